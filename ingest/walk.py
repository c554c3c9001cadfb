"""Walking a directory tree into the pipeline, with change detection.

Names are bytes end to end (a name need not be valid UTF-8). Symlinks are never followed.

The walk works relative to directory descriptors (``openat``/``fstatat``/``readlinkat``, as
``rsync`` and ``tar`` do), never by full path, so that neither the length of a path nor the
depth of a tree has a limit: the walk is a loop over a stack of directories, not a
recursion, and at most ``MAX_DIR_FDS`` directory descriptors are open at once (a directory
whose descriptor was closed to keep that bound is opened again through ``..`` of its child,
checked by device and inode, when the walk comes back to it).

Change detection walks the previous point's tree alongside the source: a regular file whose
(st_dev, st_ino, size, mtime, ctime) matches its entry in the previous point of the same name
keeps that entry's blob without being read again. Problems (unreadable files and directories,
I/O errors, files that keep changing while read) become warnings naming the full path; the
walk goes on. A name that was listed but is gone when looked at again (stat, open, readlink,
extended attributes: ENOENT) gives one warning, "vanished during the backup".

With a :class:`~pointsafe.ingest.changes.guide.Guide` (what changed between the previous
point's btrfs snapshot and the new one), a directory at the same path and inode as in the
previous point is walked *guided*: a name with no change at or below it keeps the previous
point's entry (a directory its whole subtree) without being looked at; the directory is listed
only when its entries changed; a file with written extents is read only around them
(ingest/changes/resync.py). Everything else -- a renamed or new directory, a file to read
whole, a hardlinked one -- is walked as without a guide, so that the point is the one a full
walk makes; only, below a renamed directory, a file whose inode, size, mtime and ctime are
those of its entry at the old place takes that entry's content instead of being read.
"""

from __future__ import annotations

import errno
import fnmatch
import os
import stat
import struct
import threading
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Callable, TypeGuard, cast

import blake3

from pointsafe.cas import Entry, Safe, read_tree
from pointsafe.cas.blob import BlobReader
from pointsafe.cas.tree import DIR, LNK, REG, type_of_mode

from .changes.guide import Guide
from .changes.resync import read_around
from .chunking import Cutter, data_extents
from .db.detect import live_database
from .pipeline import Pipeline

CHANGE_RETRIES = 3
PREFETCH_FILES = 64          # files looked at ahead of the one being fed to the pipeline
PREFETCH_MAX = 1024 * 1024   # files up to this size are read ahead whole
PREFETCH_THREADS = 4
PREV_AHEAD = 1024            # previous point's directories read ahead and not yet walked, at most ...
PREV_AHEAD_ENTRIES = 200_000  # ... and entries in them
MAX_DIR_FDS = 64             # directory descriptors open at once (the deepest levels of the path)
PROGRESS_BYTES = 4 * 1024 * 1024   # progress is reported in steps of this many bytes ...
PROGRESS_FILES = 256               # ... or of this many files, whichever comes first
PATH_MAX = 4096
EMPTY_SUBVOL_INO = 2         # btrfs: a subvolume nested in a snapshot shows as an empty directory of this inode
VANISHED = "vanished during the backup"
MOVED = "moved or removed during the backup; what had not been read below it is not in the point"

_O_NOATIME = getattr(os, "O_NOATIME", 0)
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
_PROC_FD = os.path.isdir("/proc/self/fd")


class Vanished(Exception):
    """A name listed in its directory was gone (ENOENT) when it was looked at again."""


@dataclass
class WalkOptions:
    """What a tree walk leaves out: other file systems (``one_file_system``), names or relative
    paths matching ``excludes`` (fnmatch), and the directories in ``skip`` by (dev, ino).
    """
    one_file_system: bool = False
    excludes: list[str] = field(default_factory=list)   # fnmatch patterns on names and relative paths
    skip: set[tuple[int, int]] = field(default_factory=set)  # (dev, ino) of dirs never entered (the safe)
    # Reading a snapshot: its device number -> the live source's. Inode numbers, sizes and times
    # in a snapshot are the original's, so with the device mapped an unchanged file is seen as
    # unchanged (not read again) and the point's entries are the same as from the live source.
    dev_map: dict[int, int] = field(default_factory=dict)


def open_at(dir_fd: int | None, name: bytes, flags: int) -> int:
    """``os.open(name, flags, dir_fd=dir_fd)``, with O_NOATIME when the kernel allows it (it
    needs ownership or CAP_FOWNER): a backup leaves the source's atimes alone."""
    try:
        return os.open(name, flags | _O_NOATIME, dir_fd=dir_fd)
    except PermissionError:
        if not _O_NOATIME:
            raise
        return os.open(name, flags, dir_fd=dir_fd)


def read_xattrs(target: int | bytes, warn: Callable[[str], None]) -> list[tuple[bytes, bytes]]:
    """The extended attributes of an open file (a descriptor) or of a path (never followed),
    sorted by name. Problems other than "not supported" become warnings (``warn(message)``);
    a path that is gone raises :class:`Vanished`."""
    kw = {} if isinstance(target, int) else {"follow_symlinks": False}
    try:
        names = os.listxattr(target, **kw)
    except OSError as e:
        if e.errno == errno.ENOENT:
            raise Vanished from None
        if e.errno not in (errno.ENOTSUP, errno.EPERM):
            warn(f"cannot list extended attributes: {e.strerror}")
        return []
    out = []
    for n in sorted(names):
        try:
            out.append((os.fsencode(n), os.getxattr(target, n, **kw)))
        except OSError as e:
            if e.errno == errno.ENOENT:
                raise Vanished from None
            if e.errno != errno.ENODATA:
                warn(f"cannot read extended attribute {n}: {e.strerror}")
    return out


