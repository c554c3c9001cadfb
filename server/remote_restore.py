"""Restoring an agent's point through the server, streamed: ingest's restorer reading from the server.

The restorer (ingest/restore.py) reads a safe through ``get`` (a node's or chunk's raw bytes),
``entry`` (an object's kind) and its ``fetch_many`` (several objects at once, in order).
:class:`RemoteSource` answers the first two from the server by the agent's plain ids, and
:class:`RemoteRestorer` turns ``fetch_many`` into one fetch request per group (and reads the
trees of the directories ahead of its walk TREE_BATCH to a request), so that a restore
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
from concurrent.futures import Future
from dataclasses import dataclass

from pointsafe.cas import Entry, Kind, ObjectMissing
from pointsafe.cas.tree import DIR, tree_pages
from pointsafe.fusefs.cache import ByteLRU
from pointsafe.ingest import restore as _restore
from pointsafe.ingest.browse import children
from pointsafe.ingest.restore import Restorer

from .client import Remote

NODE_CACHE_BYTES = 32 << 20   # tree and list nodes fetched (a file's list is read once per extent walk)
KIND_PEEKED = 16              # chunks fetched by ``entry`` (to learn their kind), kept until read
TREE_BATCH = 256              # directories' trees read ahead in one fetch request, at most


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

    # -- trees, read ahead in batches -----------------------------------------------------

    def _trees_ahead(self, items: list[Entry]) -> None:
        """As the restorer's, but the trees of the subdirectories ``items`` names are read
        ahead TREE_BATCH to a request (the local restorer reads each alone: a pread is cheap,
        a request is not), within the same bounds (TREES_AHEAD trees, TREES_AHEAD_ENTRIES
        entries not yet walked)."""
        batch: list[tuple[Entry, Future[list[Entry]]]] = []
        with self.tree_lock:
            for c in items:
                if (c.type == DIR and c.ref is not None and (c.name, c.ref) not in self.tree_ahead
                        and len(self.tree_ahead) < _restore.TREES_AHEAD
                        and self.tree_held < _restore.TREES_AHEAD_ENTRIES):
                    f: Future[list[Entry]] = Future()
                    self.tree_ahead[(c.name, c.ref)] = f
                    batch.append((c, f))
        for i in range(0, len(batch), TREE_BATCH):
            part = batch[i:i + TREE_BATCH]
            try:
                self.trees.submit(self._tree_batch, part)
            except RuntimeError:        # the restore is over (the pool shut down): nobody waits
                for _, f in part:
                    f.cancel()

    def _tree_batch(self, batch: list[tuple[Entry, Future[list[Entry]]]]) -> None:
        """A reading thread: one request for the batch's trees (and one for their pages), which
        land in the node cache; then each directory's entries as the walk takes them. A tree
        the batch could not bring is read alone, which raises what is wrong with it there."""
        try:
            got = self.source.fetch([c.ref for c, _ in batch if c.ref is not None])
            pages = [k for kind, raw in got if kind == Kind.TREE for k, _, _ in (tree_pages(raw) or [])]
            if pages:
                self.source.fetch(pages)
        except Exception:  # noqa: BLE001 - each tree is read alone below, which raises there
            pass
        more: list[Entry] = []
        for c, f in batch:
            if f.done():
                continue
            try:
                items = children(self.safe, c)
            except BaseException as e:  # noqa: BLE001 - handed to the walk, which warns about that directory
                f.set_exception(e)
                continue
            with self.tree_lock:
                self.tree_held += len(items)
            f.set_result(items)
            more += items
        self._trees_ahead(more)
