"""gc: bury orphans, drop dead objects from the index, delete packs left with nothing live,
rewrite packs whose dead share passes the threshold.

``plan_gc`` only reads (``--dry-run``); ``run_gc`` does the work under the writer lock, in
this order, each step crash-safe on its own (cas/relocate.py):

0. drain the release queue a forget may have left (cas/release.py);
1. bury orphans: objects a crashed backup left at count 0 are marked dead (cascading);
2. drop dead objects: walk the ``zero`` table (it lists only count-0 objects, so the cost
   follows what died, not the safe's size) and remove them from the index; packs left naming
   no object are deleted after the commit;
3. compact: packs whose dead share is >= threshold have their live records copied into new
   packs, then are deleted.

A rerun after a crash at any point finishes the job.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

from pointsafe.cas.relocate import Relocator, bury_orphans, count_dead, drop_dead, drop_empty_packs
from pointsafe.cas.release import drain

from .compact import compact, plan_compaction
from .fragmentation import cached_fragmentation, fragmentation

DEFAULT_THRESHOLD = 0.20


def packs_on_disk(safe) -> tuple[int, int]:
    """(pack files, their bytes) in the safe's packs directory."""
    n = size = 0
    with os.scandir(safe.packs_dir) as it:
        for d in it:
            if d.name.endswith(".pack"):
                n += 1
                size += d.stat().st_size
    return n, size


@dataclass
class GcReport:
    dry_run: bool = False
    threshold: float = DEFAULT_THRESHOLD
    points_dropped: int = 0
    objects_freed: int = 0          # dead objects removed from the index
    dead_bytes_freed: int = 0       # their record bytes
    orphans_buried: int = 0
    packs_deleted: list[str] = field(default_factory=list)
    packs_rewritten: list[str] = field(default_factory=list)
    packs_written: list[str] = field(default_factory=list)
    objects_moved: int = 0
    bytes_moved: int = 0
    size_before: int = 0            # bytes of pack files
    size_after: int = 0
    bytes_reclaimed: int = 0
    fragmentation_before: dict | None = None
    fragmentation_after: dict | None = None
    warnings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def _names(pids) -> list[str]:
    return [f"{p:016x}" for p in pids]


def plan_gc(safe, threshold: float = DEFAULT_THRESHOLD) -> GcReport:
    """What gc would do now (reads only). Orphans are counted but their cascade is not
    simulated, so packs they would empty are not in the plan."""
    r = GcReport(dry_run=True, threshold=threshold)
    dead, dead_bytes, orphans = count_dead(safe)
    r.objects_freed, r.dead_bytes_freed, r.orphans_buried = dead, dead_bytes, orphans
    _, r.size_before = packs_on_disk(safe)
    reclaim = 0
    for pid, pe in sorted(safe.pack_entries().items()):
        if pe.live_bytes <= 0 or pe.objects <= 0:
            r.packs_deleted.append(f"{pid:016x}")
            reclaim += pe.committed_len
    for c in plan_compaction(safe, threshold):
        if c.live_bytes > 0:
            r.packs_rewritten.append(f"{c.pack:016x}")
            r.bytes_moved += c.live_bytes
            reclaim += c.dead_bytes
    r.bytes_reclaimed = reclaim
    r.size_after = r.size_before - reclaim
    r.fragmentation_before = r.fragmentation_after = cached_fragmentation(safe)
    return r


def collect(w, threshold: float = DEFAULT_THRESHOLD, measure: bool = True) -> GcReport:
    """Run gc with writer ``w`` (which holds the lock). See the module docstring."""
    safe = w.safe
    r = GcReport(threshold=threshold)
    w.flush(seal=True)      # the writer's own pack is closed: compaction may rewrite it
    _, r.size_before = packs_on_disk(safe)
    r.points_dropped = 0
    drain(w)                # finish a forget that was interrupted (its queued drops)
    r.orphans_buried = bury_orphans(w)
    drop = drop_dead(w)
    empty = drop_empty_packs(w)
    r.objects_freed, r.dead_bytes_freed = drop.objects, drop.bytes
    deleted = drop.packs_deleted + empty.packs_deleted
    cands = [c.pack for c in plan_compaction(safe, threshold)]
    frag_before = cached_fragmentation(safe)
    if cands and measure and frag_before is None:
        frag_before = fragmentation(safe)
    rel = Relocator(w)
    try:
        res = compact(w, rel, cands)
        rel.close()
    except BaseException:
        rel.abort()
        raise
    r.packs_rewritten = _names(res.rewritten)
    alive = safe.pack_entries()
    r.packs_written = _names(p for p in rel.packs_written if p in alive)
    r.objects_moved, r.bytes_moved = res.objects_moved, res.bytes_moved
    r.warnings = res.warnings
    deleted += rel.dropped.packs_deleted
    r.packs_deleted = _names(sorted(set(deleted) - set(res.rewritten)))
    _, r.size_after = packs_on_disk(safe)
    r.bytes_reclaimed = r.size_before - r.size_after
    r.fragmentation_before = frag_before
    if res.objects_moved and measure:
        r.fragmentation_after = fragmentation(safe)
    else:
        r.fragmentation_after = frag_before
    return r


def run_gc(safe, threshold: float = DEFAULT_THRESHOLD, dry_run: bool = False) -> GcReport:
    if dry_run:
        return plan_gc(safe, threshold)
    with safe.writer("gc") as w:
        return collect(w, threshold)
