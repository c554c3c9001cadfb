"""Helpers for the FUSE tests: a mount that always goes away, a tree with every entry type,
and a walker that records everything a user could compare between two trees."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

from conftest import run_cli

MOUNT_TIMEOUT = 30.0


def unmount(mp: Path | str) -> None:
    subprocess.run(["fusermount3", "-u", "-z", str(mp)], capture_output=True, timeout=30)


def is_mounted(mp: Path | str) -> bool:
    mp = os.path.realpath(mp)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == mp for line in f)


def wait_gone(pid: int, timeout: float = MOUNT_TIMEOUT) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.02)
    return False


@contextmanager
def mounted(safe: Path, mp: Path, *args, log: Path | None = None):
    """``pointsafe mount`` in the background; yields the --json answer; always unmounts."""
    mp.mkdir(parents=True, exist_ok=True)
    log = log or mp.parent / (mp.name + ".log")
    info = None
    try:
        r = run_cli("mount", mp, *args, "--log", log, "--json", safe=safe, timeout=MOUNT_TIMEOUT * 2)
        assert r.code == 0, f"mount failed ({r.code}): {r.err}"
        info = json.loads(r.out)
        assert is_mounted(mp)
        yield info
    finally:
        unmount(mp)
        if info is not None:
            assert wait_gone(info["pid"]), "the mount process did not exit after unmounting"


def stats(mp: Path) -> dict:
    return json.loads(os.getxattr(mp, "user.pointsafe.stats"))


# -- a tree with every entry type -------------------------------------------------------------

def make_tree(root: Path) -> None:
    """Regular, empty, multi-chunk, sparse and hardlinked files, symlinks, a FIFO, device nodes,
    odd modes and owners, xattrs, POSIX ACLs, a non-UTF-8 name and set times."""
    root.mkdir(parents=True)
    (root / "hello.txt").write_text("hello\n")
    (root / "empty").write_bytes(b"")
    rnd = os.urandom(700_000)
    (root / "big.bin").write_bytes(rnd + b"text " * 100_000 + rnd[:12345])
    with open(root / "sparse.img", "wb") as f:
        f.truncate(5 << 20)
        f.seek(2 << 20)
        f.write(b"middle" * 1000)
    d = root / "dir" / "deeper"
    d.mkdir(parents=True)
    (d / "leaf").write_bytes(b"leaf data\n" * 10)
    os.link(root / "hello.txt", root / "dir" / "hello-hardlink")
    os.link(root / "big.bin", d / "big-hardlink")
    os.symlink("hello.txt", root / "link-rel")
    os.symlink("/nonexistent/target", root / "link-dangling")
    os.symlink("../../big.bin", d / "link-up")
    os.mkfifo(root / "fifo")
    os.mknod(root / "chardev", 0o644 | stat.S_IFCHR, os.makedev(1, 3))
    os.mknod(root / "blockdev", 0o600 | stat.S_IFBLK, os.makedev(7, 200))
    (root / "secret").write_text("owner only\n")
    os.chmod(root / "secret", 0o600)
    (root / "setuid").write_text("#!/bin/sh\n")
    os.chmod(root / "setuid", 0o4755)
    (root / "sticky").mkdir()
    os.chmod(root / "sticky", 0o1777)
    (root / "owned").write_text("someone else's\n")
    os.chown(root / "owned", 1234, 5678)
    os.setxattr(root / "hello.txt", "user.comment", b"greeting")
    os.setxattr(root / "dir", "user.empty", b"")
    os.setxattr(root / "big.bin", "user.bin", bytes(range(256)))
    subprocess.run(["setfacl", "-m", "u:1234:r--,g:5678:rw-", str(root / "hello.txt")], check=True)
    subprocess.run(["setfacl", "-d", "-m", "u:1234:rwx", str(root / "dir")], check=True)
    (root / os.fsdecode(b"caf\xe9-latin1")).write_bytes(b"non-utf8 name\n")
    (root / "empty-dir").mkdir()
    for i, p in enumerate(sorted(root.rglob("*"), key=lambda p: len(p.parts), reverse=True)):
        os.utime(p, ns=(1_600_000_000_000_000_000 + i * 1_000_000_123, 1_500_000_000_000_000_000 + i * 7_000_000_001),
                 follow_symlinks=False)


def walk(root: Path, content: bool = True, atime: bool = False) -> dict:
    """Everything comparable about a tree: per relative path its type, mode, owner, size, mtime,
    link count, device numbers, symlink target, xattrs (incl. ACLs), content hash, and which
    paths are hardlinks of one another."""
    out: dict = {}
    by_ino: dict[int, list[str]] = {}
    rootb = os.fsencode(root)
    for dirpath, dirnames, filenames in os.walk(rootb):
        for name in dirnames + filenames + ([b"."] if dirpath == rootb else []):
            p = os.path.join(dirpath, name) if name != b"." else dirpath
            rel = os.path.relpath(p, rootb)
            st = os.lstat(p)
            rec = {"mode": oct(st.st_mode), "uid": st.st_uid, "gid": st.st_gid,
                   "mtime_ns": st.st_mtime_ns if rel != b"." else None}
            if atime:
                rec["atime_ns"] = st.st_atime_ns
            if not stat.S_ISDIR(st.st_mode):
                rec["size"] = st.st_size
                rec["nlink"] = st.st_nlink
            if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                rec["rdev"] = (os.major(st.st_rdev), os.minor(st.st_rdev))
            if stat.S_ISLNK(st.st_mode):
                rec["target"] = os.readlink(p)
            else:
                rec["xattrs"] = sorted((n, os.getxattr(p, n, follow_symlinks=False).hex())
                                       for n in os.listxattr(p, follow_symlinks=False))
            if stat.S_ISREG(st.st_mode):
                if content:
                    h = hashlib.blake2b()
                    with open(p, "rb") as f:
                        while chunk := f.read(1 << 20):
                            h.update(chunk)
                    rec["sha"] = h.hexdigest()
                if st.st_nlink > 1:
                    by_ino.setdefault(st.st_ino, []).append(rel.decode(errors="surrogateescape"))
            out[rel] = rec
    out["__hardlinks__"] = sorted(sorted(v) for v in by_ino.values())
    return out
