"""The status page: everything a person needs at a glance, as one dict (``status --json``).

Keys: ``now``, ``ok`` (no open alerts), ``safe`` (path, sizes, ratios, reclaimable bytes,
fragmentation), ``space`` (the filesystem against the quotas), ``sources`` (per point name:
newest point and its age, expected interval, last backup task) and ``alerts`` (open ones).

Ratios, defined so that they can be checked by hand:

- ``dedup_ratio`` = logical bytes (the sum of every point's size: what restoring every point
  would write) / unique bytes (raw size of the live data chunks). Holes count as logical bytes.
- ``compression_ratio`` = raw bytes of live objects / their stored (compressed) bytes.
- ``reclaimable_bytes`` = dead record bytes in packs (what gc can give back).

Computing them reads every object entry once (a cursor over the index; millions per second).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from pointsafe.cas import Point
from pointsafe.cas.index import ObjectEntry
from pointsafe.cas.keys import Kind

from . import alerts, config, quota, tasks
from .clock import iso, now, parse_iso


def _fragmentation(safe):
    try:
        from pointsafe.gc.fragmentation import fragmentation
    except ImportError:
        return None
    except Exception as e:  # gc's module is there but broken: say so, show the rest
        return {"error": f"cannot load pointsafe.gc.fragmentation: {e}"}
    try:
        v = fragmentation(safe)
    except Exception as e:  # the status page must show even if this measure fails
        return {"error": str(e)}
    if hasattr(v, "as_dict"):
        v = v.as_dict()
    try:
        json.dumps(v)
    except TypeError:
        v = str(v)
    return v


def _dir_bytes(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.stat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total


def point_size(p: Point) -> int:
    """Logical bytes of a point: a volume's image size, a tree's total file bytes."""
    return int(p.size or p.stats.get("size") or 0)


def safe_summary(safe) -> dict:
    idx = safe.index
    raw = stored = unique = 0
    with idx.read() as t:
        for _, v in t.cursor(db=idx.db["objects"]):
            e = ObjectEntry.decode(v)
            if e.dead:
                continue
            raw += e.raw_len
            stored += e.stored_len
            if e.kind == Kind.CHUNK:
                unique += e.raw_len
    points = safe.points()
    logical = sum(point_size(p) for p in points)
    packs = safe.pack_entries()
    pack_bytes = _dir_bytes(safe.packs_dir)
    index_bytes = _dir_bytes(safe.index.path)
    return {
        "path": str(safe.path), "points": len(points), "packs": len(packs),
        "size_on_disk": pack_bytes + index_bytes, "pack_bytes": pack_bytes, "index_bytes": index_bytes,
        "logical_bytes": logical, "unique_bytes": unique, "raw_bytes": raw, "stored_bytes": stored,
        "dedup_ratio": round(logical / unique, 3) if unique else None,
        "compression_ratio": round(raw / stored, 3) if stored else None,
        "live_bytes": sum(p.live_bytes for p in packs.values()),
        "reclaimable_bytes": sum(p.dead_bytes for p in packs.values()),
        "fragmentation": _fragmentation(safe),
    }


def space_summary(safe_dir, settings: dict[str, str]) -> dict:
    sp = quota.space(safe_dir)
    return {"total": sp.total, "free": sp.free, "free_pct": round(sp.free_pct, 2),
            "quota_soft": settings["quota.soft"], "quota_hard": settings["quota.hard"],
            "soft_free_bytes": quota.limit_bytes(settings["quota.soft"], sp.total),
            "hard_free_bytes": quota.limit_bytes(settings["quota.hard"], sp.total),
            "state": quota.state(sp, settings)}


def sources_summary(safe, settings: dict[str, str]) -> list[dict]:
    idx = safe.index
    t_now = now()
    by_name: dict[str, dict] = {}
    for p in safe.points():     # oldest first (the one order): a name's last point seen is its newest
        name = p.name or p.source or "?"
        s = by_name.setdefault(name, {"name": name, "points": 0, "source": p.source,
                                      "kind": p.kind, "last_point": None})
        s["points"] += 1
        s["last_point"] = {"id": p.id, "finished": p.taken, "warnings": len(p.warnings)}
        s["source"] = p.source
    backups = tasks.list_tasks(idx, kind="backup")
    for t in backups:
        n = t["fields"].get("name")
        if n and n not in by_name:
            by_name[n] = {"name": n, "points": 0, "source": t["fields"].get("source"), "kind": None,
                          "last_point": None}
    out = []
    for name, s in sorted(by_name.items()):
        lp = s["last_point"]
        if lp:
            lp["age_seconds"] = round((t_now - parse_iso(lp["finished"])).total_seconds(), 1)
        interval = config.interval_for(settings, name)
        s["interval_seconds"] = interval
        s["stale"] = bool(interval is not None and lp and lp["age_seconds"] > interval)
        last = None
        for t in backups:
            f = t["fields"]
            if f.get("name") == name or (not f.get("name") and s["source"] and f.get("source") == s["source"]):
                last = t
        s["last_task"] = ({"id": last["id"], "state": last["state"], "started": last["started"],
                           "finished": last["finished"], "error": last["error"]} if last else None)
        out.append(s)
    return out


def build(safe, evaluate: bool = True) -> dict:
    """The status page of an open safe. With ``evaluate``, standing conditions raise alerts first."""
    idx = safe.index
    notes = []
    if evaluate:
        try:
            alerts.sweep_abandoned(idx)
            alerts.evaluate(idx, safe.path)
        except Exception as e:   # e.g. a full disk: show what we can
            notes.append(f"could not update the alerts: {e}")
    settings = config.effective(config.load(idx))
    open_alerts = alerts.list_alerts(idx)
    last_tasks = tasks.list_tasks(idx)[-5:]
    return {
        "now": iso(now()),
        "ok": not open_alerts,
        "safe": safe_summary(safe),
        "space": space_summary(safe.path, settings),
        "sources": sources_summary(safe, settings),
        "alerts": open_alerts,
        "recent_tasks": [{k: t[k] for k in ("id", "kind", "state", "started", "finished", "error")}
                         for t in last_tasks],
        "notes": notes,
    }
