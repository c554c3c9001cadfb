"""The one error the database integrations raise, and the one-line rendering of driver errors."""

from __future__ import annotations

from pointsafe.cas import SafeError


class ConsistencyError(SafeError):
    """A database could not be reached, logged into, or locked for a consistent backup."""


def one_line(e: BaseException) -> str:
    """A driver exception as one short line (drivers like to add newlines and error codes)."""
    args: tuple[object, ...] = getattr(e, "args", ())
    if len(args) >= 2 and isinstance(args[0], int) and isinstance(args[1], str):
        text = args[1]  # PyMySQL: (errno, message)
    else:
        text = str(e) or type(e).__name__
    text = " ".join(text.split())
    return text[:300]
