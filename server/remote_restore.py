"""Restoring an agent's point through the server, streamed: ingest's restorer reading from the server.

The restorer (ingest/restore.py) reads a safe through ``get`` (a node's or chunk's raw bytes),
``entry`` (an object's kind) and its ``fetch_many`` (several objects at once, in order).
:class:`RemoteSource` answers the first two from the server by the agent's plain ids, and
:class:`RemoteRestorer` turns ``fetch_many`` into one fetch request per group, so that a restore
through the server writes exactly what a local restore writes -- with the same code -- straight
into the target, with nothing stored on the agent's disk in between.

Memory stays bounded: the restorer fetches at most FETCH_AHEAD groups of FETCH_GROUP chunks
ahead per file being written (and batches of small files of at most BATCH_BYTES), tree and list
nodes go into a byte-bounded cache, and a chunk fetched to learn its kind is kept only until
it is read (a bounded handful). Each object arrives as stored (compressed) and is decompressed
and checked against its plain id as it arrives (``Remote.fetch``); nothing unchecked is written.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

from pointsafe.cas import Kind, ObjectMissing
from pointsafe.fusefs.cache import ByteLRU
from pointsafe.ingest.restore import Restorer

from .client import Remote

NODE_CACHE_BYTES = 32 << 20   # tree and list nodes fetched (a file's list is read once per extent walk)
KIND_PEEKED = 16              # chunks fetched by ``entry`` (to learn their kind), kept until read


@dataclass(frozen=True)
class _Entry:
    """What the restorer asks of an object's index entry: its kind."""

    kind: int


class RemoteSource:
    """The agent's objects on the server, as the restorer reads a safe. Thread-safe."""

    path = None                   # no safe directory on this machine (restore() checks the target against it)

    def __init__(self, remote: Remote, node_cache_bytes: int = NODE_CACHE_BYTES):
        self.remote = remote
        self.nodes: ByteLRU[tuple[int, bytes]] = ByteLRU(node_cache_bytes, sizeof=lambda v: len(v[1]) + 64)
        self.peeked: OrderedDict[bytes, bytes] = OrderedDict()    # chunks ``entry`` fetched, not yet read
        self.lock = threading.Lock()
        self.objects_read = 0
        self.requests = 0

    def fetch(self, keys: list[bytes]) -> list[tuple[int, bytes]]:
        """(kind, raw bytes) of each of ``keys``, in order, checked; nodes are cached.
        ObjectMissing for one the server does not give this agent."""
        with self.lock:
            self.requests += 1
        recs = self.remote.fetch(keys)
        with self.lock:
            self.objects_read += len(recs)
        for r in recs:
            if r.kind != Kind.CHUNK:
                self.nodes.put(r.id, (r.kind, r.raw))
        return [(r.kind, r.raw) for r in recs]

    def cached(self, key: bytes) -> tuple[int, bytes] | None:
        """(kind, raw bytes) of ``key`` when a node cached or a chunk ``entry`` fetched (taken)."""
        item = self.nodes.peek(key)
        if item is not None:
            return item
        with self.lock:
            raw = self.peeked.pop(key, None)
        return (Kind.CHUNK, raw) if raw is not None else None

    def get(self, key: bytes) -> bytes:
        """The raw bytes of object ``key``; ObjectMissing when the agent has no such object."""
        item = self.cached(key)
        return item[1] if item is not None else self.fetch([key])[0][1]

    def entry(self, key: bytes) -> _Entry | None:
        """The kind of object ``key`` (None when the agent has none): the object is fetched to
        learn it, and kept for the ``get`` that comes next."""
        item = self.nodes.peek(key)
        if item is not None:
            return _Entry(item[0])
        with self.lock:
            if key in self.peeked:
                return _Entry(Kind.CHUNK)
        try:
            kind, raw = self.fetch([key])[0]
        except ObjectMissing:
            return None
        if kind == Kind.CHUNK:
            with self.lock:
                self.peeked[key] = raw
                while len(self.peeked) > KIND_PEEKED:
                    self.peeked.popitem(last=False)
        return _Entry(kind)


class RemoteRestorer(Restorer):
    """ingest's Restorer over a :class:`RemoteSource`: each group of objects it reads at once
    is one fetch request (the server answers in bodies of at most MAX_BODY; ``Remote.fetch``
    asks again for the rest)."""

    def __init__(self, source: RemoteSource, **kw):
        super().__init__(source, **kw)     # type: ignore[arg-type]  # RemoteSource: the Safe calls the restorer makes
        self.source = source

    def fetch_many(self, keys: list[bytes]) -> list[tuple[int, bytes | memoryview]]:
        """(kind, raw bytes) of each of ``keys``, in order: what is cached, and the rest in one
        request."""
        got: dict[bytes, tuple[int, bytes]] = {}
        todo = []
        for k in dict.fromkeys(keys):
            item = self.source.cached(k)
            if item is not None:
                got[k] = item
            else:
                todo.append(k)
        if todo:
            got.update(zip(todo, self.source.fetch(todo)))
        return [got[k] for k in keys]
