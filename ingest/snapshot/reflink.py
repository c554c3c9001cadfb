"""reflink: an instant clone (FICLONE) of a single file (a disk image, a database file) on a
filesystem that shares extents (XFS with reflink, btrfs). The clone,
``.<name>.pointsafe-<safe>.clone`` next to the file, is backed up and removed; one left by a
killed backup is removed by the next. The clone is a new inode: volume change detection
compares the live file's stat taken at the freeze, never the clone's.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from pathlib import Path

from pointsafe.cas import utc_now_iso

from . import Request, SnapshotError, Taken, signals_deferred
from .fs import BTRFS, XFS, fs_name, fs_type

FICLONE = 0x40049409


def clone_path(source: Path, safe_id: str) -> Path:
    """Where the clone of ``source`` is made (same directory: a reflink cannot cross filesystems)."""
    return source.parent / f".{source.name}.pointsafe-{safe_id[:16]}.clone"


def ficlone(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """Make ``dst`` (new, 0600) a reflink clone of ``src``; OSError when the filesystem cannot
    (``dst`` is then not left behind)."""
    sfd = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
    try:
        dfd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            fcntl.ioctl(dfd, FICLONE, sfd)
        except BaseException:
            os.close(dfd)
            os.unlink(dst)
            raise
        os.close(dfd)
    finally:
        os.close(sfd)


def _probe(directory: Path) -> str | None:
    """None when a reflink clone can be made in ``directory``, else why not."""
    a = directory / f".pointsafe-reflink-probe.{os.getpid()}"
    b = directory / f".pointsafe-reflink-probe.{os.getpid()}.clone"
    try:
        with open(a, "wb") as f:
            f.write(b"\0" * 4096)
        ficlone(a, b)
        os.unlink(b)
        return None
    except OSError as e:
        if e.errno in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL, errno.EXDEV):
            return f"the {fs_name(directory)} filesystem of {directory} has no reflinks"
        return f"cannot make a clone in {directory}: {e.strerror}"
    finally:
        try:
            os.unlink(a)
        except OSError:
            pass


def plan(req: Request, explicit: bool) -> tuple[ReflinkProvider | None, str]:
    """A provider for a single regular file on XFS or btrfs that can be cloned; else (None, why)."""
    if req.kind != "volume" or not stat.S_ISREG(req.st.st_mode):
        return None, "only a single file (a disk image backed up with --volume) can be cloned"
    try:
        t = fs_type(req.source)
    except OSError as e:
        return None, f"cannot tell the filesystem of {req.source}: {e.strerror}"
    if t not in (XFS, BTRFS):
        return None, f"{req.source} is on {fs_name(req.source)}, which has no reflinks (XFS or btrfs have)"
    if not explicit:
        why = _probe(req.source.parent)
        if why:
            return None, why
    return ReflinkProvider(req), ""


class ReflinkProvider:
    """Clones one file, and removes the clone (see the module's docstring)."""

    method = "reflink"

    def __init__(self, req: Request):
        self.req = req
        self.clone = clone_path(req.source, req.safe_id)
        self.made = False

    def clear_stale(self) -> list[str]:
        """Remove a clone a killed backup left."""
        try:
            st = os.lstat(self.clone)
        except FileNotFoundError:
            return []
        if not stat.S_ISREG(st.st_mode):
            raise SnapshotError(f"{self.clone} is in the way of the clone and is not one of pointsafe's")
        os.unlink(self.clone)
        return [str(self.clone)]

    def take(self) -> Taken:
        """Clone the file now; its live stat, taken just before, is what change detection compares."""
        taken_at = utc_now_iso()
        live = os.stat(self.req.source)
        with signals_deferred():
            try:
                ficlone(self.req.source, self.clone)
            except OSError as e:
                raise SnapshotError(f"cannot clone {self.req.source} (FICLONE): {e.strerror}") from None
            self.made = True
        return Taken("reflink", self.clone, taken_at, live_stat=live)

    def keep(self) -> None:
        """Clones are never kept: the same as ``release``."""
        self.release()

    def release(self) -> None:
        """Remove the clone."""
        if self.made:
            with signals_deferred():
                try:
                    os.unlink(self.clone)
                except FileNotFoundError:
                    pass
                self.made = False
