"""Mounting an agent's own points through the server: what the mount's view reads, fetched.

fusefs's View reads a safe through a few calls -- ``get`` (a tree or list node's raw bytes),
``entry`` (whether a file's root is a chunk or a list), ``points``, ``objects_read`` and, for
``df``, ``pack_entries`` and ``path`` -- and reads file data through a chunk source
(fusefs/objects.py). :class:`RemoteObjects` answers those calls from the server by the agent's
plain ids (docs/SERVER.md, "Ids"), and :class:`RemoteChunks` is the chunk source, so the view,
its caches, its read-ahead and its error handling are the local mount's, unchanged.

Nothing is fetched at mount time but the point list. A directory, when first looked into,
fetches its tree (a paged directory: its pages in one request), and its subdirectories' trees
are fetched in the background, in one request, so that a ``find`` or ``ls -R`` costs a request
per directory level rather than per directory. A read fetches the chunks it needs in one
request; the view's read-ahead asks for the next ones, a request per MiB. Every object is
checked against its plain id as it arrives (``Remote.fetch``). Memory is bounded: chunks go
into the view's chunk cache (``--cache-size``), nodes into a byte-bounded cache of their own.

A server that cannot be reached (after a few quick retries) fails the one request that needed
it: the read answers EIO, and the mount's log has a line saying why. Nothing is ever made up.
"""

from __future__ import annotations

import logging
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from pointsafe.cas import IntegrityError, Kind, ObjectMissing, Point, UsageError
from pointsafe.cas.tree import DIR, decode_tree, tree_pages
from pointsafe.fusefs.cache import ByteLRU
from pointsafe.fusefs.objects import ENTRY_OVERHEAD, Chunk, ChunkSource

from . import protocol
from .client import Remote, ServerError, resolve

log = logging.getLogger("pointsafe.mount")

MOUNT_RETRIES = 3            # attempts of a fetch (about 1.5 s when the server is down) before EIO
MOUNT_TIMEOUT = 30.0         # seconds a fetch may wait for the server's answer
NODE_CACHE_BYTES = 32 << 20  # raw tree and list nodes fetched (decoded listings are the view's)
SUBDIRS_AHEAD = 256          # subdirectory trees fetched ahead of a listing, at most
LOG_EVERY = 10.0             # seconds between two log lines about the same failure


class _AheadFailed(Exception):
    """A node fetched ahead in a batch that failed: fetch it alone."""


@dataclass(frozen=True)
class RemoteEntry:
    """What the view asks of an object's index entry: its kind."""

    kind: int


def _node_size(item: tuple[int, bytes]) -> int:
    return len(item[1]) + ENTRY_OVERHEAD


def _chunk_size(value: Chunk) -> int:
    return len(value) + ENTRY_OVERHEAD


