"""gc: plan, then execute the plan (as restic's PlanPrune -> Execute).

``plan_gc`` only reads. It returns a frozen ``GcPlan``: what the release queue (an interrupted
forget) and the orphans (what a crashed backup left at count 0) will kill when they cascade,
which dead objects leave the index, which packs are deleted whole, which are rewritten, how
many bytes that gives back, and whether there is room to compact. The cascade is simulated, not
guessed: the ``zero`` table is walked and the children of what dies are followed, with the
counts dropped so far kept in an overlay that spills to a temporary SQLite file when large
(memory stays bounded). ``--dry-run`` prints that plan; a real run makes the plan again under
the writer lock and hands it to ``execute``, which does, in this order, each step crash-safe on
its own (cas/relocate.py):

0. drain the release queue (cas/release.py);
1. bury orphans (cascading);
2. drop dead objects from the index; delete the packs left naming no object;
3. compact the plan's packs (copy their live records into new packs, delete the old ones),
   unless there is not enough free space for the new packs: then compaction is skipped with a
   warning that says how much it needs.

Full disk: steps 0-2 need only index commits. When the filesystem is nearly full, gc deletes
the safe's space reserve (cas/release.py) so that LMDB finds room for those commits, works in
small transactions, and puts the reserve back at the end when there is room. Without a
reserve and with no free space at all, gc fails with one line saying how much to free.

A rerun after a crash at any point finishes the job.
"""

from __future__ import annotations

import math
import os
import sqlite3
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

from pointsafe.cas import Kind, Safe, SafeError, Writer, node_children
from pointsafe.cas.index import FLAG_DEAD, FLAG_PINNED, OBJ, ObjectEntry, PackEntry
from pointsafe.cas.pack import PACK_HEADER, REC_HEADER_SIZE
from pointsafe.cas.release import (
    DRAIN_BATCH,
    QUEUE,
    RESERVE_BYTES,
    TIGHT_BATCH,
    check_room,
    disk_full_error,
    drain,
    free_bytes,
    is_disk_full,
    keep_reserve,
    low_space,
    release_reserve,
    reserve_size,
)
from pointsafe.cas.relocate import (
    BATCH_BYTES,
    ZERO_BATCH,
    Relocator,
    bury_orphans,
    drop_dead,
    drop_empty_packs,
)

from .compact import candidates, compact
from .fragmentation import cached_fragmentation, fragmentation

DEFAULT_THRESHOLD = 0.20
READ_BATCH = 65536      # keys per read transaction while planning
SPILL = 100_000         # overlay entries kept in memory before they move to SQLite


def packs_on_disk(safe: Safe) -> tuple[int, int]:
    """(packs, their bytes) in the safe's pack store (its packs directory, or its bucket)."""
    n = size = 0
    for pid in safe.store.pack_ids():
        s = safe.store.size(pid)
        if s is not None:
            n += 1
            size += s
    return n, size


def _names(pids) -> list[str]:
    return [f"{p:016x}" for p in pids]


# -- the plan ------------------------------------------------------------------------------

@dataclass(frozen=True)
class GcPlan:
    """What gc will do to the safe as it is now. Pack ids are ints; ``as_dict`` names them."""

    threshold: float
    queued: int                   # keys waiting in the release queue (an interrupted forget)
    released: int                 # objects the queue's cascade kills
    orphans: int                  # objects a crashed backup left at count 0
    orphans_buried: int           # the orphans and what only they reach: all of them die
    objects_dropped: int          # dead objects removed from the index (now dead + dying)
    dead_bytes: int               # their record bytes
    delete: tuple[int, ...]       # packs deleted whole (no object left in them)
    delete_bytes: int             # their bytes
    rewrite: tuple[int, ...]      # packs compacted (dead share >= threshold), if ``compact``
    rewrite_bytes: int            # their bytes
    objects_moved: int            # live objects they hold, copied into new packs
    bytes_moved: int              # the record bytes copied
    new_packs: int                # packs the copies fill (estimated from bytes_moved)
    size_before: int              # bytes of the packs the index names
    free_before: int              # free bytes on the safe's filesystem when planned
    reserve: int                  # bytes of the space reserve gc may use on a full disk
    compaction_needs: int         # free bytes compaction needs (new packs + index room)
    compact: bool                 # False: not enough room, compaction is skipped

    @property
    def bytes_reclaimed(self) -> int:
        """Pack bytes given back: deleted packs whole, rewritten packs less their copies."""
        back = self.delete_bytes
        if self.compact and self.rewrite:
            back += self.rewrite_bytes - self.bytes_moved - PACK_HEADER.size * self.new_packs
        return back

    @property
    def skipped_message(self) -> str | None:
        """The warning a skipped compaction gives, or None when it runs (or has nothing to do)."""
        if self.compact or not self.rewrite:
            return None
        room = self.free_before + self.delete_bytes + self.reserve
        return (f"compaction of {len(self.rewrite)} packs skipped: it needs about "
                f"{_mib(self.compaction_needs)} free for its new packs and the safe's filesystem "
                f"has {_mib(room)} after deleting dead packs; free {_mib(self.compaction_needs - room)} "
                f"more (or forget more points) and run 'pointsafe gc' again")

    def stats(self) -> dict:
        """The plan's figures (no pack lists)."""
        d = self.as_dict()
        for k in ("delete", "rewrite"):
            d[k] = len(d[k])
        return d

    def as_dict(self) -> dict:
        """Every field, pack ids as 16-digit hex names, plus ``bytes_reclaimed``."""
        d = asdict(self)
        d["delete"] = _names(self.delete)
        d["rewrite"] = _names(self.rewrite)
        d["bytes_reclaimed"] = self.bytes_reclaimed
        return d


