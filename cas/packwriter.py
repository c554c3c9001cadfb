"""The one component that writes packs: opens them, frames them, makes them durable, and
records them in the index — for backups (``store.Writer``) and for gc/defrag
(``relocate.Relocator``) alike.

It keeps the ordering invariants of docs/FORMAT.md ("Read and write ordering") in one place:

- rule 2, pack bytes before the index: ``commit`` makes the sink durable (``PackSink.commit``)
  and only then runs the one LMDB transaction that names those bytes, sets the pack's
  committed length and, for a new pack, advances ``meta.next_pack``;
- rule 5 and 6, recovery: ``recover`` cuts every pack back to its committed length and
  deletes packs the index does not name (a crashed writer's, or ones gc had dropped from the
  index before it crashed);
- rule 7, pack ids are never reused: a new pack takes ``meta.next_pack``, and the commit that
  first names it advances the counter past it.

The caller supplies what the transaction must change besides the pack entry (new objects,
count changes, moved objects) as a function of the transaction and the current pack's entry.
"""

from __future__ import annotations

import errno
import time
from typing import TYPE_CHECKING, Callable

import lmdb

from .errors import DiskFull, SafeError
from .index import Index, PackEntry, pack_from_dbkey
from .pack import PACK_HEADER, PACK_MAGIC, pack_name
from .packstore import PackSink, PackStore

if TYPE_CHECKING:
    from .index import Txn

# What a commit changes besides the pack entry: called with the write transaction and the open
# pack's entry (None when no pack is open).
Apply = Callable[["Txn", "PackEntry | None"], None]


def disk_error(e: OSError, what: str) -> SafeError:
    """A user-facing error for an OSError met while writing: DiskFull says what to do."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFull(f"disk full while {what}: the last batch was not committed; "
                        "free some space (or run 'pointsafe gc') and try again")
    return SafeError(f"I/O error while {what}: {e.strerror or e}")


def index_error(e: lmdb.Error) -> SafeError:
    """A user-facing error for an LMDB failure of a write transaction."""
    if "No space" in str(e) or "MDB_MAP_FULL" in str(e):
        return DiskFull("disk full while committing the index: the last batch was not "
                        "committed; free some space and try again")
    return SafeError(f"cannot commit the index: {e}")


def recover(store: PackStore, index: Index) -> None:
    """Undo what a crashed writer left: uncommitted tails, unindexed packs, temporaries.

    The caller holds the writer lock (no other writer may be appending). Cost: one pass over
    the ``packs`` table and one stat per pack file. OSError from the store propagates."""
    with index.read() as t:
        committed = {pack_from_dbkey(k): PackEntry.decode(v).committed_len
                     for k, v in t.cursor(db=index.db["packs"])}
    store.discard_temporaries()
    doomed = []
    for pid in store.pack_ids():
        length = committed.get(pid)
        if length is None:
            doomed.append(pid)    # never committed, or deleted from the index by gc
        else:
            size = store.size(pid)
            if size is not None and size > length:
                store.truncate(pid, length)
    store.delete(doomed)


class PackWriter:
    """Appends records to one pack at a time and commits them with the caller's changes.

    Args:
        store: where the packs live.
        index: the safe's index (the caller holds the writer lock).
        pack_size: a pack is full once it reaches this many bytes; the caller then commits
            with ``seal=True`` before appending more (see ``full``).
        reuse_last: go on appending to the newest pack when it is not sealed, not full and
            exactly its committed length long (backups; gc and defrag start new packs).
    """

    def __init__(self, store: PackStore, index: Index, pack_size: int, reuse_last: bool = True):
        self.store = store
        self.index = index
        self.pack_size = pack_size
        self.reuse_last = reuse_last and store.appendable
        self.sink: PackSink | None = None
        self.pack_id: int | None = None
        self.pos = 0
        self.new = False
        self.opened = 0            # packs this writer started or reopened
        self.packs_written: list[int] = []   # packs this writer created

    @property
    def full(self) -> bool:
        """True when the open pack has reached its size: commit with seal=True first."""
        return self.sink is not None and self.pos >= self.pack_size

    def append(self, *parts: bytes | bytearray | memoryview) -> tuple[int, int]:
        """Append one record (its parts back to back); returns (pack id, offset). Opens a
        pack when none is open. Raises SafeError (DiskFull) on a write error."""
        if self.sink is None:
            self._open()
        assert self.sink is not None and self.pack_id is not None
        off = self.pos
        try:
            for p in parts:
                self.sink.write(p)
        except OSError as e:
            raise disk_error(e, f"writing pack {pack_name(self.pack_id)}") from None
        self.pos += sum(len(p) for p in parts)
        return self.pack_id, off

    def _open(self) -> None:
        with self.index.read() as t:
            pid = self.index.get_meta_int(t, "next_pack", 1)
            last = None
            cur = t.cursor(db=self.index.db["packs"])
            if self.reuse_last and self.opened == 0 and cur.last():
                last = (pack_from_dbkey(cur.key()), PackEntry.decode(cur.value()))
        if last is not None and not last[1].sealed and last[1].committed_len < self.pack_size:
            sink = self.store.reopen(last[0], last[1].committed_len)
            if sink is not None:
                self.sink, self.pack_id, self.pos, self.new = sink, last[0], last[1].committed_len, False
                self.opened += 1
                return
        try:
            sink = self.store.create(pid)
            sink.write(PACK_HEADER.pack(PACK_MAGIC, pid))
        except OSError as e:
            raise disk_error(e, f"creating pack {pack_name(pid)}") from None
        self.sink, self.pack_id, self.pos, self.new = sink, pid, PACK_HEADER.size, True
        self.opened += 1
        self.packs_written.append(pid)

    def commit(self, apply: Apply | None = None, seal: bool = False) -> None:
        """Make the appended bytes durable, then commit one transaction that records the
        open pack (committed length, sealed, ``next_pack``) and runs ``apply(txn, entry)``,
        where ``entry`` is the open pack's PackEntry (None when no pack is open) for the
        caller to add its objects' bytes to. A store that cannot append seals every commit.
        Raises SafeError (DiskFull) when either step fails; nothing is then committed."""
        seal = seal or not self.store.appendable
        if self.sink is not None:
            try:
                self.sink.commit()
            except OSError as e:
                raise disk_error(e, f"writing pack {pack_name(self.pack_id or 0)}") from None
        try:
            with self.index.write() as txn:
                pe = None
                pid = 0
                if self.sink is not None:
                    assert self.pack_id is not None   # set together with the sink
                    pid = self.pack_id
                    pe = self.index.get_pack(txn, pid) or PackEntry(0, 0, 0, time.time_ns(), 0, 0)
                    pe.committed_len = self.pos
                    pe.sealed = 1 if seal else 0
                    if self.new:
                        self.index.put_meta_int(txn, "next_pack", pid + 1)
                if apply is not None:
                    apply(txn, pe)
                if pe is not None:
                    self.index.put_pack(txn, pid, pe)
        except lmdb.Error as e:
            raise index_error(e) from None
        self.new = False
        if seal and self.sink is not None:
            self.sink.close()
            self.sink, self.pack_id = None, None

    def abandon(self) -> None:
        """Stop without committing: the uncommitted tail is removed by the next writer."""
        if self.sink is not None:
            self.sink.abandon()
            self.sink, self.pack_id = None, None

    def close(self) -> None:
        """Close the open pack (after a commit); it stays unsealed for the next writer."""
        if self.sink is not None:
            self.sink.close()
            self.sink, self.pack_id = None, None
