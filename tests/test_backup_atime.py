"""No atime churn: reading the source between two backups (``find``, ``cat``) moves atimes, and
the second backup must still store nothing new -- the previous entries (and their atimes) are
kept when nothing but the atime changed (docs/FORMAT.md, TREE payload). A real change still
stores.

The source lives on a loop-mounted ext4 with ``strictatime``, so that every read and every
listing moves an atime (relatime would move each one only once a day)."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from _backup_util import backup, restore
from conftest import needs_root


def _need(tool: str) -> None:
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} is not installed")


@contextlib.contextmanager
def strictatime_ext4(tmp_path: Path):
    """A fresh 64 MiB ext4, loop-mounted with strictatime; unmounted afterwards."""
    _need("mkfs.ext4")
    img, mnt = tmp_path / "src.img", tmp_path / "src"
    subprocess.run(["mkfs.ext4", "-q", "-F", str(img), "64M"], check=True, capture_output=True, timeout=120)
    mnt.mkdir()
    r = subprocess.run(["mount", "-o", "loop,strictatime", str(img), str(mnt)], capture_output=True,
                       text=True, timeout=60)
    if r.returncode != 0:
        pytest.skip(f"cannot loop-mount an ext4 image: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True, timeout=60).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=60)


def make_tree(top: Path) -> None:
    for i in range(6):
        d = top / f"dir{i}" / "sub"
        d.mkdir(parents=True)
        for j in range(20):
            (d / f"f{j:02d}.txt").write_bytes(os.urandom(100 + 300 * j))
        (top / f"dir{i}" / "big.bin").write_bytes(os.urandom(300_000))
    (top / "dir0" / "link").symlink_to("sub/f00.txt")
    os.link(top / "dir1" / "big.bin", top / "dir1" / "big-again.bin")
    os.mkfifo(top / "dir2" / "fifo")


def atimes(top: Path) -> dict[str, int]:
    out = {".": os.lstat(top).st_atime_ns}
    for dirpath, dirs, files in os.walk(top):
        for n in dirs + files:
            p = os.path.join(dirpath, n)
            out[os.path.relpath(p, top)] = os.lstat(p).st_atime_ns
    return out


def read_everything(top: Path) -> None:
    """What a user, an indexer or a virus scanner does: list every directory, read every file."""
    subprocess.run(["find", str(top), "-ls"], check=True, capture_output=True, timeout=60)
    subprocess.run(f"find {top} -type f -exec cat {{}} + > /dev/null", shell=True, check=True, timeout=60)
    subprocess.run(["ls", "-lR", str(top)], check=True, capture_output=True, timeout=60)


@needs_root
def test_reading_the_source_between_backups_stores_nothing_new(safe_dir, tmp_path):
    with strictatime_ext4(tmp_path) as src:
        make_tree(src)
        p1 = backup(safe_dir, src, "-q", name="src")
        before = atimes(src)
        read_everything(src)
        after = atimes(src)
        moved = [k for k in before if before[k] != after[k]]
        # the reads really moved atimes: of files and of directories
        assert "dir0/sub/f05.txt" in moved and "dir3/sub" in moved and "dir1/big.bin" in moved, moved
        p2 = backup(safe_dir, src, "-q", name="src")
        st = p2["stats"]
        assert st["objects_new"] == 0 and st["bytes_stored"] == 0, st
        assert st["bytes_read"] == 0, st
        assert p2["root"] == p1["root"]

        # Once more, after another round of reads: still nothing.
        read_everything(src)
        p3 = backup(safe_dir, src, "-q", name="src")
        assert p3["stats"]["objects_new"] == 0 and p3["root"] == p1["root"], p3["stats"]

        # A real change still stores: a new mode, and new content.
        os.chmod(src / "dir4" / "sub" / "f03.txt", 0o600)
        (src / "dir5" / "sub" / "f07.txt").write_bytes(b"changed content")
        read_everything(src)
        p4 = backup(safe_dir, src, "-q", name="src")
        assert p4["stats"]["objects_new"] > 0 and p4["root"] != p1["root"], p4["stats"]
        # (the chmod-ed file is read again, its ctime moved, but only the new content is new)
        assert p4["stats"]["bytes_new"] == len(b"changed content"), p4["stats"]
        out = tmp_path / "out"
        restore(safe_dir, p4["id"], out, "-q")
        assert (out / "dir5" / "sub" / "f07.txt").read_bytes() == b"changed content"
        assert os.stat(out / "dir4" / "sub" / "f03.txt").st_mode & 0o7777 == 0o600
        assert (out / "dir1" / "big.bin").read_bytes() == (src / "dir1" / "big.bin").read_bytes()


@needs_root
def test_the_kept_atime_is_the_one_of_the_first_backup(safe_dir, tmp_path):
    """The point after the reads restores the atimes recorded by the first backup (what the
    format promises), and a file whose metadata changed gets the atime seen then."""
    with strictatime_ext4(tmp_path) as src:
        make_tree(src)
        backup(safe_dir, src, "-q", name="src")
        first = atimes(src)
        read_everything(src)
        os.chmod(src / "dir4" / "big.bin", 0o640)   # changes ctime: this entry is stored anew
        seen = os.lstat(src / "dir4" / "big.bin").st_atime_ns
        p2 = backup(safe_dir, src, "-q", name="src")
        out = tmp_path / "out"
        restore(safe_dir, p2["id"], out, "-q")
        assert os.lstat(out / "dir0" / "sub" / "f05.txt").st_atime_ns == first["dir0/sub/f05.txt"]
        assert os.lstat(out / "dir4" / "big.bin").st_atime_ns == seen
