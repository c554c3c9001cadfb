"""Faults of the tree walk found by trying the safe as a hostile user would (issue 10):
paths longer than PATH_MAX and trees deeper than Python's recursion limit are backed up
whole, with a bounded number of open descriptors; ``backup ""`` is refused; a file deleted
during the backup is "vanished during the backup"; a volume named ``disk.img`` is not shown
as ``disk.img.img``."""

from __future__ import annotations

import hashlib
import json
import os
import resource
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from _backup_util import one_error_line
from conftest import Result, run_cli
from pointsafe.cas import BlobReader, Point, Safe, resolve_point
from pointsafe.cas.tree import DIR, LNK, REG, TYPE_NAMES
from pointsafe.fusefs.layout import image_name
from pointsafe.ingest import BackupOptions
from pointsafe.ingest import backup as backup_api
from pointsafe.ingest.browse import children, root_entry

LONG = 200                 # bytes per name of the long-named levels
LONG_LEVELS = 42           # 42 * 201 > 8,400 bytes of path
DEEP_LEVELS = 1500         # then short names, deeper than Python's recursion limit (1000)
NOFILE = 256               # descriptors the backup may open (far fewer than the levels)
VANISHED = "vanished during the backup"


# -- building and reading deep trees without paths ---------------------------------------------

def _write(dir_fd: int, name: bytes, data: bytes) -> int:
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640, dir_fd=dir_fd)
    os.write(fd, data)
    return fd


def make_deep_tree(top: Path) -> int:
    """A tree whose deepest path is ~11,400 bytes over 1,542 levels, with files, a sparse file,
    a hardlink pair, symlinks, FIFOs and xattrs along the way; returns the number of file
    names (both names of the hardlink count)."""
    os.mkdir(top)
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    files = 0
    for level in range(LONG_LEVELS + DEEP_LEVELS):
        name = (b"L%03d" % level).ljust(LONG, b"x") if level < LONG_LEVELS else b"d"
        if level % 20 == 0 or level == LONG_LEVELS + DEEP_LEVELS - 1:
            f = _write(fd, b"file", b"level %d " % level * (level % 97 + 1))
            os.setxattr(f, "user.level", b"%d" % level)
            os.close(f)
            os.symlink(b"../" * 3 + b"t" * 300, b"link", dir_fd=fd)
            os.mkfifo(b"fifo", dir_fd=fd)
            files += 1
        os.mkdir(name, 0o750, dir_fd=fd)
        nfd = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = nfd
    f = _write(fd, b"sparse", b"")
    os.pwrite(f, b"end of a sparse file", 3 * 1024 * 1024)
    os.close(f)
    f = _write(fd, b"hard1", b"two names, one inode")
    os.close(f)
    os.link(b"hard1", b"hard2", src_dir_fd=fd, dst_dir_fd=fd)
    os.close(fd)
    return files + 3


def source_listing(top: Path) -> dict[tuple[bytes, ...], tuple]:
    """relative path (as name parts) -> (type, mode, size, content digest or target, xattrs)."""
    out: dict[tuple[bytes, ...], tuple] = {}
    stack = [((), os.open(top, os.O_RDONLY | os.O_DIRECTORY))]
    while stack:
        rel, fd = stack.pop()
        try:
            for n in sorted(os.fsencode(x) for x in os.listdir(fd)):
                st = os.stat(n, dir_fd=fd, follow_symlinks=False)
                key = rel + (n,)
                if stat.S_ISDIR(st.st_mode):
                    out[key] = ("dir", stat.S_IMODE(st.st_mode), 0, b"", ())
                    stack.append((key, os.open(n, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)))
                elif stat.S_ISREG(st.st_mode):
                    f = os.open(n, os.O_RDONLY, dir_fd=fd)
                    data = b""
                    while chunk := os.read(f, 1 << 20):
                        data += chunk
                    xa = tuple(sorted((os.fsencode(a), os.getxattr(f, a)) for a in os.listxattr(f)))
                    os.close(f)
                    out[key] = ("file", stat.S_IMODE(st.st_mode), st.st_size, hashlib.sha256(data).digest(), xa)
                elif stat.S_ISLNK(st.st_mode):
                    out[key] = ("symlink", stat.S_IMODE(st.st_mode), st.st_size, os.readlink(n, dir_fd=fd), ())
                else:
                    out[key] = (stat.filemode(st.st_mode)[0], stat.S_IMODE(st.st_mode), 0, b"", ())
        finally:
            os.close(fd)
    return out


def point_listing(safe: Safe, point: dict) -> dict[tuple[bytes, ...], tuple]:
    """The same, from the point (the cas API; an explicit stack, however deep)."""
    out: dict[tuple[bytes, ...], tuple] = {}
    kinds = {REG: "file", DIR: "dir", LNK: "symlink", 4: "p"}
    stack = [((), root_entry(point))]
    while stack:
        rel, d = stack.pop()
        for e in children(safe, d):
            key = rel + (e.name,)
            kind = kinds.get(e.type, TYPE_NAMES.get(e.type))
            if e.type == DIR:
                out[key] = (kind, e.mode, 0, b"", ())
                stack.append((key, e))
            elif e.type == REG:
                data = BlobReader(e.ref, e.size, safe.get, lambda k: safe.entry(k).kind).read(0, e.size)
                out[key] = (kind, e.mode, e.size, hashlib.sha256(data).digest(), tuple(sorted(e.xattrs)))
            elif e.type == LNK:
                out[key] = (kind, e.mode, e.size, e.target, ())
            else:
                out[key] = (kind, e.mode, 0, b"", ())
    return out


