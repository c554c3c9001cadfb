"""Writing a point back out: a tree into a directory, a volume into an image or a device.

Everything below the target is created through directory file descriptors with O_NOFOLLOW,
so a hostile safe (names like ``..`` or ``a/b``, a symlink and a directory of the same name)
cannot make restore write outside the target: such entries are refused with a warning.
Holes are skipped with ``pwrite`` past them and a final ``ftruncate``, so sparse files stay
sparse. Chunks are fetched and decompressed ahead of the writer by a small thread pool.
Metadata order per entry: content, xattrs, owner, mode (after chown, which clears setuid),
times; directories get their times after their children are written.
"""

from __future__ import annotations

import errno
import os
import stat
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from pointsafe.cas import BlobReader, Entry, NodeCache, Safe, SafeError, UsageError
from pointsafe.cas.tree import BLK, CHR, DIR, FIFO, LNK, REG, SOCK

from .browse import children, lookup, root_entry, split_path

PREFETCH = 16


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
    def __init__(self, safe: Safe, force: bool = False, progress: Callable[[int], None] | None = None,
                 workers: int = 2):
        self.safe = safe
        self.force = force
        self.progress = progress or (lambda n: None)
        self.stats = RestoreStats()
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="pointsafe-restore")
        self.nodes = NodeCache(1024)
        self.link_paths: dict[int, bytes] = {}  # link group -> absolute path of the first copy
        self.is_root = os.geteuid() == 0

    def warn(self, path: bytes, message: str) -> None:
        self.stats.warnings.append({"path": path.decode("utf-8", "backslashreplace"), "message": message})

    # -- blobs --------------------------------------------------------------------------

    def reader(self, e: Entry) -> BlobReader:
        return BlobReader(e.ref, e.size, self.safe.get, lambda k: self.safe.entry(k).kind, self.nodes)

    def write_blob(self, fd: int, r: BlobReader) -> None:
        """Write a blob into ``fd`` from offset 0, skipping holes; chunks fetched ahead."""
        window: deque = deque()

        def drain(one: bool) -> None:
            while window and (not one or len(window) >= PREFETCH):
                off, fut = window.popleft()
                data = fut.result()
                os.pwrite(fd, data, off)
                self.stats.bytes_written += len(data)
                self.progress(len(data))
                if one:
                    return

        for off, length, key in r.extents():
            if key is None:
                continue
            window.append((off, self.pool.submit(self.safe.get, key)))
            if len(window) >= PREFETCH:
                drain(True)
        drain(False)
        os.ftruncate(fd, r.size)

    # -- trees --------------------------------------------------------------------------

    def restore_tree(self, point: dict, target: Path, subpath: str | None = None) -> RestoreStats:
        _prepare_target(target, self.force, want_dir=True)
        top = os.open(target, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            if not subpath or not split_path(subpath):
                root = root_entry(point)
                self._restore_dir_contents(top, root, b"")
                self._apply_meta(top, None, root, b".")
            else:
                parts = split_path(subpath)
                dfd = top
                opened = []
                # Intermediate directories get their stored metadata too.
                for i in range(len(parts) - 1):
                    d = lookup(self.safe, point, b"/".join(parts[:i + 1]))
                    if d.type != DIR:
                        raise UsageError(f"{subpath}: {parts[i].decode(errors='replace')} is not a directory")
                    dfd = self._mkdir(dfd, d, b"/".join(parts[:i + 1]))
                    opened.append((dfd, d))
                e = lookup(self.safe, point, subpath)
                self._restore_entry(dfd, e, b"/".join(parts))
                for fd, d in reversed(opened):
                    self._apply_meta(fd, None, d, d.name)
                    os.close(fd)
        finally:
            os.close(top)
            self.pool.shutdown()
        return self.stats

    def _mkdir(self, dfd: int, e: Entry, path: bytes) -> int:
        try:
            os.mkdir(e.name, 0o700, dir_fd=dfd)
        except FileExistsError:
            if not self.force:
                raise SafeError(f"{path.decode(errors='replace')}: already exists in the target")
        return os.open(e.name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)

    def _restore_dir_contents(self, dfd: int, d: Entry, path: bytes) -> None:
        seen: set[bytes] = set()
        for c in children(self.safe, d):
            p = path + b"/" + c.name if path else c.name
            if not _safe_name(c.name):
                self.warn(p, "refused an entry whose name would escape the target")
                continue
            if c.name in seen:
                self.warn(p, "refused a second entry with the same name")
                continue
            seen.add(c.name)
            self._restore_entry(dfd, c, p)

    def _restore_entry(self, dfd: int, e: Entry, path: bytes) -> None:
        try:
            if e.type == DIR:
                fd = self._mkdir(dfd, e, path)
                try:
                    self._restore_dir_contents(fd, e, path)
                    self._apply_meta(fd, None, e, path)
                finally:
                    os.close(fd)
                self.stats.dirs += 1
                return
            if self.force:
                _remove_existing(dfd, e.name)
            if e.type == REG:
                self._restore_file(dfd, e, path)
                return
            if e.type == LNK:
                os.symlink(e.target, e.name, dir_fd=dfd)
            elif e.type in (FIFO, CHR, BLK, SOCK):
                kind = {FIFO: stat.S_IFIFO, CHR: stat.S_IFCHR, BLK: stat.S_IFBLK, SOCK: stat.S_IFSOCK}[e.type]
                os.mknod(e.name, kind | 0o600, e.rdev, dir_fd=dfd)
            self._apply_meta(None, dfd, e, path)
            self.stats.other += 1
        except OSError as err:
            self.warn(path, f"cannot restore: {err.strerror}")

    def _restore_file(self, dfd: int, e: Entry, path: bytes) -> None:
        if e.link_group and e.link_group in self.link_paths:
            os.link(self.link_paths[e.link_group], e.name, dst_dir_fd=dfd, follow_symlinks=False)
            self.stats.files += 1
            return
        fd = os.open(e.name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dfd)
        try:
            if e.size:
                self.write_blob(fd, self.reader(e))
            self._apply_meta(fd, None, e, path)
        finally:
            os.close(fd)
        if e.link_group:
            self.link_paths[e.link_group] = self._abs(dfd, e.name)
        self.stats.files += 1

    @staticmethod
    def _abs(dfd: int, name: bytes) -> bytes:
        return os.fsencode(os.readlink(f"/proc/self/fd/{dfd}")) + b"/" + name

    def _apply_meta(self, fd: int | None, dfd: int | None, e: Entry, path: bytes) -> None:
        """Set xattrs, owner, mode and times, on ``fd`` or on ``e.name`` in ``dfd``."""
        target = fd if fd is not None else e.name
        kw = {} if fd is not None else {"dir_fd": dfd, "follow_symlinks": False}
        for n, v in e.xattrs:
            try:
                if fd is not None:
                    os.setxattr(fd, n, v)
                else:
                    # xattr calls take no dir_fd: go through /proc for the parent directory.
                    os.setxattr(self._abs(dfd, e.name), n, v, follow_symlinks=False)
            except OSError as err:
                self.warn(path, f"cannot set extended attribute {n.decode(errors='replace')}: {err.strerror}")
        if self.is_root:
            try:
                os.chown(target, e.uid, e.gid, **kw)
            except OSError as err:
                self.warn(path, f"cannot set owner {e.uid}:{e.gid}: {err.strerror}")
        if e.type != LNK:
            try:
                os.chmod(target, e.mode, **({} if fd is not None else {"dir_fd": dfd}))
            except OSError as err:
                self.warn(path, f"cannot set mode: {err.strerror}")
        try:
            os.utime(target, ns=(e.atime_ns, e.mtime_ns), **kw)
        except OSError as err:
            self.warn(path, f"cannot set times: {err.strerror}")

    # -- volumes ------------------------------------------------------------------------

    def restore_volume(self, point: dict, target: Path) -> RestoreStats:
        size = point.get("size", 0)
        root = bytes.fromhex(point["root"]) if point.get("root") else None
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
                target = target / f"{point['name']}.img"
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
            self.pool.shutdown()
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


def _remove_existing(dfd: int, name: bytes) -> None:
    try:
        st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        raise SafeError(f"{name.decode(errors='replace')}: a directory is in the way")
    os.unlink(name, dir_fd=dfd)


def restore(safe: Safe, point: dict, target: str, subpath: str | None = None, force: bool = False,
            progress: Callable[[int], None] | None = None) -> RestoreStats:
    r = Restorer(safe, force, progress)
    if point["kind"] == "volume":
        if subpath:
            raise UsageError("--path applies to tree points; this point is a volume")
        return r.restore_volume(point, Path(target))
    return r.restore_tree(point, Path(target), subpath)
