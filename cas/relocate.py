"""Primitives for gc and defrag: bury orphans, drop dead objects from the index, move live
records into new packs, delete packs that hold nothing the index names.

Ordering rules (docs/FORMAT.md, "Read and write ordering", rules 7 to 9):

- a relocated record is copied byte for byte (checked against its checksum first) into a new
  pack, and that pack is fsynced *before* the LMDB transaction that repoints the object commits;
- a pack file is unlinked only *after* the commit that stops the index naming it. A reader that
  looked an object up earlier either still holds the old file open (an unlinked file stays
  readable) or fails to open it and looks the object up again (``Safe.get``);
- pack ids come from ``meta.next_pack`` and are never reused;
- every function here needs the writer lock: pass the ``Writer`` that holds it.

A crash at any instant leaves either the old index (the new pack is not referenced and the
next writer removes it) or the new one (the old pack is unreferenced and the next writer
removes its file); a rerun finishes the job.

Memory is bounded: the ``zero`` table is walked in batches, and a relocation batch holds at
most ``BATCH_OBJECTS`` moves before it commits.
"""

from __future__ import annotations


from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterator

from .index import FLAG_DEAD, FLAG_PINNED, Index, ObjectEntry, PackEntry, pack_from_dbkey
from .pack import (check_record, PACK_HEADER, REC_HEADER_SIZE, check_pack_header, parse_record_header)
from .packwriter import PackWriter
from .store import Writer

if TYPE_CHECKING:
    from .index import Txn

ZERO_BATCH = 65536     # keys per transaction (in key order, so they share index pages)
BATCH_OBJECTS = 8192   # moves per commit: random keys, each may dirty an index page held in memory
BATCH_BYTES = 32 * 1024 * 1024
LAYOUT_GEN = "layout_gen"   # meta counter bumped whenever objects move (fragmentation caches)


# -- dead objects --------------------------------------------------------------------------

def _zero_batches(idx: Index, batch: int = ZERO_BATCH) -> Iterator[list[bytes]]:
    """The keys of the ``zero`` table in batches, each read in its own short transaction."""
    after: bytes | None = None
    while True:
        keys: list[bytes] = []
        with idx.read() as txn:
            cur = txn.cursor(db=idx.db["zero"])
            ok = cur.set_range(after) if after is not None else cur.first()
            while ok and len(keys) < batch:
                k = cur.key()
                if k != after:
                    keys.append(k)
                ok = cur.next()
        if not keys:
            return
        yield keys
        after = keys[-1]


def bury_orphans(w: Writer, batch: int = ZERO_BATCH) -> int:
    """Mark dead every unpinned object left at count 0 and not dead yet (a crashed backup's
    orphans), cascading to their children, in bounded transactions.
    Correct only under the writer lock (no backup can be linking these objects)."""
    idx = w.index
    died = 0
    for keys in _zero_batches(idx, batch):
        with idx.write() as txn:
            rc = w.refs(txn)
            stack: list[bytes] = []
            for key in keys:
                children = rc.bury(key)
                if children is not None:
                    died += 1
                    stack.extend(children)
            died += rc.release(stack)
            rc.finish()
    return died


@dataclass
class DropStats:
    """What dropping dead objects and empty packs removed and gave back."""

    objects: int = 0          # dead objects removed from the index
    bytes: int = 0            # their record bytes
    packs_deleted: list[int] = field(default_factory=list)
    bytes_reclaimed: int = 0  # file bytes of the packs deleted


DropHook = Callable[["Txn", list[tuple[bytes, ObjectEntry]]], None]   # see drop_dead


def drop_dead(w: Writer, batch: int = ZERO_BATCH, on_drop: DropHook | None = None) -> DropStats:
    """Remove every dead object (count 0, FLAG_DEAD) from the index; delete the packs left
    naming no object. An object with a non-zero count is never removed, whatever its flags.
    ``w`` holds the writer lock; the packs are unlinked only after the commit that stops the
    index naming them. ``on_drop(txn, removed)`` runs in each transaction with the (key, entry)
    pairs it removes, for rows elsewhere in the index that must go with them (the safe server's
    per-agent counts). Cost: one pass over the ``zero`` table, in bounded transactions."""
    idx = w.index
    st = DropStats()
    for keys in _zero_batches(idx, batch):
        doomed: list[tuple[int, int]] = []
        removed: list[tuple[bytes, ObjectEntry]] = []
        with idx.write() as txn:
            packs: dict[int, PackEntry] = {}
            for key in keys:
                e = idx.get_object(txn, key)
                if e is None:
                    txn.delete(key, db=idx.db["zero"])
                    continue
                if not e.flags & FLAG_DEAD or e.refcount or e.flags & FLAG_PINNED:
                    continue
                txn.delete(key, db=idx.db["objects"])
                txn.delete(key, db=idx.db["zero"])
                pe = packs.get(e.pack) or idx.get_pack(txn, e.pack)
                if pe is not None:
                    pe.objects -= 1
                    packs[e.pack] = pe
                st.objects += 1
                st.bytes += e.record_len
                removed.append((key, e))
            if on_drop is not None and removed:
                on_drop(txn, removed)
            for pid, pe in packs.items():
                if pe.objects <= 0:
                    idx.delete_pack(txn, pid)
                    doomed.append((pid, pe.committed_len))
                else:
                    idx.put_pack(txn, pid, pe)
        _unlink_packs(w, doomed, st)
    return st