def _mib(n: int) -> str:
    return f"{max(n, 0) / (1 << 20):.1f} MiB"


class _Overlay:
    """Per-object state of the simulated cascade: drops applied so far and whether it died.
    A dict until SPILL entries, then a temporary SQLite file (bounded memory)."""

    def __init__(self) -> None:
        self.mem: dict[bytes, tuple[int, bool]] = {}
        self.db: sqlite3.Connection | None = None
        self.tmp: tempfile.TemporaryDirectory | None = None

    def get(self, key: bytes) -> tuple[int, bool]:
        v = self.mem.get(key)
        if v is not None or self.db is None:
            return v or (0, False)
        row = self.db.execute("SELECT n, died FROM o WHERE k = ?", (key,)).fetchone()
        return (row[0], bool(row[1])) if row else (0, False)

    def put(self, key: bytes, drops: int, died: bool) -> None:
        if self.db is not None:
            self.db.execute("INSERT OR REPLACE INTO o VALUES (?, ?, ?)", (key, drops, int(died)))
            return
        self.mem[key] = (drops, died)
        if len(self.mem) > SPILL:
            self._spill()

    def _spill(self) -> None:
        self.tmp = tempfile.TemporaryDirectory(prefix="pointsafe-gc-")
        self.db = sqlite3.connect(os.path.join(self.tmp.name, "overlay.db"))
        self.db.execute("PRAGMA journal_mode=OFF")
        self.db.execute("PRAGMA synchronous=OFF")
        self.db.execute("CREATE TABLE o (k BLOB PRIMARY KEY, n INTEGER, died INTEGER) WITHOUT ROWID")
        self.db.executemany("INSERT INTO o VALUES (?, ?, ?)",
                            ((k, n, int(d)) for k, (n, d) in self.mem.items()))
        self.mem.clear()

    def close(self) -> None:
        if self.db is not None:
            self.db.close()
        if self.tmp is not None:
            self.tmp.cleanup()


class _Simulation:
    """The plan's model of the index after drain, bury and drop: per-pack changes only."""

    def __init__(self, safe) -> None:
        self.safe = safe
        self.idx = safe.index
        self.overlay = _Overlay()
        self.drop_objects: dict[int, int] = {}   # pack -> objects leaving the index
        self.drop_bytes: dict[int, int] = {}     # pack -> their record bytes
        self.newly_dead: dict[int, int] = {}     # pack -> record bytes going from live to dead
        self.txn = None
        self.reads = 0

    def entry(self, key: bytes) -> ObjectEntry | None:
        if self.txn is None or self.reads >= 4096:   # short snapshots: LMDB reuses pages
            if self.txn is not None:
                self.txn.abort()
            self.txn = self.idx.read()
            self.reads = 0
        self.reads += 1
        return self.idx.get_object(self.txn, key)

    def dropped(self, e: ObjectEntry) -> None:
        self.drop_objects[e.pack] = self.drop_objects.get(e.pack, 0) + 1
        self.drop_bytes[e.pack] = self.drop_bytes.get(e.pack, 0) + e.record_len

    def kill(self, key: bytes, e: ObjectEntry, drops: int) -> list[bytes]:
        """Record that ``key`` dies; return its children (each loses one count)."""
        self.overlay.put(key, drops, True)
        self.dropped(e)
        self.newly_dead[e.pack] = self.newly_dead.get(e.pack, 0) + e.record_len
        if e.kind == Kind.CHUNK:
            return []
        return node_children(self.safe.read_entry(key, e))

    def cascade(self, seeds: list[tuple[bytes, int]]) -> int:
        """Apply ``seeds`` (key, drops), depth first; returns how many objects die."""
        died = 0
        stack = list(seeds)
        while stack:
            key, n = stack.pop()
            e = self.entry(key)
            if e is None:
                raise SafeError(f"internal error: release of unknown object {key.hex()[:12]}")
            drops, dead = self.overlay.get(key)
            drops += n
            if (max(0, e.refcount - drops) == 0 and not dead
                    and not e.flags & (FLAG_DEAD | FLAG_PINNED)):
                died += 1
                stack.extend((c, 1) for c in self.kill(key, e, drops))
            else:
                self.overlay.put(key, drops, dead)
        return died

    def bury(self, key: bytes, e: ObjectEntry) -> int:
        """An orphan dies with what only it reaches; returns how many objects die."""
        return 1 + self.cascade([(c, 1) for c in self.kill(key, e, 0)])

    def close(self) -> None:
        if self.txn is not None:
            self.txn.abort()
        self.overlay.close()