def remove_tree(top: Path) -> None:
    """rm -r without recursion or long paths (shutil.rmtree of Python 3.11 has both limits)."""
    if not top.exists():
        return
    stack = [(os.open(top, os.O_RDONLY | os.O_DIRECTORY), None)]
    while stack:
        fd, _ = stack[-1]
        sub = None
        for n in os.listdir(fd):
            if stat.S_ISDIR(os.stat(n, dir_fd=fd, follow_symlinks=False).st_mode):
                sub = n
                break
            os.unlink(n, dir_fd=fd)
        if sub is not None:
            stack.append((os.open(sub, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd), sub))
            continue
        os.close(fd)
        stack.pop()
        if stack:
            os.rmdir(_, dir_fd=stack[-1][0])
    os.rmdir(top)


def backup_limited(safe_dir: Path, source: Path, *extra: str) -> tuple[Result, dict]:
    """``pointsafe backup --json`` with at most NOFILE open descriptors."""
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE, NOFILE))
    env = {k: v for k, v in os.environ.items() if k != "POINTSAFE_SAFE"}
    p = subprocess.run([sys.executable, "-m", "pointsafe.cli", "--safe", str(safe_dir), "backup", str(source),
                        "--json", *extra], capture_output=True, timeout=600, env=env, preexec_fn=limit,
                       check=False)
    r = Result(p.returncode, p.stdout.decode(errors="replace"), p.stderr.decode(errors="replace"))
    assert "Traceback" not in r.err, r.err
    return r, (json.loads(r.out) if r.out.strip() else {})


# -- 1. paths longer than PATH_MAX -----------------------------------------------------------

def test_paths_longer_than_path_max_and_deeper_than_recursion_are_backed_up_whole(safe_dir, tmp_path):
    src = tmp_path / "src"
    try:
        nfiles = make_deep_tree(src)
        want = source_listing(src)
        deepest = max(len(b"/".join(k)) for k in want)
        assert deepest > 8000 and max(len(k) for k in want) > 1500
        r, point = backup_limited(safe_dir, src)
        assert r.code == 0, r.err
        assert point["warnings"] == []
        assert point["stats"]["files"] == nfiles
        with Safe.open(safe_dir) as safe:
            got = point_listing(safe, resolve_point(safe, point["id"]))
        missing = sorted(set(want) - set(got), key=len)
        assert not missing, f"{len(missing)} entries missing, first at depth {len(missing[0])}"
        assert got == want

        # Change detection works at every depth: nothing is read again, nothing is written.
        r2, again = backup_limited(safe_dir, src)
        assert r2.code == 0, r2.err
        assert again["stats"]["bytes_read"] == 0
        assert again["stats"]["files_unchanged"] == nfiles - 1   # hard2: a link to hard1
        assert again["stats"]["objects_new"] == 0
    finally:
        remove_tree(src)


def make_chain(src: Path, depth: int) -> Path:
    """src/d/d/.../d (``depth`` levels), each level also holding an empty file ``zz`` (after
    ``d``: its turn comes when the walk climbs back), the deepest one an 8 MiB file."""
    level = src
    for _ in range(depth):
        level.mkdir()
        (level / "zz").write_bytes(b"")      # empty: never read ahead, opened when its turn comes
        level = level / "d"
    level.mkdir()
    (level / "big").write_bytes(os.urandom(8 << 20))
    return level


def zz_levels(safe: Safe, point: dict) -> list[int]:
    """The levels whose ``zz`` is in the point."""
    out, e, i = [], root_entry(point), 0
    while True:
        names = {c.name: c for c in children(safe, e)}
        if b"zz" in names:
            out.append(i)
        if b"d" not in names:
            return out
        e, i = names[b"d"], i + 1


def test_a_subtree_removed_under_the_walk_is_vanished_entries(safe, tmp_path, monkeypatch):
    """``rm -r`` of an ancestor while a file deep below it is read: each entry listed below it
    and not read yet is "vanished during the backup"; everything above is backed up. The walk
    keeps only the deepest directories open (here 8) and climbs back through ``..``."""
    from pointsafe.ingest import walk
    monkeypatch.setattr(walk, "MAX_DIR_FDS", 8)
    src = tmp_path / "src"
    make_chain(src, 30)
    removed = src.joinpath(*["d"] * 10)
    gone: list[bool] = []

    def progress(nbytes: int) -> None:
        if not gone:
            gone.append(True)
            remove_tree(removed)

    res = backup_api(safe, str(src), BackupOptions(), progress=progress)
    assert gone
    got = sorted((w["path"], w["message"]) for w in res.warnings)
    assert got == sorted((str(src.joinpath(*["d"] * i, "zz")), VANISHED) for i in range(10, 30))
    assert zz_levels(safe, res.point) == list(range(10))


