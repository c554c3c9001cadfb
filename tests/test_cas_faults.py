"""Faults of the safe found by trying it as a hostile user would (issue 10): repair must not
destroy intact data, a damaged header must not lock the user out, a safe is private whatever
the umask, and verify must catch a size that does not match its blob."""

from __future__ import annotations

import json
import os
import random
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import lmdb
from _backup_util import backup, one_error_line
from conftest import run_cli
from pointsafe.cas import (
    BlobBuilder,
    Entry,
    Kind,
    Safe,
    decode_list,
    encode_tree,
    read_tree,
    utc_now_iso,
)
from pointsafe.cas.pack import PACK_HEADER, REC_HEADER, pack_id_from_name
from pointsafe.cas.tree import DIR, REG

# -- helpers -----------------------------------------------------------------------------------


def _init(safe: Path, *extra: str) -> None:
    # the plain format: these tests damage header and pack bytes (encrypted safes: test_cas_encrypted.py)
    r = run_cli("init", safe, "--pack-size", "64K", "--encryption", "none", *extra)
    assert r.code == 0, r.err


def _source(root: Path, n: int = 40, seed: int = 7) -> dict[str, bytes]:
    """``n`` files of 20..60 KB of incompressible bytes (so that tiny packs hold few of them)."""
    rng = random.Random(seed)
    root.mkdir(parents=True)
    files = {}
    for i in range(n):
        name = f"f{i:02d}.bin"
        data = rng.randbytes(rng.randint(20_000, 60_000))
        (root / name).write_bytes(data)
        files[name] = data
    return files


def _objects_of_files(safe_dir: Path, point_id: str) -> dict[str, set[bytes]]:
    """For each file of the point's root directory, every object its content needs."""
    out = {}
    with Safe.open(safe_dir) as safe:
        root = safe.point(point_id).root
        for e in read_tree(safe.get, root):
            keys: set[bytes] = set()
            todo = [e.ref] if e.ref else []
            while todo:
                k = todo.pop()
                keys.add(k)
                if safe.entry(k).kind == Kind.LIST:
                    todo.extend(c for c in decode_list(safe.get(k)).keys if c is not None)
            out[e.name.decode()] = keys
    return out


def _records(pack: Path) -> list[tuple[int, int, bytes, int]]:
    """(offset, kind, key, record length) of every record of an intact pack."""
    data = pack.read_bytes()
    off, out = PACK_HEADER.size, []
    while off < len(data):
        _, kind, _, _, key, _, stored, _, _ = REC_HEADER.unpack_from(data, off)
        out.append((off, kind, key, 64 + stored))
        off += 64 + stored
    return out


def _flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x40]))


def _restore_each(safe: Path, point: str, names, target: Path) -> dict[str, int]:
    """Restore every file on its own (a missing object fails only its file); exit codes.
    (How restore reports a missing object is ingest/restore.py's business, not checked here.)"""
    codes = {}
    for name in names:
        r = run_cli("restore", point, target / name, "--path", name, safe=safe)
        codes[name] = r.code
    return codes


# -- 1. repair destroys intact data --------------------------------------------------------------


