"""btrfs: a read-only snapshot of the subvolume that holds SOURCE.

Snapshots live in ``<subvolume>/.pointsafe-snapshots/`` (same filesystem: a snapshot must be),
named ``<safe id, 16 hex>-<point name>@<UTC time>``; one being read is named with ``.partial``
at the end and renamed once the point is committed. Per safe and point name, the newest
complete snapshot is kept (the base of the next backup's changed-block tracking); older ones
and every ``.partial`` (left by a killed backup) are removed by the next backup of that source,
by ``forget`` and by ``pointsafe snapshots --prune``. ``.pointsafe-snapshots`` itself is never
in a point.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import blake3

from pointsafe.cas import utc_now_iso

from . import Request, SnapshotError, Taken, signals_deferred
from .fs import BTRFS, fs_name, fs_type, mount_of, mounts_below, subvolume_root

SNAPDIR = ".pointsafe-snapshots"
PARTIAL = ".partial"
FLUSH = "flushoncommit"
RUN_DIR = Path("/run/pointsafe")
_NAME = re.compile(r"^([0-9a-f]{16})-(.*)@(\d{8}T\d{6}\.\d{6}Z)(\.partial)?$", re.S)


def encode_name(name: str) -> str:
    """The point name as it appears in a snapshot's name (a hash when it is too long for one)."""
    raw = name.encode("utf-8", "surrogateescape")
    return name if len(raw) <= 150 else "h" + blake3.blake3(raw).hexdigest()[:32]


def prefix(safe_id: str, name: str) -> str:
    """The start of the names of this safe's snapshots of the source ``name``."""
    return f"{safe_id[:16]}-{encode_name(name)}@"


@dataclass(frozen=True)
class Found:
    """A snapshot in a ``.pointsafe-snapshots`` directory."""
    path: Path
    safe16: str
    name: str            # the encoded point name
    stamp: str
    partial: bool

    @property
    def taken_at(self) -> str:
        """When it was taken, ISO UTC."""
        s = self.stamp
        return f"{s[0:4]}-{s[4:6]}-{s[6:8]}T{s[9:11]}:{s[11:13]}:{s[13:15]}{s[15:]}"


def found_in(snapdir: Path) -> list[Found]:
    """The snapshots (by pointsafe's naming) in ``snapdir``, oldest first; [] when it is absent."""
    try:
        names = os.listdir(snapdir)
    except OSError:
        return []
    out = []
    for n in names:
        m = _NAME.match(n)
        if m:
            out.append(Found(snapdir / n, m.group(1), m.group(2), m.group(3), bool(m.group(4))))
    return sorted(out, key=lambda f: (f.stamp, f.path.name))


def delete(path: Path) -> None:
    """Delete the snapshot subvolume ``path`` (SIGTERM waits until it is done); SnapshotError when it cannot."""
    with signals_deferred():
        r = subprocess.run(["btrfs", "subvolume", "delete", str(path)], capture_output=True, text=True)
    if r.returncode != 0 and os.path.lexists(path):
        tail = (r.stderr or r.stdout).strip().splitlines()
        raise SnapshotError(f"cannot remove the btrfs snapshot {path}: {tail[-1] if tail else 'btrfs failed'}")


def prune_dir(snapdir: Path, safe_id: str, name: str | None, keep_newest: bool = True) -> list[str]:
    """Remove this safe's stale snapshots in ``snapdir`` (of the source ``name``, or of every
    source): every ``.partial``, and every complete one but the newest when ``keep_newest``
    (else all). Returns the paths removed."""
    mine = [f for f in found_in(snapdir) if f.safe16 == safe_id[:16]
            and (name is None or f.name == encode_name(name))]
    removed = []
    by_name: dict[str, list[Found]] = {}
    for f in mine:
        if f.partial:
            delete(f.path)
            removed.append(str(f.path))
        else:
            by_name.setdefault(f.name, []).append(f)
    for group in by_name.values():
        for f in (group[:-1] if keep_newest else group):
            delete(f.path)
            removed.append(str(f.path))
    return removed


def _remount(mountpoint: str, option: str) -> str:
    """``mount -o remount,OPTION MOUNTPOINT``; "" when done, else why not (one line)."""
    r = subprocess.run(["mount", "-o", f"remount,{option}", mountpoint], capture_output=True, text=True)
    if r.returncode == 0:
        return ""
    tail = (r.stderr or r.stdout).strip().splitlines()
    return tail[-1] if tail else f"mount exited {r.returncode}"