def test_a_closed_ancestor_moved_away_is_one_warning_and_the_rest_is_backed_up(safe, tmp_path, monkeypatch):
    """The subtree being walked is moved elsewhere and an ancestor renamed while a file deep
    below is read: the walk climbs the moved subtree through ``..`` (checked by device and
    inode) and backs up all of it; the ancestors it had closed cannot be found again by
    name: one warning names the first, and what it had not read of them is not in the point."""
    from pointsafe.ingest import walk
    monkeypatch.setattr(walk, "MAX_DIR_FDS", 8)
    src = tmp_path / "src"
    make_chain(src, 30)
    moved: list[bool] = []

    def progress(nbytes: int) -> None:
        if not moved:
            moved.append(True)
            os.rename(src.joinpath(*["d"] * 10), src / "elsewhere")
            os.rename(src / "d", src / "renamed")

    res = backup_api(safe, str(src), BackupOptions(), progress=progress)
    assert moved
    assert [(w["path"], w["message"].split(";")[0]) for w in res.warnings] == [
        (str(src / "d"), "moved or removed during the backup")]
    assert zz_levels(safe, res.point) == [0] + list(range(10, 30))


# -- 2. an empty source ----------------------------------------------------------------------

def test_an_empty_source_is_refused_not_the_current_directory(safe_dir, tmp_path):
    cwd = tmp_path / "here"
    cwd.mkdir()
    (cwd / "secret").write_bytes(b"not to be backed up by accident")
    env = {k: v for k, v in os.environ.items() if k != "POINTSAFE_SAFE"}
    p = subprocess.run([sys.executable, "-m", "pointsafe.cli", "--safe", str(safe_dir), "backup", ""],
                       capture_output=True, timeout=120, cwd=cwd, env=env, check=False)
    r = Result(p.returncode, p.stdout.decode(errors="replace"), p.stderr.decode(errors="replace"))
    assert r.code == 1
    one_error_line(r, "source", "empty")
    pts = run_cli("points", "--json", safe=safe_dir)
    assert json.loads(pts.out) == []


# -- 3. vanished during the backup -----------------------------------------------------------

def test_entries_deleted_during_the_backup_are_one_warning_each_saying_so(safe, tmp_path):
    """Entries listed (and stat'ed) with their directory, then deleted while the backup reads
    the first file: each gives one warning "vanished during the backup", whatever its type."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "a_first").write_bytes(os.urandom(12 << 20))   # read first, in many progress steps
    (src / "b_big").write_bytes(os.urandom(3 << 20))      # too big to be read ahead
    (src / "c_link").symlink_to("a_first")
    os.mkfifo(src / "d_fifo")
    (src / "e_dir").mkdir()
    (src / "e_dir" / "inside").write_bytes(b"x")
    (src / "f_hard").write_bytes(b"two names")
    os.link(src / "f_hard", src / "g_hard")
    (src / "z_kept").write_bytes(b"still here")
    doomed = ["b_big", "c_link", "d_fifo", "e_dir", "f_hard", "g_hard"]
    deleted = []

    def progress(nbytes: int) -> None:
        if not deleted:
            deleted.append(True)
            for n in doomed:
                p = src / n
                if p.is_dir() and not p.is_symlink():
                    (p / "inside").unlink()
                    p.rmdir()
                else:
                    p.unlink()

    res = backup_api(safe, str(src), BackupOptions(), progress=progress)
    assert deleted, "the backup reported no progress while reading a_first"
    got = sorted((w["path"], w["message"]) for w in res.warnings)
    assert got == sorted((str(src / n), VANISHED) for n in doomed)
    names = {e.name for e in children(safe, root_entry(res.point))}
    assert names == {b"a_first", b"z_kept"}


def test_a_name_gone_between_listing_and_stat_is_vanished(tmp_path):
    from pointsafe.ingest.walk import stat_listed
    (tmp_path / "gone").write_bytes(b"")
    (tmp_path / "kept").write_bytes(b"")
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        names = sorted(os.fsencode(n) for n in os.listdir(fd))
        os.unlink(tmp_path / "gone")
        warnings = []
        got = stat_listed(fd, names, lambda n, m: warnings.append((n, m)))
    finally:
        os.close(fd)
    assert [n for n, _ in got] == [b"kept"]
    assert warnings == [(b"gone", VANISHED)]


# -- 5. the image name of a volume -----------------------------------------------------------

@pytest.mark.parametrize("name, shown", [
    ("disk.img", b"disk.img"), ("DISK.IMG", b"DISK.IMG"), ("vm.qcow2", b"vm.qcow2"), ("usb.raw", b"usb.raw"),
    ("sda", b"sda.img"), ("img", b"img.img"), (".img", b".img.img"), ("a.b", b"a.b.img"), ("", b"volume.img"),
])
def test_a_volume_image_keeps_a_name_that_already_says_image(name, shown):
    assert image_name(Point.from_record({"id": "aa", "name": name, "kind": "volume"})) == shown

