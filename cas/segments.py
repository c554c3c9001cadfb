"""Index segments: what one commit changed in cas's tables, so that another machine can rebuild
its index from the bucket without reading a pack (docs/FORMAT.md, "Index segments").

A bucket safe's index is a cache; the segments in ``index/`` are the truth. Rather than teach
every writer (backup, forget, gc, defrag) to describe its commit, the index records the rows a
write transaction changed (:class:`JournalTxn`, a thin wrapper over the LMDB transaction) and
hands them to a *publisher* just before the LMDB commit: the publisher uploads the segment, and
only then does the local commit happen (a failed upload aborts it). Replaying the segments in
order on an empty index gives the same rows, whatever logic made them: the replay needs no
refcount rules, so it cannot drift from them.
"""

from __future__ import annotations

import struct
import zlib
from typing import TYPE_CHECKING, Any, Callable, Iterable

from .errors import IntegrityError

if TYPE_CHECKING:
    from .crypto import Crypto
    from .index import Index, Txn

MAGIC = b"PSSEG\x00\x00\x01"
_HEAD = struct.Struct("<8sQB3xI")    # magic, n, sealed, reserved, body length: 24 bytes
_CRC = struct.Struct("<I")
_U16, _U32, _U64 = struct.Struct("<H"), struct.Struct("<I"), struct.Struct("<Q")
SEAL_TABLE = b"index/seg"
SEG_META = b"s3.segment"             # meta row: the last segment applied to this cache (local)
JOURNALLED = ("objects", "packs", "zero", "points", "meta", "tombstones", "release", "missing")
LOCAL_META = frozenset({SEG_META, b"gc.fragmentation"})   # meta rows that stay on the machine
# A checkpoint segment (written by ``repair``) holds the whole state of cas's tables, not a
# change: its meta row ``s3.checkpoint`` is its own number. Applying it empties the tables first,
# and the segments before it may be missing (docs/FORMAT.md, "Index segments").
CHECKPOINT_META = b"s3.checkpoint"


def is_checkpoint(n: int, changes: list[tuple[str, bytes, bytes | None]]) -> bool:
    """True when decoded segment ``n`` is a checkpoint (the whole state, not a change)."""
    mark = str(n).encode()
    return any(t == "meta" and k == CHECKPOINT_META and v == mark for t, k, v in changes)


def clear(index: Index, txn: Txn) -> None:
    """Empty cas's journalled tables (all but the machine's own meta rows) before a checkpoint."""
    for name in JOURNALLED:
        db = index.db[name]
        if name != "meta":
            txn.drop(db, delete=False)
            continue
        keys = [bytes(k) for k, _ in txn.cursor(db=db) if bytes(k) not in LOCAL_META]
        for k in keys:
            txn.delete(k, db=db)

# (table name, row key) -> the row's final value, or None when the row was deleted
Changes = dict[tuple[str, bytes], "bytes | None"]
Publisher = Callable[["Txn", Changes], None]


def encode(n: int, changes: Changes, crypto: Crypto | None) -> bytes:
    """The bytes of segment ``n`` holding ``changes`` (the body sealed when ``crypto``)."""
    parts = [_U32.pack(len(changes))]
    # In key order: a new machine merges many segments and sorts their rows before it writes
    # them (apply_many), and sorting runs that are sorted already is cheaper.
    for (table, key), value in sorted(changes.items(), key=lambda c: c[0]):
        name = table.encode("ascii")
        parts += [bytes([len(name)]), name, _U16.pack(len(key)), key]
        if value is None:
            parts.append(b"\x00")
        else:
            parts += [b"\x01", _U32.pack(len(value)), value]
    body = b"".join(parts)
    if crypto is not None:
        body = crypto.seal_value(SEAL_TABLE, struct.pack(">Q", n), body)
    head = _HEAD.pack(MAGIC, n, 1 if crypto is not None else 0, len(body)) + body
    return head + _CRC.pack(zlib.crc32(head))


