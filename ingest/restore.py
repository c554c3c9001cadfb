"""Writing a point back out: a tree into a directory, a volume into an image or a device.

Names are checked before use (no ``/``, ``.``, ``..``, NUL, duplicates), every directory is
opened with O_NOFOLLOW before anything is written below it, and files are created with
O_EXCL|O_NOFOLLOW, so a hostile safe (names like ``..`` or ``a/b``, a symlink and a directory
of the same name) cannot make restore write outside the target: such entries are refused
with a warning. A target inside the safe is refused.
Holes are skipped with ``pwrite`` past them and a final ``ftruncate``, so sparse files stay
sparse. Chunks are fetched and decompressed ahead of the writer by a small thread pool.
Metadata order per entry: content, owner, xattrs (after chown, which drops security.capability),
mode (after chown, which clears setuid), times; directories get their times after their children
are written.
"""

from __future__ import annotations

import errno
import os
import stat
import struct
from collections import deque
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from pointsafe.cas import BlobReader, Entry, IntegrityError, Kind, NodeCache, Point, Safe, SafeError, UsageError
from pointsafe.cas.tree import BLK, CHR, DIR, FIFO, LNK, REG, SOCK

from .browse import children, lookup, root_entry, split_path

PREFETCH = 16
FETCH_GROUP = 8           # chunks per fetch job
SMALL_FILE = 256 * 1024   # files up to this size are usually one chunk


