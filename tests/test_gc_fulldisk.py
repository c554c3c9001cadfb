"""gc on a full disk, on a real small filesystem (a loop-mounted 64 MiB ext4 image): forget and
gc free space although not one block is free, compaction is skipped with one line saying how
much it needs, and without the safe's reserve the error says exactly what to do."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from _gc_util import point_digests, source_digests
from conftest import PW, needs_root
from pointsafe.cas import Safe, verify
from pointsafe.cas.release import RESERVE_BYTES

pytestmark = [needs_root, pytest.mark.skipif(shutil.which("mkfs.ext4") is None, reason="needs mkfs.ext4")]

MiB = 1 << 20


@contextlib.contextmanager
def ext4(tmp_path: Path, size: int = 64 * MiB) -> Iterator[Path]:
    """A fresh ext4 filesystem of ``size`` bytes mounted from an image file, always unmounted."""
    img, mnt = tmp_path / "fs.img", tmp_path / "mnt"
    with open(img, "wb") as f:
        f.truncate(size)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(img)], check=True)
    mnt.mkdir()
    subprocess.run(["mount", "-o", "loop", str(img), str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
        subprocess.run(["umount", "-l", str(mnt)], check=False, capture_output=True)


def fill(mnt: Path, name: str = "filler") -> None:
    """Take every last block (as root, the ext4 root reserve too) with a file of our own."""
    fd = os.open(mnt / name, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for size in (MiB, 64 * 1024, 4096, 512, 1):
            try:
                while True:
                    os.write(fd, b"\xff" * size)
            except OSError:
                pass
        try:
            os.fsync(fd)
        except OSError:
            pass
    finally:
        os.close(fd)
    assert os.statvfs(mnt).f_bavail == 0


def free(mnt: Path) -> int:
    st = os.statvfs(mnt)
    return st.f_bfree * st.f_frsize


def _backups(cli, mnt: Path, tmp_path: Path, n: int, size: int = 9 * MiB) -> tuple[Path, dict]:
    """``n`` backups of one source whose file is replaced each time (so each point holds whole
    packs of its own); returns the source and the digests of the last one."""
    src = tmp_path / "src"
    src.mkdir(exist_ok=True)
    for _ in range(n):
        (src / "data").write_bytes(os.urandom(size))
        r = cli("backup", src, "--name", "s", safe=mnt / "safe")
        assert r.code == 0, r.err
    return src, source_digests(src)


def _check_last(safe_dir: Path, digests: dict) -> None:
    with Safe.open(safe_dir, password=PW) as safe:
        assert verify(safe, data=True).ok
        assert point_digests(safe, safe.points()[-1]) == digests


def test_forget_and_gc_free_space_on_a_full_disk(tmp_path, cli):
    with ext4(tmp_path) as mnt:
        safe_dir = mnt / "safe"
        assert cli("init", safe_dir, "--pack-size", "4M").code == 0
        _, digests = _backups(cli, mnt, tmp_path, 1)
        assert cli("gc", safe=safe_dir).code == 0      # routine gc keeps the safe's reserve
        assert (safe_dir / "reserve").stat().st_size == RESERVE_BYTES
        src, digests = _backups(cli, mnt, tmp_path, 3)
        fill(mnt)
        r = cli("backup", src, "--name", "s", safe=safe_dir)
        assert r.code == 1 and "pointsafe gc" in r.err

        r = cli("forget", "--keep-last", "1", safe=safe_dir)
        assert r.code == 0, r.err
        assert "forgot 3 points" in r.out
        dry = cli("gc", "--dry-run", "--json", safe=safe_dir)
        assert dry.code == 0, dry.err
        plan = json.loads(dry.out)
        assert len(plan["packs_deleted"]) >= 6 and plan["bytes_reclaimed"] >= 24 * MiB
        before = free(mnt)
        r = cli("gc", "--json", safe=safe_dir)
        assert r.code in (0, 3), r.err
        done = json.loads(r.out)
        assert done["packs_deleted"] == plan["packs_deleted"]
        assert done["bytes_reclaimed"] == plan["bytes_reclaimed"]
        # The space really came back (less the reserve gc put back for next time).
        assert free(mnt) - before >= done["bytes_reclaimed"] - RESERVE_BYTES - MiB
        _check_last(safe_dir, digests)
        # With room again the reserve is back, and a backup works.
        assert (safe_dir / "reserve").stat().st_size == RESERVE_BYTES
        (src / "data").write_bytes(os.urandom(MiB))
        assert cli("backup", src, "--name", "s", safe=safe_dir).code == 0


def test_gc_skips_compaction_it_has_no_room_for_and_says_how_much_it_needs(tmp_path, cli):
    with ext4(tmp_path) as mnt:
        safe_dir = mnt / "safe"
        assert cli("init", safe_dir, "--pack-size", "4M").code == 0
        assert cli("gc", safe=safe_dir).code == 0      # the reserve
        src = tmp_path / "src"
        src.mkdir()
        for i in range(12):
            (src / f"f{i}").write_bytes(os.urandom(MiB))
        assert cli("backup", src, "--name", "s", safe=safe_dir).code == 0
        for i in range(0, 12, 3):                     # a quarter of every pack dies
            (src / f"f{i}").write_bytes(os.urandom(MiB))
        assert cli("backup", src, "--name", "s", safe=safe_dir).code == 0
        digests = source_digests(src)
        fill(mnt)
        assert cli("forget", "--keep-last", "1", safe=safe_dir).code == 0
        dry = cli("gc", "--dry-run", "--threshold", "10", safe=safe_dir)
        assert dry.code == 3, dry.out + dry.err
        r = cli("gc", "--threshold", "10", safe=safe_dir)
        assert r.code == 3, r.out + r.err
        warnings = [ln for ln in r.out.splitlines() if ln.startswith("warning:")]
        assert len(warnings) == 1 and warnings == [ln for ln in dry.out.splitlines() if ln.startswith("warning:")]
        assert "compaction of" in warnings[0] and "skipped: it needs about" in warnings[0]
        assert "free " in warnings[0] and "run 'pointsafe gc' again" in warnings[0]
        _check_last(safe_dir, digests)
        # Doing what the line says works: with the space freed, gc compacts.
        os.unlink(mnt / "filler")
        r = cli("gc", "--threshold", "10", "--json", safe=safe_dir)
        assert r.code == 0, r.out + r.err
        out = json.loads(r.out)
        assert out["packs_rewritten"] and out["bytes_reclaimed"] >= 3 * MiB and not out["compaction_skipped"]
        _check_last(safe_dir, digests)


def test_without_a_reserve_a_full_disk_gives_one_line_saying_what_to_free(tmp_path, cli):
    with ext4(tmp_path) as mnt:
        safe_dir = mnt / "safe"
        assert cli("init", safe_dir, "--pack-size", "4M").code == 0
        _, digests = _backups(cli, mnt, tmp_path, 3)
        (safe_dir / "reserve").unlink(missing_ok=True)
        fill(mnt)
        r = cli("gc", safe=safe_dir)
        assert r.code == 1 and len(r.err.strip().splitlines()) == 1, r.err
        assert r.err.startswith("pointsafe: error: disk full: gc needs about 4 MiB free"), r.err
        assert "nothing was changed; free that much" in r.err
        r = cli("forget", "--keep-last", "1", safe=safe_dir)
        lines = r.err.strip().splitlines()
        assert r.code == 1 and len(lines) == 1, r.err
        assert lines[0].startswith("pointsafe: error: disk full: forget needs about 4 MiB free"), r.err
        assert "free that much" in lines[0]
        with Safe.open(safe_dir, password=PW) as safe:
            assert len(safe.points()) == 3 and verify(safe).ok    # nothing half done
        with open(mnt / "filler", "r+b") as f:    # do what it says
            f.truncate(os.path.getsize(mnt / "filler") - RESERVE_BYTES)
        r = cli("forget", "--keep-last", "1", safe=safe_dir)
        assert r.code == 0, r.err
        before = free(mnt)
        r = cli("gc", safe=safe_dir)                # in what the forget left of those 4 MiB
        assert r.code == 0, r.out + r.err
        assert "reclaimed 18.0 MiB" in r.out
        assert free(mnt) - before >= 18 * MiB - RESERVE_BYTES
        _check_last(safe_dir, digests)