def drop_empty_packs(w: Writer) -> DropStats:
    """Delete packs the index names but that hold no indexed object (one pass over ``packs``);
    ``w`` holds the writer lock; files are unlinked after the commit."""
    idx = w.index
    st = DropStats()
    doomed: list[tuple[int, int]] = []
    with idx.write() as txn:
        for k, v in list(txn.cursor(db=idx.db["packs"])):
            pe = PackEntry.decode(v)
            if pe.objects <= 0:
                idx.delete_pack(txn, pack_from_dbkey(k))
                doomed.append((pack_from_dbkey(k), pe.committed_len))
    _unlink_packs(w, doomed, st)
    return st


def _unlink_packs(w: Writer, doomed: list[tuple[int, int]], st: DropStats) -> None:
    """After the commit: remove the packs (a crash here leaves files the next writer removes)."""
    store = w.safe.store
    for pid, length in doomed:
        size = store.size(pid)
        st.packs_deleted.append(pid)
        st.bytes_reclaimed += length if size is None else size
    store.delete([pid for pid, _ in doomed])


# -- relocation ----------------------------------------------------------------------------

def live_records(w: Writer, pack_id: int) -> Iterator[tuple[bytes, ObjectEntry, bytes]]:
    """(key, entry, record bytes) of every record of ``pack_id`` that the index still names
    at that offset, in pack order. Reads the pack sequentially once; each record's stored
    bytes are checked against their checksum before they are handed out (IntegrityError when
    they do not match, or when a record header does not parse). ``w`` holds the writer lock,
    so that the pack cannot change meanwhile."""
    idx = w.index
    objects = idx.db["objects"]
    with idx.read() as t:
        pe = idx.get_pack(t, pack_id)
    if pe is None:
        return
    end = pe.committed_len
    # The store's reader, buffered: records are read (or skipped) front to back, once.
    with w.safe.store.open_reader(pack_id, buffer=1 << 20) as f:
        check_pack_header(f.read(PACK_HEADER.size), pack_id)
        off = PACK_HEADER.size
        txn = idx.read()
        n = 0
        try:
            while off < end:
                f.seek(off)
                hb = f.read(REC_HEADER_SIZE)
                h = parse_record_header(hb, pack_id, off)
                n += 1
                if n % 4096 == 0:       # a fresh snapshot now and then: LMDB reuses pages
                    txn.abort()
                    txn = idx.read()
                v = txn.get(h.key, db=objects)
                e = ObjectEntry.decode(v) if v is not None else None
                if e is not None and e.pack == pack_id and e.offset == off:
                    rec = hb + f.read(h.stored_len)
                    check_record(rec, pack_id, off, h.key)
                    yield h.key, e, rec
                off += h.total
        finally:
            txn.abort()


