"""Writing a point back out: a tree into a directory, a volume into an image or a device.

Everything is created relative to directory descriptors, never by a full path (as ``rsync``
and ``tar`` do): every directory is opened with O_NOFOLLOW|O_DIRECTORY from its parent's
descriptor, and files, symlinks, devices, hardlinks and renames go through ``*at`` calls on
those descriptors. So neither a hostile safe (names like ``..`` or ``a/b``, a symlink and a
directory of the same name: refused with a warning) nor the owner of the target swapping a
directory for a symlink while the restore runs can make it write outside the target, and paths
have no length limit. A target inside the safe is refused.
Directory descriptors are bounded: the walk keeps the innermost ``KEEP_OPEN`` directories of its
stack (and every ``KEEP_OPEN``-th above them) open and reopens the others by name from the
nearest open ancestor when it comes back to them; the final pass (hardlinks, directory
metadata) opens directories by name from the target through a small LRU.
Each regular file is written under a temporary name in its directory (``.pointsafe-restore.*``,
created O_EXCL|O_NOFOLLOW) and renamed over its real name once its content and metadata are
complete, so an aborted restore never leaves a partial file under a real name. A file whose
content is missing or damaged in the safe, or does not match the size its entry records, is
not written: a warning names it (exit 3) and everything else is restored.
Holes are skipped with ``pwrite`` past them and a final ``ftruncate``, so sparse files stay
sparse. Chunks are fetched and decompressed ahead of the writer by a small thread pool, in
groups: one index transaction per group, one ``pread`` per run of records that lie next to
each other in a pack (a backup writes a file's chunks, and small files, in order), and one
``pwritev`` per run of contiguous chunks; a batch of small files is fetched the same way.
Metadata order per entry: content, owner, xattrs (after chown, which drops security.capability),
mode (after chown, which clears setuid), times; directories get theirs once everything is
written, children before their parents.
"""

from __future__ import annotations

import errno
import itertools
import os
import secrets
import stat
import struct
import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from typing import TypeVar
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from pointsafe.cas import (
    BlobReader,
    Entry,
    IntegrityError,
    Kind,
    NodeCache,
    ObjectMissing,
    Point,
    Safe,
    SafeError,
    UsageError,
    decode_list,
)
from pointsafe.cas.pack import decode_record_view
from pointsafe.cas.tree import BLK, CHR, DIR, FIFO, LNK, REG, SOCK

from .browse import children, display_name, lookup_chain, root_entry, split_path

_T = TypeVar("_T")

FETCH_GROUP = 16          # chunks per fetch job (one index transaction, runs read in one pread)
FETCH_AHEAD = 4           # fetch jobs in flight per large file
MAX_RUN = 4 << 20         # bytes of neighbouring records read from a pack in one pread, at most
TREES_AHEAD = 512         # directories whose trees are read ahead of the walk, at most ...
TREES_AHEAD_ENTRIES = 200_000   # ... holding at most this many entries not yet walked
SMALL_FILE = 256 * 1024   # files up to this size are usually one chunk
_ZEROS = memoryview(bytes(1 << 20))   # what a device restore writes where a volume has a hole, in pieces of at most this
BATCH_FILES = 64          # files per job of the writer pool
BATCH_BYTES = 4 << 20
BATCH_DIRS = 16           # distinct directories per job (each holds a descriptor open)
KEEP_OPEN = 32            # directory descriptors kept open at the inner end of the walk's stack
OPENER_CACHE = 64         # directory descriptors cached by the final pass
TMP_PREFIX = ".pointsafe-restore."

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_TMP_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_PROC_FD = os.path.isdir("/proc/self/fd")
_NODE_KIND = {FIFO: stat.S_IFIFO, CHR: stat.S_IFCHR, BLK: stat.S_IFBLK, SOCK: stat.S_IFSOCK}


@dataclass
class RestoreStats:
    """What a restore did: files, directories and other entries made, bytes written, and the
    warnings (one dict per entry not restored or restored without some metadata).
    """
    files: int = 0
    dirs: int = 0
    other: int = 0
    bytes_written: int = 0
    warnings: list[dict] = field(default_factory=list)

    def as_dict(self) -> dict:
        """The counters and warnings, for JSON output."""
        return dict(self.__dict__)


class BadContent(IntegrityError):
    """A file's blob does not match its entry (size) or is inconsistent in itself."""


def _safe_name(name: bytes) -> bool:
    return bool(name) and b"/" not in name and name not in (b".", b"..") and b"\0" not in name


def _reason(err: OSError) -> str:
    """An OSError as words for a warning (never a bytes repr of a path)."""
    if err.errno in (errno.EISDIR, errno.ENOTEMPTY):
        return "a directory is in the way"
    if err.errno == errno.ELOOP:
        return "a symbolic link is in the way (not followed)"
    return err.strerror or str(err)


def _join(rel: bytes, name: bytes) -> bytes:
    return rel + b"/" + name if rel else name


class _Dir:
    """An open directory of the target, shared by the walk and the queued file jobs; closed
    when the last holder drops it (see ``Restorer.hold``/``drop``)."""

    __slots__ = ("fd", "refs")

    def __init__(self, fd: int):
        self.fd = fd
        self.refs = 1


