"""defrag: rewrite live chunks so that the newest point of each source reads sequentially.

Walk the newest points in file order (gc/walk.py) and cut the chunk sequence into *runs*:
maximal stretches whose records already lie one after another in one pack (the same
contiguity rule as the fragmentation figure, gc/fragmentation.py). A run of at least
``keep_bytes`` (half a pack) is left where it is; shorter runs are copied, in walk order, into
new packs (cas/relocate.py: verbatim copy, fsync, one index commit per batch). Chunks met
again (shared between files or points) stay where their first copy went. Afterwards the packs
the moves left mostly dead are compacted like ``gc`` does, which gives their space back.

A rerun after a crash finds the chunks already moved in long runs and leaves them; the cost of
defrag is the size of the newest points plus what it rewrites.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from pointsafe.cas import Safe
from pointsafe.cas.index import ObjectEntry
from pointsafe.cas.pack import PACK_HEADER
from pointsafe.cas.relocate import Relocator

from .collect import DEFAULT_THRESHOLD, collect, packs_on_disk
from .fragmentation import GAP, fragmentation
from .walk import newest_chunks, with_entries


@dataclass
class DefragReport:
    """What defrag did (or, in a dry run, would do): chunks walked, runs kept, objects and bytes
    moved, packs written / compacted / deleted, sizes and the fragmentation before and after.
    """
    dry_run: bool = False
    chunks_walked: int = 0
    runs_kept: int = 0
    objects_moved: int = 0
    bytes_moved: int = 0
    packs_written: list[str] = field(default_factory=list)
    packs_rewritten: list[str] = field(default_factory=list)
    packs_deleted: list[str] = field(default_factory=list)
    size_before: int = 0
    size_after: int = 0
    bytes_reclaimed: int = 0
    fragmentation_before: dict | None = None
    fragmentation_after: dict | None = None
    warnings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        """The report as a new dict (JSON-able)."""
        return asdict(self)


class _Runs:
    """Cuts the walk into runs; short runs are handed to ``move`` when they end."""

    def __init__(self, keep_bytes: int, move, pack_ends: dict[int, int] | None = None):
        self.keep_bytes = keep_bytes
        self.move = move
        self.pack_ends = pack_ends or {}
        self.buf: list[tuple[bytes, ObjectEntry | None]] = []
        self.pack = -1
        self.end = 0
        self.size = 0
        self.keeping = False
        self.kept = 0

    def add(self, key: bytes, pack: int, offset: int, length: int, entry: ObjectEntry | None = None) -> None:
        seq = pack == self.pack and self.end <= offset <= self.end + GAP
        if not seq and offset == PACK_HEADER.size and self.pack >= 0:
            # From the end of one pack to the start of another: a run may go on across packs.
            end = self.pack_ends.get(self.pack)
            seq = end is not None and self.end <= end <= self.end + GAP
        if not seq:
            self.close()
        self.pack, self.end = pack, offset + length
        self.size += length
        if self.keeping:
            return
        self.buf.append((key, entry))
        if self.size >= self.keep_bytes:
            self.keeping = True
            self.kept += 1
            self.buf.clear()

    def close(self) -> None:
        """End the current run: move it unless it was long enough to keep."""
        if self.buf and not self.keeping:
            for k, e in self.buf:
                self.move(k, e)
        self.buf.clear()
        self.pack, self.end, self.size, self.keeping = -1, 0, 0, False


def _plan(safe: Safe, keep_bytes: int, threshold: float) -> tuple[set[int], int, int, int, int]:
    """Walk once without writing: which old packs the moves will leave at or above the
    threshold (those get compacted afterwards, so runs in them are moved now, in walk
    order, rather than kept and then scattered by the compaction). Returns (doomed packs,
    chunks walked, runs kept, objects to move, bytes to move)."""
    packs = safe.pack_entries()
    out: dict[int, int] = {}
    n = b = 0

    def count(key: bytes, e) -> None:
        nonlocal n, b
        if e is not None:
            out[e.pack] = out.get(e.pack, 0) + e.record_len
            n += 1
            b += e.record_len

    runs = _Runs(keep_bytes, count, {p: pe.committed_len for p, pe in packs.items()})
    walked = 0
    for key, _len, e in with_entries(safe, newest_chunks(safe)):
        if e is None:
            continue
        walked += 1
        runs.add(key, e.pack, e.offset, e.record_len, e)
    runs.close()
    doomed = set()
    for pid, moved in out.items():
        pe = packs.get(pid)
        if pe is not None and (pe.dead_bytes + moved) / max(1, pe.live_bytes + pe.dead_bytes) >= threshold:
            doomed.add(pid)
    return doomed, walked, runs.kept, n, b


def defrag(safe: Safe, dry_run: bool = False, threshold: float = DEFAULT_THRESHOLD) -> DefragReport:
    """Defragment ``safe`` (or, with ``dry_run``, say how much would move)."""
    r = DefragReport(dry_run=dry_run)
    keep_bytes = max(safe.config.pack_size // 2, 64 * 1024)
    if dry_run:
        r.fragmentation_before = r.fragmentation_after = fragmentation(safe)
        _, r.size_before = packs_on_disk(safe)
        _doomed, r.chunks_walked, r.runs_kept, r.objects_moved, r.bytes_moved = _plan(safe, keep_bytes, threshold)
        r.size_after = r.size_before
        return r

    with safe.writer("defrag") as w:
        w.flush(seal=True)
        r.fragmentation_before = fragmentation(safe)
        _, r.size_before = packs_on_disk(safe)
        doomed, *_ = _plan(safe, keep_bytes, threshold)
        rel = Relocator(w)

        def move(key: bytes, _stale=None) -> None:
            e = safe.entry(key)     # fresh: the key may have moved since the walk looked it up
            if e is None or key in rel.pending_keys or rel.is_new(e.pack):
                return
            rel.move_entry(key, e)

        runs = _Runs(keep_bytes, move, {p: pe.committed_len for p, pe in safe.pack_entries().items()})
        try:
            for key, _len, e in with_entries(safe, newest_chunks(safe)):
                if e is None:
                    continue
                r.chunks_walked += 1
                if key in rel.pending_keys or rel.is_new(e.pack):
                    runs.close()       # already placed by this run
                    continue
                if e.pack in doomed:   # its pack is compacted next: place it now, in order
                    runs.close()
                    move(key)
                    continue
                runs.add(key, e.pack, e.offset, e.record_len)
            runs.close()
            rel.close()
        except BaseException:
            rel.abort()
            raise
        r.runs_kept = runs.kept
        r.objects_moved, r.bytes_moved = rel.objects_moved, rel.bytes_moved
        written = list(rel.packs_written)
        # Give back the space the moves left dead (old packs only).
        g = collect(w, threshold, measure=False)
        r.packs_rewritten = g.packs_rewritten
        r.packs_deleted = g.packs_deleted
        r.warnings = g.warnings
        alive = safe.pack_entries()
        r.packs_written = [f"{p:016x}" for p in written if p in alive] + g.packs_written
        _, r.size_after = packs_on_disk(safe)
        r.bytes_reclaimed = r.size_before - r.size_after
        r.fragmentation_after = fragmentation(safe)
    return r