@dataclass
class RestoreStats:
    files: int = 0
    dirs: int = 0
    other: int = 0
    bytes_written: int = 0
    warnings: list[dict] = field(default_factory=list)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def _safe_name(name: bytes) -> bool:
    return bool(name) and b"/" not in name and name not in (b".", b"..") and b"\0" not in name


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
        self.jobs = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="pointsafe-restore")
        self.slots = threading.Semaphore(workers * 4)    # bounds the queued batches of files
        self.batch: list[tuple[bytes, Entry]] = []
        self.batch_bytes = 0
        self.pending: list[Future] = []
        self.lock = threading.Lock()
        self.nodes = NodeCache(1024)
        self.first_link: dict[int, bytes] = {}          # link group -> path of the first copy
        self.links: list[tuple[bytes, Entry]] = []      # (path, entry) of later copies
        self.dirs: list[tuple[bytes, Entry]] = []       # directories, in creation order
        self.is_root = os.geteuid() == 0

    def warn(self, path: bytes, message: str) -> None:
        with self.lock:
            self.stats.warnings.append({"path": path.decode("utf-8", "backslashreplace"), "message": message})

    def _count(self, **kw) -> None:
        with self.lock:
            for k, v in kw.items():
                setattr(self.stats, k, getattr(self.stats, k) + v)

    # -- blobs --------------------------------------------------------------------------

    def reader(self, e: Entry) -> BlobReader:
        return BlobReader(e.ref, e.size, self.safe.get, lambda k: self.safe.entry(k).kind, self.nodes)

    def write_small(self, fd: int, e: Entry) -> None:
        """A file of one chunk (most small files): one index lookup, one read, one write."""
        oe = self.safe.entry(e.ref)
        if oe is None or oe.kind != Kind.CHUNK:
            self.write_blob(fd, self.reader(e), prefetch=False)
            return
        try:
            data = self.safe.read_entry(e.ref, oe)
        except (FileNotFoundError, IntegrityError):
            data = self.safe.get(e.ref)   # moved by a concurrent gc, or really damaged
        os.pwrite(fd, data, 0)
        if len(data) != e.size:
            os.ftruncate(fd, e.size)
        self._count(bytes_written=len(data))
        self.progress(len(data))

    def write_blob(self, fd: int, r: BlobReader, prefetch: bool = True) -> None:
        """Write a blob into ``fd`` from offset 0, skipping holes; chunks fetched ahead."""
        window: deque = deque()
        written = 0

        def put(off: int, data: bytes) -> None:
            nonlocal written
            os.pwrite(fd, data, off)
            written += len(data)
            self.progress(len(data))

        def fetch(group: list[tuple[int, bytes]]) -> list[tuple[int, bytes]]:
            return [(o, self.safe.get(k)) for o, k in group]

        group: list[tuple[int, bytes]] = []
        for off, length, key in r.extents():
            if key is None:
                continue
            if not prefetch:
                put(off, self.safe.get(key))
                continue
            # Chunks travel to the fetch threads in groups: one future per group, not per
            # chunk, keeps thread hand-offs (and GIL handovers) off the hot path.
            group.append((off, key))
            if len(group) >= FETCH_GROUP:
                window.append(self.fetch.submit(fetch, group))
                group = []
                if len(window) >= PREFETCH // 2:
                    for o, data in window.popleft().result():
                        put(o, data)
        if group:
            window.append(self.fetch.submit(fetch, group))
        while window:
            for o, data in window.popleft().result():
                put(o, data)
        os.ftruncate(fd, r.size)
        self._count(bytes_written=written)

    # -- trees --------------------------------------------------------------------------

    def restore_tree(self, point: Point, target: Path, subpath: str | None = None) -> RestoreStats:
        _prepare_target(target, self.force, want_dir=True)
        top = os.fsencode(str(target.resolve()))
        try:
            if not subpath or not split_path(subpath):
                root = root_entry(point)
                self._restore_dir_contents(top, root, b"")
                self.dirs.append((top, root))
            else:
                parts = split_path(subpath)
                path = top
                # Intermediate directories get their stored metadata too.
                for i in range(len(parts) - 1):
                    d = lookup(self.safe, point, b"/".join(parts[:i + 1]))
                    if d.type != DIR:
                        raise UsageError(f"{subpath}: {parts[i].decode(errors='replace')} is not a directory")
                    path = self._mkdir(path, d, b"/".join(parts[:i + 1]))
                    self.dirs.append((path, d))
                e = lookup(self.safe, point, subpath)
                self._restore_entry(path, e, b"/".join(parts))
            self._finish()
        finally:
            self.jobs.shutdown(cancel_futures=True)
            self.fetch.shutdown(cancel_futures=True)
        return self.stats

    def _submit_batch(self) -> None:
        """Hand a batch of files to the pool: one job per batch keeps the per-file overhead of
        futures and thread hand-offs off the small files."""
        if not self.batch:
            return
        batch, self.batch, self.batch_bytes = self.batch, [], 0
        self.slots.acquire()
        fut = self.jobs.submit(lambda: [self._file_job(p, e) for p, e in batch])
        fut.add_done_callback(lambda f: self.slots.release())
        self.pending.append(fut)
        if len(self.pending) > 4096:
            self.pending = [f for f in self.pending if not f.done()]

    def _finish(self) -> None:
        self._submit_batch()
        for f in self.pending:
            f.result()
        self.pending.clear()
        for path, e in self.links:
            try:
                first = self.first_link.get(e.link_group)
                if first is None:
                    raise OSError(errno.ENOENT, "the first copy of this hardlink was not restored")
                os.link(first, path, follow_symlinks=False)
                self._count(files=1)
            except OSError as err:
                self.warn(path, f"cannot restore hardlink: {err.strerror}")
        # Deepest first (self.dirs is in post-order, after the --path directories on the way):
        # a parent made unsearchable (mode 0000, 0600) would otherwise shut the children out
        # for a restore without CAP_DAC_OVERRIDE.
        for path, e in sorted(self.dirs, key=lambda pe: pe[0].count(b"/"), reverse=True):
            try:
                fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
            except OSError as err:
                self.warn(path, f"cannot set directory metadata: {err.strerror}")
                continue
            try:
                self._apply_meta(fd, path, e)
            finally:
                os.close(fd)

    def _mkdir(self, parent: bytes, e: Entry, rel: bytes) -> bytes:
        path = parent + b"/" + e.name
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            if not self.force:
                raise SafeError(f"{rel.decode(errors='replace')}: already exists in the target")
        # Refuse to descend through anything but a real directory (never a symlink).
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        os.close(fd)
        return path

    def _restore_dir_contents(self, dirpath: bytes, d: Entry, rel: bytes) -> None:
        seen: set[bytes] = set()
        try:
            entries = children(self.safe, d)
        except SafeError as err:   # a damaged or hostile tree node: restore the rest
            self.warn(rel or b".", f"cannot read this directory from the safe: {err}")
            return
        for c in entries:
            p = rel + b"/" + c.name if rel else c.name
            if not _safe_name(c.name):
                self.warn(p, "refused an entry whose name would escape the target")
                continue
            if c.name in seen:
                self.warn(p, "refused a second entry with the same name")
                continue
            seen.add(c.name)
            self._restore_entry(dirpath, c, p)

    def _restore_entry(self, dirpath: bytes, e: Entry, rel: bytes) -> None:
        path = dirpath + b"/" + e.name
        try:
            if e.type == DIR:
                self._mkdir(dirpath, e, rel)
                self._restore_dir_contents(path, e, rel)
                self.dirs.append((path, e))
                self._count(dirs=1)
                return
            if self.force:
                _remove_existing(path)
            if e.type == REG:
                if e.link_group and e.link_group in self.first_link:
                    self.links.append((path, e))
                    return
                if e.link_group:
                    self.first_link[e.link_group] = path
                self.batch.append((path, e))
                self.batch_bytes += e.size
                if len(self.batch) >= 64 or self.batch_bytes >= (4 << 20):
                    self._submit_batch()
                return
            if e.type == LNK:
                os.symlink(e.target, path)
            elif e.type in (FIFO, CHR, BLK, SOCK):
                kind = {FIFO: stat.S_IFIFO, CHR: stat.S_IFCHR, BLK: stat.S_IFBLK, SOCK: stat.S_IFSOCK}[e.type]
                os.mknod(path, kind | 0o600, e.rdev)
            self._apply_meta(None, path, e)
            self._count(other=1)
        except OSError as err:
            self.warn(rel, f"cannot restore: {err.strerror}")

    def _file_job(self, path: bytes, e: Entry) -> None:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as err:
            self.warn(path, f"cannot restore: {err.strerror}")
            return
        try:
            if e.size and e.size <= SMALL_FILE:
                self.write_small(fd, e)
            elif e.size:
                self.write_blob(fd, self.reader(e), prefetch=e.size > (1 << 20))
            self._apply_meta(fd, path, e)
            self._count(files=1)
        except SafeError as err:
            self.warn(path, f"cannot restore: {err}")
        except OSError as err:
            self.warn(path, f"cannot restore: {err.strerror}")
        except (ValueError, struct.error, IndexError) as err:   # a damaged or hostile blob
            self.warn(path, f"cannot restore: its content in the safe is malformed ({err})")
        finally:
            os.close(fd)

    def _apply_meta(self, fd: int | None, path: bytes, e: Entry) -> None:
        """Set owner, xattrs, mode and times, on ``fd`` or on ``path`` (never following it)."""
        target = fd if fd is not None else path
        nofollow = {} if fd is not None else {"follow_symlinks": False}
        # Owner first: the kernel drops file capabilities (security.capability) on chown.
        if self.is_root:
            try:
                os.chown(target, e.uid, e.gid, **nofollow)
            except OSError as err:
                self.warn(path, f"cannot set owner {e.uid}:{e.gid}: {err.strerror}")
        for n, v in e.xattrs:
            try:
                os.setxattr(target, n, v, **nofollow)
            except OSError as err:
                self.warn(path, f"cannot set extended attribute {n.decode(errors='replace')}: {err.strerror}")
        if e.type != LNK:
            try:
                os.chmod(target, e.mode)
            except OSError as err:
                self.warn(path, f"cannot set mode: {err.strerror}")
        try:
            os.utime(target, ns=(e.atime_ns, e.mtime_ns), **nofollow)
        except OSError as err:
            self.warn(path, f"cannot set times: {err.strerror}")

    # -- volumes ------------------------------------------------------------------------

    def restore_volume(self, point: Point, target: Path) -> RestoreStats:
        size = point.size
        root = point.root
        r = BlobReader(root, size, self.safe.get, lambda k: self.safe.entry(k).kind, self.nodes)
        try:
            st = os.stat(target)
        except FileNotFoundError:
            st = None
        if st is not None and stat.S_ISBLK(st.st_mode):
            if not self.force:
                raise UsageError(f"{target}: is a block device; add --force to overwrite it")
            fd = os.open(target, os.O_WRONLY | os.O_CLOEXEC)
            try:
                dev_size = os.lseek(fd, 0, os.SEEK_END)
                if dev_size < size:
                    raise UsageError(f"{target}: device holds {dev_size} bytes, the volume needs {size}")
                # A device has no holes: write zeros where the point has them.
                for off, length, key in r.extents():
                    data = self.safe.get(key) if key else bytes(length)
                    os.pwrite(fd, data, off)
                    self.progress(length)
                os.fsync(fd)
            finally:
                os.close(fd)
            return self.stats
        if st is not None:
            if stat.S_ISDIR(st.st_mode):
                target = target / f"{point.name}.img"
                if target.exists() and not self.force:
                    raise UsageError(f"{target}: exists; add --force to overwrite it")
            elif not self.force:
                raise UsageError(f"{target}: exists; add --force to overwrite it")
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            self.write_blob(fd, r)
            os.fsync(fd)
        finally:
            os.close(fd)
            self.fetch.shutdown()
            self.jobs.shutdown()
        self.stats.files = 1
        return self.stats


