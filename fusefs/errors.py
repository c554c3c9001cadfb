"""What the view reports to the pyfuse3 adapter, and the log of damaged data it found.

Each ``ViewError`` class maps to one errno in ``ops.ERRNO`` (the one table of that mapping).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .inodes import Node

log = logging.getLogger("pointsafe.mount")


class ViewError(Exception):
    """Base of what the view reports to the adapter; each maps to one errno there."""


class NotFound(ViewError):
    """No such name or inode (ENOENT)."""


class NotADir(ViewError):
    """A directory operation on something else (ENOTDIR)."""


class IsADir(ViewError):
    """A file operation on a directory (EISDIR)."""


class NotALink(ViewError):
    """readlink of something that is not a symlink (EINVAL)."""


class NoAttr(ViewError):
    """No such extended attribute (ENOATTR)."""


class ReadOnly(ViewError):
    """Anything that would write (EROFS)."""


class Damaged(ViewError):
    """Stored data is damaged or missing; the message names the file. Never wrong bytes (EIO)."""


class BadHandle(ViewError):
    """A file or directory handle the view did not hand out, or already released (EBADF)."""


class DamageLog:
    """Turns a storage error into :class:`Damaged` naming the file, warning once per file and error.

    ``path_of(node)`` gives the readable path used in the message. The set of warnings already
    given is bounded (cleared past 10,000), so the log may repeat itself but memory does not grow.
    """

    LIMIT = 10000

    def __init__(self, path_of: Callable[[Node], str]):
        self.path_of = path_of
        self.warned: set[tuple[int, str]] = set()
        self.lock = threading.Lock()

    def damaged(self, node: Node, err: Exception, what: str) -> Damaged:
        """A :class:`Damaged` for ``node`` (``what`` failed because of ``err``), logged the first time."""
        msg = f"{self.path_of(node)}: {what}: {err}"
        key = (node.ino, str(err))
        with self.lock:
            fresh = key not in self.warned
            if fresh:
                if len(self.warned) > self.LIMIT:
                    self.warned.clear()
                self.warned.add(key)
        if fresh:
            log.warning("damaged data: %s", msg)
        return Damaged(msg)
