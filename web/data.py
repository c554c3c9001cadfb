"""The facts behind the pages, from the rooms that own them (ops, cas, ingest).

Nothing here recomputes what ops decides: the dashboard is ``ops.status.build`` (the dict
``pointsafe status --json`` prints), tasks are ``ops.tasks`` (its indexed queries), alerts
``ops.alerts``. What the dashboard adds (chart series, the space trend, verify and gc
recency) comes from the points' own statistics and the task history.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from pointsafe.cas import Entry, Point, Safe
from pointsafe.ingest.browse import entry_json
from pointsafe.ops import tasks
from pointsafe.ops.clock import human_duration, now, parse_iso
from pointsafe.ops.quota import human_bytes
from pointsafe.ops.status import point_size

CHART_POINTS = 200       # the newest points a chart shows
TREND_DAYS = 7           # the free-space trend looks at the points of the last week


def _secs(text: str | None) -> float | None:
    if not text:
        return None
    try:
        return parse_iso(text).timestamp()
    except (ValueError, TypeError):
        return None


def point_row(p: Point) -> dict[str, Any]:
    """A point's line on the pages: id, name, kind, times, duration, sizes, warnings."""
    st = p.stats
    start, end = _secs(p.started), _secs(p.finished)
    return {"id": p.id, "name": p.name, "kind": p.kind, "source": p.source, "started": p.started,
            "finished": p.finished, "duration": (end - start) if start is not None and end is not None else None,
            "size": point_size(p), "bytes_new": int(st.get("bytes_new", 0) or 0),
            "bytes_stored": int(st.get("bytes_stored", 0) or 0), "files": st.get("files"),
            "warnings": len(p.warnings), "agent": p.extra.get("agent")}


def chart_series(points: list[Point]) -> dict[str, Any]:
    """Per point (oldest first, the newest CHART_POINTS): time, the safe's growth (the sum of
    the bytes each point stored, gc not subtracted), bytes new and duration of the backup."""
    total = 0
    rows = []
    for p in points:
        r = point_row(p)
        total += r["bytes_stored"]
        t = _secs(p.taken)
        if t is not None:
            rows.append((t, total, r["bytes_new"], r["duration"] or 0.0))
    rows = rows[-CHART_POINTS:]
    return {"t": [r[0] for r in rows], "stored_total": [r[1] for r in rows],
            "bytes_new": [r[2] for r in rows], "duration": [r[3] for r in rows]}


def space_trend(points: list[Point], space: dict[str, Any]) -> dict[str, Any]:
    """How fast the safe grows (bytes stored by the points of the last TREND_DAYS days, per
    day) and, at that rate, the days until the free space reaches the hard quota."""
    since = (now() - timedelta(days=TREND_DAYS)).timestamp()
    recent = [(t, int(p.stats.get("bytes_stored", 0) or 0)) for p in points
              if (t := _secs(p.taken)) is not None and t >= since]
    if len(recent) < 2:
        return {"days": TREND_DAYS, "bytes_per_day": None, "days_left": None}
    span = max(recent[-1][0] - recent[0][0], 3600.0) / 86400
    per_day = sum(b for _, b in recent[1:]) / span
    floor = space.get("hard_free_bytes") or 0
    room = max(0.0, space["free"] - floor)
    return {"days": TREND_DAYS, "bytes_per_day": round(per_day),
            "days_left": round(room / per_day, 1) if per_day > 0 else None}


def recency(index) -> dict[str, Any]:
    """The last verify and gc task (id, state, started, finished, age in seconds), or None
    each; read backwards from the newest task until both are found."""
    last = tasks.newest_of_kinds(index, ("verify", "gc"))
    out: dict[str, Any] = {}
    t_now = now()
    for kind, rec in last.items():
        if rec is None:
            out[kind] = None
            continue
        when = rec["finished"] or rec["started"]
        out[kind] = {"id": rec["id"], "state": rec["state"], "started": rec["started"], "finished": rec["finished"],
                     "age_seconds": round((t_now - parse_iso(when)).total_seconds(), 1)}
    return out


def filter_tasks(index, state: str | None, kind: str | None, source: str | None) -> list[dict]:
    """Tasks oldest first (as ``pointsafe tasks --json``), by state and kind, and by source:
    a task whose reported name or source is ``source``. Read through the task index: it
    costs the tasks returned."""
    if not (state or kind or source):
        return tasks.list_tasks(index)
    return list(reversed(tasks.page(index, state=state, kind=kind, source=source, limit=tasks.MAX_ID)))


def task_duration(t: dict) -> float | None:
    """Seconds a finished task took (None while running or when its times are unreadable)."""
    a, b = _secs(t.get("started")), _secs(t.get("finished"))
    return b - a if a is not None and b is not None else None


def task_lines(t: dict) -> list[str]:
    """A task's record as the lines ``pointsafe tasks show`` prints (without the warnings)."""
    took = task_duration(t)
    lines = [f"task {t['id']}: {t['kind']}, {t['state']}",
             f"  command   pointsafe {' '.join(t.get('argv') or [])}",
             f"  process   pid {t.get('pid')} on {t.get('host')}",
             f"  started   {t['started']}",
             f"  finished  {t['finished'] or '-'}" + (f" (took {human_duration(took)})" if took is not None else "")]
    if t.get("exit_code") is not None:
        lines.append(f"  exit code {t['exit_code']}")
    for k, v in sorted(t["fields"].items()):
        if isinstance(v, int) and not isinstance(v, bool) and k.startswith("bytes"):
            v = f"{v} ({human_bytes(v)})"
        lines.append(f"  {k:<9} {v}")
    if t.get("error"):
        lines.append(f"  error     {t['error']}")
    if t.get("warning_count"):
        lines.append(f"  warnings  {t['warning_count']}")
    return lines


def task_sources(index) -> list[str]:
    """The source names the tasks report, sorted (the choices of the source filter)."""
    return tasks.task_names(index)


def change_json(change: str, path: bytes, old: Entry | None, new: Entry | None) -> dict[str, Any]:
    """One change of a diff as ``pointsafe diff --json`` prints it (the new entry, or the old
    one for a removal)."""
    e = new if new is not None else old
    assert e is not None, "a change has an old or a new entry"
    return {"change": change, **entry_json(path, e)}


def points_by_source(safe: Safe) -> dict[str, list[Point]]:
    """The safe's points per name, each list newest first, names sorted."""
    out: dict[str, list[Point]] = {}
    for p in reversed(safe.points()):
        out.setdefault(p.name or p.source or "?", []).append(p)
    return dict(sorted(out.items()))


def agent_rows(safe: Safe) -> list[dict[str, Any]]:
    """Each agent of ``pointsafe serve`` (by name) as ``agent list --json`` shows it -- its
    sources and rights, last contact, its points (count and newest), bytes stored and quotas --
    and ``quota_state`` (``ok``, ``soft``, ``hard``)."""
    from pointsafe.server import agents
    return [{**a, "quota_state": _quota_state(a["stored_bytes"], a["quota_soft"], a["quota_hard"])}
            for a in agents.listing(safe)]


def _quota_state(stored: int, soft: int | None, hard: int | None) -> str:
    """``hard`` at or beyond the hard quota, ``soft`` beyond the soft one, else ``ok``."""
    if hard is not None and stored >= hard:
        return "hard"
    if soft is not None and stored > soft:
        return "soft"
    return "ok"