@dataclass(slots=True)
class _Frame:
    """One directory on the walk's stack."""
    entry: Entry
    rel: bytes                 # its path below the target (= in the point), b"" for the top
    items: Iterator[Entry]
    dir: _Dir | None           # None while its descriptor is closed (deep stacks)
    meta: bool = True          # gets its stored metadata at the end
    seen: set[bytes] = field(default_factory=set)


class _Opener:
    """Opens directories of the target by their relative path, one O_NOFOLLOW component at a
    time from the nearest cached ancestor (an LRU of descriptors; the top is never closed).
    A returned descriptor stays valid until the next call."""

    def __init__(self, top: int, limit: int = OPENER_CACHE):
        self.top = top
        self.limit = limit
        self.cache: OrderedDict[bytes, int] = OrderedDict()

    def open(self, rel: bytes) -> int:
        """The descriptor of directory ``rel`` (b"" is the top); OSError if it is not one."""
        names: list[bytes] = []
        base = rel
        fd = self.top
        while base:
            cached = self.cache.get(base)
            if cached is not None:
                self.cache.move_to_end(base)
                fd = cached
                break
            base, _, name = base.rpartition(b"/")
            names.append(name)
        for name in reversed(names):
            fd = os.open(name, _DIR_FLAGS, dir_fd=fd)
            base = _join(base, name)
            self.cache[base] = fd
            while len(self.cache) > self.limit:
                os.close(self.cache.popitem(last=False)[1])
        return fd

    def close(self) -> None:
        """Close every cached descriptor."""
        for fd in self.cache.values():
            os.close(fd)
        self.cache.clear()