class Relocator:
    """Moves records into new packs, committing in batches (through the one pack writer).

    ``move(key, entry, record)`` appends a record; ``release_pack(pid)`` says every live
    record of old pack ``pid`` has been handed over, so the pack is deleted by the commit that
    leaves it naming no object. ``close()`` commits what is pending. ``w`` is the Writer that
    holds the lock; not thread-safe.
    """

    def __init__(self, w: Writer, seal_last: bool = False):
        self.w = w
        self.safe = w.safe
        self.idx = w.index
        self.seal_last = seal_last
        self.packs = PackWriter(self.safe.store, self.idx, self.safe.config.pack_size, reuse_last=False)
        self.moves: list[tuple[bytes, int, int, int, int, int]] = []   # key, old pack, old off, new pack, new off, len
        self.pending_keys: set[bytes] = set()
        self.batch_bytes = 0
        self.releasing: set[int] = set()
        with self.idx.read() as t:
            self.start_pack = self.idx.get_meta_int(t, "next_pack", 1)
        self.objects_moved = 0
        self.bytes_moved = 0
        self.dropped = DropStats()

    @property
    def packs_written(self) -> list[int]:
        """The packs this relocator created."""
        return self.packs.packs_written

    def is_new(self, pack_id: int) -> bool:
        """True when ``pack_id`` was written by this relocator."""
        return pack_id >= self.start_pack

    def move(self, key: bytes, e: ObjectEntry, record: bytes) -> None:
        """Copy ``record`` (checked by the caller) into a new pack; the object is repointed
        by the commit that follows (one runs by itself every BATCH_OBJECTS moves or
        BATCH_BYTES). A key already moved in this batch is skipped. Raises SafeError (DiskFull)
        when writing or committing fails."""
        if key in self.pending_keys:
            return
        if self.packs.full:
            self.commit(seal=True)
        pid, off = self.packs.append(record)
        self.moves.append((key, e.pack, e.offset, pid, off, len(record)))
        self.pending_keys.add(key)
        self.batch_bytes += len(record)
        self.objects_moved += 1
        self.bytes_moved += len(record)
        if len(self.moves) >= BATCH_OBJECTS or self.batch_bytes >= BATCH_BYTES:
            self.commit()

    def move_entry(self, key: bytes, e: ObjectEntry) -> None:
        """Move one object, reading its record from where the index says it is; IntegrityError
        when that record is damaged (nothing is moved), OSError from the pack store."""
        rec = self.safe.store.read(e.pack, e.offset, e.record_len)
        check_record(rec, e.pack, e.offset, key)   # cas.pack: framing and checksum, no decompression
        self.move(key, e, rec)

    def release_pack(self, pack_id: int) -> None:
        """Every live record of ``pack_id`` was handed over: delete it once it names nothing."""
        self.releasing.add(pack_id)

    def commit(self, seal: bool = False) -> None:
        """Make the moved records durable, then repoint their objects in one transaction and
        delete the released packs left naming nothing (after that commit). Raises SafeError
        (DiskFull) when either step fails; nothing is then committed."""
        idx = self.idx
        doomed: list[tuple[int, int]] = []

        def apply(txn: Txn, npe: PackEntry | None) -> None:
            packs: dict[int, PackEntry] = {}
            for key, old_pack, old_off, new_pack, new_off, length in self.moves:
                assert npe is not None and new_pack == self.packs.pack_id
                e = idx.get_object(txn, key)
                if e is None or (e.pack, e.offset) != (old_pack, old_off):
                    # Moved or dropped meanwhile (cannot happen under the lock); the copy is dead.
                    npe.dead_bytes += length
                    continue
                ope = packs.get(old_pack) or idx.get_pack(txn, old_pack)
                assert ope is not None      # an indexed object's pack is indexed
                ope.objects -= 1
                if not e.flags & FLAG_DEAD:   # a dead one's bytes were already counted dead
                    ope.live_bytes -= length
                    ope.dead_bytes += length
                packs[old_pack] = ope
                e.pack, e.offset = new_pack, new_off
                idx.put_object(txn, key, e)
                if e.flags & FLAG_DEAD:
                    npe.dead_bytes += length
                else:
                    npe.live_bytes += length
                npe.objects += 1
            for pid in self.releasing:
                if pid not in packs:
                    pe = idx.get_pack(txn, pid)
                    if pe is not None:
                        packs[pid] = pe
            for pid, pe in packs.items():
                if pid in self.releasing and pe.objects <= 0:
                    idx.delete_pack(txn, pid)
                    doomed.append((pid, pe.committed_len))
                else:
                    idx.put_pack(txn, pid, pe)
            if self.moves:
                idx.put_meta_int(txn, LAYOUT_GEN, idx.get_meta_int(txn, LAYOUT_GEN, 0) + 1)

        self.packs.commit(apply, seal=seal)
        self.releasing -= {pid for pid, _ in doomed}
        self.moves.clear()
        self.pending_keys.clear()
        self.batch_bytes = 0
        _unlink_packs(self.w, doomed, self.dropped)

    def close(self) -> None:
        """Commit what is pending (sealing the last pack when asked)."""
        if self.packs.sink is not None or self.moves or self.releasing:
            self.commit(seal=self.seal_last)
        self.packs.close()

    def abort(self) -> None:
        """Leave without committing: the uncommitted tail is removed by the next writer."""
        self.packs.abandon()
