"""The pyfuse3 adapter: FUSE request -> ``View`` call -> reply or errno. Nothing else.

Trio rule: the trio thread never blocks on the safe. Anything that may read objects (lookup
and opendir load a directory; open, read and statfs touch LMDB and packs) runs in a worker
thread through ``trio.to_thread.run_sync`` under one ``CapacityLimiter``; the view's caches
make sure a chunk is loaded once even when several of those threads want it. Requests that
only consult the inode table (getattr, readlink, readdir of an opened directory, xattrs,
forget) answer on the trio thread, and so do a lookup in a directory whose listing is cached,
an open whose file's root object is cached, and a read whose chunks are all cached already
(the usual case for a sequential reader, whose next chunks the read-ahead loads in the
background): a thread hop costs more than copying a cached MiB.

Every request that would change anything answers EROFS (the mount is also made ``ro``, so
the kernel usually answers first).
"""

from __future__ import annotations

import errno
import logging
import os
from typing import Callable

import pyfuse3
import trio

from pointsafe.cas import IntegrityError, ObjectMissing, SafeError

from .errors import BadHandle, Damaged, IsADir, NoAttr, NotADir, NotALink, NotFound, ReadOnly, ViewError
from .view import View

log = logging.getLogger("pointsafe.mount")

# The one table from what the view raises to what the caller sees.
ERRNO: dict[type[BaseException], int] = {
    NotFound: errno.ENOENT,
    NotADir: errno.ENOTDIR,
    IsADir: errno.EISDIR,
    NotALink: errno.EINVAL,
    NoAttr: pyfuse3.ENOATTR,
    ReadOnly: errno.EROFS,
    Damaged: errno.EIO,
    BadHandle: errno.EBADF,
    IntegrityError: errno.EIO,
    ObjectMissing: errno.EIO,
    SafeError: errno.EIO,
}

COUNT_ENV = "POINTSAFE_MOUNT_COUNT"    # set (to anything but "" or "0"): count FUSE requests per kind
COUNTED = ("lookup", "forget", "getattr", "readlink", "opendir", "readdir", "releasedir", "statfs", "access",
           "getxattr", "listxattr", "open", "read", "flush", "release", "fsync")

VIRTUAL_TIMEOUT = 1.0      # the point list can change (new backups, forget)
POINT_TIMEOUT = 3600.0     # a point's contents never change
BLKSIZE = 128 * 1024       # st_blksize: what `cp`/`tar` size their reads by


def _errno(e: BaseException) -> int:
    for cls in type(e).__mro__:
        n = ERRNO.get(cls)
        if n is not None:
            return n
    log.error("internal error: %s: %s", type(e).__name__, e, exc_info=e)
    return errno.EIO


def _counting(handler: Callable, name: str, counts: dict[str, int]) -> Callable:
    async def counted(*args):
        counts[name] += 1
        return await handler(*args)
    return counted


_EntryAttributes = pyfuse3.EntryAttributes


def _attrs(view: View, node) -> pyfuse3.EntryAttributes:
    a = _EntryAttributes()
    a.entry_timeout = a.attr_timeout = VIRTUAL_TIMEOUT if view.fill(node, a) else POINT_TIMEOUT
    a.st_blksize = BLKSIZE
    return a


