"""Forgetting in bounded memory: a durable queue of pending reference drops; and the space
reserve that lets forget and gc run on a full disk.

This is the one forget path: ``forget_points`` (tombstones, queue, drain) is what the CLI's
``forget`` (gc/forget.py), the tests and every other caller use. Dropping points and cascading in
one LMDB transaction would hold dirty pages (in memory until the commit) that grow with what
dies: forgetting points that alone hold a million objects would hold most of the index in
memory. ``forget_points_queued`` instead commits the points' removal (tombstones written,
``points`` entries deleted) together with one entry per point in the ``release`` table, then
``drain`` works the queue off in transactions of bounded size: each takes a batch of keys,
drops one count per queued drop, marks dead what reaches zero (adjusting its pack's live/dead
bytes) and queues the dead object's children.

The queue is durable (``release``: key -> u32 LE pending drops), so a crash between batches
leaves the rest of the work recorded and the next ``drain`` (forget and gc both run it) finishes
it. Until then the queued objects' stored counts are higher than their live parents alone: the
refcount audit adds the queued drops to what it expects. A backup that runs before the queue is
drained is safe: counts only err upwards, so nothing it reuses can be collected.

The reserve (``<safe>/reserve``, RESERVE_BYTES of allocated blocks, contents meaningless) is
space kept for the index: on a full filesystem LMDB cannot grow its file, so no commit, and
therefore no pack deletion, could happen. forget and gc delete the reserve when the disk is
nearly full (``release_reserve``), do their commits in its room, and put it back when there is
space again (``keep_reserve``). Nothing else reads it; ``repair`` and ``verify`` ignore it.
"""

from __future__ import annotations

import errno
import os
import struct
from pathlib import Path
from typing import TYPE_CHECKING

import lmdb

from .errors import DiskFull, SafeError
from .header import PRIVATE_FILE_MODE
from .keys import Kind
from .store import Safe, Writer

if TYPE_CHECKING:
    from .index import Index, Table, Txn

QUEUE = "release"
DRAIN_BATCH = 32768
_U32 = struct.Struct("<I")

RESERVE_NAME = "reserve"
RESERVE_BYTES = 4 * 1024 * 1024   # room for the index commits that delete dead packs
LOW_SPACE = 4 * RESERVE_BYTES       # below this much free space, forget and gc use the reserve
TIGHT_BATCH = 1024                  # keys per transaction when space is low (few new pages each)
NO_ROOM = 256 * 1024                # with less free (reserve included), forget and gc do not start


def queue_db(idx: Index) -> Table:
    """The ``release`` table, created when missing (SafeError on a read-only index)."""
    return idx.table(QUEUE)


def _enqueue(txn: Txn, q: Table, key: bytes, n: int = 1) -> None:
    old = txn.get(key, db=q)
    txn.put(key, _U32.pack(n + (_U32.unpack(old)[0] if old is not None else 0)), db=q)


def queued(idx: Index) -> int:
    """How many keys wait in the queue (0 when there is no queue); O(1), never writes."""
    q = idx.existing(QUEUE)   # before the read transaction; never created here (full disk)
    if q is None:
        return 0
    with idx.read() as txn:
        n: int = txn.stat(q)["entries"]
        return n


def forget_points_queued(w: Writer, point_keys: list[bytes]) -> None:
    """Forget points (tombstones, ``points`` entries removed) and queue their release, in one
    commit; call ``drain`` afterwards to cascade. ``w`` holds the writer lock. SafeError when a
    point is not in the safe: nothing is committed and the writer is closed."""
    q = queue_db(w.index)
    tombs = [w.put_node(Kind.TOMBSTONE, [], pk) for pk in point_keys]
    idx = w.index

    def apply(txn: Txn) -> None:
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


def forget_points(w: Writer, point_keys: list[bytes], batch: int = DRAIN_BATCH) -> int:
    """Forget points (tombstones written, ``points`` entries removed, in one commit) and
    cascade their release in bounded transactions; returns how many objects died. The one
    forget path: a crash after the first commit leaves the rest queued for the next drain."""
    forget_points_queued(w, point_keys)
    return drain(w, batch)


# -- space ---------------------------------------------------------------------------------

def free_bytes(safe: Safe) -> int:
    """Bytes an unprivileged writer could still use on the safe's filesystem."""
    st = os.statvfs(safe.path)
    return st.f_bavail * st.f_frsize


def reserve_path(safe: Safe) -> Path:
    """Where the reserve lives: ``<safe>/reserve``."""
    return Path(safe.path) / RESERVE_NAME


def reserve_size(safe: Safe) -> int:
    """Bytes the reserve holds now (0 when there is none)."""
    try:
        return reserve_path(safe).stat().st_size
    except FileNotFoundError:
        return 0


def release_reserve(safe: Safe) -> int:
    """Delete the reserve so that index commits find room; returns the bytes given back (0
    when there was none)."""
    n = reserve_size(safe)
    reserve_path(safe).unlink(missing_ok=True)
    return n


def keep_reserve(safe: Safe) -> bool:
    """Create the reserve unless it exists or the filesystem lacks room for it and as much
    again; True when a reserve is in place afterwards. Never raises for a full disk."""
    path = reserve_path(safe)
    if reserve_size(safe) >= RESERVE_BYTES:
        return True
    if free_bytes(safe) + reserve_size(safe) < 2 * RESERVE_BYTES:
        return False
    tmp = path.with_name(RESERVE_NAME + ".tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, PRIVATE_FILE_MODE)
        try:
            os.fchmod(fd, PRIVATE_FILE_MODE)
            os.posix_fallocate(fd, 0, RESERVE_BYTES)   # real blocks, not a sparse file
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        return False
    return True


def low_space(safe: Safe) -> bool:
    """True when the filesystem is so full that forget and gc should use the reserve."""
    return free_bytes(safe) < LOW_SPACE


def disk_full_error(safe: Safe, what: str, done: str = "") -> DiskFull:
    """The one line that says what to do when ``what`` found no room for an index commit;
    ``done``: what was committed before (it stays), else nothing was changed."""
    free = free_bytes(safe)
    after = f"{done}; " if done else "nothing was changed; "
    return DiskFull(f"disk full: {what} needs about {RESERVE_BYTES >> 20} MiB free to update the "
                    f"index and the safe's filesystem has {free >> 10} KiB; {after}free that much "
                    f"(move or delete any file on it) and run the command again")


def check_room(safe: Safe, what: str) -> None:
    """Refuse to start ``what`` (raise DiskFull, nothing changed) when the filesystem has no
    room at all for index commits, the reserve included."""
    if free_bytes(safe) + reserve_size(safe) < NO_ROOM:
        raise disk_full_error(safe, what)


def is_disk_full(e: BaseException, safe: Safe) -> bool:
    """True for the errors a full filesystem gives: DiskFull, OSError ENOSPC/EDQUOT, and an
    LMDB error on a nearly full filesystem (a commit cut short surfaces as a short write, EIO)."""
    if isinstance(e, DiskFull):
        return True
    if isinstance(e, OSError):
        return e.errno in (errno.ENOSPC, errno.EDQUOT)
    if isinstance(e, lmdb.Error):
        return "No space" in str(e) or "MAP_FULL" in str(e) or low_space(safe)
    return False