def stat_listed(dir_fd: int, names: list[bytes], warn: Callable[[bytes, str], None]) -> list[tuple[bytes, os.stat_result]]:
    """(name, lstat) of each name listed in the directory ``dir_fd``; a name that is gone
    meanwhile gives one warning, "vanished during the backup" (``warn(name, message)``), and
    other failures a "cannot stat" warning; neither is in the result."""
    out = []
    for name in names:
        try:
            out.append((name, os.stat(name, dir_fd=dir_fd, follow_symlinks=False)))
        except OSError as e:
            warn(name, VANISHED if e.errno == errno.ENOENT else f"cannot stat: {e.strerror}")
    return out


def entry_from_stat(name: bytes, st: os.stat_result, dev_map: dict[int, int] | None = None) -> Entry:
    """The tree entry describing ``st`` (no content, target or xattrs yet); its device number
    translated through ``dev_map`` (a snapshot's device -> the live source's) when given."""
    return Entry(name=name, type=type_of_mode(st.st_mode) or REG, mode=stat.S_IMODE(st.st_mode),
                 uid=st.st_uid, gid=st.st_gid, mtime_ns=st.st_mtime_ns, atime_ns=st.st_atime_ns,
                 ctime_ns=st.st_ctime_ns, size=st.st_size,
                 dev=dev_map.get(st.st_dev, st.st_dev) if dev_map else st.st_dev, ino=st.st_ino,
                 nlink=st.st_nlink,
                 rdev=st.st_rdev if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else 0)


def keep_atime(e: Entry, prev: Entry | None) -> Entry:
    """``e``, with the atime of ``prev`` (its entry in the previous point) when nothing but the
    atime differs in what the inode's stat says (type, mode, owner, times, size, device, inode,
    links, rdev): reading a file or listing a directory must not make new tree nodes, so an
    entry's atime is the one of the first backup that stored it like this (docs/FORMAT.md)."""
    if (prev is not None and prev.atime_ns != e.atime_ns and
            (prev.type, prev.mode, prev.uid, prev.gid, prev.mtime_ns, prev.ctime_ns, prev.size,
             prev.dev, prev.ino, prev.nlink, prev.rdev)
            == (e.type, e.mode, e.uid, e.gid, e.mtime_ns, e.ctime_ns, e.size, e.dev, e.ino, e.nlink, e.rdev)):
        e.atime_ns = prev.atime_ns
    return e


class _Dir:
    """One directory on the walk's stack."""

    __slots__ = ("ahead", "alt", "dev", "fd", "grel", "guided", "i", "ino", "items", "j", "name", "rel", "sub_prev")

    def __init__(self, name: bytes, fd: int | None, dev: int, ino: int, rel: bytes):
        self.name = name
        self.fd = fd
        self.dev, self.ino = dev, ino
        self.rel = rel                                   # relative path (kept only with excludes)
        self.guided = False                              # walked with the Guide (see the module's docstring)
        self.grel = b""                                  # relative path, when guided
        # the previous point's entries of this directory under its old name (it was renamed):
        # the content of an unchanged file is taken from there instead of being read
        self.alt: dict[bytes, Entry] | None = None
        # (name, lstat, previous entry); lstat None: unchanged, the previous entry is kept
        self.items: list[tuple[bytes, os.stat_result | None, Entry | None]] = []
        self.i = 0                                       # next item to back up
        self.j = 0                                       # next item to look at for read-ahead
        self.ahead: dict[bytes, Future] = {}             # small files read ahead (use self.fd)
        self.sub_prev: dict[bytes, Future] = {}          # previous point's subtrees read ahead


@dataclass
class _Kept:
    """What the subtrees kept from the previous point without walking them hold (the
    pipeline's counters see only their top directory's entry)."""
    files: int = 0
    linked: int = 0     # ... of them with a link group
    dirs: int = 0
    other: int = 0
    size: int = 0