class Operations(pyfuse3.Operations):
    """pyfuse3 operations over a :class:`View`."""

    enable_acl = True            # pass system.posix_acl_* through; the kernel enforces them
    supports_dot_lookup = True

    def __init__(self, view: View, threads: int = 8):
        super().__init__()
        self.view = view
        self.limiter = trio.CapacityLimiter(threads)
        self.on_init: Callable[[], None] = lambda: None
        if os.environ.get(COUNT_ENV, "") not in ("", "0"):
            self._count_requests()

    def _count_requests(self) -> None:
        """Count every request per kind into ``view.requests`` (shown in the stats xattr); the
        handlers are wrapped on this instance only, so an uncounted mount pays nothing."""
        counts = self.view.requests = dict.fromkeys(COUNTED, 0)
        for name in COUNTED:
            setattr(self, name, _counting(getattr(self, name), name, counts))

    def init(self) -> None:
        """Called by pyfuse3 once the kernel's INIT is handled (the mount is live): ``on_init``."""
        self.on_init()

    async def _thread(self, fn: Callable, *args):
        try:
            return await trio.to_thread.run_sync(fn, *args, limiter=self.limiter)
        except pyfuse3.FUSEError:
            raise
        except Exception as e:
            raise pyfuse3.FUSEError(_errno(e)) from None

    def _here(self, fn: Callable, *args):
        try:
            return fn(*args)
        except Exception as e:
            raise pyfuse3.FUSEError(_errno(e)) from None

    # -- names and attributes ---------------------------------------------------------------

    async def lookup(self, parent_inode, name, ctx=None):
        """The attributes of ``name`` in directory ``parent_inode`` (ENOENT when absent); counts a lookup."""
        name = bytes(name)
        node = self._here(self.view.lookup, parent_inode, name, True)   # from a cached listing
        if node is None:
            node = await self._thread(self.view.lookup, parent_inode, name)
        return _attrs(self.view, node)

    async def forget(self, inode_list):
        """Drop the kernel's lookup counts of the inodes in ``inode_list``."""
        for ino, n in inode_list:
            self.view.forget(ino, n)

    async def getattr(self, inode, ctx=None):
        """The attributes of ``inode`` (answered at once, not in a worker thread)."""
        self.view.getattrs += 1
        return _attrs(self.view, self._here(self.view.node, inode))

    async def readlink(self, inode, ctx):
        """The target of the symlink ``inode`` (EINVAL when it is not one)."""
        return self._here(self.view.readlink, inode)

    async def opendir(self, inode, ctx):
        """A handle for listing directory ``inode`` (ENOTDIR when it is not one)."""
        return await self._thread(self.view.opendir, inode)

    async def readdir(self, fh, start_id, token):
        """Reply the entries of ``fh`` from ``start_id`` on until the kernel's buffer is full;
        the entries handed over count as looked up."""
        view = self.view
        given = []
        reply, new, fill = pyfuse3.readdir_reply, _EntryAttributes, view.fill
        try:
            for name, node, nxt, counted in view.readdir(fh, start_id):
                # _attrs() inlined: the per-entry loop of `find` (a sixth of its Python time)
                a = new()
                a.entry_timeout = a.attr_timeout = VIRTUAL_TIMEOUT if fill(node, a) else POINT_TIMEOUT
                a.st_blksize = BLKSIZE
                if not reply(token, name, a, nxt):
                    break
                if counted:
                    given.append(node)
        except ViewError as e:
            raise pyfuse3.FUSEError(_errno(e)) from None
        finally:
            view.remember_many(given)       # no await above: no forget() can come in between

    async def releasedir(self, fh):
        """Forget the directory handle ``fh``."""
        self.view.releasedir(fh)

    async def statfs(self, ctx):
        """Sizes for ``df`` (see ``View.statfs``): the safe's packs as used, its filesystem's free space."""
        d = await self._thread(self.view.statfs)
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = d["bsize"]
        s.f_blocks, s.f_bfree, s.f_bavail = d["blocks"], d["bfree"], d["bavail"]
        s.f_files, s.f_ffree, s.f_favail = d["files"], d["ffree"], d["ffree"]
        s.f_namemax = d["namemax"]
        return s

    async def access(self, inode, mode, ctx):
        """False when ``mode`` asks for writing (the mount is read-only), else True (the stored
        permissions are the kernel's to check, with default_permissions)."""
        if mode & os.W_OK:
            return False
        return True

    # -- extended attributes ----------------------------------------------------------------

    async def getxattr(self, inode, name, ctx):
        """The stored extended attribute ``name`` of ``inode`` (ENODATA when absent)."""
        return self._here(self.view.getxattr, inode, bytes(name))

    async def listxattr(self, inode, ctx):
        """The names of the stored extended attributes of ``inode``."""
        return [n for n, _ in self._here(self.view.xattrs, inode)]

    # -- file contents ----------------------------------------------------------------------

    async def open(self, inode, flags, ctx):
        """A handle for reading file ``inode``; the kernel may keep its page cache (the data never changes).
        Opening for writing is EROFS."""
        fh = self._here(self.view.open, inode, flags, True)       # from the caches: right here
        if fh is None:
            fh = await self._thread(self.view.open, inode, flags)
        return pyfuse3.FileInfo(fh=fh, keep_cache=True)

    async def read(self, fh, off, size):
        """Up to ``size`` bytes of ``fh`` at ``off``: from the cache at once when all there, else
        loaded in a worker thread (EIO for damaged data)."""
        data = self._here(self.view.read, fh, off, size, True)     # cached: answer right here
        if data is None:
            data = await self._thread(self.view.read, fh, off, size)
        return data

    async def flush(self, fh):
        """Nothing to flush on a read-only mount: ENOSYS, which tells the kernel never to send
        FLUSH again (one request less for every file closed)."""
        raise pyfuse3.FUSEError(errno.ENOSYS)

    async def release(self, fh):
        """Forget the file handle ``fh``."""
        self.view.release(fh)

    async def fsync(self, fh, datasync):
        """Nothing to sync on a read-only mount."""
        return None

    # -- everything that would write: read-only -----------------------------------------------

    async def _erofs(self, *args, **kwargs):
        raise pyfuse3.FUSEError(errno.EROFS)

    setattr = mknod = mkdir = unlink = rmdir = symlink = rename = link = _erofs
    write = create = setxattr = removexattr = _erofs
