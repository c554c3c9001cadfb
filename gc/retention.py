"""Retention policy: which points a keep-last/hourly/daily/weekly/monthly/yearly policy keeps.

Pure functions over points (``pointsafe.cas.Point``: ``id``, ``name``, ``started``); nothing
here touches a safe, so dry runs, reports and tests need no I/O.

The rules follow restic's ``forget``: within one source (points with the same ``name``),
points are taken newest first; ``--keep-last N`` keeps the N newest; ``--keep-daily N`` keeps
the newest point of each of the N most recent days that have points (likewise hourly, weekly
(ISO weeks), monthly, yearly). A point is kept when any rule keeps it; the result is the union.
Buckets are in UTC, the time zone point records are written in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone

from pointsafe.cas import EPOCH, Point, newest_first

RULES = ("last", "hourly", "daily", "weekly", "monthly", "yearly")

_BUCKET = {
    "hourly": "%Y-%m-%d %H:00",
    "daily": "%Y-%m-%d",
    "weekly": "%G-W%V",
    "monthly": "%Y-%m",
    "yearly": "%Y",
}


@dataclass(frozen=True)
class Policy:
    """A retention policy: keep the ``last`` N points and the newest point of each of the N
    most recent hours, days, ISO weeks, months and years that have points (per source, UTC;
    0 turns a rule off; a point is kept when any rule keeps it).
    """
    last: int = 0
    hourly: int = 0
    daily: int = 0
    weekly: int = 0
    monthly: int = 0
    yearly: int = 0

    @property
    def empty(self) -> bool:
        """True when no rule is set (it would keep nothing; forget refuses it)."""
        return not any(getattr(self, r) for r in RULES)

    def describe(self) -> str:
        """The policy in words, e.g. "keep-last 3, keep-daily 7" ("nothing" when empty)."""
        return ", ".join(f"keep-{r} {getattr(self, r)}" for r in RULES if getattr(self, r)) or "nothing"


@dataclass
class Decision:
    """Whether a policy keeps ``point``, and why (the rules that keep it)."""
    point: Point
    keep: bool
    reasons: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        """The decision as a dict (point id, name, start time, keep, reasons), JSON-able."""
        p = self.point
        return {"id": p.id, "name": p.name, "started": p.started,
                "keep": self.keep, "reasons": self.reasons}


def point_time(p: Point) -> datetime:
    """The time a point's buckets are taken from: its start (else its finish; else 1970), UTC."""
    return p.started_at or p.finished_at or EPOCH


def bucket(rule: str, when: datetime) -> str:
    """The period of ``rule`` that ``when`` falls in, as a label (e.g. '2026-W48')."""
    return when.astimezone(timezone.utc).strftime(_BUCKET[rule])


def select(points: list[Point], policy: Policy) -> list[Decision]:
    """Decide for the points of ONE source; returns decisions newest first."""
    ordered = newest_first(points)
    left = {r: getattr(policy, r) for r in RULES}
    last_bucket: dict[str, str | None] = {r: None for r in RULES}
    out = []
    for i, p in enumerate(ordered):
        d = Decision(p, False)
        when = point_time(p)
        if left["last"] > 0:
            left["last"] -= 1
            d.reasons.append(f"last {i + 1}")
        for rule in RULES[1:]:
            if left[rule] <= 0:
                continue
            b = bucket(rule, when)
            if b != last_bucket[rule]:
                last_bucket[rule] = b
                left[rule] -= 1
                d.reasons.append(f"{rule} {b}")
        d.keep = bool(d.reasons)
        if not d.keep:
            d.reasons.append("no keep rule matches")
        out.append(d)
    return out


def plan(points: list[Point], policy: Policy, name: str | None = None) -> list[Decision]:
    """Decisions for every point, per source (``name``); with ``name`` only that source is
    considered and other sources' points are left out of the result (kept)."""
    groups: dict[str, list[Point]] = {}
    for p in points:
        groups.setdefault(p.name, []).append(p)
    out: list[Decision] = []
    for n in sorted(groups):
        if name is not None and n != name:
            continue
        out.extend(select(groups[n], policy))
    return out