class Restorer:
    """Restores one point. Files are written by a pool of threads (file creation, writes and
    decompression all release the GIL); directories are created in walk order by the calling
    thread; hardlinks and directory metadata are applied once every file is in place."""

    def __init__(self, safe: Safe, force: bool = False, progress: Callable[[int], None] | None = None,
                 workers: int = 4):
        self.safe = safe
        self.force = force
        self.progress = progress or (lambda n: None)
        self.stats = RestoreStats()
        self.fetch = ThreadPoolExecutor(max_workers=2, thread_name_prefix="pointsafe-fetch")
        self.trees = ThreadPoolExecutor(max_workers=2, thread_name_prefix="pointsafe-trees")
        self.tree_ahead: dict[tuple[bytes, bytes], Future] = {}   # (name, ref) -> its entries, read ahead
        self.tree_held = 0                                        # entries read ahead, not yet walked
        self.tree_lock = threading.Lock()
        self.jobs = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="pointsafe-restore")
        self.slots = threading.Semaphore(workers * 4)    # bounds the queued batches of files
        self.batch: list[tuple[_Dir, bytes, Entry]] = []
        self.batch_dirs: set[_Dir] = set()
        self.batch_bytes = 0
        self.pending: list[Future] = []
        self.lock = threading.Lock()
        self.nodes = NodeCache(1024)
        self.first_link: dict[int, bytes] = {}          # link group -> path of the first copy
        self.linked: set[int] = set()                   # link groups whose first copy is in place
        self.links: list[tuple[bytes, Entry]] = []      # (path, entry) of later copies
        self.dirs: list[tuple[bytes, Entry]] = []       # directories, in post-order
        self.is_root = os.geteuid() == 0
        self._tmp_token = secrets.token_hex(4)
        self._tmp_count = itertools.count()

    def warn(self, path: bytes, message: str) -> None:
        """Record a warning about ``path`` (relative to the point)."""
        with self.lock:
            self.stats.warnings.append({"path": display_name(path or b"."), "message": message})

    def _count(self, **kw) -> None:
        with self.lock:
            for k, v in kw.items():
                setattr(self.stats, k, getattr(self.stats, k) + v)

    def hold(self, d: _Dir) -> None:
        """Take one more reference on an open directory."""
        with self.lock:
            d.refs += 1

    def drop(self, d: _Dir) -> None:
        """Drop a reference; the last one closes the descriptor."""
        with self.lock:
            d.refs -= 1
            last = d.refs == 0
        if last:
            os.close(d.fd)

    # -- blobs --------------------------------------------------------------------------

    def _kind(self, key: bytes) -> int:
        oe = self.safe.entry(key)
        if oe is None:
            raise ObjectMissing(f"its content (object {key.hex()[:12]}) is missing from the safe")
        return oe.kind

    def reader(self, ref: bytes | None, size: int) -> BlobReader:
        """A reader of the blob ``ref`` recorded as ``size`` bytes; BadContent when the blob's
        real length differs, ObjectMissing when its root is not in the safe."""
        r = BlobReader(ref, size, self.safe.get, self._kind, self.nodes)
        if ref is None and size:
            raise _mismatch(size, 0)
        if ref is not None and not r.root_is_chunk:
            real = self.nodes.get(ref, lambda k: decode_list(self.safe.get(k))).size
            if real != size:
                raise _mismatch(size, real)
        return r

    def fetch_many(self, keys: list[bytes]) -> list[tuple[int, bytes | memoryview]]:
        """(kind, raw bytes) of each object of ``keys``, in order: one index transaction, and one
        ``pread`` for each run of records that lie next to each other in a pack. An object that
        is not where the index said (moved by a concurrent gc) or whose record does not check
        is read again through ``Safe.get``; raises as ``Safe.get`` (ObjectMissing,
        IntegrityError)."""
        safe, idx = self.safe, self.safe.index
        with idx.read() as txn:
            ents = [idx.get_object(txn, k) for k in keys]
        out: list[tuple[int, bytes | memoryview] | None] = [None] * len(keys)
        located = []
        for n, e in enumerate(ents):
            if e is None:
                out[n] = (self._kind(keys[n]), safe.get(keys[n]))   # ObjectMissing, or moved meanwhile
            else:
                located.append((e.pack, e.offset, n))
        located.sort()
        i = 0
        while i < len(located):
            pack, start, first = located[i]
            end = start + _ent(ents, first).record_len
            j = i + 1
            while j < len(located) and located[j][0] == pack and located[j][1] == end and end - start < MAX_RUN:
                end += _ent(ents, located[j][2]).record_len
                j += 1
            try:
                buf = memoryview(safe.store.read(pack, start, end - start))
            except OSError:
                safe.store.forget(pack)
                buf = None
            for _, off, n in located[i:j]:
                e = _ent(ents, n)
                raw: bytes | memoryview | None = None
                if buf is not None:
                    try:
                        _, raw = decode_record_view(buf[off - start:off - start + e.record_len], pack, off,
                                                    rehash=False, expect_key=keys[n], crypto=safe.crypto)
                    except IntegrityError:
                        raw = None
                out[n] = (e.kind, raw if raw is not None else safe.get(keys[n]))
            i = j
        safe.objects_read += len(located)
        return [x for x in out if x is not None]

    def write_small(self, fd: int, e: Entry, got: tuple[int, bytes | memoryview] | None = None) -> None:
        """A file of one chunk (most small files): one index lookup, one read, one write --
        or none but the write when its (kind, bytes) were fetched already (``got``, see
        ``fetch_many``). The caller holds ``e.ref`` not None; ObjectMissing when the object is
        not in the safe."""
        ref = e.ref
        assert ref is not None, "write_small of a file without content"
        if got is None:
            got = self.fetch_many([ref])[0]
        kind, data = got
        if kind != Kind.CHUNK:
            self.write_blob(fd, self.reader(ref, e.size), prefetch=False)
            return
        if len(data) != e.size:
            raise _mismatch(e.size, len(data))
        _pwritev_all(fd, [data], 0)
        self._count(bytes_written=len(data))
        self.progress(len(data))

    def write_blob(self, fd: int, r: BlobReader, prefetch: bool = True, zeros: bool = False,
                   done: list[int] | None = None) -> None:
        """Write a blob into ``fd`` from offset 0, skipping holes (``zeros``: writing zeros
        there, for a device, which has no holes; then nothing is truncated); chunks fetched
        ahead, in groups. ``done[0]`` follows the bytes written, in order from offset 0 with
        ``zeros``. BadContent when its pieces do not add up to ``r.size`` bytes."""
        window: deque = deque()
        written = 0
        expect = 0
        done = done if done is not None else [0]

        def put(pieces: list[tuple[int, int, bytes | memoryview]]) -> None:
            # Contiguous pieces go out in one pwritev.
            nonlocal written
            k = 0
            while k < len(pieces):
                start = pieces[k][0]
                bufs = []
                end = start
                while k < len(pieces) and pieces[k][0] == end:
                    off, length, data = pieces[k]
                    if len(data) != length:
                        raise BadContent(f"its content in the safe is malformed (a piece at offset {off} "
                                         f"holds {len(data)} bytes, its list says {length})")
                    bufs.append(data)
                    end += length
                    k += 1
                _pwritev_all(fd, bufs, start)
                written += end - start
                done[0] = written
                self.progress(end - start)

        def fetch(group: list[tuple[int, int, bytes | None]]) -> list[tuple[int, int, bytes | memoryview]]:
            # a hole's pieces (key None, with ``zeros``) are slices of one buffer of zeros
            got = iter(self.fetch_many([k for _, _, k in group if k is not None]))
            return [(o, n, _ZEROS[:n] if k is None else next(got)[1]) for o, n, k in group]

        def pieces() -> Iterator[tuple[int, int, bytes | None]]:
            for off, length, key in r.extents():
                if key is not None or not zeros:
                    yield off, length, key
                    continue
                for o in range(off, off + length, len(_ZEROS)):
                    yield o, min(len(_ZEROS), off + length - o), None

        group: list[tuple[int, int, bytes | None]] = []
        for off, length, key in pieces():
            if off != expect:
                raise BadContent(f"its content in the safe is malformed (a gap or overlap at offset {off})")
            expect = off + length
            if key is None and not zeros:
                continue
            # Chunks travel in groups: one future (or, without prefetch, one call) per group,
            # not per chunk, keeps index transactions, reads, writes and thread hand-offs few.
            group.append((off, length, key))
            if len(group) >= FETCH_GROUP:
                if not prefetch:
                    put(fetch(group))
                else:
                    window.append(self.fetch.submit(fetch, group))
                    if len(window) >= FETCH_AHEAD:
                        put(window.popleft().result())
                group = []
        if group:
            if not prefetch:
                put(fetch(group))
            else:
                window.append(self.fetch.submit(fetch, group))
        while window:
            put(window.popleft().result())
        if expect != r.size:
            raise _mismatch(r.size, expect)
        if not zeros:
            os.ftruncate(fd, r.size)
        self._count(bytes_written=written)

    # -- trees --------------------------------------------------------------------------

    def restore_tree(self, point: Point, target: Path, subpath: str | None = None) -> RestoreStats:
        """Restore the tree point (or the part at ``subpath``, kept at its place) into
        ``target``, a new or empty directory (any directory with ``force``)."""
        parts = split_path(subpath) if subpath else []
        # Everything the user named is checked before anything is created.
        chain = lookup_chain(self.safe, point, b"/".join(parts)) if parts else []
        root = root_entry(point)
        top = _open_target(target, self.force)
        stack = [_Frame(root, b"", iter(()), top, meta=not parts)]
        try:
            if not parts:
                try:
                    stack[0].items = iter(self._children(root))
                except SafeError as err:   # a damaged root node: nothing below can be restored
                    self.warn(b"", f"cannot read this directory from the safe: {err}")
            else:
                for i, d in enumerate(chain[:-1]):   # the directories on the way
                    rel = b"/".join(parts[:i + 1])
                    try:
                        fd = self._open_subdir(self._dir_of(stack), d)
                    except (OSError, SafeError) as err:
                        why = _reason(err) if isinstance(err, OSError) else str(err)
                        raise SafeError(f"{display_name(rel)}: cannot restore into it: {why}") from None
                    self._push(stack, _Frame(d, rel, iter(()), _Dir(fd)))
                stack[-1].items = iter(chain[-1:])
            self.hold(top)               # the final pass needs the top after the walk drops it
            self._walk(stack)
            self._finish(top.fd)
        finally:
            self.jobs.shutdown(cancel_futures=True)
            self.fetch.shutdown(cancel_futures=True)
            self.trees.shutdown(cancel_futures=True)
            for f in stack:
                if f.dir is not None:
                    self.drop(f.dir)
            if top.refs:
                self.drop(top)
        return self.stats

    def _children(self, e: Entry) -> list[Entry]:
        """The entries of directory ``e`` (raises as ``browse.children``), read ahead when they
        could be; its subdirectories' trees are then read ahead in turn (by two threads, at
        most TREES_AHEAD trees and TREES_AHEAD_ENTRIES entries not yet walked), so that the
        walk, which creates the directories, rarely waits for a cold tree node."""
        fut = self.tree_ahead.pop((e.name, e.ref), None) if e.ref is not None else None
        if fut is None:
            items = children(self.safe, e)
        else:
            items = fut.result()
            with self.tree_lock:
                self.tree_held -= len(items)
        self._trees_ahead(items)
        return items

    def _trees_ahead(self, items: list[Entry]) -> None:
        with self.tree_lock:
            for c in items:
                if (c.type == DIR and c.ref is not None and (c.name, c.ref) not in self.tree_ahead
                        and len(self.tree_ahead) < TREES_AHEAD and self.tree_held < TREES_AHEAD_ENTRIES):
                    self.tree_ahead[(c.name, c.ref)] = self.trees.submit(self._tree_ahead, c)

    def _tree_ahead(self, e: Entry) -> list[Entry]:
        """A reading thread: the entries of ``e``, counted as held until the walk takes them."""
        items = children(self.safe, e)
        with self.tree_lock:
            self.tree_held += len(items)
        self._trees_ahead(items)
        return items

    def _walk(self, stack: list[_Frame]) -> None:
        """Depth-first over the stack's directories, without recursion (depth is unbounded)."""
        while stack:
            f = stack[-1]
            c = next(f.items, None)
            if c is None:
                stack.pop()
                if f.dir is not None:
                    self.drop(f.dir)
                    f.dir = None
                if f.meta:
                    self.dirs.append((f.rel, f.entry))
                continue
            rel = _join(f.rel, c.name)
            if not _safe_name(c.name):
                self.warn(rel, "refused an entry whose name would escape the target")
                continue
            if c.name in f.seen:
                self.warn(rel, "refused a second entry with the same name")
                continue
            f.seen.add(c.name)
            try:
                d = self._dir_of(stack)
                if c.type == DIR:
                    self._enter(stack, d, c, rel)
                elif c.type == REG:
                    self._queue_file(d, c, rel)
                else:
                    self._make_other(d, c, rel)
            except OSError as err:
                self.warn(rel, f"cannot restore: {_reason(err)}")
            except SafeError as err:
                self.warn(rel, f"cannot restore: {err}")

    def _push(self, stack: list[_Frame], frame: _Frame) -> None:
        """Push a directory; close the descriptor of one far up the stack (every KEEP_OPEN-th
        stays open, so that reopening one never walks more than KEEP_OPEN names)."""
        stack.append(frame)
        i = len(stack) - 1 - KEEP_OPEN
        if i > 0 and i % KEEP_OPEN:
            d = stack[i].dir
            if d is not None:
                self.drop(d)
                stack[i].dir = None

    def _dir_of(self, stack: list[_Frame]) -> _Dir:
        """The open directory of the stack's innermost frame, reopened by name (O_NOFOLLOW,
        from the nearest open ancestor, never through '..') when it was closed."""
        j = len(stack) - 1
        d = stack[j].dir
        while d is None:
            j -= 1
            d = stack[j].dir
        for k in range(j + 1, len(stack)):
            fd = os.open(stack[k].entry.name, _DIR_FLAGS, dir_fd=d.fd)
            d = _Dir(fd)
            stack[k].dir = d
        return d

    def _open_subdir(self, parent: _Dir, e: Entry) -> int:
        """Create directory ``e`` in ``parent`` (or, with --force, take the one there) and open it."""
        try:
            os.mkdir(e.name, 0o700, dir_fd=parent.fd)
        except FileExistsError:
            if not self.force:
                raise SafeError("already exists in the target (add --force to restore into it)") from None
        try:
            fd = os.open(e.name, _DIR_FLAGS, dir_fd=parent.fd)
        except NotADirectoryError:
            st = os.stat(e.name, dir_fd=parent.fd, follow_symlinks=False)
            what = "a symbolic link (not followed)" if stat.S_ISLNK(st.st_mode) else "a file that is not a directory"
            raise SafeError(f"{what} is in the way") from None
        if self.force:
            drop_stale_temps(fd)
        return fd

    def _enter(self, stack: list[_Frame], parent: _Dir, e: Entry, rel: bytes) -> None:
        fd = self._open_subdir(parent, e)
        self._count(dirs=1)
        try:
            items = self._children(e)
        except SafeError as err:   # a damaged, missing or hostile tree node: restore the rest
            os.close(fd)
            self.warn(rel, f"cannot read this directory from the safe: {err}")
            self.dirs.append((rel, e))
            return
        self._push(stack, _Frame(e, rel, iter(items), _Dir(fd)))

    def _queue_file(self, d: _Dir, e: Entry, rel: bytes) -> None:
        if e.link_group:
            if e.link_group in self.first_link:
                self.links.append((rel, e))
                return
            self.first_link[e.link_group] = rel
        self.batch.append((d, rel, e))
        if d not in self.batch_dirs:
            self.hold(d)
            self.batch_dirs.add(d)
        self.batch_bytes += e.size
        if len(self.batch) >= BATCH_FILES or self.batch_bytes >= BATCH_BYTES or len(self.batch_dirs) >= BATCH_DIRS:
            self._submit_batch()

    def _submit_batch(self) -> None:
        """Hand a batch of files to the pool: one job per batch keeps the per-file overhead of
        futures and thread hand-offs off the small files."""
        if not self.batch:
            return
        batch, dirs = self.batch, self.batch_dirs
        self.batch, self.batch_dirs, self.batch_bytes = [], set(), 0
        self.slots.acquire()

        def job() -> None:
            try:
                got = self._fetch_small(batch)
                for d, rel, e in batch:
                    self._file_job(d, rel, e, got.get(e.ref) if e.ref is not None else None)
            finally:
                for d in dirs:
                    self.drop(d)

        fut = self.jobs.submit(job)
        fut.add_done_callback(lambda f: self.slots.release())
        self.pending.append(fut)
        if len(self.pending) > 4096:
            self.pending = [f for f in self.pending if not f.done()]

    def _temp(self, dir_fd: int, make: Callable[[bytes], _T]) -> tuple[bytes, _T]:
        """Create a fresh temporary name in ``dir_fd`` with ``make(name)`` (which must fail
        with EEXIST on an existing name); return the name and what ``make`` returned."""
        for attempt in range(8):
            if attempt:   # someone took the name: pick an unpredictable one
                self._tmp_token = secrets.token_hex(4)
            name = f"{TMP_PREFIX}{self._tmp_token}.{next(self._tmp_count):x}".encode()
            try:
                return name, make(name)
            except FileExistsError:
                continue
        raise OSError(errno.EEXIST, "cannot find a free temporary name")

    def _fetch_small(self, batch: list[tuple[_Dir, bytes, Entry]]) -> dict[bytes, tuple[int, bytes | memoryview]]:
        """The contents of a batch's small files, fetched together (``fetch_many``); empty when
        any of them cannot be read, so that each file is then tried, and warned about, alone."""
        keys = list(dict.fromkeys(e.ref for _, _, e in batch if e.ref is not None and e.size <= SMALL_FILE))
        if len(keys) < 2:
            return {}
        try:
            return dict(zip(keys, self.fetch_many(keys)))
        except (SafeError, OSError, ValueError, struct.error):
            return {}

    def _file_job(self, d: _Dir, rel: bytes, e: Entry, got: tuple[int, bytes | memoryview] | None = None) -> None:
        """Write one file under a temporary name and rename it into place when complete
        (``got``: its content's (kind, bytes), when fetched already)."""
        try:
            tmp, fd = self._temp(d.fd, lambda n: os.open(n, _TMP_FLAGS, 0o600, dir_fd=d.fd))
        except OSError as err:
            self.warn(rel, f"cannot restore: {_reason(err)}")
            return
        done = False
        try:
            if e.size <= SMALL_FILE and e.ref is not None:
                self.write_small(fd, e, got)
            elif e.ref is not None or e.size:
                self.write_blob(fd, self.reader(e.ref, e.size), prefetch=e.size > (1 << 20))
            self._apply_meta(fd, rel, e)
            os.rename(tmp, e.name, src_dir_fd=d.fd, dst_dir_fd=d.fd)
            done = True
            if e.link_group:
                with self.lock:
                    self.linked.add(e.link_group)
            self._count(files=1)
        except SafeError as err:   # missing or damaged in the safe, or not the size recorded
            self.warn(rel, f"not restored: {err}")
        except OSError as err:
            self.warn(rel, f"cannot restore: {_reason(err)}")
        except (ValueError, struct.error, IndexError) as err:   # a damaged or hostile blob
            self.warn(rel, f"not restored: its content in the safe is malformed ({err})")
        finally:
            os.close(fd)
            if not done:
                try:
                    os.unlink(tmp, dir_fd=d.fd)
                except OSError:
                    pass

    def _make_other(self, d: _Dir, e: Entry, rel: bytes) -> None:
        """A symlink, FIFO, device or socket. With --force it is made under a temporary name
        and renamed over whatever is there (a directory in the way is a warning)."""
        if e.type == LNK:
            def make(n: bytes) -> None:
                os.symlink(e.target, n, dir_fd=d.fd)
        elif e.type in _NODE_KIND:
            def make(n: bytes) -> None:
                os.mknod(n, _NODE_KIND[e.type] | 0o600, e.rdev, dir_fd=d.fd)
        else:
            self.warn(rel, f"not restored: unknown entry type {e.type}")
            return
        if not self.force:
            make(e.name)
            self._apply_meta_at(d.fd, e.name, rel, e)
        else:
            tmp, _ = self._temp(d.fd, make)
            try:
                self._apply_meta_at(d.fd, tmp, rel, e)
                os.rename(tmp, e.name, src_dir_fd=d.fd, dst_dir_fd=d.fd)
            except OSError:
                os.unlink(tmp, dir_fd=d.fd)
                raise
        self._count(other=1)

    def _finish(self, top: int) -> None:
        self._submit_batch()
        for f in self.pending:
            f.result()
        self.pending.clear()
        opener = _Opener(top)
        try:
            for rel, e in self.links:
                self._link(opener, rel, e)
            # Post-order (children before their parent; the --path directories on the way come
            # last): a parent made unsearchable (mode 0000, 0600) would otherwise shut the
            # children out for a restore without CAP_DAC_OVERRIDE.
            for rel, e in self.dirs:
                try:
                    fd = opener.open(rel)
                except OSError as err:
                    self.warn(rel, f"cannot set directory metadata: {_reason(err)}")
                    continue
                self._apply_meta(fd, rel, e)
        finally:
            opener.close()

    def _link(self, opener: _Opener, rel: bytes, e: Entry) -> None:
        """Make a later copy of a hardlink group from the first copy's final name."""
        first = self.first_link[e.link_group]
        if e.link_group not in self.linked:
            self.warn(rel, "cannot restore hardlink: the first copy of this hardlink "
                           f"({display_name(first)}) was not restored")
            return
        src_dir, _, src_name = first.rpartition(b"/")
        dst_dir, _, name = rel.rpartition(b"/")
        try:
            sfd = os.dup(opener.open(src_dir))
            try:
                dfd = opener.open(dst_dir)
                try:
                    os.link(src_name, name, src_dir_fd=sfd, dst_dir_fd=dfd, follow_symlinks=False)
                except FileExistsError:
                    if not self.force:
                        raise
                    tmp, _ = self._temp(dfd, lambda n: os.link(src_name, n, src_dir_fd=sfd, dst_dir_fd=dfd,
                                                                follow_symlinks=False))
                    try:
                        os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
                    except OSError:
                        os.unlink(tmp, dir_fd=dfd)
                        raise
            finally:
                os.close(sfd)
            self._count(files=1)
        except OSError as err:
            self.warn(rel, f"cannot restore hardlink: {_reason(err)}")

    def _apply_meta(self, target: int | str, rel: bytes, e: Entry, owner: tuple[int, int] | None = None) -> None:
        """Set owner (unless ``owner``, the current one, already matches), xattrs, mode and
        times on an open file or directory, or on a /proc/self/fd path naming one inode."""
        # Owner first: the kernel drops file capabilities (security.capability) on chown.
        if self.is_root and owner != (e.uid, e.gid):
            try:
                os.chown(target, e.uid, e.gid)
            except OSError as err:
                self.warn(rel, f"cannot set owner {e.uid}:{e.gid}: {err.strerror}")
        for n, v in e.xattrs:
            try:
                os.setxattr(target, n, v)
            except OSError as err:
                self.warn(rel, f"cannot set extended attribute {display_name(n)}: {err.strerror}")
        if e.type != LNK:
            try:
                os.chmod(target, e.mode)
            except OSError as err:
                self.warn(rel, f"cannot set mode: {err.strerror}")
        try:
            os.utime(target, ns=(e.atime_ns, e.mtime_ns))
        except OSError as err:
            self.warn(rel, f"cannot set times: {err.strerror}")

    def _apply_meta_at(self, dir_fd: int, name: bytes, rel: bytes, e: Entry) -> None:
        """Set the metadata of the symlink, device, FIFO or socket ``name`` in ``dir_fd``
        (none of which can be opened for it). An O_PATH descriptor of the entry itself (not
        followed), reached through /proc/self/fd, names that inode and nothing else, so that
        an entry swapped for a hardlink of someone else's file meanwhile is left alone."""
        if not _PROC_FD:
            self._apply_meta_by_name(dir_fd, name, rel, e)
            return
        try:
            pfd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
        except OSError as err:
            self.warn(rel, f"cannot set its metadata: {_reason(err)}")
            return
        try:
            st = os.fstat(pfd)
            if stat.S_IFMT(st.st_mode) != stat.S_IFMT(e.st_mode) or st.st_nlink != 1:
                self.warn(rel, "cannot set its metadata: it was replaced while the restore ran")
                return
            self._apply_meta(f"/proc/self/fd/{pfd}", rel, e, owner=(st.st_uid, st.st_gid))
        finally:
            os.close(pfd)

    def _apply_meta_by_name(self, dir_fd: int, name: bytes, rel: bytes, e: Entry) -> None:
        # Without /proc: the *at calls, never following ``name`` (xattrs need /proc).
        if self.is_root:
            try:
                os.chown(name, e.uid, e.gid, dir_fd=dir_fd, follow_symlinks=False)
            except OSError as err:
                self.warn(rel, f"cannot set owner {e.uid}:{e.gid}: {err.strerror}")
        if e.xattrs:
            self.warn(rel, "cannot set extended attributes: /proc is not mounted")
        if e.type != LNK:
            try:
                os.chmod(name, e.mode, dir_fd=dir_fd, follow_symlinks=False)
            except OSError as err:
                self.warn(rel, f"cannot set mode: {err.strerror}")
            except (NotImplementedError, ValueError):   # fchmodat(AT_SYMLINK_NOFOLLOW) needs /proc too
                self.warn(rel, "cannot set mode: not supported without /proc")
        try:
            os.utime(name, ns=(e.atime_ns, e.mtime_ns), dir_fd=dir_fd, follow_symlinks=False)
        except OSError as err:
            self.warn(rel, f"cannot set times: {err.strerror}")

    # -- volumes ------------------------------------------------------------------------

    def restore_volume(self, point: Point, target: Path) -> RestoreStats:
        """Write a volume point into an image file (written under a temporary name and renamed
        into place when complete) or, with --force, onto a block device."""
        size = point.size
        root = point.root
        try:
            try:
                r = self.reader(root, size)
            except (SafeError, ValueError, struct.error, IndexError) as err:
                raise SafeError(f"cannot restore the volume: {_blob_error(err)}; nothing was written") from None
            try:
                st = os.stat(target)
            except FileNotFoundError:
                st = None
            if st is not None and stat.S_ISBLK(st.st_mode):
                self._volume_to_device(r, target)
            else:
                if st is not None and stat.S_ISDIR(st.st_mode):
                    target = target / f"{point.name}.img"
                    if target.exists() and not self.force:
                        raise UsageError(f"{target}: exists; add --force to overwrite it")
                elif st is not None and not self.force:
                    raise UsageError(f"{target}: exists; add --force to overwrite it")
                _check_image_target(target)
                self._volume_to_image(r, Path(os.path.realpath(target)))
        finally:
            self.fetch.shutdown(cancel_futures=True)
            self.jobs.shutdown(cancel_futures=True)
        self.stats.files = 1
        return self.stats

    def _volume_to_device(self, r: BlobReader, target: Path) -> None:
        if not self.force:
            raise UsageError(f"{target}: is a block device; add --force to overwrite it")
        fd = os.open(target, os.O_WRONLY | os.O_CLOEXEC)
        done = [0]
        try:
            dev_size = os.lseek(fd, 0, os.SEEK_END)
            if dev_size < r.size:
                raise UsageError(f"{target}: device holds {dev_size} bytes, the volume needs {r.size}")
            # A device has no holes: zeros are written where the point has them. Blocks are
            # fetched in groups, a few ahead, and written in order, as into an image.
            self.write_blob(fd, r, zeros=True, done=done)
            os.fsync(fd)
        except (SafeError, ValueError, struct.error, IndexError) as err:
            if isinstance(err, UsageError):
                raise
            raise SafeError(f"cannot restore the volume: {_blob_error(err)}; {target} holds only "
                            f"its first {done[0]} bytes") from None
        except OSError as err:
            raise SafeError(f"cannot restore the volume to {target}: {_reason(err)}") from None
        finally:
            os.close(fd)

    def _volume_to_image(self, r: BlobReader, target: Path) -> None:
        try:
            dfd = os.open(target.parent, _DIR_FLAGS & ~os.O_NOFOLLOW)
        except OSError as err:
            raise SafeError(f"{target.parent}: cannot write the image there: {_reason(err)}") from None
        name = os.fsencode(target.name)
        tmp = None
        try:
            tmp, fd = self._temp(dfd, lambda n: os.open(n, _TMP_FLAGS, 0o600, dir_fd=dfd))
            try:
                self.write_blob(fd, r)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
            tmp = None
        except (SafeError, ValueError, struct.error, IndexError) as err:
            raise SafeError(f"cannot restore the volume: {_blob_error(err)}; nothing was written") from None
        except OSError as err:
            raise SafeError(f"cannot write the image {target}: {_reason(err)}") from None
        finally:
            if tmp is not None:
                try:
                    os.unlink(tmp, dir_fd=dfd)
                except OSError:
                    pass
            os.close(dfd)