def _table_batches(idx, db) -> Iterator[list[tuple[bytes, bytes]]]:
    """(key, value) pairs of table ``db`` in batches, each read in its own short transaction."""
    after: bytes | None = None
    while True:
        items: list[tuple[bytes, bytes]] = []
        with idx.read() as txn:
            cur = txn.cursor(db=db)
            ok = cur.set_range(after) if after is not None else cur.first()
            while ok and len(items) < READ_BATCH:
                if cur.key() != after:
                    items.append((cur.key(), cur.value()))
                ok = cur.next()
        if not items:
            return
        yield items
        after = items[-1][0]


def _zero_keys(idx) -> Iterator[list[bytes]]:
    """The keys of the ``zero`` table in batches, each read in its own short transaction."""
    after: bytes | None = None
    while True:
        with idx.read() as txn:
            cur = txn.cursor(db=idx.db["zero"])
            if after is None:
                ok = cur.first()
            else:
                ok = cur.set_range(after) and (cur.key() != after or cur.next())
            keys = []
            if ok:
                for k in cur.iternext(keys=True, values=False):
                    keys.append(k)
                    if len(keys) >= READ_BATCH:
                        break
        if not keys:
            return
        yield keys
        after = keys[-1]


def _zero(sim: _Simulation) -> Iterator[tuple[bytes, ObjectEntry]]:
    """Walk the ``zero`` table: count every dead object in ``sim`` (it leaves the index) and
    yield (key, entry) of each orphan (count 0, neither dead nor pinned). The dead are the
    bulk: their entries are unpacked, not decoded, in one read transaction per batch."""
    idx = sim.idx
    objects = idx.db["objects"]
    drop_objects, drop_bytes = sim.drop_objects, sim.drop_bytes
    for batch in _zero_keys(idx):
        orphans = []
        with idx.read() as txn:
            found = txn.cursor(db=objects).getmulti(batch)   # one C loop per batch
        for key, v in found:
            pack, _, stored, _, _, _, flags, refcount = OBJ.unpack(v)
            if refcount or flags & FLAG_PINNED:
                continue
            if flags & FLAG_DEAD:
                drop_objects[pack] = drop_objects.get(pack, 0) + 1
                drop_bytes[pack] = drop_bytes.get(pack, 0) + REC_HEADER_SIZE + stored
            else:
                orphans.append((key, ObjectEntry.decode(v)))
        yield from orphans


def _queue(sim: _Simulation) -> Iterator[tuple[bytes, int]]:
    q = sim.idx.existing(QUEUE)   # never created here: planning writes nothing
    if q is None:
        return
    for batch in _table_batches(sim.idx, q):
        for key, v in batch:
            yield key, int.from_bytes(v[:4], "little")


def plan_gc(safe: Safe, threshold: float = DEFAULT_THRESHOLD) -> GcPlan:
    """What gc would do to the safe now (reads only; pass the writer's safe under the lock for
    a plan nothing can change before it runs). Cost follows the ``zero`` table and what the
    release queue and the orphans kill, not the safe's size."""
    sim = _Simulation(safe)
    try:
        queued = released = orphans = buried = 0
        for key, n in _queue(sim):            # step 0: drain
            queued += 1
            released += sim.cascade([(key, n)])
        for key, e in _zero(sim):             # step 1: bury (the dead are counted by _zero)
            if not sim.overlay.get(key)[1]:   # not killed by the queue's cascade
                orphans += 1
                buried += sim.bury(key, e)
    finally:
        sim.close()
    return _plan_packs(safe, threshold, sim, queued, released, orphans, buried)


