"""The snapshots a safe's backups keep or left behind: listed by ``pointsafe snapshots``,
pruned by ``--prune``, by the next backup of a source and by ``forget``.

Where they are found: the ``.pointsafe-snapshots`` directory of every btrfs subvolume a point
of the safe was read from (the directory of the snapshot a point records, and the subvolume
its SOURCE lies in now), the reflink clone next to each file a volume point was read from,
and, where LVM works, logical volumes named ``pointsafe-<safe>-*``. Per source name the newest
complete btrfs snapshot is *retained* (the next backup's base); everything else is *stale*.
"""

from __future__ import annotations

from collections.abc import Mapping
import os
import stat
from dataclasses import asdict, dataclass
from pathlib import Path

from pointsafe.cas import Point, Safe, SafeError

from . import btrfs, lvm, reflink
from .fs import mounts, subvolume_root


@dataclass
class Listed:
    """One snapshot: its method, the source name, where it is, retained or stale, when taken,
    whether it is mounted (only an LVM snapshot of a killed backup can be)."""
    method: str
    name: str
    path: str
    state: str
    taken_at: str | None = None
    mounted: bool = False

    def as_dict(self) -> dict:
        """JSON-able."""
        return asdict(self)


def _snapdirs(points: list[Point]) -> set[Path]:
    """The snapshot directories this machine's points name. Points an agent sent through the
    safe server name paths on the agent's machine, not here: never looked at (an agent could
    otherwise point this machine's pruning at any directory)."""
    points = [p for p in points if "agent_id" not in p.extra]
    dirs: set[Path] = set()
    for p in points:
        snap = p.snapshot
        if isinstance(snap, Mapping) and snap.get("method") == "btrfs" and isinstance(snap.get("path"), str):
            dirs.add(Path(snap["path"]).parent)
    for src in {p.source for p in points if p.source}:
        path = Path(src)
        if os.path.lexists(path):
            sub = subvolume_root(path)
            if sub is not None:
                dirs.add(sub / btrfs.SNAPDIR)
    return dirs


def list_snapshots(safe: Safe) -> list[Listed]:
    """Every snapshot of this safe's sources that exists now, retained or stale."""
    points = safe.points()
    names = {btrfs.encode_name(p.name): p.name for p in points}
    out: list[Listed] = []
    sid = safe.config.safe_id
    for d in sorted(_snapdirs(points)):
        groups: dict[str, list[btrfs.Found]] = {}
        for f in btrfs.found_in(d):
            if f.safe16 == sid[:16]:
                groups.setdefault(f.name, []).append(f)
        for enc, group in groups.items():
            complete = [f for f in group if not f.partial]
            newest = complete[-1] if complete else None
            for f in group:
                out.append(Listed("btrfs", names.get(enc, enc), str(f.path),
                                  "retained" if f is newest else "stale", f.taken_at))
    seen = set()
    for p in points:
        if p.kind == "volume" and p.source and p.source not in seen:
            seen.add(p.source)
            c = reflink.clone_path(Path(p.source), sid)
            try:
                if stat.S_ISREG(os.lstat(c).st_mode):
                    out.append(Listed("reflink", p.name, str(c), "stale"))
            except OSError:
                pass
    out.extend(_lvm_leftovers(sid))
    return out


def _lvm_leftovers(safe_id: str) -> list[Listed]:
    if lvm.available() is not None:
        return []
    r = lvm.run(["lvs", "--noheadings", "--separator", "|", "-o", "vg_name,lv_name"])
    if r.returncode != 0:
        return []
    mounted = {m.device for m in mounts()}
    out = []
    for line in r.stdout.splitlines():
        vg, _, lv = (x.strip() for x in line.partition("|"))
        if lv.startswith(f"pointsafe-{safe_id[:8]}-"):
            dev = f"/dev/{vg}/{lv}"
            out.append(Listed("lvm", lv[len(f"pointsafe-{safe_id[:8]}-"):], dev, "stale", None, dev in mounted))
    return out


def remove(item: Listed) -> None:
    """Remove one listed snapshot (unmounting an LVM one first); SnapshotError when it cannot."""
    if item.method == "btrfs":
        btrfs.delete(Path(item.path))
    elif item.method == "reflink":
        os.unlink(item.path)
    elif item.method == "lvm":
        for m in mounts():
            if m.device == item.path:
                r = lvm.run(["umount", m.mountpoint])
                if r.returncode != 0:
                    raise SafeError(f"cannot unmount {m.mountpoint}: {lvm._tail(r)}")
        r = lvm.run(["lvremove", "--yes", item.path])
        if r.returncode != 0:
            raise SafeError(f"cannot remove {item.path}: {lvm._tail(r)}")


def prune(safe: Safe) -> tuple[list[Listed], list[str]]:
    """Remove every stale snapshot (call it holding the safe's writer lock, so that no backup
    is taking one meanwhile); returns (removed, problems)."""
    removed, problems = [], []
    for item in list_snapshots(safe):
        if item.state != "stale":
            continue
        try:
            remove(item)
            removed.append(item)
        except (SafeError, OSError) as e:
            problems.append(f"{item.path}: {e}")
    return removed, problems


def after_forget(safe: Safe, dropped: list[Point]) -> tuple[list[str], list[str]]:
    """After ``dropped`` were forgotten: per source name, keep exactly the newest complete
    snapshot while points of that name remain, none once the last is gone. Returns
    (removed paths, problems)."""
    remaining = safe.points()
    left = {p.name for p in remaining}
    removed, problems = [], []
    sid = safe.config.safe_id
    for name in sorted({p.name for p in dropped}):
        of_name = [p for p in dropped + remaining if p.name == name]
        for d in sorted(_snapdirs(of_name)):
            mine = [f for f in btrfs.found_in(d) if f.safe16 == sid[:16] and f.name == btrfs.encode_name(name)
                    and not f.partial]      # a .partial may be a running backup's: the next backup clears it
            doomed = mine[:-1] if name in left else mine
            for f in doomed:
                try:
                    btrfs.delete(f.path)
                    removed.append(str(f.path))
                except SafeError as e:
                    problems.append(str(e))
    return removed, problems