def _ent(ents: list, n: int):
    """``ents[n]``, an index entry the caller found (not None)."""
    e = ents[n]
    assert e is not None
    return e


def _pwritev_all(fd: int, bufs: list[bytes | memoryview], offset: int) -> None:
    """Write ``bufs`` one after the other at ``offset`` (one ``pwritev``; again for the rest
    after a short write)."""
    total = sum(len(b) for b in bufs)
    done = os.pwritev(fd, bufs, offset)
    while done < total:
        rest = memoryview(b"".join(bufs))[done:]
        done += os.pwrite(fd, rest, offset + done)


def _check_image_target(target: Path) -> None:
    """UsageError when ``target`` exists and is not a regular file: the image is renamed into
    place, which would replace a character device, a FIFO or a socket (``/dev/null``)."""
    try:
        st = os.stat(target)
    except FileNotFoundError:
        return
    if not stat.S_ISREG(st.st_mode):
        raise UsageError(f"{target}: is not a regular file, a directory or a block device; "
                         "restore a volume to an image file or a block device")


def _mismatch(recorded: int, real: int) -> BadContent:
    return BadContent(f"its size in the point ({recorded} bytes) does not match its content in the safe "
                      f"({real} bytes)")


def _blob_error(err: Exception) -> str:
    if isinstance(err, SafeError):
        return str(err)
    return f"its content in the safe is malformed ({err})"