def test_repair_keeps_records_after_a_damaged_header(tmp_path):
    """One flipped byte in a pack header and one in a record header in the middle of another pack:
    repair reports both regions, shortens no pack, and every file whose records are intact
    restores byte-identical."""
    safe = tmp_path / "safe"
    _init(safe)
    files = _source(tmp_path / "src")
    point = backup(safe, tmp_path / "src", name="data")["id"]
    needs = _objects_of_files(safe, point)
    packs = sorted((safe / "packs").glob("*.pack"))
    layout = {p: _records(p) for p in packs}
    # A pack whose first record is a chunk followed by more records: damage that header.
    victim, rec = next((p, recs[0]) for p, recs in layout.items() if len(recs) >= 2 and recs[0][1] == Kind.CHUNK)
    head_pack = next(p for p, recs in layout.items() if p != victim and len(recs) >= 2)
    sizes = {p: p.stat().st_size for p in packs}
    _flip(head_pack, 3)                    # the pack magic
    _flip(victim, rec[0] + 20)             # inside the record's key: its header CRC fails
    lost_key = rec[2]
    broken = {n for n, keys in needs.items() if lost_key in keys}
    assert len(broken) == 1

    # verify reports both regions and goes on checking the records after them.
    r = run_cli("verify", "--json", safe=safe)
    assert r.code == 1, r.err
    rep = json.loads(r.out)
    msgs = [e["message"] for e in rep["errors"]]
    assert any(victim.name in m and f"bytes {rec[0]}..{rec[0] + rec[3]}" in m for m in msgs), msgs
    assert any(head_pack.name in m and "pack magic" in m for m in msgs), msgs
    assert rep["objects"] == sum(len(v) for v in layout.values()) - 1

    r = run_cli("repair", "--json", safe=safe)
    assert r.code == 1 and "Traceback" not in r.err, r.err
    rep = json.loads(r.out)
    assert rep["truncated"] == []
    damaged = {(d["pack"], d["offset"], d["bytes"]) for d in rep["damaged"]}
    assert (victim.name, rec[0], rec[3]) in damaged and (head_pack.name, 0, 16) in damaged, rep["damaged"]
    assert rep["objects"] == sum(len(v) for v in layout.values()) - 1
    for p in packs:
        assert p.stat().st_size == sizes[p], f"{p.name} changed size"
    assert (head_pack.read_bytes()[:16] == PACK_HEADER.pack(b"PSPACK\x00\x01", pack_id_from_name(head_pack.name)))

    codes = _restore_each(safe, point, files, tmp_path / "out")
    for name, data in files.items():
        if name in broken:
            assert codes[name] != 0
        else:
            assert codes[name] == 0, name
            assert (tmp_path / "out" / name / name).read_bytes() == data, name

    # After repair verify still names the region it cannot read and the object lost with it,
    # and nothing else.
    r = run_cli("verify", "--json", safe=safe)
    rep = json.loads(r.out)
    assert r.code == 1
    region = [e for e in rep["errors"] if e.get("pack") == victim.name and e.get("bytes") == rec[3]]
    assert len(region) == 1, rep["errors"]
    others = [e for e in rep["errors"] if e not in region]
    assert others and all(lost_key.hex()[:12] in e["message"] for e in others), others


def test_repair_still_cuts_a_torn_tail(tmp_path):
    """A torn last record (a crashed writer's) is the one thing repair truncates."""
    safe = tmp_path / "safe"
    _init(safe)
    _source(tmp_path / "src", n=4)
    backup(safe, tmp_path / "src", name="data")
    pack = max((safe / "packs").glob("*.pack"))
    size = pack.stat().st_size
    last = _records(pack)[-1]
    data = pack.read_bytes()
    with open(pack, "ab") as f:   # a whole record header, then 10 of its stored bytes
        f.write(data[last[0]:last[0] + 74])
    r = run_cli("repair", "--json", safe=safe)
    assert r.code == 0, r.out + r.err
    assert json.loads(r.out)["truncated"] == [{"pack": pack.name, "offset": size, "bytes": 74}]
    assert pack.stat().st_size == size
    assert run_cli("verify", safe=safe).code == 0


# -- 2. one flipped byte in the header locks the user out ----------------------------------------


def _small_safe(tmp_path: Path) -> tuple[Path, str, dict[str, bytes]]:
    safe = tmp_path / "safe"
    _init(safe, "--compression", "zstd:7")
    files = _source(tmp_path / "src", n=3)
    point = backup(safe, tmp_path / "src", name="data")["id"]
    return safe, point, files