class TreeWalker:
    """Walks a source tree into a Pipeline, iteratively and fd-relative (any depth, any path
    length, at most MAX_DIR_FDS directory descriptors open), reusing the previous point's
    entries for files whose inode, size, mtime and ctime are unchanged (not with
    ``full_read``: every file is read). Problems with single entries (unreadable, vanished,
    changed while read, moved away) become warnings through ``warn`` and the walk goes on.
    """
    def __init__(self, safe: Safe, pipe: Pipeline, cutter: Cutter, opts: WalkOptions,
                 warn: Callable[[bytes, str], None], progress: Callable[[int, int], None] | None = None,
                 guide: Guide | None = None, full_read: bool = False):
        """``warn(path, message)`` gets full paths; ``progress(nbytes, files)`` is told, in
        steps, how many bytes of regular files (read, holes, or unchanged and not read) and
        how many files the walk has covered; ``guide``: what changed since the previous point
        (see the module's docstring)."""
        self.guide = guide
        self.full_read = full_read
        self.prev_root: bytes | None = None
        self.kept = _Kept()
        self.kept_groups: dict[int, int] = {}   # link group -> size, of files in kept subtrees
        self.safe = safe
        self.pipe = pipe
        self.cutter = cutter
        self.opts = opts
        self.warn = warn
        self.progress = progress or (lambda n, f: None)
        self.groups_seen: set[int] = set()
        self.root_dev = 0
        self.top = b""
        self.stack: list[_Dir] = []
        self.lo = 1               # stack[1:lo] have their descriptors closed; stack[lo:] open
        self.p_bytes = self.p_files = 0
        self.readers = ThreadPoolExecutor(max_workers=PREFETCH_THREADS, thread_name_prefix="pointsafe-read")
        self.prev_ahead: dict[bytes, Future] = {}   # previous point's trees read ahead, by key
        self.prev_held = 0                          # entries in them (read, not yet walked)
        self.prev_lock = threading.Lock()

    # -- paths, for warnings and excludes ---------------------------------------------------

    def _path(self, name: bytes | None = None, upto: int | None = None) -> bytes:
        """The full path of ``name`` in the current directory (or of the current directory,
        or of the directory ``stack[upto]``)."""
        parts = [d.name for d in self.stack[1:len(self.stack) if upto is None else upto + 1]]
        if name is not None:
            parts.append(name)
        return os.path.join(self.top, *parts) if parts else self.top

    def _warn_at(self, name: bytes | None, message: str) -> None:
        self.warn(self._path(name), message)

    def _excluded(self, rel: bytes, name: bytes) -> bool:
        r, n = os.fsdecode(rel), os.fsdecode(name)
        return any(fnmatch.fnmatchcase(n, p) or fnmatch.fnmatchcase(r, p) or fnmatch.fnmatchcase("/" + r, p)
                   for p in self.opts.excludes)

    # -- previous point -----------------------------------------------------------------

    def _read_prev(self, ref: bytes, ahead: bool = False) -> list[Entry]:
        """The entries of the previous point's tree ``ref`` (in a reader thread); its
        subdirectories' trees are read ahead in turn (``ahead=True``; at most PREV_AHEAD trees
        and PREV_AHEAD_ENTRIES entries not yet walked), so that the walk, depth first, rarely
        waits for one: on a cold cache, reading old tree nodes one at a time is most of an
        unchanged re-backup."""
        entries = read_tree(self.safe.get, ref)
        with self.prev_lock:
            if ahead:
                self.prev_held += len(entries)
            for e in entries:
                if (e.type == DIR and e.ref is not None and e.ref not in self.prev_ahead
                        and len(self.prev_ahead) < PREV_AHEAD and self.prev_held < PREV_AHEAD_ENTRIES):
                    self.prev_ahead[e.ref] = self.readers.submit(self._read_prev, e.ref, True)
        return entries

    def _walked_ahead(self, fut: Future) -> None:
        """A tree read ahead is taken by the walk: its entries no longer count as held."""
        if not fut.cancelled() and fut.exception() is None:
            with self.prev_lock:
                self.prev_held -= len(fut.result())

    def _prev_entries(self, tree: bytes | Future | None) -> dict[bytes, Entry]:
        if tree is None:
            return {}
        try:
            entries = tree.result() if isinstance(tree, Future) else self._read_prev(tree)
            return {e.name: e for e in entries}
        except Exception:  # a damaged previous point only costs a full re-read
            return {}

    # -- progress -----------------------------------------------------------------------

    def _covered(self, nbytes: int, files: int = 0) -> None:
        self.p_bytes += nbytes
        self.p_files += files
        if self.p_bytes >= PROGRESS_BYTES or self.p_files >= PROGRESS_FILES:
            self._flush_progress()

    def _flush_progress(self) -> None:
        if self.p_bytes or self.p_files:
            n, f = self.p_bytes, self.p_files
            self.p_bytes = self.p_files = 0
            self.progress(n, f)

    # -- walking ------------------------------------------------------------------------

    def walk_root(self, path: bytes, prev_root: bytes | None) -> Entry:
        """Back up the tree at ``path`` (its entries feed the pipeline); return its root entry."""
        st = os.lstat(path)
        self.root_dev = st.st_dev
        self.top = path
        self.prev_root = prev_root
        root = entry_from_stat(b"", st, self.opts.dev_map)
        try:
            fd = open_at(None, path, _DIR_FLAGS)
        except OSError as e:
            root.xattrs = read_xattrs(path, lambda m: self.warn(path, m))
            self.warn(path, f"cannot read directory: {e.strerror}; stored as empty")
            self.pipe.opendir(root)
            self.pipe.closedir()
            return root
        self.stack = [_Dir(b"", fd, st.st_dev, st.st_ino, b"")]
        self.stack[0].guided = self.guide is not None
        try:
            root.xattrs = read_xattrs(fd, lambda m: self.warn(path, m))
            self.pipe.opendir(root)
            self._fill(self.stack[0], prev_root)
            self._run()
            self._flush_progress()
        finally:
            self._release_all()
        return root

    def _run(self) -> None:
        stack = self.stack
        while stack:
            d = stack[-1]
            if d.i >= len(d.items):
                self._leave()
                continue
            name, st, p = d.items[d.i]
            d.i += 1
            self._read_ahead(d)
            if st is None:
                assert p is not None, "a kept name has its previous entry"
                self._keep(p)
                continue
            try:
                self._one(d, name, st, p)
            except Vanished:
                self._warn_at(name, VANISHED)

    def _read_ahead(self, d: _Dir) -> None:
        # Small files are read ahead by a few threads: a cold tree of small files is bound
        # by the latency of one read at a time, not by the disk's bandwidth.
        items, limit = d.items, min(len(d.items), d.i - 1 + PREFETCH_FILES)
        while d.j < limit:
            jn, jst, jp = items[d.j]
            if jst is None:
                pass
            elif (stat.S_ISREG(jst.st_mode) and 0 < jst.st_size <= PREFETCH_MAX and jst.st_nlink == 1
                    and (self.full_read or not _unchanged(jp, jst, self.opts.dev_map))
                    and not (d.guided and self._extents(d, jn) is not None)
                    and self._alt_same(d, jn, jst) is None):
                d.ahead[jn] = self.readers.submit(_read_small, _fd(d), jn)
            elif stat.S_ISDIR(jst.st_mode) and jp is not None and jp.type == DIR and jp.ref is not None:
                # The previous point's subdirectories are read ahead too: on a cold cache,
                # reading old tree nodes one at a time is most of an unchanged re-backup.
                fut = self.prev_ahead.pop(jp.ref, None)
                if fut is None:
                    fut = self.readers.submit(self._read_prev, jp.ref)
                else:
                    fut.add_done_callback(self._walked_ahead)
                d.sub_prev[jn] = fut
            d.j += 1

    def _one(self, d: _Dir, name: bytes, st: os.stat_result, p: Entry | None) -> None:
        e = keep_atime(entry_from_stat(name, st, self.opts.dev_map), p)
        if e.type == REG:
            self._file(d, e, p, d.ahead.pop(name, None))
        elif e.type == DIR:
            self._dir(d, e, st, p)
        elif e.type == LNK:
            self._symlink(d, e, st, p)
        else:
            e.size = 0
            e.xattrs = self._xattrs_at(d, e, p)
            self.pipe.entry(e)

    # -- directories --------------------------------------------------------------------

    def _dir(self, d: _Dir, e: Entry, st: os.stat_result, p: Entry | None) -> None:
        if (e.dev, st.st_ino) in self.opts.skip:
            return
        nested = self._nested_in_snapshot(st)
        if nested and not self.opts.one_file_system:
            self._warn_at(e.name, "a btrfs subvolume nested in the source: a snapshot does not hold it, "
                                  "stored as an empty directory (back it up as a source of its own)")
        if nested or self.opts.one_file_system and st.st_dev != self.root_dev:
            e.xattrs = self._xattrs_at(d, e, p)
            self.pipe.opendir(e)
            self.pipe.closedir()
            return
        try:
            fd = open_at(d.fd, e.name, _DIR_FLAGS)
        except OSError as err:
            if err.errno == errno.ENOENT:
                raise Vanished from None
            e.xattrs = self._xattrs_at(d, e, p)
            self._warn_at(e.name, f"cannot read directory: {err.strerror}; stored as empty")
            self.pipe.opendir(e)
            self.pipe.closedir()
            return
        try:
            fst = os.fstat(fd)
            if (fst.st_dev, fst.st_ino) != (st.st_dev, st.st_ino):   # replaced since it was listed
                e = keep_atime(entry_from_stat(e.name, fst, self.opts.dev_map), p)
            e.xattrs = (p.xattrs if _same_inode(p, e)
                        else read_xattrs(fd, lambda m: self._warn_at(e.name, m)))
        except BaseException:
            os.close(fd)
            raise
        rel = (os.path.join(d.rel, e.name) if d.rel else e.name) if self.opts.excludes else b""
        child = _Dir(e.name, fd, fst.st_dev, fst.st_ino, rel)
        # guided below only where the previous point has this very directory at this path
        child.guided = (d.guided and p is not None and p.type == DIR and p.ref is not None
                        and (p.dev, p.ino) == (e.dev, e.ino))
        child.grel = os.path.join(d.grel, e.name) if d.grel else e.name
        if not child.guided and self.guide is not None and not self.full_read:
            child.alt = self._alt_of(d, e)
        self.stack.append(child)   # from here on, _release_all closes fd whatever happens
        self.pipe.opendir(e)
        self._bound_fds()
        self._fill(child, d.sub_prev.pop(e.name, None))

    def _nested_in_snapshot(self, st: os.stat_result) -> bool:
        """True for the empty stand-in a btrfs snapshot shows for a subvolume nested in it
        (inode 2 on another device) when reading a snapshot."""
        return bool(self.opts.dev_map) and st.st_ino == EMPTY_SUBVOL_INO and st.st_dev not in self.opts.dev_map

    def _fill(self, d: _Dir, prev_tree: bytes | Future | None) -> None:
        """List and stat the (new, top) directory ``d``."""
        if d.guided and self._fill_guided(d, prev_tree):
            return
        d.guided = False
        prev = self._prev_entries(prev_tree)
        try:
            names = sorted(os.fsencode(n) for n in os.listdir(_fd(d)))
        except OSError as e:
            self._warn_at(None, f"cannot read directory: {e.strerror}; stored as empty")
            return
        live = live_database(names, self._path)   # a running database's data directory?
        if live is not None:
            self._warn_at(None, live.message())
        if self.opts.excludes:
            names = [n for n in names if not self._excluded(os.path.join(d.rel, n) if d.rel else n, n)]
        d.items = [(n, st, prev.get(n)) for n, st in stat_listed(_fd(d), names, self._warn_at)]

    # -- guided by the changes since the previous point -----------------------------------

    def _fill_guided(self, d: _Dir, prev_tree: bytes | Future | None) -> bool:
        """Fill the guided directory ``d``: its names from a listing when its entries changed,
        else the previous point's; only the dirty ones are looked at. False when the previous
        tree cannot be read (``d`` is then walked as without a guide)."""
        guide = self.guide
        assert guide is not None, "a guided directory has a guide"
        try:
            if prev_tree is None:
                return False
            entries = prev_tree.result() if isinstance(prev_tree, Future) else self._read_prev(prev_tree)
        except Exception:  # noqa: BLE001 - a damaged previous point only costs a full walk
            return False
        prev = {e.name: e for e in entries}
        if guide.must_list(d.grel):
            try:
                names = sorted(os.fsencode(n) for n in os.listdir(_fd(d)))
            except OSError:
                return False
            if self.opts.excludes:
                names = [n for n in names if not self._excluded(os.path.join(d.rel, n) if d.rel else n, n)]
        else:
            names = sorted(prev)
        live = live_database(names, self._path)
        if live is not None:
            self._warn_at(None, live.message())
        dirty = [n for n in names if n not in prev or guide.is_dirty(os.path.join(d.grel, n) if d.grel else n)]
        looked = dict(stat_listed(_fd(d), dirty, self._warn_at))
        keep = set(names) - set(dirty)
        d.items = [(n, None, prev[n]) if n in keep else (n, looked[n], prev.get(n))
                   for n in names if n in keep or n in looked]
        return True

    def _keep(self, p: Entry) -> None:
        """The unchanged name ``p`` of the previous point (a directory: its whole subtree)."""
        if p.type == REG:
            if p.link_group:
                if p.link_group in self.groups_seen:
                    self.pipe.link(p)
                    self._covered(0, 1)
                    return
                self.groups_seen.add(p.link_group)
            self.pipe.entry(p)
            self._covered(p.size, 1)
            return
        self.pipe.entry(p)
        if p.type == DIR:
            self.kept.other -= 1       # the pipeline counts a kept directory's entry as "other"
            self.kept.dirs += 1
            if p.ref is not None:
                self._count_kept(p.ref)

    def _count_kept(self, ref: bytes) -> None:
        """Count what the kept subtree ``ref`` holds (from the safe, not the source)."""
        k = self.kept
        todo = [ref]
        nbytes = files = 0
        while todo:
            for e in read_tree(self.safe.get, todo.pop()):
                if e.type == DIR:
                    k.dirs += 1
                    if e.ref is not None:
                        todo.append(e.ref)
                elif e.type == REG:
                    k.files += 1
                    files += 1
                    if e.link_group:
                        self.kept_groups.setdefault(e.link_group, e.size)
                        k.linked += 1
                    else:
                        k.size += e.size
                    nbytes += e.size
                else:
                    k.other += 1
        self._covered(nbytes, files)

    def add_kept(self, stats) -> None:
        """Add what the kept subtrees hold to the pipeline's ``stats`` (after it finished):
        a point's counters are those of a full walk."""
        k = self.kept
        # a hardlinked file counts its size, and as unchanged, once (at the name a walk meets first)
        groups = [n for g, n in self.kept_groups.items() if g not in self.groups_seen]
        stats.files += k.files
        stats.files_unchanged += k.files - k.linked + len(groups)
        stats.dirs += k.dirs
        stats.other += k.other
        stats.size += k.size + sum(groups)

    def _alt_of(self, d: _Dir, e: Entry) -> dict[bytes, Entry] | None:
        """The previous point's entries of the directory ``e`` of ``d`` where it was before it
        was renamed (itself, or with a directory above it); None when there is no such."""
        guide = self.guide
        assert guide is not None, "only a guided walk knows what was renamed"
        old = guide.moved.get(os.path.join(d.grel, e.name) if d.grel else e.name)
        a: Entry | None = None
        try:
            if old is not None and self.prev_root is not None:
                tree: bytes | None = self.prev_root
                for part in old.split(b"/"):
                    a = next((x for x in read_tree(self.safe.get, tree) if x.name == part), None) if tree else None
                    tree = a.ref if a is not None and a.type == DIR else None
            elif d.alt is not None:
                a = d.alt.get(e.name)
            if a is None or a.type != DIR or a.ref is None or (a.dev, a.ino) != (e.dev, e.ino):
                return None
            return {x.name: x for x in read_tree(self.safe.get, a.ref)}
        except Exception:  # noqa: BLE001 - a damaged previous point only costs reading
            return None

    def _alt_same(self, d: _Dir, name: bytes, now: os.stat_result | Entry) -> Entry | None:
        """The entry of ``d.alt`` for ``name`` when it is this very file (``now``: its lstat
        or its entry), unchanged."""
        a = d.alt.get(name) if d.alt is not None else None
        if a is None or a.type != REG or (a.ref is None and a.size):
            return None
        if isinstance(now, Entry):
            same = (a.dev, a.ino, a.size, a.mtime_ns, a.ctime_ns) == (now.dev, now.ino, now.size, now.mtime_ns, now.ctime_ns)
        else:
            same = _unchanged(a, now, self.opts.dev_map)
        return a if same else None

    def _extents(self, d: _Dir, name: bytes) -> list[tuple[int, int]] | None:
        guide = self.guide
        assert guide is not None, "a guided directory has a guide"
        return guide.extents_of(os.path.join(d.grel, name) if d.grel else name)

    def _read_extents(self, d: _Dir, e: Entry, prev: Entry | None) -> bool | None:
        """Read the modified file ``e`` only around its written extents, keeping the previous
        point's chunks elsewhere; None when that cannot be exact (it is then read whole):
        not the same single-link inode as ``prev``, shorter than it, or either not one data
        region (holes: a full read cuts each region on its own)."""
        written = self._extents(d, e.name)
        if (written is None or prev is None or prev.type != REG or prev.ref is None or prev.size <= 0
                or e.nlink != 1 or prev.nlink != 1 or prev.link_group or e.size < prev.size
                or (prev.dev, prev.ino) != (e.dev, e.ino)):
            return None
        guide = self.guide
        assert guide is not None, "a guided directory has a guide"
        rel = os.path.join(d.grel, e.name) if d.grel else e.name
        if not _old_file_is(guide.parent / os.fsdecode(rel), prev):
            return None
        try:
            fd = open_at(_fd(d), e.name, _FILE_FLAGS)
        except OSError:
            return None   # read whole, which reports why it cannot be
        try:
            st = os.fstat(fd)
            if st.st_ino != e.ino or st.st_size < prev.size or list(data_extents(fd, st.st_size)) != [(0, st.st_size)]:
                return None
            e.xattrs = read_xattrs(fd, lambda m: self._warn_at(e.name, m))
            e.size, e.mtime_ns, e.ctime_ns = st.st_size, st.st_mtime_ns, st.st_ctime_ns
            reader = BlobReader(prev.ref, prev.size, self.safe.get, self.safe.kind)
            self.pipe.file(e)
            try:
                # past a written extent, a minimal chunk at a time until the cuts resync
                extra = read_around(fd, st.st_size, reader, written, self.cutter.content_defined(),
                                    max(4096, self.cutter.min_size), self.pipe, self._covered)
            except OSError as err:
                self.pipe.abort()
                self._warn_at(e.name, f"read error: {err.strerror}; not backed up")
                return False
            self.pipe.stats.bytes_scanned += extra   # read past a resync: read, not fed
            self.pipe.end()
            return True
        finally:
            os.close(fd)

    def _leave(self) -> None:
        """The top directory is done: close it; open its parent again if it was closed and
        still has entries to back up."""
        stack = self.stack
        d = stack[-1]
        if len(stack) > 1:
            parent = stack[-2]
            if parent.fd is None and parent.i < len(parent.items):
                self._reopen(len(stack) - 2, d)
        stack.pop()
        self._release(d)
        self.lo = min(self.lo, max(1, len(stack)))
        self.pipe.closedir()

    def _bound_fds(self) -> None:
        """Close the shallowest open descriptors (never the root's) beyond MAX_DIR_FDS."""
        while len(self.stack) - self.lo + 1 > MAX_DIR_FDS and self.lo < len(self.stack) - 1:
            d = self.stack[self.lo]
            wait(list(d.ahead.values()))   # the read-ahead threads use d.fd: let them finish first
            if d.fd is not None:
                os.close(d.fd)
                d.fd = None
            self.lo += 1

    def _reopen(self, k: int, child: _Dir) -> None:
        """Open ``stack[k]`` again (its descriptor was closed by _bound_fds): through ``..`` of
        its ``child``, else name by name from the deepest open ancestor; each checked by device
        and inode. When it cannot be reached any more (an ancestor was moved or removed during
        the backup), one warning names the first one that is gone, and what had not been read
        below it is not in the point."""
        stack = self.stack
        fd = _open_checked(child.fd, b"..", stack[k]) if child.fd is not None else None
        broken = k + 1
        if fd is None:
            fd, broken = self._reopen_by_names(k)
        if fd is None:
            for m in range(broken, k + 1):
                del stack[m].items[stack[m].i:]
            self.warn(self._path(upto=broken), MOVED)
            return
        stack[k].fd = fd
        self.lo = k

    def _reopen_by_names(self, k: int) -> tuple[int | None, int]:
        """(descriptor of stack[k], k + 1), or (None, index of the first directory on the
        way that is not there any more)."""
        stack = self.stack
        j = k - 1
        fd = stack[j].fd
        while fd is None:
            j -= 1
            fd = stack[j].fd
        for m in range(j + 1, k + 1):
            nfd = _open_checked(fd, stack[m].name, stack[m])
            if fd != stack[j].fd:
                os.close(fd)
            if nfd is None:
                return None, m
            fd = nfd
        return fd, k + 1

    def _release(self, d: _Dir) -> None:
        """Stop using ``d``: no read-ahead thread may use its descriptor after it is closed."""
        if d.ahead or d.sub_prev:
            futures = list(d.ahead.values()) + list(d.sub_prev.values())
            for f in futures:
                f.cancel()
            wait(futures)
            d.ahead.clear()
            d.sub_prev.clear()
        if d.fd is not None:
            os.close(d.fd)
            d.fd = None

    def _release_all(self) -> None:
        while self.stack:
            self._release(self.stack.pop())

    # -- leaves -------------------------------------------------------------------------

    def _xattrs_at(self, d: _Dir, e: Entry, prev: Entry | None) -> list[tuple[bytes, bytes]]:
        """The xattrs of ``e`` (in ``d``) without opening it: a symlink, a device or a FIFO
        cannot be opened harmlessly. Through ``/proc/self/fd/N/name`` (short whatever the depth),
        else by full path when that is short enough."""
        # Changing an xattr changes ctime: an unchanged inode keeps its recorded xattrs.
        if _same_inode(prev, e):
            return prev.xattrs
        if _PROC_FD and d.fd is not None:
            target = b"/proc/self/fd/%d/%s" % (d.fd, e.name)
        else:
            target = self._path(e.name)
            if len(target) >= PATH_MAX:
                self._warn_at(e.name, "cannot read extended attributes: the path is too long "
                                      "(and /proc is not mounted)")
                return []
        return read_xattrs(target, lambda m: self._warn_at(e.name, m))

    def _symlink(self, d: _Dir, e: Entry, st: os.stat_result, p: Entry | None) -> None:
        if (p is not None and p.type == LNK and
                (p.dev, p.ino, p.size, p.mtime_ns, p.ctime_ns) == (e.dev, e.ino, e.size, e.mtime_ns, e.ctime_ns)):
            e.target = p.target   # unchanged: readlink would move its atime again
        else:
            try:
                e.target = os.readlink(e.name, dir_fd=d.fd)
                # readlink has no O_NOATIME: record the atime it leaves (relatime moved
                # it at most once), or the next backup would see the link changed.
                st2 = os.stat(e.name, dir_fd=d.fd, follow_symlinks=False)
                if (st2.st_ino, st2.st_ctime_ns) == (st.st_ino, st.st_ctime_ns):
                    e.atime_ns = st2.st_atime_ns
            except OSError as err:
                if err.errno == errno.ENOENT:
                    raise Vanished from None
                self._warn_at(e.name, f"cannot read symlink: {err.strerror}")
                return
        e.size = len(e.target)
        e.xattrs = self._xattrs_at(d, e, p)
        self.pipe.entry(e)

    def _file(self, d: _Dir, e: Entry, prev: Entry | None, pre: Future | None = None) -> None:
        if e.nlink > 1:
            e.link_group = _group_of(e)
            if e.link_group in self.groups_seen:
                e.xattrs = self._xattrs_at(d, e, prev)
                self.pipe.link(e)
                self._covered(0, 1)
                return
        if (not self.full_read and prev is not None and prev.type == REG and
                (prev.dev, prev.ino, prev.size, prev.mtime_ns, prev.ctime_ns) == (e.dev, e.ino, e.size, e.mtime_ns, e.ctime_ns)):
            e.ref = prev.ref
            e.xattrs = prev.xattrs
            self.pipe.entry(e)
            self._covered(e.size, 1)
        elif (alt := self._alt_same(d, e.name, e)) is not None:
            # renamed with its directory, unchanged: the content a read would store
            e.ref = alt.ref
            e.xattrs = self._xattrs_at(d, e, None)
            self.pipe.entry(e)
            self._covered(e.size, 1)
        else:
            done = self._from_prefetch(e, pre) if pre is not None else None
            if done is None and d.guided and not self.full_read:
                done = self._read_extents(d, e, prev)
            if done is None:
                done = self.read_file(_fd(d), e)
            if not done:
                # Not in the point: its other names must not become links to nothing (they
                # would restore as holes); each is tried, and warned about, on its own.
                return
            self._covered(0, 1)
        if e.link_group:
            self.groups_seen.add(e.link_group)

    def _from_prefetch(self, e: Entry, pre: Future) -> bool | None:
        """Feed a file read ahead; None when it must be read again the ordinary way."""
        try:
            st, data, st2, xattrs, problems = pre.result()
        except (OSError, CancelledError):
            return None   # the ordinary path reports the error (or the file's vanishing)
        if ((st.st_size, st.st_mtime_ns, st.st_ctime_ns) != (st2.st_size, st2.st_mtime_ns, st2.st_ctime_ns)
                or len(data) != st.st_size or st.st_ino != e.ino):
            return None
        for m in problems:
            self._warn_at(e.name, m)
        e.xattrs = xattrs
        e.size, e.mtime_ns, e.ctime_ns = st.st_size, st.st_mtime_ns, st.st_ctime_ns
        self.pipe.file(e)
        mv = memoryview(data)
        for c in self.cutter.content_defined().cut_buf(mv):
            self.pipe.data(mv[c.offset:c.offset + c.length])
        self._covered(len(data))
        self.pipe.end()
        return True

    def close(self) -> None:
        """Stop the read-ahead threads (after the walk, or after it failed)."""
        self._release_all()
        self.prev_ahead.clear()
        self.readers.shutdown(cancel_futures=True)

    def read_file(self, dir_fd: int, e: Entry) -> bool:
        """Read the regular file ``e.name`` of the directory ``dir_fd`` (the walk's current
        one), with its xattrs, into the pipeline; False when it could not be read at all.
        Raises :class:`Vanished` when it is gone."""
        try:
            fd = open_at(dir_fd, e.name, _FILE_FLAGS)
        except OSError as err:
            if err.errno == errno.ENOENT:
                raise Vanished from None
            self._warn_at(e.name, f"cannot open: {err.strerror}; not backed up")
            return False
        try:
            e.xattrs = read_xattrs(fd, lambda m: self._warn_at(e.name, m))
            for attempt in range(CHANGE_RETRIES):
                st = os.fstat(fd)
                e.size, e.mtime_ns, e.ctime_ns = st.st_size, st.st_mtime_ns, st.st_ctime_ns
                self.pipe.file(e)
                try:
                    for what, v in self.cutter.chunks(fd, st.st_size):
                        if what == "data":
                            mv = cast(memoryview, v)      # Cutter.chunks: ("data", memoryview)
                            self.pipe.data(mv)
                            self._covered(len(mv))
                        else:
                            n = cast(int, v)              # ... and ("hole", length)
                            self.pipe.hole(n)
                            self._covered(n)
                except OSError as err:
                    self.pipe.abort()
                    self._warn_at(e.name, f"read error: {err.strerror}; not backed up")
                    return False
                st2 = os.fstat(fd)
                if (st2.st_size, st2.st_mtime_ns, st2.st_ctime_ns) == (st.st_size, st.st_mtime_ns, st.st_ctime_ns):
                    self.pipe.end()
                    return True
                if attempt < CHANGE_RETRIES - 1:
                    self.pipe.abort()
                    continue
                self.pipe.end()
                self._warn_at(e.name, f"file changed while being read ({CHANGE_RETRIES} attempts); "
                                      "the point holds the last read, which may be inconsistent")
                return True
        finally:
            os.close(fd)
        return True