class RemoteObjects:
    """The agent's objects on the server, as the mount's view reads a safe (see the module
    docstring); ``chunks`` is the chunk source to give the view with it. Thread-safe."""

    def __init__(self, remote: Remote, chunk_cache_bytes: int, node_cache_bytes: int = NODE_CACHE_BYTES):
        self.remote = remote
        self.path = ""                   # no local filesystem: df shows no free space
        self.objects_read = 0            # objects fetched (the view's stats)
        self.requests = 0                # fetch requests made
        self.nodes: ByteLRU[tuple[int, bytes]] = ByteLRU(node_cache_bytes, sizeof=_node_size)
        self.chunks = RemoteChunks(self, chunk_cache_bytes)
        self.lock = threading.Lock()
        self._points: list[Point] | None = None
        self._logged: dict[str, float] = {}
        self._ahead = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fetch-trees")
        self._wanted: list[bytes] = []   # claimed in ``nodes``, for the fetcher thread to ask for
        self._draining = False           # the fetcher thread has a job queued or running

    # -- fetching ---------------------------------------------------------------------------

    def fetch(self, keys: list[bytes]) -> list[protocol.Record]:
        """The objects ``keys`` names, in order, each checked against its plain id; ObjectMissing
        for one the server does not give this agent, ServerError (logged) when it cannot be had."""
        with self.lock:
            self.requests += 1
        try:
            recs = self.remote.fetch(keys)
        except ServerError as e:
            self._log_failure(str(e))
            raise
        with self.lock:
            self.objects_read += len(recs)
        return recs

    def _log_failure(self, message: str) -> None:
        """One log line per distinct failure every LOG_EVERY seconds (a dead server fails every read)."""
        now = time.monotonic()
        with self.lock:
            if now - self._logged.get(message, -LOG_EVERY) < LOG_EVERY:
                return
            if len(self._logged) > 100:
                self._logged.clear()
            self._logged[message] = now
        log.warning("cannot fetch from the server (the read answers EIO): %s", message)

    def keep(self, rec: protocol.Record) -> None:
        """Cache a fetched object: a chunk in the chunk cache, a node in the node cache."""
        if rec.kind == Kind.CHUNK:
            self.chunks.cache.put(rec.id, rec.raw)
        else:
            self.nodes.put(rec.id, (rec.kind, rec.raw))

    # -- what the view calls ------------------------------------------------------------------

    def get(self, key: bytes) -> bytes:
        """The raw bytes of node ``key`` (a tree or a list; fetched once, then cached);
        ObjectMissing when the agent has no such object. A tree's subdirectories are fetched
        ahead in the background; a paged tree's pages come with it, in one request."""
        try:
            kind, raw = self.nodes.get(key, lambda: self._load(key))
        except _AheadFailed:        # it was in a batch fetched ahead that failed: alone, now
            kind, raw = self.nodes.get(key, lambda: self._load(key))
        if kind == Kind.TREE:
            self._tree_fetched(raw)
        return raw

    def _load(self, key: bytes) -> tuple[int, bytes]:
        rec = self.fetch([key])[0]
        if rec.kind == Kind.CHUNK:
            self.chunks.cache.put(rec.id, rec.raw)
        return rec.kind, rec.raw

    def _tree_fetched(self, raw: bytes) -> None:
        """Fetch what a listing of tree ``raw`` reads next: its pages now, or its subdirectories'
        trees in the background."""
        try:
            pages = tree_pages(raw)
            if pages is not None:
                _, mine, _ = self.nodes.claim([k for k, _, _ in pages])
                self._fetch_claimed(mine)        # read_tree asks for each next
                return
            subdirs = [e.ref for e in decode_tree(raw) if e.type == DIR and e.ref is not None]
        except (ValueError, struct.error, IndexError, KeyError):
            return              # the view decodes it again and reports the damage
        if subdirs:
            self._queue_ahead(subdirs[:SUBDIRS_AHEAD])

    def _queue_ahead(self, keys: list[bytes]) -> None:
        """Claim the nodes ``keys`` not cached or on their way (a listing that wants one waits
        for it instead of fetching it again) and have the fetcher thread ask for everything
        queued in one request. At most MAX_IDS wait."""
        with self.lock:
            room = protocol.MAX_IDS - len(self._wanted)
        _, mine, _ = self.nodes.claim(keys[:max(0, room)])
        if not mine:
            return
        with self.lock:
            self._wanted += mine
            start, self._draining = not self._draining, True
        if start:
            try:
                self._ahead.submit(self._drain)
            except RuntimeError:    # closed
                self._drop_wanted()

    def _take(self, n: int) -> list[bytes]:
        with self.lock:
            batch, self._wanted = self._wanted[:n], self._wanted[n:]
            if not batch:
                self._draining = False
            return batch

    def _drain(self) -> None:
        while batch := self._take(protocol.MAX_IDS):
            self._fetch_claimed(batch)

    def _drop_wanted(self) -> None:
        """Settle every node still queued (the fetcher thread is gone): whoever waits fetches it alone."""
        with self.lock:
            keys, self._wanted, self._draining = self._wanted, [], False
        for k in keys:
            self.nodes.settle(k, error=_AheadFailed("not fetched ahead"))

    def _fetch_claimed(self, keys: list[bytes]) -> None:
        """Fetch nodes ``keys`` (claimed in the node cache) in one request and settle each; when
        that fails, each is settled with _AheadFailed (whoever waits for it fetches it alone)."""
        if not keys:
            return
        try:
            got = {r.id: r for r in self.fetch(keys)}
        except Exception as e:  # noqa: BLE001 - one bad object must not fail its siblings
            for k in keys:
                self.nodes.settle(k, error=_AheadFailed(str(e)))
            return
        for k in keys:
            r = got.get(k)
            if r is None:
                self.nodes.settle(k, error=_AheadFailed(f"object {k.hex()[:12]} did not come"))
                continue
            if r.kind == Kind.CHUNK:
                self.chunks.cache.put(r.id, r.raw)
            self.nodes.settle(k, (r.kind, r.raw))

    def entry(self, key: bytes) -> RemoteEntry | None:
        """The kind of object ``key`` (None when the agent has no such object); the object is
        fetched (and cached) to learn it: the caller reads it next."""
        if key in self.chunks.cache:
            return RemoteEntry(Kind.CHUNK)
        item = self.nodes.peek(key)
        if item is not None:
            return RemoteEntry(item[0])
        try:
            rec = self.fetch([key])[0]
        except ObjectMissing:
            return None
        self.keep(rec)
        return RemoteEntry(rec.kind)

    def points(self) -> list[Point]:
        """The agent's points (their roots are its plain ids); when the server cannot be
        reached, the list it gave last (logged), so that the folders stay as they were."""
        try:
            pts = self.remote.points()
        except ServerError as e:
            with self.lock:
                last = self._points
            if last is None:
                raise
            self._log_failure(str(e))
            return last
        with self.lock:
            self._points = pts
        return pts

    def pack_entries(self) -> dict[str, Any]:
        """No packs here (``df`` of the mount shows nothing used)."""
        return {}

    def close(self) -> None:
        """Stop fetching ahead and drop the caches."""
        self._ahead.shutdown(wait=True, cancel_futures=True)
        self._drop_wanted()
        self.nodes.clear()
        self.chunks.cache.clear()