def _restores(safe: Path, point: str, files: dict[str, bytes], target: Path) -> None:
    r = run_cli("restore", point, target, safe=safe)
    assert r.code == 0, r.err
    for name, data in files.items():
        assert (target / name).read_bytes() == data


def test_damaged_header_uses_the_copy_and_repair_rewrites_it(tmp_path):
    safe, point, files = _small_safe(tmp_path)
    good = (safe / "header").read_bytes()
    _flip(safe / "header", 30)
    r = run_cli("points", safe=safe)
    assert r.code == 0 and point[:12] in r.out, r.err
    warn = [line for line in r.err.splitlines() if "header" in line]
    assert len(warn) == 1 and "header.copy" in warn[0] and "repair" in warn[0], r.err
    _restores(safe, point, files, tmp_path / "out1")
    r = run_cli("verify", safe=safe)
    assert r.code == 1 and "header is corrupt" in r.out, r.out

    r = run_cli("repair", "--json", safe=safe)
    assert r.code == 0, r.err
    assert "rewrote header from header.copy" in json.loads(r.out)["header"]
    assert (safe / "header").read_bytes() == good == (safe / "header.copy").read_bytes()
    r = run_cli("verify", safe=safe)
    assert r.code == 0 and r.err == "", r.out + r.err

    # A missing header, and a damaged copy, are rebuilt the same way.
    (safe / "header").unlink()
    _flip(safe / "header.copy", 0)
    assert run_cli("ls", point, safe=safe).code == 1    # neither file is usable ...
    r = run_cli("repair", "--json", safe=safe)           # ... but the index keeps a copy
    assert r.code == 0, r.err
    assert "from the copy kept in the index" in json.loads(r.out)["header"]
    assert (safe / "header").read_bytes() == good == (safe / "header.copy").read_bytes()
    with Safe.open(safe) as s:
        assert s.config.compression == "zstd:7"


def _as_version_2(safe: Path) -> None:
    """Make a safe look as a version-2 pointsafe made it: a version-2 header, no copy, no
    copy in the index's meta table."""
    data = (safe / "header").read_bytes()
    n = struct.unpack_from("<I", data, 12)[0]
    head = data[:8] + struct.pack("<I", 2) + data[12:16 + n]
    (safe / "header").write_bytes(head + struct.pack("<I", zlib.crc32(head)))
    (safe / "header.copy").unlink()
    env = lmdb.open(str(safe / "index"), max_dbs=64)
    with env.begin(write=True) as t:
        t.delete(b"header", db=env.open_db(b"meta", txn=t))
    env.close()


def test_version_2_safe_is_read_and_repaired(tmp_path):
    safe, point, files = _small_safe(tmp_path)
    _as_version_2(safe)
    with Safe.open(safe) as s:
        safe_id = s.config.safe_id
    _restores(safe, point, files, tmp_path / "out1")
    r = run_cli("verify", safe=safe)
    assert r.code == 0 and "header.copy is missing (a version-2 safe" in r.out, r.out

    _flip(safe / "header", 30)
    one_error_line(run_cli("points", safe=safe), "header is corrupt")
    r = run_cli("repair", "--json", safe=safe)
    assert r.code == 0, r.err
    assert "default settings and a new safe id" in json.loads(r.out)["header"]
    assert (safe / "header").read_bytes() == (safe / "header.copy").read_bytes()
    with Safe.open(safe) as s:
        assert s.config.safe_id != safe_id and s.config.compression == "zstd:1"
    _restores(safe, point, files, tmp_path / "out2")
    assert run_cli("verify", safe=safe).code == 0


# -- 5. a size that does not match its blob --------------------------------------------------------