def _fd(d: _Dir) -> int:
    """The descriptor of ``d``, which the walk keeps open while it works in ``d`` (the top of
    its stack; only directories further up may have theirs closed by _bound_fds)."""
    assert d.fd is not None, "a directory being read has its descriptor open"
    return d.fd


def _same_inode(prev: Entry | None, e: Entry) -> TypeGuard[Entry]:
    return prev is not None and prev.type == e.type and (prev.dev, prev.ino, prev.ctime_ns) == (e.dev, e.ino, e.ctime_ns)


def _unchanged(prev: Entry | None, st: os.stat_result, dev_map: dict[int, int] | None = None) -> bool:
    dev = dev_map.get(st.st_dev, st.st_dev) if dev_map else st.st_dev
    return (prev is not None and prev.type == REG and
            (prev.dev, prev.ino, prev.size, prev.mtime_ns, prev.ctime_ns)
            == (dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))


def _old_file_is(path: str | os.PathLike[str], prev: Entry) -> bool:
    """Whether ``path`` (in the parent snapshot) is the file ``prev`` describes, unchanged, and
    one data region -- as the previous point read it."""
    try:
        fd = open_at(None, os.fsencode(path), _FILE_FLAGS)
    except OSError:
        return False
    try:
        st = os.fstat(fd)
        return (stat.S_ISREG(st.st_mode) and (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
                == (prev.ino, prev.size, prev.mtime_ns, prev.ctime_ns)
                and list(data_extents(fd, st.st_size)) == [(0, st.st_size)])
    finally:
        os.close(fd)


def _open_checked(dir_fd: int, name: bytes, want: _Dir) -> int | None:
    """Open the directory ``name`` of ``dir_fd`` if it is still ``want`` (device, inode)."""
    try:
        fd = open_at(dir_fd, name, _DIR_FLAGS)
    except OSError:
        return None
    st = os.fstat(fd)
    if (st.st_dev, st.st_ino) != (want.dev, want.ino):
        os.close(fd)
        return None
    return fd


def _read_small(dir_fd: int, name: bytes) -> tuple[os.stat_result, bytes, os.stat_result, list, list[str]]:
    """Read a whole small file of ``dir_fd``: (stat before, bytes, stat after, xattrs,
    problems with the xattrs); raises OSError."""
    fd = open_at(dir_fd, name, _FILE_FLAGS)
    try:
        problems: list[str] = []
        xattrs = read_xattrs(fd, problems.append)
        st = os.fstat(fd)
        data = os.read(fd, st.st_size + 1)
        while len(data) < st.st_size:
            more = os.read(fd, st.st_size + 1 - len(data))
            if not more:
                break
            data += more
        return st, data, os.fstat(fd), xattrs, problems
    finally:
        os.close(fd)


def _group_of(e: Entry) -> int:
    h = blake3.blake3(struct.pack("<QQ", e.dev, e.ino)).digest(length=8)
    return (int.from_bytes(h, "little") & 0x7FFF_FFFF_FFFF_FFFF) or 1
