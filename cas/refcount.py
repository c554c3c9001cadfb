"""Reference-count changes inside one write transaction: the one API every job uses.

docs/FORMAT.md ("Reference counts and the dead flag") defines the counts; this module is the
only code that changes them, and with them the dead flag, the packs' live/dead bytes and the
safe's totals (cas/counters.py). The backup writer's commit, ``forget`` (directly or through
the release queue, cas/release.py) and gc's burial of orphans all open a ``RefChange`` on
their transaction, call its methods, and ``finish()`` it before the transaction commits.
"""

from __future__ import annotations

import struct

from typing import TYPE_CHECKING, Callable, Iterable

from .counters import CounterDelta
from .errors import SafeError
from .index import FLAG_DEAD, FLAG_PINNED, Index, ObjectEntry, PackEntry
from .keys import Kind
from .nodes import node_children

if TYPE_CHECKING:
    from .index import Txn

ReadNode = Callable[[bytes, ObjectEntry], bytes]   # the raw bytes of an indexed node


class RefChange:
    """Count changes of one write transaction ``txn`` of ``index``.

    ``read_node(key, entry)`` returns an indexed node's raw bytes (its children are read from
    it when it dies or comes back to life). ``txn`` is a write transaction whose caller holds
    the writer lock. Not thread-safe. Call ``finish()`` before ``txn`` commits, or the packs'
    live/dead bytes and the totals fall out of step with the counts.
    """

    def __init__(self, index: Index, txn: Txn, read_node: ReadNode):
        self.index = index
        self.txn = txn
        self.read_node = read_node
        self.packs: dict[int, PackEntry] = {}
        self.delta = CounterDelta()

    def _pack(self, pack_id: int) -> PackEntry:
        pe = self.packs.get(pack_id)
        if pe is None:
            pe = self.index.get_pack(self.txn, pack_id)
            if pe is None:
                raise SafeError(f"internal error: object in unknown pack {pack_id:016x}")
            self.packs[pack_id] = pe
        return pe

    def _children(self, key: bytes, e: ObjectEntry) -> list[bytes]:
        return [] if e.kind == Kind.CHUNK else node_children(self.read_node(key, e))

    def added(self, e: ObjectEntry) -> None:
        """A new object was indexed (by the writer's commit): count it in the totals."""
        self.delta.object(e.kind, e.raw_len, e.stored_len, 1)

    def kill(self, key: bytes, e: ObjectEntry) -> list[bytes]:
        """Mark ``e`` dead (the caller writes it back); return the children to release."""
        e.flags |= FLAG_DEAD
        pe = self._pack(e.pack)
        pe.live_bytes -= e.record_len
        pe.dead_bytes += e.record_len
        self.delta.object(e.kind, e.raw_len, e.stored_len, -1)
        return self._children(key, e)

    def revive(self, key: bytes, e: ObjectEntry) -> list[bytes]:
        """Clear the dead flag of ``e`` (its count rose above 0); return the children to count."""
        e.flags &= ~FLAG_DEAD
        pe = self._pack(e.pack)
        pe.live_bytes += e.record_len
        pe.dead_bytes -= e.record_len
        self.delta.object(e.kind, e.raw_len, e.stored_len, 1)
        return self._children(key, e)

    def increase(self, key: bytes, n: int = 1) -> list[bytes]:
        """Add ``n`` to the count of indexed ``key``; return children to count when it revived."""
        e = self.index.get_object(self.txn, key)
        if e is None:
            raise SafeError(f"internal error: reference to unknown object {key.hex()[:12]}")
        e.refcount += n
        out: list[bytes] = []
        if e.flags & FLAG_DEAD and e.refcount > 0:
            out = self.revive(key, e)
        self.index.put_object(self.txn, key, e)
        return out

    def count_up(self, deltas: Iterable[tuple[bytes, int]]) -> None:
        """Apply count increases, cascading revivals to dead children."""
        stack: list[bytes] = []
        for key, n in deltas:
            stack.extend(self.increase(key, n))
        while stack:
            key = stack.pop()
            if self.index.get_object(self.txn, key) is None:
                raise SafeError(f"object {key.hex()[:12]} was collected while a dead parent was "
                                "reused; run 'pointsafe gc' to finish collecting, then retry")
            stack.extend(self.increase(key))

    def found(self, key: bytes) -> int:
        """For an object being indexed: how many live nodes already name it because ``repair``
        found it lost (the ``missing`` table); the entry goes, the caller adds the count."""
        db = self.index.db["missing"]
        v = self.txn.get(key, db=db)
        if v is None:
            return 0
        self.txn.delete(key, db=db)
        n: int = struct.unpack("<I", v)[0]
        return n

    def _drop_lost(self, key: bytes, n: int) -> bool:
        """A drop of an object ``repair`` found lost: counted in ``missing``. False when
        ``key`` is not one."""
        db = self.index.db["missing"]
        v = self.txn.get(key, db=db)
        if v is None:
            return False
        left = struct.unpack("<I", v)[0] - n
        if left > 0:
            self.txn.put(key, struct.pack("<I", left), db=db)
        else:
            self.txn.delete(key, db=db)
        return True

    def drop(self, key: bytes, n: int = 1) -> list[bytes] | None:
        """Take ``n`` from the count of ``key``; when it reaches 0 the object dies and its
        children are returned (the caller releases them, now or through a queue); None when
        it did not die. An object ``repair`` found lost only loses a parent."""
        e = self.index.get_object(self.txn, key)
        if e is None:
            if self._drop_lost(key, n):
                return None
            raise SafeError(f"internal error: release of unknown object {key.hex()[:12]}")
        e.refcount = max(0, e.refcount - n)
        out: list[bytes] | None = None
        if e.refcount == 0 and not e.flags & (FLAG_DEAD | FLAG_PINNED):
            out = self.kill(key, e)
        self.index.put_object(self.txn, key, e)
        return out

    def release(self, keys: Iterable[bytes]) -> int:
        """Drop one count from each of ``keys``, cascading at zero; returns how many died.
        Cost follows what dies, not the safe's size."""
        stack = list(keys)
        died = 0
        while stack:
            children = self.drop(stack.pop())
            if children is not None:
                died += 1
                stack.extend(children)
        return died

    def bury(self, key: bytes) -> list[bytes] | None:
        """Mark dead an orphan (count 0, not dead, not pinned); None when ``key`` is not one.
        Correct only under the writer lock, when no backup can be linking it."""
        e = self.index.get_object(self.txn, key)
        if e is None or e.flags & (FLAG_DEAD | FLAG_PINNED) or e.refcount:
            return None
        children = self.kill(key, e)
        self.index.put_object(self.txn, key, e)
        return children

    def finish(self) -> None:
        """Write the touched pack entries and the totals; call before the commit."""
        for pid, pe in self.packs.items():
            self.index.put_pack(self.txn, pid, pe)
        self.packs.clear()
        self.delta.apply(self.txn, self.index.db["meta"])
