"""Finding points by what users type: an id prefix, ``latest``, ``NAME@latest``, ``NAME@TIME``.

Point records are the JSON objects kept in the ``points`` table (see docs/FORMAT.md); times
are ISO 8601 UTC strings (``2026-11-25T14:36:24.123456Z``), so they sort as text.
"""

from __future__ import annotations

from datetime import datetime, timezone

from .errors import PointNotFound, UsageError
from .store import Safe


def parse_time(text: str) -> str:
    """Normalise a user's time (``2026-11-25``, ``2026-11-25T14:36``, ``...Z``) to ISO UTC."""
    t = text.strip().replace(" ", "T")
    if t.endswith("Z"):
        t = t[:-1] + "+00:00"
    try:
        dt = datetime.fromisoformat(t)
    except ValueError:
        raise UsageError(f"bad time {text!r}: use ISO 8601, e.g. 2026-11-25T14:30 (UTC)") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def resolve_point(safe: Safe, spec: str, points: list[dict] | None = None) -> dict:
    """The point record ``spec`` names; PointNotFound (one clear line) otherwise."""
    pts = safe.points() if points is None else points
    if not pts:
        raise PointNotFound("the safe holds no points yet")
    spec = spec.strip()
    if spec == "latest":
        return max(pts, key=lambda p: (p["started"], p["id"]))
    if "@" in spec:
        name, when = spec.rsplit("@", 1)
        mine = [p for p in pts if p.get("name") == name]
        if not mine:
            names = sorted({p.get("name", "") for p in pts})
            raise PointNotFound(f"no points named {name!r} (names in this safe: {', '.join(names)})")
        if when == "latest":
            return max(mine, key=lambda p: (p["started"], p["id"]))
        t = parse_time(when)
        before = [p for p in mine if p["started"] <= t]
        if not before:
            raise PointNotFound(f"no point of {name!r} was taken at or before {t}")
        return max(before, key=lambda p: (p["started"], p["id"]))
    s = spec.lower()
    if len(s) < 4 or any(c not in "0123456789abcdef" for c in s):
        raise PointNotFound(f"unknown point {spec!r}: use an id (at least 4 hex digits), 'latest', "
                            "NAME@latest or NAME@TIME")
    hits = [p for p in pts if p["id"].startswith(s)]
    if not hits:
        raise PointNotFound(f"no point with id {spec!r}")
    if len(hits) > 1:
        raise PointNotFound(f"point id {spec!r} is ambiguous ({len(hits)} points match); give more digits")
    return hits[0]
