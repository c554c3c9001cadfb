"""Whether a btrfs tree backup may walk only what changed, and the Guide when it may (issue 12).

A guided walk keeps the previous point's entries for everything the send stream does not
name, so it is exact only when that point's tree is what a full walk of its snapshot made and
the snapshot is still the one it read. Each check below is a way that could fail; any failure
is a reason, and the backup walks the whole tree (with a warning saying why, except where
there was never a base: a first backup, a previous point read live, database integrations,
which graft files into the tree after the walk).
"""

from __future__ import annotations

import os
import stat
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from pointsafe.cas import Point, Safe, read_tree

from .btrfs_send import Changes, SendStreamError, parent_mismatch, send_changes, subvol_root
from .guide import Guide, guide_from

FALLBACK = "btrfs send not used, walked the whole tree: "
MAX_LINKED = 1000      # changed files with several names, each costs a subprocess to name them all
# warnings of a previous point that say nothing is missing from its tree
_BENIGN_PATHS = {"post-hook", "post-thaw hook"}


@dataclass
class Plan:
    """``guide`` to walk with (None: the full walker); ``detail`` names the parent snapshot;
    ``fallback`` why the guide is not used (a warning), None when there is no base at all."""
    guide: Guide | None
    detail: str = ""
    fallback: str | None = None


def walk_record(excludes: list[str], one_file_system: bool) -> dict:
    """What a tree point records of how it was walked (``walk``): a guided walk needs the
    same settings as its previous point, whose tree it keeps."""
    return {"excludes": list(excludes), "one_file_system": bool(one_file_system)}


def plan(safe: Safe, prev: Point | None, source: Path, read_path: Path, walk: dict, live_dev: int | None,
         integrations: bool) -> Plan:
    """The plan of a btrfs tree backup of ``source`` read at ``read_path`` (in the new
    snapshot, whose device maps to ``live_dev``), walked with the settings ``walk``."""
    snap = prev.snapshot if prev is not None else None
    if prev is None or not isinstance(snap, Mapping) or snap.get("method") != "btrfs" or not snap.get("path"):
        return Plan(None)
    if integrations or prev.consistency:
        return Plan(None, "database integrations add files after the walk")
    parent = Path(snap["path"])
    why = _why_not(safe, prev, source, read_path, walk, live_dev, parent)
    if why is not None:
        return Plan(None, str(parent), why)
    new_root = subvol_root(read_path)
    prefix = os.path.relpath(read_path, new_root)
    prefix = "" if prefix == "." else prefix
    try:
        changes = send_changes(parent, new_root)
        name_every_link(changes, new_root)
    except (SendStreamError, OSError) as e:
        return Plan(None, str(parent), f"the send stream cannot be used: {e}")
    why = parent_mismatch(snap.get("subvol"), parent, new_root, changes)
    if why is not None:
        return Plan(None, str(parent), why)
    return Plan(guide_from(changes, prefix, parent / prefix if prefix else parent), str(parent))


def name_every_link(ch: Changes, root: Path) -> None:
    """Add every name of each changed file with several links to ``ch.changed``: the stream
    names an inode by one of its paths only, and the walk must not keep the previous entry of
    another (``btrfs inspect-internal inode-resolve``: BTRFS_IOC_INO_PATHS). SendStreamError
    when the names cannot all be found."""
    more: set[str] = set()
    linked = 0
    for p in sorted(ch.changed):
        try:
            st = os.lstat(root / p)
        except OSError as e:
            raise SendStreamError(f"{p!r} changed but cannot be looked at: {e.strerror}") from None
        if stat.S_ISDIR(st.st_mode) or st.st_nlink < 2:
            continue
        linked += 1
        if linked > MAX_LINKED:
            raise SendStreamError(f"more than {MAX_LINKED} changed files have several names")
        r = subprocess.run(["btrfs", "inspect-internal", "inode-resolve", str(st.st_ino), str(root)],
                           capture_output=True)
        top = os.fsencode(str(root)) + b"/"
        names = [os.fsdecode(ln[len(top):]) for ln in r.stdout.split(b"\n") if ln.startswith(top)]
        if r.returncode != 0 or len(names) != st.st_nlink:
            raise SendStreamError(f"cannot name every link of {p!r}")
        for q in names:
            try:
                if os.lstat(root / q).st_ino != st.st_ino:
                    raise SendStreamError(f"cannot name every link of {p!r}")
            except OSError:
                raise SendStreamError(f"cannot name every link of {p!r}") from None
        more.update(names)
    ch.changed |= more


def _why_not(safe: Safe, prev: Point, source: Path, read_path: Path, walk: dict, live_dev: int | None,
             parent: Path) -> str | None:
    """Why the previous point's tree may not be what a full walk of ``parent`` makes now, or
    why ``parent`` is not its base any more; None when nothing says so."""
    if not os.path.isdir(parent):
        return f"the previous point's snapshot {parent} is gone"
    snap = prev.snapshot
    why = parent_mismatch(snap.get("subvol") if isinstance(snap, Mapping) else None, parent, subvol_root(read_path))
    if why is not None:
        return why
    if prev.source != str(source):
        return f"the previous point of that name was of {prev.source}"
    if prev.extra.get("walk") != walk:
        return "the previous point was walked with other settings (excludes, --one-file-system) or by an older version"
    for w in prev.warnings:
        if not str(w.get("message", "")).startswith(FALLBACK) and w.get("path") not in _BENIGN_PATHS:
            return "the previous point has warnings (what it could not read is read again)"
    new_root = subvol_root(read_path)
    prefix = os.path.relpath(read_path, new_root)
    if prefix != ".":
        try:
            if os.lstat(parent / prefix).st_ino != os.lstat(read_path).st_ino:
                return f"{source} is another directory than in the previous point's snapshot"
        except OSError as e:
            return f"{source} is not in the previous point's snapshot: {e.strerror}"
    if prev.root is None:
        return "the previous point has no tree"
    try:
        devs = {e.dev for e in read_tree(safe.get, prev.root)}
    except Exception as e:  # noqa: BLE001 - a damaged previous point: walk whole
        return f"the previous point's tree cannot be read: {e}"
    if devs and live_dev is not None and live_dev not in devs:
        return "the source's device number changed since the previous point"
    return None