@contextmanager
def flushing_commits(subvol: Path) -> Iterator[str]:
    """While the body runs, the btrfs filesystem holding ``subvol`` is mounted ``flushoncommit``
    (as it was before, afterwards); yields "" or a note saying why it could not be.

    Why: a snapshot is made at a transaction commit, and btrfs flushes the subvolume's dirty
    data only before it starts that commit. Data written in between is left out while the
    names and sizes written with it are in: a file written and renamed into place a moment
    before the snapshot appears in it empty (measured here: 11 empty files in 40 snapshots of
    a busy directory, and 2 in 600 snapshots even when the writer fsyncs before renaming).
    With ``flushoncommit`` the commit itself flushes, and the snapshot holds every completed
    write (0 in 400). The remount takes about 4 ms.

    Backups on one filesystem take turns (a lock in /run/pointsafe), and a marker there says
    the option was pointsafe's, so that a backup killed meanwhile does not leave it on."""
    m = mount_of(subvol)
    if m is None:
        yield f"cannot find the mount of {subvol}: the snapshot may miss data written while it was taken"
        return
    try:
        RUN_DIR.mkdir(mode=0o700, exist_ok=True)
        key = blake3.blake3(m.device.encode("utf-8", "surrogateescape")).hexdigest()[:16]
        fd = os.open(RUN_DIR / f"btrfs-{key}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as e:
        yield (f"cannot lock {RUN_DIR} ({e.strerror}): the snapshot may miss data written while "
               f"it was taken unless {m.mountpoint} is mounted with {FLUSH}")
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        m = mount_of(subvol) or m          # as it is now that this backup has its turn
        ours = os.pread(fd, 2, 0) == b"on"  # left on by a backup that was killed
        note = ""
        if FLUSH not in m.options.split(",") or ours:
            os.pwrite(fd, b"on", 0)
            why = _remount(m.mountpoint, FLUSH)
            if why:
                os.ftruncate(fd, 0)
                note = (f"cannot remount {m.mountpoint} with {FLUSH} ({why}): the snapshot may miss "
                        "data written while it was taken")
            else:
                ours = True
        try:
            yield note
        finally:
            if ours and not _remount(m.mountpoint, "no" + FLUSH):
                os.ftruncate(fd, 0)
    finally:
        os.close(fd)


@contextmanager
def _hint_if_slow(subvol: Path) -> Iterator[None]:
    """While the body runs: after 10 s ($POINTSAFE_SNAPSHOT_HINT_S), one line on stderr saying
    what a snapshot that does not come waits for. Taking one waits for as long as the
    filesystem is frozen (``fsfreeze -f``, e.g. by a --pre-freeze hook meant for LVM), and
    SIGTERM is held off meanwhile."""
    try:
        after = float(os.environ.get("POINTSAFE_SNAPSHOT_HINT_S", "10"))
    except ValueError:
        after = 10.0
    timer = threading.Timer(after, lambda: print(
        f"pointsafe: the btrfs snapshot of {subvol} is still waiting; is the filesystem frozen (fsfreeze -f, "
        "e.g. in --pre-freeze)? A btrfs snapshot cannot be taken until it is thawed", file=sys.stderr, flush=True))
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def _stamp() -> str:
    ns = time.time_ns()
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime(ns // 10**9)) + f".{ns // 1000 % 10**6:06d}Z"


def nested_subvolumes(subvol: Path, source: Path) -> list[str]:
    """Subvolumes below ``source`` (inside ``subvol``), which a snapshot of ``subvol`` does not
    hold; pointsafe's own snapshots are not counted. [] when btrfs cannot tell (not root)."""
    show = subprocess.run(["btrfs", "subvolume", "show", str(subvol)], capture_output=True, text=True)
    lst = subprocess.run(["btrfs", "subvolume", "list", "-o", str(subvol)], capture_output=True, text=True)
    if show.returncode != 0 or lst.returncode != 0 or not show.stdout.strip():
        return []
    me = show.stdout.splitlines()[0].strip()
    base = "" if me == "/" else me.rstrip("/") + "/"
    rel_src = os.path.relpath(source, subvol)
    under = "" if rel_src == "." else rel_src.rstrip("/") + "/"
    out = []
    for line in lst.stdout.splitlines():
        _, sep, p = line.partition(" path ")
        if not sep or not p.startswith(base):
            continue
        rel = p[len(base):]
        if rel.startswith(SNAPDIR + "/") or not rel.startswith(under):
            continue
        out.append(str(subvol / rel))
    return out


def plan(req: Request, explicit: bool) -> tuple[BtrfsProvider | None, str]:
    """A provider when SOURCE is on btrfs, inside a subvolume, and a snapshot of that subvolume
    holds all of SOURCE; else (None, why)."""
    where = req.source if req.kind == "tree" else req.source.parent
    try:
        t = fs_type(where)
    except OSError as e:
        return None, f"cannot tell the filesystem of {req.source}: {e.strerror}"
    if t != BTRFS:
        return None, f"{req.source} is on {fs_name(where)}, not btrfs"
    if shutil.which("btrfs") is None:
        return None, "btrfs-progs is not installed (no 'btrfs' command)"
    if not explicit and os.geteuid() != 0:
        return None, "not root: snapshots could not be removed again (run as root, or --snapshot btrfs)"
    subvol = subvolume_root(where)
    if subvol is None:
        return None, f"cannot find the btrfs subvolume that holds {req.source}"
    if req.kind == "tree" and not req.one_file_system:
        other = [m for m in mounts_below(req.source) if SNAPDIR not in Path(m).parts]
        other += nested_subvolumes(subvol, req.source)
        if other:
            more = f" and {len(other) - 1} more" if len(other) > 1 else ""
            return None, (f"{req.source} holds other filesystems or subvolumes ({other[0]}{more}), which a "
                          "snapshot of its subvolume would not hold; use --one-file-system or back them up "
                          "as sources of their own")
    return BtrfsProvider(req, subvol), ""


class BtrfsProvider:
    """Snapshots one source's subvolume (see the module's docstring)."""

    method = "btrfs"

    def __init__(self, req: Request, subvol: Path):
        self.req = req
        self.subvol = subvol
        self.snapdir = subvol / SNAPDIR
        self.partial: Path | None = None
        self.final: Path | None = None
        self.kept = False

    def clear_stale(self) -> list[str]:
        """Remove this source's ``.partial`` snapshots (killed backups) and all but its newest complete one."""
        return prune_dir(self.snapdir, self.req.safe_id, self.req.name)

    def take(self) -> Taken:
        """Take the read-only snapshot now (saying so on stderr when that does not come)."""
        with _hint_if_slow(self.subvol):
            return self._take()

    def _take(self) -> Taken:
        try:
            os.makedirs(self.snapdir, mode=0o700, exist_ok=True)
        except OSError as e:
            raise SnapshotError(f"cannot create {self.snapdir}: {e.strerror}") from None
        base = prefix(self.req.safe_id, self.req.name) + _stamp()
        dest = self.snapdir / (base + PARTIAL)
        taken_at = utc_now_iso()
        # a SIGTERM now would leave a snapshot this object does not know of (or flushoncommit on)
        with signals_deferred(), flushing_commits(self.subvol) as note:
            r = subprocess.run(["btrfs", "subvolume", "snapshot", "-r", str(self.subvol), str(dest)],
                               capture_output=True, text=True)
            if r.returncode == 0:
                self.partial = dest
        if r.returncode != 0:
            tail = (r.stderr or r.stdout).strip().splitlines()
            raise SnapshotError(f"btrfs snapshot of {self.subvol} failed: {tail[-1] if tail else 'exit ' + str(r.returncode)}")
        self.final = self.snapdir / base
        rel = os.path.relpath(self.req.source, self.subvol)
        live_dev = os.stat(self.subvol).st_dev
        snap_dev = os.stat(dest).st_dev
        return Taken("btrfs", dest if rel == "." else dest / rel, taken_at, {snap_dev: live_dev},
                     kept=str(self.final), notes=[note] if note else [])

    def keep(self) -> None:
        """Rename the snapshot to its complete name; remove this source's older ones."""
        if self.partial is None or self.final is None:
            return
        with signals_deferred():
            os.rename(self.partial, self.final)
            self.partial = None
            self.kept = True
        prune_dir(self.snapdir, self.req.safe_id, self.req.name)

    def release(self) -> None:
        """Delete the snapshot unless it was kept."""
        if self.partial is not None:
            p, self.partial = self.partial, None
            delete(p)


def own_dirs(source: Path) -> set[tuple[int, int]]:
    """(device, inode) of the ``.pointsafe-snapshots`` directory of the subvolume holding
    ``source``, when there is one: a walk never enters it (live or in a snapshot)."""
    subvol = subvolume_root(source)
    if subvol is None:
        return set()
    try:
        st = os.stat(subvol / SNAPDIR)
    except OSError:
        return set()
    return {(st.st_dev, st.st_ino)}
