"""Finding points by what users type: an id prefix, ``latest``, ``NAME@latest``, ``NAME@TIME``.

Points are :class:`~.point.Point` values (docs/FORMAT.md "POINT payload"); "latest" is the
newest in the one order of points (``Point.order_key``); times are ISO 8601 UTC (``.timefmt``).
"""

from __future__ import annotations

from .errors import PointNotFound, UsageError
from .point import Point, latest
from .store import Safe
from .timefmt import format_utc, parse_utc


def parse_time(text: str) -> str:
    """Normalise a user's time (``2026-11-25``, ``2026-11-25T14:36``, ``...Z``; no zone means
    UTC) to stored ISO UTC text; UsageError (one line) when it is not a time."""
    try:
        return format_utc(parse_utc(text.strip().replace(" ", "T")))
    except ValueError:
        raise UsageError(f"bad time {text!r}: use ISO 8601, e.g. 2026-11-25T14:30 (UTC)") from None


def resolve_point(safe: Safe, spec: str, points: list[Point] | None = None) -> Point:
    """The point ``spec`` names (an id prefix, ``latest``, ``NAME@latest``, ``NAME@TIME``:
    the newest of that name started at or before TIME); PointNotFound (one line) otherwise."""
    pts = safe.points() if points is None else points
    if not pts:
        raise PointNotFound("the safe holds no points yet")
    spec = spec.strip()
    if spec == "latest":
        return _newest(pts)
    if "@" in spec:
        name, when = spec.rsplit("@", 1)
        mine = [p for p in pts if p.name == name]
        if not mine:
            names = sorted({p.name for p in pts})
            raise PointNotFound(f"no points named {name!r} (names in this safe: {', '.join(names)})")
        if when == "latest":
            return _newest(mine)
        t = parse_time(when)
        limit = parse_utc(t)
        before = [p for p in mine if p.started_at is not None and p.started_at <= limit]
        if not before:
            raise PointNotFound(f"no point of {name!r} was taken at or before {t}")
        return _newest(before)
    s = spec.lower()
    if len(s) < 4 or any(c not in "0123456789abcdef" for c in s):
        raise PointNotFound(f"unknown point {spec!r}: use an id (at least 4 hex digits), 'latest', "
                            "NAME@latest or NAME@TIME")
    hits = [p for p in pts if p.id.startswith(s)]
    if not hits:
        raise PointNotFound(f"no point with id {spec!r}")
    if len(hits) > 1:
        raise PointNotFound(f"point id {spec!r} is ambiguous ({len(hits)} points match); give more digits")
    return hits[0]


def _newest(points: list[Point]) -> Point:
    best = latest(points)
    assert best is not None     # callers pass a non-empty list
    return best
