"""Walking a directory tree into the pipeline, with change detection.

Names are bytes end to end (a name need not be valid UTF-8). Symlinks are never followed.
Change detection walks the previous point's tree alongside the source: a regular file whose
(st_dev, st_ino, size, mtime, ctime) matches its entry in the previous point of the same name
keeps that entry's blob without being read again. Problems (unreadable files and directories,
I/O errors, files that keep changing while read) become warnings; the walk goes on.
"""

from __future__ import annotations

import errno
import fnmatch
import os
import stat
import struct
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import blake3

from pointsafe.cas import Entry, Safe, read_tree
from pointsafe.cas.tree import DIR, LNK, REG, type_of_mode

from .chunking import Cutter
from .pipeline import Pipeline

CHANGE_RETRIES = 3
PREFETCH_FILES = 64          # files looked at ahead of the one being fed to the pipeline
PREFETCH_MAX = 1024 * 1024   # files up to this size are read ahead whole
PREFETCH_THREADS = 4
_O_NOATIME = getattr(os, "O_NOATIME", 0)


@dataclass
class WalkOptions:
    one_file_system: bool = False
    excludes: list[str] = field(default_factory=list)   # fnmatch patterns on names and relative paths
    skip: set[tuple[int, int]] = field(default_factory=set)  # (dev, ino) of dirs never entered (the safe)


def read_xattrs(path: bytes, warn: Callable[[bytes, str], None]) -> list[tuple[bytes, bytes]]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as e:
        if e.errno not in (errno.ENOTSUP, errno.EPERM):
            warn(path, f"cannot list extended attributes: {e.strerror}")
        return []
    out = []
    for n in sorted(names):
        try:
            out.append((os.fsencode(n), os.getxattr(path, n, follow_symlinks=False)))
        except OSError as e:
            if e.errno != errno.ENODATA:
                warn(path, f"cannot read extended attribute {n}: {e.strerror}")
    return out


def entry_from_stat(name: bytes, st: os.stat_result) -> Entry:
    return Entry(name=name, type=type_of_mode(st.st_mode) or REG, mode=stat.S_IMODE(st.st_mode),
                 uid=st.st_uid, gid=st.st_gid, mtime_ns=st.st_mtime_ns, atime_ns=st.st_atime_ns,
                 ctime_ns=st.st_ctime_ns, size=st.st_size, dev=st.st_dev, ino=st.st_ino,
                 nlink=st.st_nlink,
                 rdev=st.st_rdev if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else 0)


