"""Time for the ops room: "now" (overridable for tests), durations and ISO UTC strings.

``POINTSAFE_NOW`` (an ISO time, e.g. ``2026-12-01T00:00Z``) replaces the clock for the checks
that compare ages (stale sources, ``--since 2d``), so tests and drills can use synthetic times.
Task start/end times always use the real clock.
"""

from __future__ import annotations

import os
import re
from datetime import datetime, timedelta, timezone

from pointsafe.cas import UsageError, format_utc, parse_time, parse_utc

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw])")


def real_now() -> datetime:
    """The wall-clock time now, in UTC (never the test override of :func:`now`)."""
    return datetime.now(timezone.utc)


def now() -> datetime:
    """The current time, or $POINTSAFE_NOW when set."""
    fake = os.environ.get("POINTSAFE_NOW")
    if fake:
        return parse_iso(parse_time(fake))
    return real_now()


def iso(dt: datetime) -> str:
    """``dt`` as stored ISO UTC text (``pointsafe.cas.format_utc``)."""
    return format_utc(dt)


def parse_iso(text: str) -> datetime:
    """A stored ISO UTC string (``...Z``) as an aware datetime (``pointsafe.cas.parse_utc``)."""
    return parse_utc(text)


def parse_duration(text: str) -> float:
    """Seconds in ``1d``, ``36h``, ``1d12h``, ``90m``, ``2w``; UsageError otherwise."""
    t = text.strip().lower().replace(" ", "")
    pos, total = 0, 0.0
    for m in _DURATION.finditer(t):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    if not t or pos != len(t) or total <= 0:
        raise UsageError(f"bad duration {text!r}: use e.g. 90m, 36h, 1d, 1d12h or 2w")
    return total


def human_duration(seconds: float) -> str:
    """``3d 4h``, ``5h 12m``, ``42s``: two units at most."""
    s = int(max(0, seconds))
    parts: list[str] = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if s >= size or (unit == "s" and not parts):
            parts.append(f"{s // size}{unit}")
            s %= size
        if len(parts) == 2:
            break
    return " ".join(parts)


def parse_since(text: str) -> str:
    """``--since``: an ISO time, or a duration meaning that long before now (``2d``)."""
    try:
        return iso(now() - timedelta(seconds=parse_duration(text)))
    except UsageError:
        pass
    try:
        return parse_time(text)
    except UsageError:
        raise UsageError(f"bad time {text!r}: use an ISO time (2026-11-25T14:30) or an age (36h, 2d)") from None
