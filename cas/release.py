"""Forgetting in bounded memory: a durable queue of pending reference drops.

``Writer.forget_points`` drops points and cascades in one LMDB transaction, whose dirty pages
(held in memory until the commit) grow with what dies: forgetting points that alone hold a
million objects would hold most of the index in memory. ``forget_points_queued`` instead commits
the points' removal (tombstones written, ``points`` entries deleted) together with one entry per
point in the ``release`` table, then ``drain`` works the queue off in transactions of bounded
size: each takes a batch of keys, drops one count per queued drop, marks dead what reaches zero
(adjusting its pack's live/dead bytes) and queues the dead object's children.

The queue is durable (``release``: key -> u32 LE pending drops), so a crash between batches
leaves the rest of the work recorded and the next ``drain`` (forget and gc both run it) finishes
it. Until then the queued objects' stored counts are higher than their live parents alone: the
refcount audit adds the queued drops to what it expects. A backup that runs before the queue is
drained is safe: counts only err upwards, so nothing it reuses can be collected.
"""

from __future__ import annotations

import struct

from .errors import SafeError
from .keys import Kind
from .store import Writer

QUEUE = "release"
DRAIN_BATCH = 32768
_U32 = struct.Struct("<I")


def queue_db(idx):
    return idx.table(QUEUE)


def _enqueue(txn, q, key: bytes, n: int = 1) -> None:
    old = txn.get(key, db=q)
    txn.put(key, _U32.pack(n + (_U32.unpack(old)[0] if old is not None else 0)), db=q)


def queued(idx) -> int:
    """How many keys wait in the queue."""
    q = idx.existing(QUEUE)   # before the read transaction; never created here (full disk)
    if q is None:
        return 0
    with idx.read() as txn:
        return txn.stat(q)["entries"]


def forget_points_queued(w: Writer, point_keys: list[bytes]) -> None:
    """Forget points (tombstones, ``points`` entries removed) and queue their release, in one
    commit; call ``drain`` afterwards to cascade."""
    q = queue_db(w.index)
    tombs = [w.put_node(Kind.TOMBSTONE, [], pk) for pk in point_keys]
    idx = w.index

    def apply(txn):
        for pk, tk in zip(point_keys, tombs):
            if txn.get(pk, db=idx.db["points"]) is None:
                raise SafeError(f"point {pk.hex()[:12]} is not in the safe")
            txn.delete(pk, db=idx.db["points"])
            txn.put(pk, tk, db=idx.db["tombstones"])
            _enqueue(txn, q, pk)

    w.flush(extra=apply)


def drain(w: Writer, batch: int = DRAIN_BATCH) -> int:
    """Apply every queued drop, cascading, in transactions of at most ``batch`` keys; returns
    how many objects died. Needs the writer lock."""
    idx = w.index
    q = queue_db(idx)
    died = 0
    while True:
        with idx.write() as txn:
            keys = []
            for k in txn.cursor(db=q).iternext(values=False):
                keys.append(bytes(k))
                if len(keys) >= batch:
                    break
            if not keys:
                return died
            rc = w.refs(txn)
            for key in keys:
                # Read the drops now, not with the batch: an object that died earlier in this
                # batch may have queued one more for a key further on.
                v = txn.get(key, db=q)
                if v is None:
                    continue
                txn.delete(key, db=q)
                children = rc.drop(key, _U32.unpack(v)[0])
                if children is not None:
                    died += 1
                    for c in children:
                        _enqueue(txn, q, c)
            rc.finish()
