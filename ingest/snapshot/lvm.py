"""lvm: a classic LVM snapshot (``lvcreate --snapshot``) of the logical volume that is SOURCE (a
volume point) or holds it (a tree point).

The snapshot gets a copy-on-write area of ``--snapshot-size`` (``-L`` for a size such as
``2G``, ``-l`` for extents such as ``10%ORIGIN``). For a tree it is mounted read-only
(``nouuid`` for XFS, which refuses two mounted filesystems of one UUID) in a private
directory, read, unmounted and removed; a volume is read from its device and removed. The
clean-up (unmount, then remove) always runs, also on failure or SIGTERM; a snapshot left by a
killed backup (same name: ``pointsafe-<safe>-<point name>``) is unmounted and removed by the next.

Commands go through ``runner`` (``subprocess.run``-like), so that what would be run can be
seen where device-mapper is missing.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path
from typing import Callable

from pointsafe.cas import utc_now_iso

from . import Request, SnapshotError, Taken, signals_deferred
from .fs import mount_of, mounts

Runner = Callable[[list[str]], subprocess.CompletedProcess]
DM_CONTROL = "/dev/mapper/control"
DM_MISC = "/sys/class/misc/device-mapper"    # the kernel's device-mapper (lvm2 makes DM_CONTROL itself)


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    """Run ``cmd``, output captured as text (the default runner)."""
    return subprocess.run(cmd, capture_output=True, text=True)


def _tail(r: subprocess.CompletedProcess) -> str:
    lines = [x.strip() for x in ((r.stderr or "") + "\n" + (r.stdout or "")).splitlines() if x.strip()]
    return lines[-1] if lines else f"exit code {r.returncode}"


def snapshot_name(safe_id: str, name: str) -> str:
    """The LV name of this safe's snapshot of the source ``name`` (LVM allows [A-Za-z0-9+_.-])."""
    clean = re.sub(r"[^A-Za-z0-9+_.-]", "_", name)[:60]
    return f"pointsafe-{safe_id[:8]}-{clean}"


def size_args(size: str) -> list[str]:
    """lvcreate's size option for ``size``: ``-l`` for extents/percentages, ``-L`` for a size."""
    if not re.fullmatch(r"\d+(\.\d+)?[bBsSkKmMgGtTpPeE]?|\d+%(ORIGIN|VG|FREE|PVS)", size):
        raise SnapshotError(f"--snapshot-size {size!r}: give a size (e.g. 2G, 512M) or extents "
                            "(e.g. 10%ORIGIN, 20%FREE)")
    return ["-l", size] if "%" in size else ["-L", size]


def dm_available() -> bool:
    """True when the kernel has device-mapper (its misc device is registered)."""
    if os.path.exists(DM_MISC):
        return True
    try:
        with open("/proc/misc") as f:
            return any(line.split()[-1:] == ["device-mapper"] for line in f)
    except OSError:
        return False


def available() -> str | None:
    """None when LVM snapshots can be taken here, else why not."""
    if shutil.which("lvcreate") is None:
        return "lvm2 is not installed (no lvcreate command); install lvm2 or choose another --snapshot"
    if not dm_available():
        return "device-mapper is not available on this machine (the kernel has no device-mapper driver)"
    return None


def plan(req: Request, explicit: bool, runner: Runner = run) -> tuple[LvmProvider | None, str]:
    """A provider when SOURCE is a logical volume or a directory on a mounted one; else (None, why)."""
    if req.kind == "volume" and stat.S_ISREG(req.st.st_mode):
        return None, f"{req.source} is a file, not a logical volume"
    why = available()
    if why:
        return None, why
    mnt = None
    if req.kind == "volume":
        device = str(req.source)
    else:
        m = mount_of(req.source)
        if m is None:
            return None, f"cannot find the mount that holds {req.source}"
        device, mnt = m.device, m
    r = runner(["lvs", "--noheadings", "--separator", "|", "-o", "vg_name,lv_name", device])
    parts = r.stdout.strip().split("|") if r.returncode == 0 else []
    if len(parts) != 2:
        return None, f"{device} is not an LVM logical volume ({_tail(r)})"
    vg, lv = (x.strip() for x in parts)
    rel = os.path.relpath(req.source, mnt.mountpoint) if mnt else None
    return LvmProvider(req, vg, lv, rel, mnt.fstype if mnt else None, runner), ""