def decode(data: bytes, n: int, crypto: Crypto | None, where: str) -> list[tuple[str, bytes, bytes | None]]:
    """The changes of segment ``n`` (``where`` names it in errors); IntegrityError when its
    framing, CRC, number or seal is wrong."""
    def bad(why: str) -> IntegrityError:
        return IntegrityError(f"index segment {where}: {why}; the bucket's index segments are damaged")
    if len(data) < _HEAD.size + _CRC.size:
        raise bad("truncated")
    magic, num, sealed, length = _HEAD.unpack_from(data)
    if magic != MAGIC:
        raise bad("not an index segment (bad magic)")
    if _HEAD.size + length + _CRC.size != len(data):
        raise bad("truncated or too long")
    if _CRC.unpack_from(data, _HEAD.size + length)[0] != zlib.crc32(data[:_HEAD.size + length]):
        raise bad("CRC mismatch")
    if num != n:
        raise bad(f"it says it is segment {num}")
    body = data[_HEAD.size:_HEAD.size + length]
    if sealed != (1 if crypto is not None else 0):
        raise bad("sealed in a plain safe" if sealed else "plain in an encrypted safe")
    if crypto is not None:
        body = crypto.open_value(SEAL_TABLE, struct.pack(">Q", n), body)
    out: list[tuple[str, bytes, bytes | None]] = []
    body = bytes(body)
    u16, u32 = _U16.unpack_from, _U32.unpack_from
    names: dict[bytes, str] = {}     # a few tables, a million rows: each name decoded once
    try:
        count = u32(body)[0]
        off = 4
        for _ in range(count):
            t = body[off]
            raw = body[off + 1:off + 1 + t]
            table = names.get(raw)
            if table is None:
                table = names[raw] = raw.decode("ascii")
                if table not in JOURNALLED:
                    raise ValueError(f"table {table!r}")
            off += 1 + t
            k = u16(body, off)[0]
            key = body[off + 2:off + 2 + k]
            off += 2 + k
            op = body[off]
            off += 1
            value: bytes | None = None
            if op == 1:
                v = u32(body, off)[0]
                value = body[off + 4:off + 4 + v]
                if len(value) != v:
                    raise ValueError("short value")
                off += 4 + v
            elif op != 0:
                raise ValueError(f"op {op}")
            out.append((table, key, value))
    except (struct.error, IndexError, ValueError, UnicodeDecodeError) as e:
        raise bad(f"malformed body ({e})") from None
    if off != len(body):
        raise bad("bytes after the last change")
    return out


def apply(index: Index, txn: Txn, changes: Iterable[tuple[str, bytes, bytes | None]]) -> None:
    """Write ``changes`` into ``txn`` (a raw LMDB write transaction of ``index``)."""
    for table, key, value in changes:
        db = index.db[table]
        if value is None:
            txn.delete(key, db=db)
        else:
            txn.put(key, value, db=db)


def apply_many(index: Index, txn: Txn, batch: Iterable[list[tuple[str, bytes, bytes | None]]]) -> None:
    """Write the changes of several consecutive segments, in their order, into ``txn``: the
    same rows as :func:`apply` of each in turn, written faster. The rows are merged first (a
    later segment's row wins), then written table by table in key order (LMDB's order: bytes,
    a prefix first, as Python sorts them), and appended (MDB_APPEND, no tree search) to a table
    that is empty, as every table but ``meta`` is when a new machine rebuilds its cache."""
    final: dict[str, dict[bytes, bytes | None]] = {}
    for changes in batch:
        for table, key, value in changes:
            rows = final.get(table)
            if rows is None:
                rows = final[table] = {}
            rows[key] = value
    for table, rows in final.items():
        db = index.db[table]
        keys = sorted(rows)      # keys alone: cheaper than sorting (key, value) pairs
        with txn.cursor(db=db) as cur:
            if txn.stat(db)["entries"] == 0:
                puts = [(k, v) for k in keys if (v := rows[k]) is not None]
                # MDB_APPEND skips, rather than fails on, a key out of LMDB's order: should
                # LMDB ever sort otherwise than Python, every row is put again the slow way.
                if cur.putmulti(puts, append=True)[1] != len(puts):
                    cur.putmulti(puts)
                continue
            for k in keys:
                v = rows[k]
                if v is not None:
                    cur.put(k, v)
                elif cur.set_key(k):
                    cur.delete()


def applied(index: Index, txn: Txn) -> int:
    """The number of the last segment applied to this index (0: none)."""
    return index.get_meta_int(txn, SEG_META.decode())


class JournalTxn:
    """An LMDB write transaction that notes every row it changes in cas's tables and, when it
    commits, hands them to ``publish`` first (which uploads the segment, or raises: the LMDB
    transaction is then aborted). Everything else is the wrapped transaction's."""

    def __init__(self, txn: Txn, index: Index, publish: Publisher):
        self._txn = txn
        self._publish = publish
        self._names = {id(index.db[name]): name for name in JOURNALLED if name in index.db}
        self.changes: Changes = {}

    def _note(self, db: Any, key: bytes, value: bytes | None) -> None:
        name = self._names.get(id(db))
        if name is None or (name == "meta" and bytes(key) in LOCAL_META):
            return
        self.changes[(name, bytes(key))] = None if value is None else bytes(value)

    def put(self, key: bytes, value: bytes, db: Any = None, **kw: Any) -> bool:
        done = bool(self._txn.put(key, value, db=db, **kw))
        if done:
            self._note(db, key, value)
        return done

    def replace(self, key: bytes, value: bytes, db: Any = None) -> Any:
        old = self._txn.replace(key, value, db=db)
        self._note(db, key, value)
        return old

    def delete(self, key: bytes, value: bytes = b"", db: Any = None) -> bool:
        done = bool(self._txn.delete(key, value, db=db))
        if done:
            self._note(db, key, None)
        return done

    def pop(self, key: bytes, db: Any = None) -> Any:
        old = self._txn.pop(key, db=db)
        if old is not None:
            self._note(db, key, None)
        return old

    def commit(self) -> None:
        """Publish the changes (when there are any), then commit; abort when publishing fails."""
        try:
            if self.changes:
                self._publish(self._txn, self.changes)
        except BaseException:
            self._txn.abort()
            raise
        self._txn.commit()

    def abort(self) -> None:
        self._txn.abort()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._txn, name)

    def __enter__(self) -> "JournalTxn":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()
