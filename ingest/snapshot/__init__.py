"""Point-in-time snapshots of a backup's source: the source is frozen for an instant, a
snapshot is taken, and the backup reads the snapshot at leisure.

Providers (each a :class:`Provider`, chosen by :func:`plan`):

- ``btrfs`` (:mod:`.btrfs`): a read-only snapshot of the subvolume that holds SOURCE, in
  ``<subvolume>/.pointsafe-snapshots/``; the newest one per source name is kept (the base for
  changed-block tracking), older and stale ones are removed;
- ``lvm`` (:mod:`.lvm`): a classic LVM snapshot (``lvcreate -s``) of the logical volume that is
  SOURCE or holds it, mounted read-only for a tree, always unmounted and removed;
- ``reflink`` (:mod:`.reflink`): an instant clone (FICLONE) of a single file next to it,
  backed up and removed.

``auto`` picks the first of btrfs, lvm, reflink that applies, else reads live; ``none`` reads
live. A provider asked for by name that does not apply raises :class:`SnapshotError` (one line).
"""

from __future__ import annotations

import os
import signal
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Protocol

from pointsafe.cas import SafeError, UsageError

MODES = ("auto", "btrfs", "lvm", "reflink", "none")
DEFAULT_COW_SIZE = "10%ORIGIN"


class SnapshotError(SafeError):
    """A snapshot asked for could not be taken (or released): one line, no point."""


@dataclass
class Taken:
    """A snapshot that exists now: read ``read_path`` instead of SOURCE.

    ``dev_map`` maps the snapshot's device number to the live source's (inode numbers, sizes
    and times are the original's), so change detection sees an unchanged file as unchanged;
    ``live_stat`` is the live file's stat taken at the freeze (a reflink clone is a new inode:
    volume change detection compares the live file); ``kept`` the snapshot's lasting path once
    the point is committed (btrfs), recorded on the point."""
    method: str
    read_path: Path
    taken_at: str
    dev_map: dict[int, int] = field(default_factory=dict)
    live_stat: os.stat_result | None = None
    kept: str | None = None
    notes: list[str] = field(default_factory=list)   # what the user should know about it


class Provider(Protocol):
    """One way to snapshot one source. Order: ``clear_stale`` (under the safe's writer lock),
    ``take`` (inside the freeze), then exactly one of ``keep`` (the point is committed) or
    ``release`` (anything else, also on SIGTERM); ``release`` after ``keep`` does nothing."""

    method: str

    def clear_stale(self) -> list[str]:
        """Remove what killed backups of this source left (snapshots, mounts, clones); the names removed."""
        ...

    def take(self) -> Taken:
        """Take the snapshot now; SnapshotError (one line) when it cannot."""
        ...

    def keep(self) -> None:
        """The point is committed: keep what is to be kept (btrfs: the newest), remove the rest."""
        ...

    def release(self) -> None:
        """Remove (unmount, delete) whatever ``take`` made and ``keep`` did not keep; never leaves a mount."""
        ...


@dataclass
class Request:
    """What a backup asks of the snapshot machinery."""
    mode: str
    source: Path                 # resolved SOURCE
    st: os.stat_result           # its stat
    kind: str                    # "tree" or "volume"
    name: str                    # point name
    safe_id: str
    cow_size: str = DEFAULT_COW_SIZE
    one_file_system: bool = False


def check_mode(mode: str) -> str:
    """``mode`` if it is one of MODES, else UsageError naming them."""
    if mode not in MODES:
        raise UsageError(f"--snapshot {mode}: unknown mode; choose one of {', '.join(MODES)}")
    return mode


def plan(req: Request) -> tuple[Provider | None, str | None]:
    """(the provider that will snapshot the source, None to read live; why not, for ``auto``).

    ``none`` reads live. ``auto`` tries btrfs, then lvm, then reflink, and reads live when none
    applies (the second value says why; not an error). A provider asked for by name that does
    not apply raises SnapshotError with the reason."""
    from . import btrfs, lvm, reflink
    check_mode(req.mode)
    try:
        lvm.size_args(req.cow_size)       # a bad --snapshot-size is refused whatever the mode
    except SnapshotError as e:
        raise UsageError(str(e)) from None
    if req.mode == "none":
        return None, None
    kinds: dict[str, Callable[[Request, bool], tuple[Provider | None, str]]] = {
        "btrfs": btrfs.plan, "lvm": lvm.plan, "reflink": reflink.plan}
    if req.mode != "auto":
        prov, why = kinds[req.mode](req, True)
        if prov is None:
            raise SnapshotError(f"--snapshot {req.mode}: {why}")
        return prov, None
    reasons = []
    for mode, fn in kinds.items():
        prov, why = fn(req, False)
        if prov is not None:
            return prov, None
        reasons.append(f"{mode}: {why}")
    return None, "; ".join(reasons)


@contextmanager
def signals_deferred() -> Iterator[None]:
    """Block SIGTERM and SIGINT in this thread while the body runs (a clean-up that must not be
    cut short); a signal that arrived meanwhile is delivered when the body is done."""
    sigs = {signal.SIGTERM, signal.SIGINT}
    try:
        old = signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
    except (OSError, ValueError):
        yield
        return
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


__all__ = ["DEFAULT_COW_SIZE", "MODES", "Provider", "Request", "SnapshotError", "Taken", "check_mode", "plan",
           "signals_deferred"]
