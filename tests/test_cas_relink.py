"""After ``repair`` found objects lost, the next backup stores them again and they count again:
the safe verifies and every point restores whole once the source has been backed up anew."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

from pointsafe.cas import BlobReader, Kind, Safe
from pointsafe.cas.index import ObjectEntry

from conftest import PW, run_cli


def _chunks_of(safe: Safe, point_id: str, name: bytes) -> set[bytes]:
    from pointsafe.ingest.browse import lookup
    e = lookup(safe, safe.point(point_id), name)
    r = BlobReader(e.ref, e.size, safe.get, lambda k: safe.entry(k).kind)
    return {k for _, _, k in r.extents() if k is not None}


def _lose_a_chunk_pack(safe_dir: Path, point_id: str, name: bytes) -> None:
    """Delete one pack that holds a chunk of file ``name`` and nothing but chunks."""
    with Safe.open(safe_dir, password=PW) as safe:
        chunks = _chunks_of(safe, point_id, name)
        by_pack: dict[int, set[int]] = {}
        with safe.index.read() as t:
            for _, v in t.cursor(db=safe.index.db["objects"]):
                e = ObjectEntry.decode(v)
                by_pack.setdefault(e.pack, set()).add(e.kind)
        packs = sorted({safe.entry(k).pack for k in chunks} & {p for p, kinds in by_pack.items() if kinds == {Kind.CHUNK}})
        assert packs, "no pack holds only chunks of that file: make it bigger"
        os.unlink(safe.pack_path(packs[0]))


def test_a_backup_after_a_lossy_repair_makes_the_safe_whole_again(tmp_path):
    rng = random.Random(5)
    src = tmp_path / "src"
    src.mkdir()
    files = {f"f{i}": rng.randbytes(400_000) for i in range(3)}
    for n, data in files.items():
        (src / n).write_bytes(data)
    safe = tmp_path / "safe"
    assert run_cli("init", safe, "--pack-size", "64K").code == 0
    first = json.loads(run_cli("backup", src, "--name", "src", "--json", "-q", safe=safe, check=True).out)
    pid = first.get("id") or first["point"]["id"]
    _lose_a_chunk_pack(safe, pid, b"f1")

    r = run_cli("repair", safe=safe)
    assert r.code == 1 and "missing" in r.out + r.err, r.out + r.err
    assert run_cli("verify", safe=safe).code == 1
    assert run_cli("restore", pid, tmp_path / "before", safe=safe).code == 3   # f1 is lost for now

    # The source still holds f1: the next backup reads it whole and stores the lost chunk again.
    assert run_cli("backup", src, "--name", "src", safe=safe).code == 0
    r = run_cli("verify", "--data", safe=safe)
    assert r.code == 0, r.out + r.err
    for p in json.loads(run_cli("points", "--json", safe=safe, check=True).out):
        out = tmp_path / ("r-" + p["id"][:8])
        assert run_cli("restore", p["id"], out, safe=safe).code == 0
        for n, data in files.items():
            assert (out / n).read_bytes() == data
    # The counts are right: forgetting the old point and collecting keeps the new one whole.
    assert run_cli("forget", pid, safe=safe).code == 0
    assert run_cli("gc", "--threshold", "0", safe=safe).code == 0
    assert run_cli("verify", "--data", safe=safe).code == 0
    out = tmp_path / "after-gc"
    assert run_cli("restore", "latest", out, safe=safe).code == 0
    assert all((out / n).read_bytes() == data for n, data in files.items())


def test_a_damaged_point_can_be_forgotten_after_repair(tmp_path):
    rng = random.Random(6)
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(rng.randbytes(400_000))
    (src / "g").write_bytes(rng.randbytes(50_000))
    safe = tmp_path / "safe"
    assert run_cli("init", safe, "--pack-size", "64K").code == 0
    first = json.loads(run_cli("backup", src, "--name", "src", "--json", "-q", safe=safe, check=True).out)
    pid = first.get("id") or first["point"]["id"]
    _lose_a_chunk_pack(safe, pid, b"f")
    run_cli("repair", safe=safe)
    r = run_cli("forget", pid, safe=safe)
    assert r.code == 0, r.err
    assert run_cli("gc", safe=safe).code == 0
    r = run_cli("verify", safe=safe)
    assert r.code == 0, r.out + r.err
