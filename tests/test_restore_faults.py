"""Restore under faults (issue 10): a target owner racing the restore with symlinks, paths longer
than PATH_MAX, objects missing from the safe (a lost pack, a removed index entry), an aborted
restore, tree entries whose size does not match their blob, and the smaller ones (messages with
bytes reprs, --path that does not exist, a directory in the way with --force)."""

from __future__ import annotations

import json
import os
import pwd
import random
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from _backup_util import backup, one_error_line, restore
from conftest import needs_root, run_cli
from pointsafe.cas import BlobBuilder, BlobReader, Entry, Kind, Safe, encode_tree, utc_now_iso
from pointsafe.cas.tree import DIR, LNK, REG
from pointsafe.ingest.browse import lookup

TMP_PREFIX = ".pointsafe-restore."


# -- helpers ----------------------------------------------------------------------------------

def _all_names(top: Path) -> list[str]:
    """Every path below ``top`` (relative, as text), walked without following symlinks."""
    out = []
    for dirpath, dirnames, filenames in os.walk(top):
        for n in dirnames + filenames:
            out.append(os.path.relpath(os.path.join(dirpath, n), top))
    return out


def _temp_files(top: Path) -> list[str]:
    return [p for p in _all_names(top) if os.path.basename(p).startswith(TMP_PREFIX)]


class _Points:
    """Write crafted points straight through the cas API (as backup does)."""

    def __init__(self, safe: Safe, w):
        self.safe, self.w = safe, w

    def blob(self, *chunks: bytes) -> bytes:
        bb = BlobBuilder(self.w.put_node, self.safe.config.list_fanout)
        for c in chunks:
            bb.add(self.w.put(Kind.CHUNK, c), len(c))
        return bb.finish()

    def file(self, name: bytes, data: bytes, size: int | None = None, **kw) -> Entry:
        return Entry(name, REG, kw.pop("mode", 0o644), size=len(data) if size is None else size,
                     ref=self.blob(data) if data else None, **kw)

    def tree(self, entries: list[Entry]) -> bytes:
        children, payload = encode_tree(entries)
        return self.w.put_node(Kind.TREE, children, payload)

    def point(self, name: str, root: bytes) -> str:
        now = utc_now_iso()
        rec = self.w.add_point({"name": name, "kind": "tree", "source": "/crafted", "host": "h",
                                "started": now, "finished": now, "size": 0, "warnings": [],
                                "stats": {"files": 0, "bytes_read": 0, "bytes_new": 0, "bytes_stored": 0},
                                "root_meta": {"mode": 0o755, "uid": 0, "gid": 0, "mtime_ns": 0,
                                              "atime_ns": 0, "xattrs": []}}, root)
        return rec["id"]


def _warnings(r) -> dict[str, str]:
    return {w["path"]: w["message"] for w in json.loads(r.out)["warnings"]}


def _drop_index_entry(safe_dir: Path, key: bytes) -> None:
    """What a repair that lost an object leaves: the index no longer knows ``key``."""
    with Safe.open(safe_dir) as safe, safe.index.write() as txn:
        assert txn.delete(key, db=safe.index.db["objects"])


# -- 1. the restore race ----------------------------------------------------------------------

def _attacker(target: Path, outside: Path, uid: int, gid: int, deadline: float) -> int:
    """Fork a process running as ``uid`` that keeps replacing every directory it finds at the
    top of ``target`` by a symlink to ``outside`` (the directory itself is moved aside)."""
    pid = os.fork()
    if pid:
        return pid
    try:
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)
        n = 0
        while time.monotonic() < deadline:
            try:
                names = os.listdir(target)
            except OSError:
                continue
            for name in names:
                if not name.startswith("d"):
                    continue
                p = os.path.join(target, name)
                try:
                    if stat.S_ISDIR(os.lstat(p).st_mode):
                        os.rename(p, os.path.join(target, f"moved-{n}"))
                        n += 1
                        os.symlink(outside, p)
                except OSError:
                    pass
    finally:
        os._exit(0)


@needs_root
def test_target_owner_cannot_redirect_restore_with_symlinks(safe_dir, tmp_path):
    """The owner of the restore target swaps its directories for symlinks to a root-owned
    directory while root restores: nothing may be written outside the target."""
    try:
        user = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user 'nobody' to race the restore with")
    src = tmp_path / "src"
    for i in range(12):
        d = src / f"d{i:02}"
        (d / "sub").mkdir(parents=True)
        for j in range(150):
            (d / f"f{j:03}").write_bytes(b"x" * (j + 1))
        (d / "sub" / "inner").write_text("inner")
        os.symlink("f000", d / "link")
        os.mkfifo(d / "fifo")
    p = backup(safe_dir, src, "-q")
    base = Path(tempfile.mkdtemp(prefix="pointsafe-race-"))
    try:
        os.chmod(base, 0o755)           # the user can reach the target; not write next to it
        outside = base / "outside"      # root's: only root can have written here
        outside.mkdir(mode=0o755)
        swapped = 0
        for attempt in range(4):
            target = base / f"t{attempt}"
            target.mkdir()
            os.chown(target, user.pw_uid, user.pw_gid)
            pid = _attacker(target, outside, user.pw_uid, user.pw_gid, time.monotonic() + 120)
            try:
                r = run_cli("restore", p["id"], target, "--json", safe=safe_dir)
            finally:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            strays = os.listdir(outside)
            assert strays == [], f"restore wrote {len(strays)} entries outside the target: {sorted(strays)[:5]}"
            assert "Traceback" not in r.err, r.err
            assert r.code in (0, 3), (r.code, r.err)
            swapped += sum(1 for n in os.listdir(target) if n.startswith("moved-"))
            assert _temp_files(target) == []
        assert swapped, "the race never happened: the test proved nothing"
    finally:
        shutil.rmtree(base)