def _prepare_target(target: Path, force: bool, want_dir: bool) -> None:
    try:
        st = os.lstat(target)
    except FileNotFoundError:
        try:
            target.mkdir(parents=True)
        except OSError as e:
            raise UsageError(f"{target}: cannot create the restore target: {e.strerror}") from None
        return
    if not stat.S_ISDIR(st.st_mode):
        raise UsageError(f"{target}: exists and is not a directory")
    if any(os.scandir(target)) and not force:
        raise UsageError(f"{target}: is not empty; restore into a new or empty directory, or add --force")


def _remove_existing(path: bytes) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        raise SafeError(f"{path.decode(errors='replace')}: a directory is in the way")
    os.unlink(path)


def restore(safe: Safe, point: Point, target: str, subpath: str | None = None, force: bool = False,
            progress: Callable[[int], None] | None = None) -> RestoreStats:
    t, sp = Path(target).resolve(), safe.path.resolve()
    if t == sp or sp in t.parents:   # with --force, a point's files could overwrite the safe's own
        raise UsageError(f"{target}: is inside the safe {safe.path}; restore somewhere else")
    r = Restorer(safe, force, progress)
    if point.kind == "volume":
        if subpath:
            raise UsageError("--path applies to tree points; this point is a volume")
        return r.restore_volume(point, Path(target))
    return r.restore_tree(point, Path(target), subpath)