def drop_stale_temps(dir_fd: int) -> None:
    """Remove the temporary files (``.pointsafe-restore.*``, regular files) that a killed
    restore left in the directory ``dir_fd``; errors are ignored (the restore reports its own)."""
    try:
        with os.scandir(dir_fd) as it:
            stale = [e.name for e in it if e.name.startswith(TMP_PREFIX) and e.is_file(follow_symlinks=False)]
        for name in stale:
            os.unlink(name, dir_fd=dir_fd)
    except OSError:
        pass


def _open_target(target: Path, force: bool) -> _Dir:
    """Create or check the restore target and open it (never through a symlink)."""
    try:
        st = os.lstat(target)
    except FileNotFoundError:
        st = None
        try:
            target.mkdir(parents=True)
        except OSError as e:
            raise UsageError(f"{target}: cannot create the restore target: {e.strerror}") from None
    if st is not None and stat.S_ISLNK(st.st_mode):
        # Never followed: whoever owns the link could point it anywhere meanwhile.
        raise UsageError(f"{target}: is a symbolic link; give the directory itself "
                         f"({os.path.realpath(target)})")
    if st is not None and not stat.S_ISDIR(st.st_mode):
        raise UsageError(f"{target}: exists and is not a directory")
    try:
        fd = os.open(target, _DIR_FLAGS)
    except OSError as e:
        raise UsageError(f"{target}: cannot open the restore target: {_reason(e)}") from None
    if st is not None:
        drop_stale_temps(fd)
    if st is not None and not force:
        with os.scandir(fd) as it:
            busy = any(True for _ in it)
        if busy:
            os.close(fd)
            raise UsageError(f"{target}: is not empty; restore into a new or empty directory, or add --force")
    return _Dir(fd)


def restore(safe: Safe, point: Point, target: str, subpath: str | None = None, force: bool = False,
            progress: Callable[[int], None] | None = None) -> RestoreStats:
    """Restore ``point`` (a tree, or the part of it at ``subpath``; or a volume) to ``target``.
    Entries that cannot be restored are warnings in the returned stats; nothing is written
    outside ``target``. An empty ``target`` is a UsageError (an unset variable in a script
    must not mean the current directory)."""
    if not target:
        raise UsageError("the target is empty: name a directory or image "
                         "(use '.' for the current directory)")
    t, sp = Path(target).resolve(), safe.path.resolve()
    if t == sp or sp in t.parents:   # with --force, a point's files could overwrite the safe's own
        raise UsageError(f"{target}: is inside the safe {safe.path}; restore somewhere else")
    r = Restorer(safe, force, progress)
    if point.kind == "volume":
        if subpath:
            raise UsageError("--path applies to tree points; this point is a volume")
        return r.restore_volume(point, Path(target))
    return r.restore_tree(point, Path(target), subpath)