class LvmProvider:
    """Takes, mounts, and always removes one LVM snapshot (see the module's docstring)."""

    method = "lvm"

    def __init__(self, req: Request, vg: str, lv: str, rel: str | None, fstype: str | None,
                 runner: Runner = run, mount_dir: str | None = None):
        """``rel`` is SOURCE's path inside the mounted filesystem (None: a volume point)."""
        self.req, self.vg, self.lv, self.rel, self.fstype = req, vg, lv, rel, fstype
        self.runner = runner
        self.mount_dir = mount_dir
        self.snap = snapshot_name(req.safe_id, req.name)
        self.created = False
        self.mountpoint: str | None = None

    @property
    def device(self) -> str:
        """The snapshot's device path."""
        return f"/dev/{self.vg}/{self.snap}"

    def create_cmd(self) -> list[str]:
        """The lvcreate command line that takes the snapshot."""
        return ["lvcreate", "--snapshot", "--name", self.snap, *size_args(self.req.cow_size), f"{self.vg}/{self.lv}"]

    def mount_cmd(self, mountpoint: str) -> list[str]:
        """The mount command line (read-only; nouuid for XFS)."""
        opts = "ro,nouuid" if self.fstype == "xfs" else "ro"
        return ["mount", "-o", opts, self.device, mountpoint]

    def remove_cmd(self) -> list[str]:
        """The lvremove command line."""
        return ["lvremove", "--yes", f"{self.vg}/{self.snap}"]

    def _must(self, cmd: list[str], what: str) -> None:
        r = self.runner(cmd)
        if r.returncode != 0:
            raise SnapshotError(f"{what} failed: {_tail(r)}")

    def clear_stale(self) -> list[str]:
        """Unmount and remove a snapshot of this name left by a killed backup."""
        r = self.runner(["lvs", "--noheadings", "-o", "lv_name", f"{self.vg}/{self.snap}"])
        if r.returncode != 0 or r.stdout.strip() != self.snap:
            return []
        for m in mounts():
            if m.device in (self.device, f"/dev/mapper/{self.vg.replace('-', '--')}-{self.snap.replace('-', '--')}"):
                self._must(["umount", m.mountpoint], f"unmounting the stale snapshot at {m.mountpoint}")
                try:
                    os.rmdir(m.mountpoint)
                except OSError:
                    pass
        self._must(self.remove_cmd(), f"removing the stale snapshot {self.vg}/{self.snap}")
        return [f"{self.vg}/{self.snap}"]

    def take(self) -> Taken:
        """lvcreate the snapshot; for a tree, mount it read-only."""
        taken_at = utc_now_iso()
        with signals_deferred():
            self._must(self.create_cmd(), f"lvcreate --snapshot of {self.vg}/{self.lv}")
            self.created = True
        if self.rel is None:
            return Taken("lvm", Path(self.device), taken_at)
        mp = tempfile.mkdtemp(prefix=f"{self.snap}-", dir=self.mount_dir)
        with signals_deferred():
            try:
                self._must(self.mount_cmd(mp), f"mounting the snapshot {self.device}")
            except BaseException:
                os.rmdir(mp)
                raise
            self.mountpoint = mp
        read = Path(mp) if self.rel == "." else Path(mp) / self.rel
        dev_map = {}
        try:
            dev_map = {os.stat(mp).st_dev: self.req.st.st_dev}
        except OSError:
            pass
        return Taken("lvm", read, taken_at, dev_map)

    def keep(self) -> None:
        """LVM snapshots are never kept: the same as ``release``."""
        self.release()

    def release(self) -> None:
        """Unmount (lazily if it is busy), then lvremove; each step that applies, once."""
        problems = []
        with signals_deferred():
            if self.mountpoint is not None:
                r = self.runner(["umount", self.mountpoint])
                if r.returncode != 0:
                    r = self.runner(["umount", "-l", self.mountpoint])
                if r.returncode != 0:
                    problems.append(f"unmounting {self.mountpoint}: {_tail(r)}")
                else:
                    try:
                        os.rmdir(self.mountpoint)
                    except OSError:
                        pass
                    self.mountpoint = None
            if self.created and self.mountpoint is None:
                r = self.runner(self.remove_cmd())
                if r.returncode != 0:
                    problems.append(f"lvremove {self.vg}/{self.snap}: {_tail(r)}")
                else:
                    self.created = False
        if problems:
            raise SnapshotError("the LVM snapshot could not be cleaned up: " + "; ".join(problems))
