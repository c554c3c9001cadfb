"""Filesystems on loop devices for tests: btrfs (and XFS), made in tmp_path, always unmounted
and detached. A test that cannot have one skips with the reason.

    with btrfs_volume(tmp_path) as mnt:
        src = make_subvolume(mnt, "data")
"""

from __future__ import annotations

import os
import shutil
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

SIZE = "300M"   # mkfs.xfs needs at least 300 MB


def _need(tool: str, package: str) -> None:
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} is missing (apt-get install {package})")
    if os.geteuid() != 0:
        pytest.skip("loop-mounted filesystems need root")
    if not os.path.exists("/dev/loop-control"):
        pytest.skip("no loop devices (/dev/loop-control is missing)")


def _sh(*cmd: str) -> None:
    subprocess.run(list(cmd), check=True, capture_output=True)


@contextmanager
def loop_fs(tmp_path: Path, fstype: str, size: str = SIZE, name: str | None = None) -> Iterator[Path]:
    """A new ``fstype`` ("btrfs" or "xfs") filesystem in an image file, loop-mounted; yields
    its mount point; unmounted (lazily if busy) and its loop device detached afterwards."""
    mkfs = {"btrfs": ("mkfs.btrfs", "btrfs-progs", ["-q"]), "xfs": ("mkfs.xfs", "xfsprogs", ["-q"])}[fstype]
    _need(mkfs[0], mkfs[1])
    name = name or fstype
    img, mnt = tmp_path / f"{name}.img", tmp_path / f"{name}-mnt"
    subprocess.run(["truncate", "-s", size, str(img)], check=True)
    try:
        _sh(mkfs[0], *mkfs[2], str(img))
    except subprocess.CalledProcessError as e:
        pytest.skip(f"{mkfs[0]} failed: {e.stderr.decode(errors='replace').strip()}")
    mnt.mkdir()
    try:
        _sh("mount", "-o", "loop", str(img), str(mnt))
    except subprocess.CalledProcessError as e:
        pytest.skip(f"cannot loop-mount {fstype}: {e.stderr.decode(errors='replace').strip()}")
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
        # mount -o loop sets autoclear; detach explicitly in case it did not
        out = subprocess.run(["losetup", "-j", str(img)], capture_output=True, text=True).stdout
        for line in out.splitlines():
            subprocess.run(["losetup", "-d", line.split(":")[0]], capture_output=True)


@contextmanager
def btrfs_volume(tmp_path: Path, size: str = SIZE) -> Iterator[Path]:
    """A loop-mounted btrfs filesystem; yields its mount point (see :func:`loop_fs`)."""
    with loop_fs(tmp_path, "btrfs", size) as mnt:
        yield mnt


def make_subvolume(mnt: Path, name: str) -> Path:
    """Create the btrfs subvolume ``mnt/name``; return its path."""
    path = mnt / name
    _sh("btrfs", "subvolume", "create", str(path))
    return path


def subvolumes(path: Path) -> list[str]:
    """The subvolumes below ``path`` (paths as btrfs prints them)."""
    out = subprocess.run(["btrfs", "subvolume", "list", "-o", str(path)], capture_output=True, text=True,
                         check=True).stdout
    return [line.partition(" path ")[2] for line in out.splitlines() if " path " in line]
