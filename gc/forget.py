"""forget: drop points, named or chosen by a retention policy (gc/retention.py).

Forgetting writes a tombstone per point (so that ``repair`` never brings it back), removes it
from the ``points`` table and queues the release of its root, in one commit per group of points;
then the queue is drained in bounded transactions: counts cascade down and objects that no
remaining point reaches are marked dead (cas/release.py). The cost follows what those points
alone referenced; memory stays bounded however much dies. Bytes go back with ``gc``.

Every forget goes through here and ``cas.release.forget_points`` (the one forget path). On a
nearly full disk the safe's space reserve is released first so that the commits find room, and
the transactions are small; with no room at all, one line says how much to free.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from pointsafe.cas import Safe, UsageError, resolve_point
from pointsafe.cas.release import (
    DRAIN_BATCH,
    TIGHT_BATCH,
    check_room,
    disk_full_error,
    drain,
    forget_points_queued,
    is_disk_full,
    keep_reserve,
    low_space,
    queued,
    release_reserve,
)

from . import retention
from .retention import Decision, Policy

GROUP = 64   # points per index transaction


@dataclass
class ForgetReport:
    """What forget did (or, in a dry run, would do): points dropped and kept, objects that died
    and their bytes (reclaimable by gc), and the policy's decision for each point.
    """
    dry_run: bool = False
    policy: str | None = None
    points_dropped: int = 0
    points_kept: int = 0
    objects_freed: int = 0          # objects that died (no remaining point reaches them)
    dead_bytes: int = 0             # their record bytes, reclaimable by gc
    decisions: list[dict] = field(default_factory=list)
    snapshots_removed: list[str] = field(default_factory=list)   # btrfs snapshots no longer needed
    snapshot_problems: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        """The report as a new dict (JSON-able)."""
        return asdict(self)


def plan_forget(safe: Safe, specs: list[str] | None = None, policy: Policy | None = None,
                name: str | None = None) -> list[Decision]:
    """Decisions (reads only): named points (``specs``) are dropped; otherwise the policy
    decides. Raises UsageError for names that match nothing or an empty request."""
    points = safe.points()
    if specs:
        if policy is not None and not policy.empty:
            raise UsageError("give either POINTs or --keep-* rules, not both")
        seen: dict[str, Decision] = {}
        for s in specs:
            p = resolve_point(safe, s, points)
            seen.setdefault(p.id, Decision(p, False, [f"named on the command line ({s})"]))
        return list(seen.values())
    if policy is None or policy.empty:
        raise UsageError("nothing to forget: name POINTs or give at least one --keep-* rule "
                         "(e.g. --keep-daily 7)")
    if name is not None and not any(p.name == name for p in points):
        names = sorted({p.name for p in points})
        raise UsageError(f"no points named {name!r} (names in this safe: {', '.join(names) or 'none'})")
    return retention.plan(points, policy, name)


def forget(safe: Safe, decisions: list[Decision], dry_run: bool = False,
           policy: Policy | None = None) -> ForgetReport:
    """Drop the points ``decisions`` do not keep (or, with ``dry_run``, only count them); a
    queue an interrupted forget left is finished first. Objects no remaining point reaches are
    marked dead; ``gc`` gives their bytes back."""
    r = ForgetReport(dry_run=dry_run, policy=policy.describe() if policy else None)
    r.decisions = [d.as_dict() for d in decisions]
    drop = [bytes.fromhex(d.point.id) for d in decisions if not d.keep]
    r.points_kept = sum(1 for d in decisions if d.keep)
    if dry_run:
        r.points_dropped = len(drop)
        return r
    if not drop and not queued(safe.index):
        return r
    tight = low_space(safe)
    if tight:
        check_room(safe, "forget")
    batch = TIGHT_BATCH if tight else DRAIN_BATCH
    try:
        with safe.writer("forget") as w:
            if tight:
                release_reserve(safe)     # room for the index commits
            dead_before = _dead_bytes(safe)
            if drop:
                _drop_points(safe, w, drop, r)
            r.objects_freed += drain(w, batch)   # cascade (and finish an interrupted forget)
            if drop:
                _forget_snapshots(safe, [d.point for d in decisions if not d.keep], r)
    except Exception as e:
        if is_disk_full(e, safe):
            done = (f"the {r.points_dropped} points are forgotten and what they alone held waits in "
                    "the release queue ('pointsafe gc' finishes it)" if r.points_dropped else "")
            raise disk_full_error(safe, "forget", done) from None
        raise
    r.dead_bytes = _dead_bytes(safe) - dead_before
    keep_reserve(safe)
    return r


def _forget_snapshots(safe: Safe, dropped: list, r: ForgetReport) -> None:
    """Per source name of the dropped points, keep exactly one btrfs snapshot (the newest) while
    points of it remain, none once its last point is gone (ingest/snapshot/retained.py)."""
    try:
        from pointsafe.ingest.snapshot.retained import after_forget
    except ImportError:
        return
    r.snapshots_removed, r.snapshot_problems = after_forget(safe, dropped)


def _dead_bytes(safe: Safe) -> int:
    return safe.counters().dead_bytes


def _drop_points(safe: Safe, w, drop: list[bytes], r: ForgetReport) -> None:
    """Commit the points' removal and queue their release, GROUP points per commit (the
    cascade is drained afterwards)."""
    live = {p.id for p in safe.points()}
    for i in range(0, len(drop), GROUP):
        group = [k for k in drop[i:i + GROUP] if k.hex() in live]
        if group:
            forget_points_queued(w, group)
            r.points_dropped += len(group)
