"""Open files and their reads: blob readers, checked byte ranges, read-ahead.

A file's data is read per request through the chunk cache shared by all open files
(:mod:`.objects`); the LIST nodes of open files go through a bounded node cache. A read
returns exactly the bytes asked for (clipped at the end of the file) or raises Damaged: a
damaged or missing chunk, a LIST node whose lengths do not add up, or a file whose size does
not match its blob are reported, never padded with zeros or cut short.

A sequential reader is detected per handle: requests within a few request sizes of each
other that together have covered at least ``RA_MIN_RUN`` bytes (a database's page reads a few
pages apart, or two or three adjacent pages, are not one). Ahead of it a window four times
what the run has covered so far, growing up to 32 MiB (at most a quarter of the chunk cache),
is loaded in 1 MiB jobs on a pool of three threads, which read and decompress without the
GIL, so that the reader's requests are answered from the cache on the trio thread.

A small file opened right after its predecessor in the same directory (tar, cp -a, rsync)
has its next small siblings loaded ahead the same way; their opens and reads then come from
the caches without a thread hop.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

from pointsafe.cas import BlobReader, IntegrityError, Kind, NodeCache, ObjectMissing, Safe, decode_list
from pointsafe.cas.tree import DIR, REG

from .errors import DamageLog, IsADir, NotFound, ReadOnly
from .inodes import DirRef, Handles, Inodes, Node
from .objects import ChunkSource


class _WouldLoad(Exception):
    """A cached-only read needs something that is not cached."""


_local = threading.local()

SMALL_FILE = 256 << 10      # files up to this size are loaded ahead of a reader going through a directory
SIBLINGS_AHEAD = 128        # ... this many of the next entries at once,
SIBLINGS_BYTES = 8 << 20    # ... at most this many bytes of them
RA_PIECE = 1 << 20          # bytes of read-ahead per background job
RA_MIN_RUN = 256 << 10      # a run of near requests covering this much is a sequential reader
RA_GROWTH = 4               # the window ahead: this many times what the run has covered
RA_THREADS = 3              # background loaders (they mostly wait in zstd and pread, without the GIL)


class FileHandle:
    """An open file: a blob reader plus the state of its sequential-read detection."""

    __slots__ = ("blob", "lock", "next_off", "node", "ra_end", "run_start", "sized", "streak")

    def __init__(self, node: Node, blob: BlobReader):
        self.node = node
        self.blob = blob
        self.sized = False          # the blob's length was found to match the file's size
        self.next_off = 0
        self.run_start = 0          # where the current run of near requests began
        self.streak = 0
        self.ra_end = 0
        self.lock = threading.Lock()


class Files:
    """Opening files and reading them, for every open file of one mount."""

    def __init__(self, safe: Safe, inodes: Inodes, handles: Handles, damage: DamageLog,
                 chunk_cache_bytes: int, readahead_bytes: int, chunks: ChunkSource | None = None):
        self.safe = safe
        self.inodes = inodes
        self.handles = handles
        self.damage = damage
        self.chunks = chunks if chunks is not None else ChunkSource(safe, chunk_cache_bytes)
        # Decoded LIST nodes of open files: a full node (256 entries) costs ≈ 28 KiB decoded,
        # so ≤ 7 MiB; one node maps 256 chunks, so 256 nodes map 4 GiB of a volume at 64 KiB.
        self.nodes = NodeCache(256)
        # never more ahead than a quarter of the chunk cache: what is loaded ahead must still
        # be there when the reader gets to it
        self.readahead_bytes = min(readahead_bytes, chunk_cache_bytes // 4)
        self.reads = 0              # read requests served, and their bytes (for benchmarks)
        self.read_bytes = 0
        self.loaded_reads = 0       # reads that had to load (or wait for) a chunk: not from the cache
        self.opens_here = 0         # opens answered from the caches, without touching the index
        self._dirs_lock = threading.Lock()
        # per directory being read file after file: (index of the last file opened, index up
        # to which its next files were loaded ahead); bounded
        self._dir_marks: OrderedDict[bytes, tuple[int, int]] = OrderedDict()
        self._prefetch = ThreadPoolExecutor(max_workers=RA_THREADS, thread_name_prefix="readahead")

    def close(self) -> None:
        """Stop the read-ahead and close the pack files."""
        self._prefetch.shutdown(wait=True, cancel_futures=True)
        self.chunks.close()

    def open(self, node: Node, flags: int, cached_only: bool = False) -> int | None:
        """A handle to read regular file ``node``; ReadOnly for any flag that would write.

        With ``cached_only`` the answer is None when opening would have to look into the safe's
        index (the caller then opens again on a worker thread). A file opened right after its
        predecessor in the same directory (tar, cp -a, rsync) has its next small siblings
        loaded ahead in the background, so that their opens and reads come from the caches."""
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & (os.O_TRUNC | os.O_APPEND | os.O_CREAT):
            raise ReadOnly(self.inodes.path(node))
        e = node.entry
        if e.type == DIR:
            raise IsADir(self.inodes.path(node))
        if e.type != REG:
            raise NotFound(self.inodes.path(node))   # fifos and devices never reach the filesystem
        if e.ref is None:
            kind_of = _chunk_kind
        elif cached_only:
            kind_of = self._kind_cached
        else:
            kind_of = self._kind
        try:
            blob = BlobReader(e.ref, e.size, self._get_node, kind_of, nodes=self.nodes)
        except _WouldLoad:
            return None
        except (IntegrityError, ObjectMissing) as err:
            raise self.damage.damaged(node, err, "file cannot be opened") from None
        if cached_only:
            self.opens_here += 1
        if node.dref is not None and e.size <= SMALL_FILE:
            self._siblings_ahead(node)
        return self.handles.add(FileHandle(node, blob))

    def _kind_cached(self, key: bytes) -> int:
        """CHUNK or LIST as the caches know it (only data chunks enter the chunk cache, only
        LIST nodes the node cache); _WouldLoad when neither holds ``key``."""
        if key in self.chunks.cache:
            return Kind.CHUNK
        if key in self.nodes.items:
            return Kind.LIST
        raise _WouldLoad()

    def _siblings_ahead(self, node: Node) -> None:
        """Load the next small files of ``node``'s directory ahead when files of it are being
        opened one after the other."""
        dref = node.dref
        assert dref is not None
        i = node.idx
        with self._dirs_lock:
            last, upto = self._dir_marks.pop(dref.key, (-SIBLINGS_AHEAD, 0))
            start = max(upto, i + 1)
            go = 0 < i - last <= 4 and start - i <= SIBLINGS_AHEAD // 2
            if go:
                upto = start + SIBLINGS_AHEAD
            self._dir_marks[dref.key] = (i, upto)
            while len(self._dir_marks) > 64:
                self._dir_marks.popitem(last=False)
        if go:
            self._prefetch.submit(self._load_siblings, dref, start, upto)

    def _load_siblings(self, dref: DirRef, start: int, stop: int) -> None:
        try:
            entries = dref.load(dref.key).entries[start:stop]
        except Exception:  # noqa: BLE001 - listing the directory again reports the problem
            return
        keys = []
        total = 0
        for e in entries:
            if e.type == REG and e.ref is not None and e.size <= SMALL_FILE:
                keys.append(e.ref)
                total += e.size
                if total >= SIBLINGS_BYTES:
                    break
        self.chunks.prefetch(keys)

    def _kind(self, key: bytes) -> int:
        ent = self.safe.entry(key)
        if ent is None:
            raise ObjectMissing(f"object {key.hex()[:12]} is not in the safe")
        return ent.kind

    def _get_node(self, key: bytes) -> bytes:
        if getattr(_local, "cached_only", False):
            raise _WouldLoad()
        return self.safe.get(key)

    def release(self, fh: int) -> None:
        """Close file handle ``fh``."""
        self.handles.release(fh)

    def read(self, fh: int, off: int, size: int, cached_only: bool = False) -> bytes | memoryview | None:
        """Bytes [off, off+size) of an open file; Damaged (and a warning) when they cannot be had.

        With ``cached_only`` nothing is loaded: the answer is None unless every piece is in the
        caches already. The adapter tries that on its own thread first (the read-ahead usually
        has the chunks ready) and hops to a worker thread only when something must be loaded.
        """
        h = self.handles.get(fh, FileHandle)
        assert isinstance(h, FileHandle)
        blob = h.blob
        end = min(off + size, blob.size)
        if off >= end:
            return b""
        if cached_only and blob.root_is_chunk:
            # A file of one chunk (every small file): its bytes straight from the cache, with
            # nothing to walk and nothing to read ahead (the chunk is the whole file).
            root = blob.root
            assert root is not None         # root_is_chunk: the root is the file's one chunk
            chunk = self.chunks.cache.peek(root)
            if chunk is None:
                return None
            try:
                _check_length(chunk, blob.size, root)
            except IntegrityError as err:
                raise self.damage.damaged(h.node, err, f"read at offset {off}") from None
            self.reads += 1
            self.read_bytes += end - off
            return chunk if off == 0 and end == len(chunk) else memoryview(chunk)[off:end]
        try:
            if cached_only:
                _local.cached_only = True
                try:
                    out = self._checked_range(h, off, end, cached_only=True)
                except _WouldLoad:
                    return None
                finally:
                    _local.cached_only = False
            else:
                out = self._checked_range(h, off, end)
                self.loaded_reads += 1
        except (IntegrityError, ObjectMissing, ValueError) as err:
            raise self.damage.damaged(h.node, err, f"read at offset {off}") from None
        self._sequential(h, off, end)
        self.reads += 1
        self.read_bytes += len(out)
        return out

    def _checked_range(self, h: FileHandle, off: int, end: int, cached_only: bool = False) -> bytes | memoryview:
        if not h.sized:
            _check_size(h.blob)
            h.sized = True
        return self._read_range(h.blob, off, end, cached_only)

    def _read_range(self, blob: BlobReader, off: int, end: int, cached_only: bool = False) -> bytes | memoryview:
        exts = list(blob.extents(off, end))
        keys = [k for _, _, k in exts if k is not None]
        if cached_only:
            data = self.chunks.peek_many(keys)
            if data is None:
                raise _WouldLoad()
        else:
            data = self.chunks.get_many(keys) if keys else {}
        parts: list[bytes | memoryview] = []
        pos = off
        for lo, length, k in exts:
            a = max(off, lo) - lo
            b = min(end, lo + length) - lo
            if lo + a != pos:
                raise IntegrityError(f"the file's chunk list has a gap or an overlap at offset {pos}")
            pos = lo + b
            if k is None:
                parts.append(bytes(b - a))
                continue
            chunk = data[k]
            _check_length(chunk, length, k)
            parts.append(memoryview(chunk)[a:b] if (a, b) != (0, len(chunk)) else chunk)
        if pos != end:
            raise IntegrityError(f"the file's chunk list ends at offset {pos}, before its size {blob.size}")
        if len(parts) == 1:
            return parts[0]
        return b"".join(parts)

    def _sequential(self, h: FileHandle, off: int, end: int) -> None:
        """Detect a sequential reader and load the next chunks ahead of it in the background.

        A run of near requests is a sequential reader once it has covered ``RA_MIN_RUN``
        bytes: a database reading two or three adjacent pages (a B-tree page and its
        neighbour, an overflow chain) must not start loading megabytes it never asks for. The
        window ahead grows with the run (``RA_GROWTH`` times what it covered, up to
        ``readahead_bytes``), and is cut into pieces of ``RA_PIECE`` bytes, each its own job,
        so that the pool's threads read and decompress several pieces at once (zstd and
        ``pread`` release the GIL) and the reader finds its chunks cached when it gets there."""
        if self.readahead_bytes <= 0:
            return
        with h.lock:
            # Kernel read-ahead requests may arrive a little out of order: "near" is sequential,
            # within a few request sizes (a database's page reads a few pages apart are not).
            near = abs(off - h.next_off) <= 4 * (end - off)
            if near:
                h.streak += 1
                h.next_off = max(end, h.next_off)
            else:
                h.streak, h.ra_end, h.next_off, h.run_start = 0, 0, end, off
            covered = h.next_off - h.run_start
            if h.streak < 2 or covered < RA_MIN_RUN or end >= h.blob.size:
                return
            start = max(end, h.ra_end)
            stop = min(h.blob.size, end + min(self.readahead_bytes, RA_GROWTH * covered))
            if stop - start < min(RA_PIECE, self.readahead_bytes // 4) and stop < h.blob.size:
                return
            h.ra_end = stop
        for a in range(start, stop, RA_PIECE):
            self._prefetch.submit(self._load_ahead, h.blob, a, min(stop, a + RA_PIECE))

    def _load_ahead(self, blob: BlobReader, start: int, stop: int) -> None:
        try:
            keys = [k for _, _, k in blob.extents(start, stop) if k is not None]
            if keys:
                self.chunks.get_many(keys)
        except Exception:  # noqa: BLE001, S110 - a real read of the same bytes reports the problem
            pass


def _check_length(chunk: bytes | memoryview, length: int, key: bytes) -> None:
    """IntegrityError unless ``chunk`` holds the ``length`` bytes the file's list says."""
    if len(chunk) != length:
        raise IntegrityError(f"chunk {key.hex()[:12]} holds {len(chunk)} bytes, the file's list says {length}")


def _chunk_kind(key: bytes) -> int:
    return Kind.CHUNK


def _check_size(blob: BlobReader) -> None:
    """IntegrityError unless the blob's LIST root covers exactly the file's size.

    (A one-chunk blob is checked by every read: the chunk's length must be the file's size.)"""
    if blob.root is None or blob.root_is_chunk:
        return
    root = blob.nodes.get(blob.root, lambda k: decode_list(blob.get(k)))
    if root.size != blob.size:
        raise IntegrityError(f"the file's size ({blob.size} bytes) does not match its content "
                             f"({root.size} bytes)")