class TreeWalker:
    def __init__(self, safe: Safe, pipe: Pipeline, cutter: Cutter, opts: WalkOptions,
                 warn: Callable[[bytes, str], None], progress: Callable[[int], None] | None = None):
        self.safe = safe
        self.pipe = pipe
        self.cutter = cutter
        self.opts = opts
        self.warn = warn
        self.progress = progress or (lambda n: None)
        self.groups_seen: set[int] = set()
        self.root_dev = 0
        self.readers = ThreadPoolExecutor(max_workers=PREFETCH_THREADS, thread_name_prefix="pointsafe-read")

    # -- previous point -----------------------------------------------------------------

    def _prev_entries(self, tree: bytes | Future | None) -> dict[bytes, Entry]:
        if tree is None:
            return {}
        try:
            entries = tree.result() if isinstance(tree, Future) else read_tree(self.safe.get, tree)
            return {e.name: e for e in entries}
        except Exception:  # a damaged previous point only costs a full re-read
            return {}

    # -- walking ------------------------------------------------------------------------

    def walk_root(self, path: bytes, prev_root: bytes | None) -> Entry:
        st = os.lstat(path)
        self.root_dev = st.st_dev
        root = entry_from_stat(b"", st)
        root.xattrs = read_xattrs(path, self.warn)
        self.pipe.opendir(root)
        self._walk_dir(path, b"", prev_root)
        self.pipe.closedir()
        return root

    def _excluded(self, rel: bytes, name: bytes) -> bool:
        if not self.opts.excludes:
            return False
        r, n = os.fsdecode(rel), os.fsdecode(name)
        return any(fnmatch.fnmatchcase(n, p) or fnmatch.fnmatchcase(r, p) or fnmatch.fnmatchcase("/" + r, p)
                   for p in self.opts.excludes)

    def _walk_dir(self, path: bytes, rel: bytes, prev_tree: bytes | Future | None) -> None:
        prev = self._prev_entries(prev_tree)
        try:
            names = _list_dir(path)
        except OSError as e:
            self.warn(path, f"cannot read directory: {e.strerror}; stored as empty")
            return
        items = []
        for name in names:
            child = os.path.join(path, name)
            crel = os.path.join(rel, name) if rel else name
            if self._excluded(crel, name):
                continue
            try:
                st = os.lstat(child)
            except OSError as e:
                if e.errno != errno.ENOENT:   # vanished since the listing: nothing to warn about
                    self.warn(child, f"cannot stat: {e.strerror}")
                continue
            items.append((name, child, crel, st, prev.get(name)))
        sub_prev: dict[bytes, Future] = {}
        ahead: dict[bytes, Future] = {}
        j = 0
        for i, (name, child, crel, st, p) in enumerate(items):
            # Small files are read ahead by a few threads: a cold tree of small files is bound
            # by the latency of one read at a time, not by the disk's bandwidth.
            while j < len(items) and j < i + PREFETCH_FILES:
                jn, jc, _, jst, jp = items[j]
                if (stat.S_ISREG(jst.st_mode) and 0 < jst.st_size <= PREFETCH_MAX and jst.st_nlink == 1
                        and not _unchanged(jp, jst)):
                    ahead[jn] = self.readers.submit(_read_small, jc)
                elif stat.S_ISDIR(jst.st_mode) and jp is not None and jp.type == DIR and jp.ref is not None:
                    # The previous point's subdirectories are read ahead too: on a cold cache,
                    # reading old tree nodes one at a time is most of an unchanged re-backup.
                    sub_prev[jn] = self.readers.submit(read_tree, self.safe.get, jp.ref)
                j += 1
            e = entry_from_stat(name, st)
            if e.type == DIR:
                if (st.st_dev, st.st_ino) in self.opts.skip:
                    continue
                e.xattrs = self._xattrs(child, e, p)
                self.pipe.opendir(e)
                if not (self.opts.one_file_system and st.st_dev != self.root_dev):
                    self._walk_dir(child, crel, sub_prev.pop(name, None))
                self.pipe.closedir()
            elif e.type == REG:
                self._file(child, e, p, ahead.pop(name, None))
            elif e.type == LNK:
                if (p is not None and p.type == LNK and
                        (p.dev, p.ino, p.size, p.mtime_ns, p.ctime_ns) == (e.dev, e.ino, e.size, e.mtime_ns, e.ctime_ns)):
                    e.target = p.target   # unchanged: readlink would move its atime again
                else:
                    try:
                        e.target = os.readlink(child)
                        # readlink has no O_NOATIME: record the atime it leaves (relatime moved
                        # it at most once), or the next backup would see the link changed.
                        st2 = os.lstat(child)
                        if (st2.st_ino, st2.st_ctime_ns) == (st.st_ino, st.st_ctime_ns):
                            e.atime_ns = st2.st_atime_ns
                    except OSError as err:
                        self.warn(child, f"cannot read symlink: {err.strerror}")
                        continue
                e.size = len(e.target)
                e.xattrs = self._xattrs(child, e, p)
                self.pipe.entry(e)
            else:
                e.size = 0
                e.xattrs = self._xattrs(child, e, p)
                self.pipe.entry(e)

    def _xattrs(self, path: bytes, e: Entry, prev: Entry | None) -> list[tuple[bytes, bytes]]:
        # Changing an xattr changes ctime: an unchanged inode keeps its recorded xattrs.
        if prev is not None and prev.type == e.type and (prev.dev, prev.ino, prev.ctime_ns) == (e.dev, e.ino, e.ctime_ns):
            return prev.xattrs
        return read_xattrs(path, self.warn)

    def _file(self, path: bytes, e: Entry, prev: Entry | None, pre: Future | None = None) -> None:
        if e.nlink > 1:
            e.link_group = _group_of(e)
            if e.link_group in self.groups_seen:
                e.xattrs = self._xattrs(path, e, prev)
                self.pipe.link(e)
                return
        if (prev is not None and prev.type == REG and
                (prev.dev, prev.ino, prev.size, prev.mtime_ns, prev.ctime_ns) == (e.dev, e.ino, e.size, e.mtime_ns, e.ctime_ns)):
            e.ref = prev.ref
            e.xattrs = prev.xattrs
            self.pipe.entry(e)
        else:
            e.xattrs = read_xattrs(path, self.warn)
            done = self._from_prefetch(path, e, pre) if pre is not None else None
            if done is None:
                done = self.read_file(path, e)
            if not done:
                # Not in the point: its other names must not become links to nothing (they
                # would restore as holes); each is tried, and warned about, on its own.
                return
        if e.link_group:
            self.groups_seen.add(e.link_group)

    def _from_prefetch(self, path: bytes, e: Entry, pre: Future) -> bool | None:
        """Feed a file read ahead; None when it must be read again the ordinary way."""
        try:
            st, data, st2 = pre.result()
        except OSError:
            return None   # the ordinary path reports the error (or retries a vanished file)
        if ((st.st_size, st.st_mtime_ns, st.st_ctime_ns) != (st2.st_size, st2.st_mtime_ns, st2.st_ctime_ns)
                or len(data) != st.st_size or st.st_ino != e.ino):
            return None
        e.size, e.mtime_ns, e.ctime_ns = st.st_size, st.st_mtime_ns, st.st_ctime_ns
        self.pipe.file(e)
        mv = memoryview(data)
        for c in self.cutter.cdc.cut_buf(mv):
            self.pipe.data(mv[c.offset:c.offset + c.length])
        self.progress(len(data))
        self.pipe.end()
        return True

    def close(self) -> None:
        self.readers.shutdown(cancel_futures=True)

    def read_file(self, path: bytes, e: Entry) -> bool:
        """Read a regular file into the pipeline; False when it could not be read at all."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | _O_NOATIME)
        except PermissionError:
            try:
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            except OSError as err:
                self.warn(path, f"cannot open: {err.strerror}; not backed up")
                return False
        except OSError as err:
            if err.errno != errno.ENOENT:
                self.warn(path, f"cannot open: {err.strerror}; not backed up")
            return False
        try:
            for attempt in range(CHANGE_RETRIES):
                st = os.fstat(fd)
                e.size, e.mtime_ns, e.ctime_ns = st.st_size, st.st_mtime_ns, st.st_ctime_ns
                self.pipe.file(e)
                try:
                    for what, v in self.cutter.chunks(fd, st.st_size):
                        if what == "data":
                            self.pipe.data(v)
                            self.progress(len(v))
                        else:
                            self.pipe.hole(v)
                except OSError as err:
                    self.pipe.abort()
                    self.warn(path, f"read error: {err.strerror}; not backed up")
                    return False
                st2 = os.fstat(fd)
                if (st2.st_size, st2.st_mtime_ns, st2.st_ctime_ns) == (st.st_size, st.st_mtime_ns, st.st_ctime_ns):
                    self.pipe.end()
                    return True
                if attempt < CHANGE_RETRIES - 1:
                    self.pipe.abort()
                    continue
                self.pipe.end()
                self.warn(path, f"file changed while being read ({CHANGE_RETRIES} attempts); "
                                "the point holds the last read, which may be inconsistent")
                return True
        finally:
            os.close(fd)
        return True


def _unchanged(prev: Entry | None, st: os.stat_result) -> bool:
    return (prev is not None and prev.type == REG and
            (prev.dev, prev.ino, prev.size, prev.mtime_ns, prev.ctime_ns)
            == (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))


def _read_small(path: bytes) -> tuple[os.stat_result, bytes, os.stat_result]:
    """Read a whole small file: (stat before, bytes, stat after); raises OSError."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | _O_NOATIME)
    except PermissionError:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        data = os.read(fd, st.st_size + 1)
        while len(data) < st.st_size:
            more = os.read(fd, st.st_size + 1 - len(data))
            if not more:
                break
            data += more
        return st, data, os.fstat(fd)
    finally:
        os.close(fd)


def _list_dir(path: bytes) -> list[bytes]:
    """The names in a directory, sorted. Listed through an O_NOATIME descriptor: under relatime
    a listing moves the directory's atime (once a day), and the next backup would then see every
    directory changed and rewrite every tree node, whatever changed."""
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags | _O_NOATIME)
    except PermissionError:   # O_NOATIME needs ownership or CAP_FOWNER
        fd = os.open(path, flags)
    try:
        return sorted(os.fsencode(n) for n in os.listdir(fd))
    finally:
        os.close(fd)


def _group_of(e: Entry) -> int:
    h = blake3.blake3(struct.pack("<QQ", e.dev, e.ino)).digest(length=8)
    return (int.from_bytes(h, "little") & 0x7FFF_FFFF_FFFF_FFFF) or 1
