"""An agent's btrfs tree incrementals walk only what changed, as local ones (issue 17 with issue
12): the agent has the previous point's retained snapshot on its machine and reads that point's
trees from the server. Real ``pointsafe serve`` on loopback, real loop btrfs.

Two agents back up the same subvolume: one incrementally, the other with ``--full-read``; both
ids are the agents' plain ids, so their roots compare directly.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import time
from pathlib import Path

from _server_util import add_agent, agent, backup_json, make_safe, running, safe_state
from _tree_util import assert_trees_equal, snapshot
from btrfs_util import btrfs_volume, make_subvolume
from conftest import run_cli
from test_cbt_btrfs_walk import _source

MiB = 1 << 20
BIG = 24 * MiB
WRITE = 16 * 1024


def _populate(src: Path, rng: random.Random) -> None:
    (src / "big").write_bytes(rng.randbytes(BIG))
    for d in range(20):
        (src / f"d{d:02}").mkdir()
        for i in range(50):
            (src / f"d{d:02}" / f"f{i:02}").write_bytes(rng.randbytes(100 + (d * 50 + i) % 1900))
    (src / "dir1" / "inner").mkdir(parents=True)
    (src / "dir1" / "inner" / "keep").write_bytes(rng.randbytes(MiB))
    (src / "gone").write_bytes(b"g" * 3000)
    os.symlink("big", src / "sym")
    time.sleep(0.05)            # past the coarse clock's tick: the read below moves atime after ctime ...
    os.readlink(src / "sym")    # ... so that it settles (relatime) before the first point, not on a later look


def _change(src: Path, rng: random.Random) -> tuple[int, int]:
    """Scattered writes in place, a rename, a deletion, metadata changes; returns (bytes written
    in place, bytes of files read whole)."""
    written = whole = 0
    with open(src / "big", "r+b") as f:
        for k in range(16):
            f.seek((k * (BIG // 16) + rng.randrange(0, BIG // 16 - WRITE)) // 4096 * 4096)
            f.write(rng.randbytes(WRITE))
            written += WRITE
    os.rename(src / "dir1", src / "dir2")          # its unchanged file is not read again
    os.unlink(src / "gone")
    os.chmod(src / "d03" / "f03", 0o600)
    os.setxattr(src / "d04" / "f04", "user.k", b"v")
    (src / "new").write_bytes(b"new" * 100)
    whole += 300
    return written, whole


def _fetches(safe: Path) -> tuple[int, int]:
    """(objects, requests) agents have fetched from the server so far (its task history)."""
    r = run_cli("tasks", "--json", safe=safe)
    assert r.code == 0, r.err
    fetches = [t for t in json.loads(r.out) if t["fields"].get("path") == "/api/v1/objects/fetch"]
    return sum(t["fields"].get("ids", 0) for t in fetches), len(fetches)


def _backup(server, tok: str, src: Path, *opts: str, code: int = 0) -> dict:
    if code == 0:
        return backup_json(server, tok, src, "--snapshot", "btrfs", *opts)
    r = agent(server, tok, "backup", src, "--json", "-q", "--snapshot", "btrfs", *opts)
    assert r.code == code, r.err
    return json.loads(r.out)


def test_agent_btrfs_incremental_walks_only_what_changed_and_equals_a_full_read(tmp_path: Path) -> None:
    rng = random.Random(17)
    safe = make_safe(tmp_path)
    inc, full = add_agent(safe, "inc", "--can-restore"), add_agent(safe, "full")
    blind = add_agent(safe, "blind")        # may not read file contents (the previous point's chunks)
    with btrfs_volume(tmp_path) as mnt, running(safe) as server:
        src = make_subvolume(mnt, "data")
        _populate(src, rng)
        first = _backup(server, inc, src)
        assert first["change_source"] == {"kind": "full", "detail": "", "fallback": None}
        assert first["walk"] == {"excludes": [], "one_file_system": False}
        _backup(server, full, src)
        _backup(server, blind, src)

        written, whole = _change(src, rng)
        p = _backup(server, inc, src)
        q = _backup(server, full, src, "--full-read")
        b = _backup(server, blind, src)
        assert b["change_source"]["kind"] == "btrfs-send" and b["warnings"] == []
        assert b["root"] == q["root"]                       # the files written in are read whole
        assert BIG <= b["stats"]["bytes_scanned"] < q["stats"]["bytes_scanned"]
        assert p["warnings"] == [] and q["warnings"] == []
        assert p["change_source"] == {"kind": "btrfs-send", "detail": first["snapshot"]["path"], "fallback": None}
        assert q["change_source"] == {"kind": "full", "detail": "--full-read", "fallback": None}
        assert p["root"] == q["root"]                       # object for object what a full read makes
        for k in ("files", "dirs", "other"):
            assert p["stats"][k] == q["stats"][k], k
        assert p["size"] == q["size"]
        assert q["stats"]["bytes_scanned"] >= BIG
        scanned = p["stats"]["bytes_scanned"]
        print(f"agent incremental scanned {scanned} B for {written} B written and {whole} B read whole")
        assert scanned <= written + whole + 64 * 1024, (scanned, written, whole)
        assert p["stats"]["files_unchanged"] >= 990
        r = agent(server, inc, "restore", p["id"], tmp_path / "out")
        assert r.code == 0, r.err
        assert_trees_equal(_source(src), snapshot(tmp_path / "out"))

        # the retained snapshot is gone: the whole tree is walked, with a warning saying why
        subprocess.run(["btrfs", "subvolume", "delete", p["snapshot"]["path"]], check=True, capture_output=True)
        (src / "d01" / "f01").write_bytes(b"changed")
        g = _backup(server, inc, src, code=3)
        assert g["change_source"]["kind"] == "full" and "gone" in g["change_source"]["fallback"]
        assert [w for w in g["warnings"] if "btrfs send not used" in w["message"] and "gone" in w["message"]]
        r = agent(server, inc, "restore", g["id"], tmp_path / "out1")
        assert r.code == 0, r.err
        assert_trees_equal(_source(src), snapshot(tmp_path / "out1"))

        # a point that fell back is a good base: the next one walks only what changed again
        (src / "d02" / "n").write_bytes(b"n")
        before = _fetches(safe)
        h = _backup(server, inc, src)
        assert h["change_source"]["kind"] == "btrfs-send" and h["warnings"] == []
        # the previous point's trees (the kept subtrees are counted from them) come in batches
        trees, requests = (a - b for a, b in zip(_fetches(safe), before))
        print(f"agent incremental: {trees} trees fetched in {requests} requests")
        assert requests <= max(4, trees // 4), (trees, requests)
        assert h["stats"]["bytes_scanned"] < 64 * 1024
        r = agent(server, inc, "restore", h["id"], tmp_path / "out2")
        assert r.code == 0, r.err
        assert_trees_equal(_source(src), snapshot(tmp_path / "out2"))


def test_a_malformed_walk_record_is_refused_and_nothing_stored(tmp_path: Path) -> None:
    safe = make_safe(tmp_path)
    tok = add_agent(safe, "evil")
    good = {"excludes": ["*.tmp"], "one_file_system": True}
    with running(safe) as server, server.client(tok) as c:
        before = safe_state(safe)
        for walk in (None, "x", [], {}, {**good, "extra": 1}, {"excludes": ["a"]}, {**good, "excludes": "a"},
                     {**good, "excludes": [1]}, {**good, "one_file_system": 1}, {**good, "excludes": ["x" * 5000]},
                     {**good, "excludes": ["a"] * 10_001}):
            body = {"name": "x", "kind": "tree", "source": "/s", "root": None, "walk": walk}
            r = c.post("/api/v1/points", json=body)
            assert r.status_code == 400, (walk, r.text)
            assert "walk" in r.text, r.text
        assert safe_state(safe) == before
        r = c.post("/api/v1/points", json={"name": "x", "kind": "tree", "source": "/s", "root": None, "walk": good})
        assert r.status_code == 200, r.text
        assert r.json()["walk"] == good
