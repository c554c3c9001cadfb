"""One hierarchy of errors for the safe.

Every error a user can cause or meet carries a one-line message (its ``str``) that the CLI
prints as is, and an exit code. Nothing below ``SafeError`` should ever reach a user as a
traceback.
"""

from __future__ import annotations


class SafeError(Exception):
    """Base of every error pointsafe reports to a user; ``str(e)`` is the one line."""

    exit_code = 1


class NotASafe(SafeError):
    """The path is not a pointsafe safe (missing, empty, foreign, truncated)."""


class UnsupportedVersion(SafeError):
    """The safe was written by a newer pointsafe."""


class SafeLocked(SafeError):
    """Another process holds the safe's writer lock."""


class ObjectMissing(SafeError):
    """An object the caller asked for is not in the index."""


class IntegrityError(SafeError):
    """Stored bytes do not match their checksum or key; never returned as data."""

    def __init__(self, message: str, pack: int | None = None, offset: int | None = None):
        super().__init__(message)
        self.pack = pack
        self.offset = offset


class DiskFull(SafeError):
    """The safe's filesystem ran out of space; the last batch was not committed."""


class QuotaExceeded(SafeError):
    """The safe's filesystem fell below its hard quota of free space; the writer stopped
    before writing more (the uncommitted batch is abandoned; gc reclaims what was written)."""


class PointNotFound(SafeError):
    """No point matches the user's POINT argument."""


class UsageError(SafeError):
    """A bad argument, path or combination given by the user."""