def _after_drop(safe: Safe, sim: _Simulation) -> dict[int, PackEntry]:
    """The pack entries as steps 0-2 leave them (packs with no object left included)."""
    out = {}
    for pid, pe in safe.pack_entries().items():
        dead = sim.newly_dead.get(pid, 0)
        out[pid] = PackEntry(pe.committed_len, pe.live_bytes - dead, pe.dead_bytes + dead,
                             pe.created_ns, pe.objects - sim.drop_objects.get(pid, 0), pe.sealed)
    return out


def _plan_packs(safe: Safe, threshold: float, sim: _Simulation, queued: int, released: int,
                orphans: int, buried: int) -> GcPlan:
    entries = _after_drop(safe, sim)
    delete = tuple(pid for pid, pe in sorted(entries.items()) if pe.objects <= 0)
    cands = candidates({p: pe for p, pe in entries.items() if pe.objects > 0}, threshold)
    rewrite = tuple(c.pack for c in cands)
    moved = sum(c.live_bytes for c in cands)
    pack_size = safe.config.pack_size
    new_packs = math.ceil(moved / pack_size) if moved else 0
    # The relocator deletes each old pack at the first commit after its last record moved:
    # at most a pack being emptied and a batch of copies are on disk twice at once.
    peak = min(moved + PACK_HEADER.size * new_packs, pack_size + max(BATCH_BYTES, pack_size))
    needs = peak + RESERVE_BYTES if rewrite else 0
    free = free_bytes(safe)
    reserve = reserve_size(safe) if low_space(safe) else 0
    delete_bytes = sum(entries[p].committed_len for p in delete)
    return GcPlan(
        threshold=threshold, queued=queued, released=released, orphans=orphans,
        orphans_buried=buried, objects_dropped=sum(sim.drop_objects.values()),
        dead_bytes=sum(sim.drop_bytes.values()), delete=delete, delete_bytes=delete_bytes,
        rewrite=rewrite, rewrite_bytes=sum(entries[p].committed_len for p in rewrite),
        objects_moved=sum(entries[p].objects for p in rewrite), bytes_moved=moved,
        new_packs=new_packs, size_before=sum(pe.committed_len for pe in entries.values()),
        free_before=free, reserve=reserve, compaction_needs=needs,
        compact=not rewrite or free + delete_bytes + reserve >= needs)


# -- the report ----------------------------------------------------------------------------

@dataclass
class GcReport:
    """What gc did (or, with ``dry_run``, would do): the plan's figures in a dry run, measured
    ones after a real run. ``plan`` is the executed plan (``GcPlan.as_dict``)."""

    dry_run: bool = False
    threshold: float = DEFAULT_THRESHOLD
    objects_freed: int = 0          # dead objects removed from the index
    dead_bytes_freed: int = 0       # their record bytes
    orphans_buried: int = 0         # orphans and what only they reached, marked dead
    packs_deleted: list[str] = field(default_factory=list)
    packs_rewritten: list[str] = field(default_factory=list)
    packs_written: list[str] = field(default_factory=list)   # names, after a real run only
    objects_moved: int = 0
    bytes_moved: int = 0
    size_before: int = 0            # bytes of pack files
    size_after: int = 0
    bytes_reclaimed: int = 0
    compaction_skipped: bool = False
    fragmentation_before: dict | None = None
    fragmentation_after: dict | None = None   # None in a dry run (not predicted)
    warnings: list[str] = field(default_factory=list)
    plan: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        """The report as a new dict (JSON-able)."""
        return asdict(self)


def report_plan(safe: Safe, plan: GcPlan) -> GcReport:
    """The dry-run report: what executing ``plan`` would do."""
    skipped = plan.skipped_message
    compacting = plan.compact and bool(plan.rewrite)
    return GcReport(
        dry_run=True, threshold=plan.threshold, objects_freed=plan.objects_dropped,
        dead_bytes_freed=plan.dead_bytes, orphans_buried=plan.orphans_buried,
        packs_deleted=_names(plan.delete),
        packs_rewritten=_names(plan.rewrite) if compacting else [],
        objects_moved=plan.objects_moved if compacting else 0,
        bytes_moved=plan.bytes_moved if compacting else 0,
        size_before=plan.size_before, size_after=plan.size_before - plan.bytes_reclaimed,
        bytes_reclaimed=plan.bytes_reclaimed, compaction_skipped=skipped is not None,
        fragmentation_before=cached_fragmentation(safe), fragmentation_after=None,
        warnings=[skipped] if skipped else [], plan=plan.as_dict())


# -- execution -----------------------------------------------------------------------------

