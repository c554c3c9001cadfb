"""A parallel front end for putting many objects: hash and compress on threads, append in one.

The writer is single-threaded (it owns the pack file and the batch), but the costly part of a
put is hashing (BLAKE3) and compressing (zstd), and both release the GIL. ``put_many`` runs
that part on a small thread pool: each worker computes the key, skips objects the safe
already holds (no compression for duplicates), compresses the rest with its own
ZstdCompressor (``pack.prepare``, which also builds the record header and its checksum).
The calling thread only appends the records in order with ``Writer.put_prepared``. At most ``window``
objects are in flight, so memory stays bounded whatever the input's length.

Rejected alternatives: ``multi_compress_to_buffer`` needs the whole batch in memory and does
not hash; a process pool would copy every object twice between processes.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Iterable, Iterator

from .pack import Prepared, prepare

if TYPE_CHECKING:
    from .store import Writer

_Prepared = list[tuple[bytes, Prepared | None]]   # per object of a group: key, record or None


def put_many(writer: Writer, kind: int, datas: Iterable[bytes], threads: int = 2,
             group_bytes: int = 1 << 20) -> list[bytes]:
    """Store every object of ``datas`` as ``kind`` (childless kinds: chunks); return their keys
    in input order. Duplicates, in the input or in the safe, are stored once. The objects are
    appended, not committed: call ``writer.flush()`` to commit. The caller holds the writer
    lock (it has a ``Writer``); errors of the workers are raised here.

    Args:
        writer: a ``Writer`` (called from this thread only).
        threads: hashing/compressing threads (the calling thread appends meanwhile).
        group_bytes: objects go to the workers in groups of about this many bytes (fewer
            hand-offs between threads); ``8 * threads + 1`` groups are in flight at most,
            so that the workers keep busy while this thread waits for a pack fsync.
    """
    return list(iter_put_many(writer, kind, datas, threads, group_bytes))


def iter_put_many(writer: Writer, kind: int, datas: Iterable[bytes], threads: int = 2,
                  group_bytes: int = 1 << 20) -> Iterator[bytes]:
    """Like ``put_many`` but yields each key once its object is appended (not yet committed:
    call ``writer.flush()`` to commit)."""
    level = writer.level
    crypto = writer.crypto
    key_of = writer.safe.object_key
    index = writer.index
    objects = index.db["objects"]
    pending = writer.pending

    def work(group: list[bytes]) -> _Prepared:
        out: _Prepared = []
        keys = [key_of(kind, d) for d in group]
        with index.read() as txn:            # one snapshot for the whole group
            known = [k in pending or txn.get(k, db=objects) is not None for k in keys]
        for data, key, seen in zip(group, keys, known):
            out.append((key, None if seen else prepare(kind, data, level, key=key, crypto=crypto)))
        return out

    def groups() -> Iterator[list[bytes]]:
        group: list[bytes] = []
        size = 0
        for data in datas:
            group.append(data)
            size += len(data)
            if size >= group_bytes:
                yield group
                group, size = [], 0
        if group:
            yield group

    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="put") as pool:
        inflight: deque[tuple[list[bytes], Future[_Prepared]]] = deque()
        for group in groups():
            inflight.append((group, pool.submit(work, group)))
            if len(inflight) > 8 * threads:
                yield from _append(writer, kind, *inflight.popleft())
        while inflight:
            yield from _append(writer, kind, *inflight.popleft())


def _append(writer: Writer, kind: int, group: list[bytes], fut: Future[_Prepared]) -> Iterator[bytes]:
    for data, (key, p) in zip(group, fut.result()):
        if p is None:
            writer.put(kind, data, key=key)      # already stored: only the writer's bookkeeping
        else:
            writer.put_prepared(p)               # dedups against what was appended meanwhile
        yield key