def _crafted_point(safe_dir: Path, name: str, kind: str = "tree") -> str:
    """A point whose tree entries (or, for a volume, whose record) declare wrong sizes:
    sub/short says 100 bytes more than its one-chunk blob, sub/long 7 bytes fewer than its
    two-chunk LIST blob; 'ok' is right."""
    with Safe.open(safe_dir) as safe, safe.writer("crafted test") as w:
        def blob(*parts: bytes) -> bytes:
            bb = BlobBuilder(w.put_node, 2)
            for p in parts:
                bb.add(w.put(Kind.CHUNK, p), len(p))
            return bb.finish()

        def tree(entries: list[Entry]) -> bytes:
            children, payload = encode_tree(entries)
            return w.put_node(Kind.TREE, children, payload)

        one, a, b = os.urandom(5000), os.urandom(3000), os.urandom(4000)
        if kind == "volume":
            return _add_point(w, name, kind, blob(a, b), 9999)
        sub = tree([Entry(b"long", REG, 0o644, size=7000 - 7, ref=blob(a, b, a[:1])),
                    Entry(b"short", REG, 0o644, size=5100, ref=blob(one))])
        root = tree([Entry(b"ok", REG, 0o644, size=3000, ref=blob(a)), Entry(b"sub", DIR, 0o755, ref=sub)])
        return _add_point(w, name, kind, root, 0)


def _add_point(w, name: str, kind: str, root: bytes, size: int) -> str:
    now = utc_now_iso()
    rec = w.add_point({"name": name, "kind": kind, "source": "/crafted", "host": "h",
                       "started": now, "finished": now, "size": size, "warnings": [],
                       "stats": {}, "root_meta": {"mode": 0o755, "uid": 0, "gid": 0,
                                                  "mtime_ns": 0, "atime_ns": 0, "xattrs": []}}, root)
    return rec.id


def test_verify_reports_a_size_that_does_not_match_its_blob(tmp_path):
    safe = tmp_path / "safe"
    _init(safe)
    _source(tmp_path / "src", n=3)
    backup(safe, tmp_path / "src", name="honest")
    assert run_cli("verify", "--data", safe=safe).code == 0
    pid = _crafted_point(safe, "crafted")
    vid = _crafted_point(safe, "disk", kind="volume")
    r = run_cli("verify", "--data", safe=safe)
    assert r.code == 1, r.out
    errors = [line for line in r.out.splitlines() if line.startswith("ERROR")]
    assert len(errors) == 3, r.out
    assert any(f"crafted ({pid[:12]})" in e and "/sub/short" in e and "says 5100 bytes" in e
               and "blob of 5000 bytes" in e for e in errors), errors
    assert any(f"crafted ({pid[:12]})" in e and "/sub/long" in e and "says 6993 bytes" in e
               and "blob of 7001 bytes" in e for e in errors), errors
    assert any(f"disk ({vid[:12]})" in e and "9999 bytes" in e and "holds 7000" in e for e in errors), errors


# -- 3. a safe made by root is readable by every local user ----------------------------------------


def _cli_with_umask(umask: int, *args) -> subprocess.CompletedProcess:
    code = f"import os, sys; os.umask({umask:#o}); from pointsafe.cli.main import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, timeout=300,
                          check=False)


def _modes(safe: Path) -> dict[str, int]:
    return {str(p.relative_to(safe)) or ".": p.stat().st_mode & 0o777
            for p in [safe, *safe.rglob("*")]}


def test_a_new_safe_is_private_whatever_the_umask(tmp_path):
    safe = tmp_path / "safe"
    r = _cli_with_umask(0o022, "init", safe, "--encryption", "none")
    assert r.returncode == 0, r.stderr
    modes = _modes(safe)
    assert set(modes) == {".", "packs", "index", "index/data.mdb", "index/lock.mdb", "header",
                          "header.copy", "lock", "reserve"}
    assert {n: m for n, m in modes.items()} == {n: 0o700 if n in (".", "packs", "index") else 0o600
                                                 for n in modes}
    # An existing empty directory becomes private too.
    (tmp_path / "empty").mkdir(mode=0o755)
    assert _cli_with_umask(0o022, "init", tmp_path / "empty").returncode == 0
    assert (tmp_path / "empty").stat().st_mode & 0o777 == 0o700

    # verify notes a safe that others can read, without failing.
    r = run_cli("verify", safe=safe)
    assert r.code == 0 and "group or others" not in r.out, r.out
    os.chmod(safe, 0o755)
    os.chmod(safe / "index" / "data.mdb", 0o644)
    r = run_cli("verify", safe=safe)
    assert r.code == 0, r.out
    notes = [line for line in r.out.splitlines() if "group or others may read" in line]
    assert len(notes) == 1 and "the safe directory" in notes[0] and "index/data.mdb" in notes[0], r.out


