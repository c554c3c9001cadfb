"""The status page: everything a person needs at a glance, as one dict (``status --json``).

Keys: ``now``, ``ok`` (no open alerts), ``safe`` (path, sizes, ratios, reclaimable bytes,
fragmentation), ``space`` (the filesystem against the quotas), ``sources`` (per point name:
newest point and its age, expected interval, last backup task) and ``alerts`` (open ones).

Ratios, defined so that they can be checked by hand:

- ``dedup_ratio`` = logical bytes (the sum of every point's size: what restoring every point
  would write) / unique bytes (raw size of the live data chunks). Holes count as logical bytes.
- ``compression_ratio`` = raw bytes of live objects / their stored (compressed) bytes.
- ``reclaimable_bytes`` = dead record bytes in packs (what gc can give back).
- ``orphans`` = objects at count 0 not yet dead (a running or killed backup's): gc buries
  them, and then their bytes are reclaimable too.

They come from the totals that cas keeps up to date with every commit (cas/counters.py), so
``status`` costs the same at 5 million objects as at 5: monitoring runs it every minute.
"""

from __future__ import annotations

from pathlib import Path

from pointsafe.cas import Point
from . import alerts, config, quota, tasks
from .clock import iso, now, parse_iso


def _fragmentation(safe):
    """The last measured fragmentation figure (never measured here: status stays O(1))."""
    try:
        from pointsafe.gc.fragmentation import last_fragmentation
    except ImportError:
        return None
    try:
        return last_fragmentation(safe)
    except Exception as e:  # the status page must show even if this measure fails
        return {"error": str(e)}


def _file_bytes(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def point_size(p: Point) -> int:
    """Logical bytes of a point: a volume's image size, a tree's total file bytes."""
    return int(p.size or p.stats.get("size") or 0)


def safe_summary(safe, points: list[Point] | None = None) -> dict:
    """Sizes and ratios of the safe, from the totals cas keeps (cas/counters.py): O(points),
    never a scan of the objects. ``points``: the safe's points, when already read."""
    c = safe.counters()
    points = safe.points() if points is None else points
    logical = sum(point_size(p) for p in points)
    index_bytes = _file_bytes(safe.index.path / "data.mdb")
    return {
        "path": str(safe.path), "points": len(points), "packs": c.packs,
        "size_on_disk": c.pack_bytes + index_bytes, "pack_bytes": c.pack_bytes, "index_bytes": index_bytes,
        "logical_bytes": logical, "unique_bytes": c.chunk_raw_bytes, "raw_bytes": c.raw_bytes,
        "stored_bytes": c.stored_bytes,
        "dedup_ratio": round(logical / c.chunk_raw_bytes, 3) if c.chunk_raw_bytes else None,
        "compression_ratio": round(c.raw_bytes / c.stored_bytes, 3) if c.stored_bytes else None,
        "live_bytes": c.live_bytes,
        "reclaimable_bytes": c.dead_bytes,
        "orphans": _orphans(safe, c.objects),
        "fragmentation": _fragmentation(safe),
    }


def _orphans(safe, live_objects: int) -> int:
    """Objects at count 0 that are not dead (a running or killed backup's, which gc buries;
    their bytes are not in ``reclaimable_bytes``), from the O(1) table sizes: the ``zero``
    table holds them and the dead ones, and the dead are the objects the totals leave out."""
    try:
        with safe.index.read() as t:
            objects = t.stat(safe.index.db["objects"])["entries"]
            zero = t.stat(safe.index.db["zero"])["entries"]
    except KeyError:      # a read-only index without the table: none
        return 0
    return max(0, zero - (objects - live_objects))


def space_summary(safe_dir, settings: dict[str, str]) -> dict:
    """The safe's filesystem space, the quota settings, the free bytes they ask for, and the
    quota state (ok, soft or hard)."""
    sp = quota.space(safe_dir)
    return {"total": sp.total, "free": sp.free, "free_pct": round(sp.free_pct, 2),
            "quota_soft": settings["quota.soft"], "quota_hard": settings["quota.hard"],
            "soft_free_bytes": quota.limit_bytes(settings["quota.soft"], sp.total),
            "hard_free_bytes": quota.limit_bytes(settings["quota.hard"], sp.total),
            "state": quota.state(sp, settings)}


def sources_summary(safe, settings: dict[str, str], points: list[Point] | None = None) -> list[dict]:
    """Per source name: its points, newest point, interval, staleness and last backup task.

    A name is listed when it has a point or a backup task that really ran (any state but
    ``usage``), so a failing new source shows while a mistyped one does not. Each source's
    last backup is one lookup in the task index, not a pass over the history.
    """
    idx = safe.index
    t_now = now()
    by_name: dict[str, dict] = {}
    # Oldest first (the one order): a name's last point seen is its newest.
    for p in (safe.points() if points is None else points):
        name = p.name or p.source or "?"
        s = by_name.setdefault(name, {"name": name, "points": 0, "source": p.source,
                                      "kind": p.kind, "last_point": None})
        s["points"] += 1
        s["last_point"] = {"id": p.id, "finished": p.taken, "warnings": len(p.warnings)}
        s["source"] = p.source
    # A backup refused for a usage error (a mistyped source or name) is no source's task.
    for n, source in tasks.backup_names(idx).items():
        if n not in by_name:
            by_name[n] = {"name": n, "points": 0, "source": source, "kind": None, "last_point": None}
    out = []
    for name, s in sorted(by_name.items()):
        lp = s["last_point"]
        if lp:
            lp["age_seconds"] = round((t_now - parse_iso(lp["finished"])).total_seconds(), 1)
        interval = config.interval_for(settings, name)
        s["interval_seconds"] = interval
        s["stale"] = bool(interval is not None and lp and lp["age_seconds"] > interval)
        last = tasks.last_backup(idx, name, s["source"])
        s["last_task"] = ({"id": last["id"], "state": last["state"], "started": last["started"],
                           "finished": last["finished"], "error": last["error"]} if last else None)
        out.append(s)
    return out


def build(safe, evaluate: bool = True, points: list[Point] | None = None) -> dict:
    """The status page of an open safe. With ``evaluate``, standing conditions raise alerts
    first. ``points``: the safe's points (``safe.points()``) when the caller has read them;
    they are read once either way."""
    idx = safe.index
    notes = []
    points = safe.points() if points is None else points
    if evaluate:
        try:
            alerts.sweep_abandoned(idx)
            alerts.evaluate(idx, safe.path, points)
        except Exception as e:   # e.g. a full disk: show what we can
            notes.append(f"could not update the alerts: {e}")
    settings = config.effective(config.load(idx))
    open_alerts = alerts.list_alerts(idx)
    last_tasks = tasks.list_tasks(idx, last=5)
    return {
        "now": iso(now()),
        "ok": not open_alerts,
        "safe": safe_summary(safe, points),
        "space": space_summary(safe.path, settings),
        "sources": sources_summary(safe, settings, points),
        "alerts": open_alerts,
        "recent_tasks": [{k: t[k] for k in ("id", "kind", "state", "started", "finished", "error")}
                         for t in last_tasks],
        "notes": notes,
    }