def execute(w: Writer, plan: GcPlan, measure: bool = True) -> GcReport:
    """Carry out ``plan`` (made under ``w``'s lock) with writer ``w``; see the module
    docstring. The report says what happened, and warns where it differs from the plan."""
    safe = w.safe
    r = GcReport(threshold=plan.threshold, plan=plan.as_dict())
    w.flush(seal=True)      # the writer's own pack is closed: compaction may rewrite it
    _, r.size_before = packs_on_disk(safe)
    tight = low_space(safe)
    if tight:
        check_room(safe, "gc")   # nothing at all free: say so before changing anything
        release_reserve(safe)    # room for the index commits that delete dead packs
    try:
        # On a nearly full disk, small transactions: few new index pages per commit.
        drain(w, TIGHT_BATCH if tight else DRAIN_BATCH)
        r.orphans_buried = bury_orphans(w, TIGHT_BATCH if tight else ZERO_BATCH)
        drop = drop_dead(w, TIGHT_BATCH if tight else ZERO_BATCH, on_drop=_drop_hook(safe))
        empty = drop_empty_packs(w)
    except Exception as e:
        if is_disk_full(e, safe):
            raise disk_full_error(safe, "gc", "what it committed before stays done") from None
        raise
    r.objects_freed, r.dead_bytes_freed = drop.objects, drop.bytes
    deleted = drop.packs_deleted + empty.packs_deleted
    if sorted(deleted) != list(plan.delete) or r.objects_freed != plan.objects_dropped:
        r.warnings.append(f"gc deleted {len(deleted)} packs and freed {r.objects_freed} objects where "
                          f"its plan said {len(plan.delete)} and {plan.objects_dropped} (please report this)")
    frag_before = cached_fragmentation(safe)
    cands = _packs_to_compact(safe, plan, r)
    if cands and measure and frag_before is None:
        frag_before = fragmentation(safe)
    rel = Relocator(w)
    try:
        res = compact(w, rel, cands)
        rel.close()
    except BaseException as e:
        rel.abort()
        if isinstance(e, Exception) and is_disk_full(e, safe):
            raise disk_full_error(safe, "gc's compaction", "the dead packs are deleted") from None
        raise
    r.packs_rewritten = _names(res.rewritten)
    alive = safe.pack_entries()
    r.packs_written = _names(p for p in rel.packs_written if p in alive)
    r.objects_moved, r.bytes_moved = res.objects_moved, res.bytes_moved
    r.warnings += res.warnings
    deleted += rel.dropped.packs_deleted
    r.packs_deleted = _names(sorted(set(deleted) - set(res.rewritten)))
    keep_reserve(safe)
    _, r.size_after = packs_on_disk(safe)
    r.bytes_reclaimed = r.size_before - r.size_after
    r.fragmentation_before = frag_before
    r.fragmentation_after = fragmentation(safe) if res.objects_moved and measure else frag_before
    return r


def _drop_hook(safe: Safe):
    """What must follow the objects gc removes, in the same index transaction: on a safe
    served to agents, their counts of bytes stored and their id rows of those objects
    (cas/agent_rows.py ``dropped_objects``); None on any other safe."""
    from pointsafe.cas.agent_rows import dropped_objects
    return dropped_objects(safe)


def _packs_to_compact(safe: Safe, plan: GcPlan, r: GcReport) -> list[int]:
    """The plan's packs, unless the plan or the free space now says there is no room."""
    if not plan.rewrite:
        return []
    msg = plan.skipped_message
    if msg is None and free_bytes(safe) < plan.compaction_needs:
        msg = (f"compaction of {len(plan.rewrite)} packs skipped: it needs about "
               f"{_mib(plan.compaction_needs)} free and the safe's filesystem has "
               f"{_mib(free_bytes(safe))} (something else used the space since gc planned); "
               f"free some space and run 'pointsafe gc' again")
    if msg is not None:
        r.compaction_skipped = True
        r.warnings.append(msg)
        return []
    return list(plan.rewrite)


def collect(w: Writer, threshold: float = DEFAULT_THRESHOLD, measure: bool = True) -> GcReport:
    """Plan and run gc with writer ``w`` (which holds the lock, so the plan cannot go stale)."""
    return execute(w, plan_gc(w.safe, threshold), measure)


def run_gc(safe: Safe, threshold: float = DEFAULT_THRESHOLD, dry_run: bool = False) -> GcReport:
    """gc of ``safe``: with ``dry_run`` the report of the plan (reads only, no lock), else
    the report of the plan executed under the writer lock."""
    if dry_run:
        return report_plan(safe, plan_gc(safe, threshold))
    with safe.writer("gc") as w:
        return collect(w, threshold)