def test_packs_written_later_are_private(tmp_path):
    safe = tmp_path / "safe"
    assert _cli_with_umask(0o022, "init", safe, "--pack-size", "64K", "--encryption", "none").returncode == 0
    _source(tmp_path / "src", n=4)
    r = _cli_with_umask(0o022, "backup", tmp_path / "src", "--safe", safe)
    assert r.returncode == 0, r.stderr
    packs = list((safe / "packs").iterdir())
    assert len(packs) >= 2
    assert {p.stat().st_mode & 0o777 for p in packs} == {0o600}


def test_size_check_holds_when_the_audit_spills_to_disk(tmp_path, monkeypatch):
    """The declared lengths are merged like the counts: spilling after every entry changes nothing."""
    from pointsafe.cas import audit as audit_mod
    from pointsafe.cas import verify
    safe = tmp_path / "safe"
    Safe.init(safe, pack_size=64 * 1024).close()
    pid = _crafted_point(safe, "crafted")
    monkeypatch.setattr(audit_mod, "FLUSH_ENTRIES", 1)
    with Safe.open(safe) as s:
        rep = verify(s)
    sizes = [e["message"] for e in rep.errors if e["message"].startswith("blob size:")]
    assert len(sizes) == 2 and all(f"crafted ({pid[:12]})" in m for m in sizes), rep.errors
    assert rep.refcounts["problems"] == 2


# -- 4 (in process). an index without the newer tables opens read-only ----------------------------


def test_an_old_index_without_newer_tables_opens_read_only(tmp_path):
    safe = tmp_path / "safe"
    _init(safe)
    _source(tmp_path / "src", n=2)
    point = backup(safe, tmp_path / "src", name="data")["id"]
    env = lmdb.open(str(safe / "index"), max_dbs=64)
    with env.begin(write=True) as t:
        for name in (b"tombstones", b"files", b"tasks_running", b"alert_latches", b"config"):
            try:
                t.drop(env.open_db(name, txn=t, create=False), delete=True)
            except lmdb.NotFoundError:
                pass
    env.close()
    with Safe.open(safe, write=False) as s:
        assert s.index.existing("tombstones") is None
        assert [p.id for p in s.points()] == [point]
    r = run_cli("verify", safe=safe)
    assert r.code == 0, r.out + r.err
    r = run_cli("ls", point, safe=safe)
    assert r.code == 0 and "f00.bin" in r.out, r.err


def test_header_files_of_another_safe_are_found_by_verify_and_undone_by_repair(tmp_path):
    """Both header files replaced by another safe's (good and alike): verify compares them
    with the copy in the index, and repair puts the safe's own header back."""
    mine, other = tmp_path / "mine", tmp_path / "other"
    for s in (mine, other):
        assert run_cli("init", s, "--encryption", "none").code == 0
    own = (mine / "header").read_bytes()
    for name in ("header", "header.copy"):
        shutil.copy(other / name, mine / name)
    r = run_cli("verify", safe=mine)
    assert r.code == 1 and "differ from the copy kept in the index" in r.out + r.err, r.out + r.err
    assert run_cli("repair", safe=mine).code == 0
    assert (mine / "header").read_bytes() == own and (mine / "header.copy").read_bytes() == own
    assert run_cli("verify", safe=mine).code == 0