class RemoteChunks(ChunkSource):
    """The view's chunk source over the server: ChunkSource's cache and single-flight loading,
    with chunks fetched (by plain id, checked) instead of read from packs."""

    def __init__(self, objects: RemoteObjects, cache_bytes: int):   # no pack store: ChunkSource's is not called
        self.objects = objects
        self.cache: ByteLRU[Chunk] = ByteLRU(cache_bytes, sizeof=_chunk_size)

    def _load(self, keys: list[bytes], known: Any = None) -> dict[bytes, Chunk | BaseException]:
        """The chunks ``keys`` names, fetched in one request (per MAX_IDS); an object that is no
        chunk (a small file's list root, asked for by the sibling read-ahead) goes to the node
        cache and is an error here. Raises what the fetch raises (the caller settles every key)."""
        out: dict[bytes, Chunk | BaseException] = {}
        for rec in self.objects.fetch(keys):
            if rec.kind == Kind.CHUNK:
                out[rec.id] = rec.raw
            else:
                self.objects.keep(rec)
                out[rec.id] = IntegrityError(f"object {rec.id.hex()[:12]} is not a data chunk")
        return out

    def prefetch(self, keys: list[bytes]) -> None:
        """Fetch those of ``keys`` not cached yet, in one request; errors are left for a real
        read to report."""
        keys = [k for k in keys if k not in self.cache and k not in self.objects.nodes]
        if keys:
            try:
                self.get_many(keys)
            except Exception:  # noqa: BLE001, S110 - a real read of the same file reports it
                pass

    def close(self) -> None:
        """Nothing to close (the connections are the Remote's)."""


def open_agent(remote: Remote, point: str | None) -> tuple[str | None, dict[str, Any]]:
    """Check that this agent may mount and resolve ``point`` among its own points: (the point's
    id or the spec as given -- ``latest``, NAME@TIME -- for the mount to resolve, the server's
    info). UsageError (one line) for an agent without --can-restore or a point it does not have
    (another agent's reads as unknown)."""
    info = remote.info()
    if not info.get("can_restore"):
        raise UsageError(f"agent {info.get('agent')} may not read file contents (it was added without "
                         "--can-restore), so it cannot mount its points")
    if point is not None and point != "latest" and not ("@" in point and not point.endswith("@latest")):
        point = resolve(remote, point).id
    return point, info


def mount_remote(url: str, token: str) -> Remote:
    """The server at ``url`` as a mount talks to it: a few quick retries, then the request fails
    (a read must not hang for half a minute); UsageError for a URL that names no server."""
    remote = Remote(url, token, timeout=MOUNT_TIMEOUT)
    remote.retries = MOUNT_RETRIES
    return remote


def mount_source(url: str, token: str, chunk_cache_bytes: int) -> tuple[RemoteObjects, RemoteChunks]:
    """What a mount of the agent's points reads (``MountOptions.source``): called in the mount
    process, with connections of its own to the server."""
    objects = RemoteObjects(mount_remote(url, token), chunk_cache_bytes)
    return objects, objects.chunks
