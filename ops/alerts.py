"""Alerts: problems that stay visible until a person acknowledges them.

An alert record (JSON, table ``alerts``): ``id``, ``kind`` (task, verify, stale, quota),
``severity`` (warning or critical), ``message`` (one line a person understands), ``raised``
(ISO UTC), ``key`` (the condition it is about, or null), ``task`` (a task id, or null),
``source`` (a point name, or null), ``acked`` (ISO UTC or null).

Conditions that persist (a stale source, a full disk) are *latched*: once alerted, they are not
raised again until they have been seen clear, so an acknowledged condition stays quiet while it
lasts and comes back if it recurs.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from pointsafe.cas import Point, latest_per

from .clock import human_duration, iso, now, parse_iso, real_now
from .config import effective, interval_for, load
from .db import ensure_tables, get_json, id_key, key_id, next_id, put_json, read_points
from . import quota
from .logs import event

SEVERITIES = ("warning", "critical")


def raise_alert(index, kind: str, severity: str, message: str, *, key: str | None = None,
                task: int | None = None, source: str | None = None) -> dict | None:
    """Record an alert; with a ``key``, only when that condition is not alerted on already."""
    dbs = ensure_tables(index)
    with index.write() as t:
        latches = dbs["alert_latches"]
        if key is not None and latches.get(t, latches.row(key)) is not None:
            return None
        aid = next_id(t, dbs["alerts"])
        rec = {"id": aid, "kind": kind, "severity": severity, "message": message,
               "raised": iso(real_now()), "key": key, "task": task, "source": source, "acked": None}
        put_json(t, dbs["alerts"], id_key(aid), rec)
        if key is not None:
            latches.put(t, latches.row(key), id_key(aid))
    event(logging.ERROR if severity == "critical" else logging.WARNING,
          f"alert #{rec['id']} ({severity}): {message}", alert=rec["id"], alert_kind=kind, severity=severity,
          task=task, source=source)
    return rec


def clear(index, key: str) -> None:
    """The condition ``key`` is no longer true: a recurrence will raise a new alert."""
    latches = ensure_tables(index)["alert_latches"]
    row = latches.row(key)
    with index.read() as t:
        if latches.get(t, row) is None:
            return
    with index.write() as t:
        latches.delete(t, row)


def list_alerts(index, include_acked: bool = False) -> list[dict]:
    """Alerts, oldest first: the open ones, or every one with ``include_acked``."""
    dbs = ensure_tables(index)
    with index.read() as t:
        out = [json.loads(v) for _, v in dbs["alerts"].items(t)]
    return out if include_acked else [a for a in out if not a["acked"]]


def get(index, alert_id: int) -> dict | None:
    """Alert ``alert_id``'s record, or None when there is no such alert."""
    dbs = ensure_tables(index)
    with index.read() as t:
        return get_json(t, dbs["alerts"], id_key(alert_id))


def ack(index, ids: list[int] | None) -> list[dict]:
    """Acknowledge the alerts ``ids`` (None: every open one); returns those newly acknowledged."""
    dbs = ensure_tables(index)
    done = []
    stamp = iso(real_now())
    with index.write() as t:
        if ids is None:
            ids = [key_id(k) for k, v in dbs["alerts"].items(t) if not json.loads(v)["acked"]]
        for i in ids:
            rec = get_json(t, dbs["alerts"], id_key(i))
            if rec is None or rec["acked"]:
                continue
            rec["acked"] = stamp
            put_json(t, dbs["alerts"], id_key(i), rec)
            done.append(rec)
    return done


# -- conditions ------------------------------------------------------------------------------

def sweep_abandoned(index) -> list[dict]:
    """Mark abandoned the tasks whose process died and raise an alert for each."""
    from .tasks import sweep_abandoned as sweep
    out = sweep(index)
    for t in out:
        msg = f"{t['kind']} task {t['id']} (started {t['started']}) was abandoned: {t['error']}"
        msg += _mysql_settings_note(t)
        raise_alert(index, "task", "critical", msg, task=t["id"], source=t["fields"].get("name"))
    return out


def _mysql_settings_note(task: dict) -> str:
    """For an abandoned ``backup --mysql`` read live: whether MariaDB settings it changed may
    still be changed (its guardian died too) or were put back (ingest/db/guardian.py)."""
    argv = task.get("argv") or []
    if task.get("kind") != "backup" or not any(str(a).startswith("--mysql") for a in argv):
        return ""
    from pointsafe.ingest.db.guardian import left_behind
    pid = task.get("pid")
    left = [s for s in left_behind() if s.get("pid") == pid]
    if not left:
        return "; no MariaDB setting it may have changed is left changed"
    names = sorted({n for s in left for n in (s.get("applied") or {})})
    return (f"; MariaDB settings it changed may still be changed ({', '.join(names)}): the next "
            "'pointsafe backup --mysql' of that server puts them back")


def source_points(index) -> dict[str, Point]:
    """The newest point of each source (by point name, the one order), read straight from the index."""
    with index.read() as t:
        points = read_points(index, t)
    return latest_per(points, lambda p: p.name or p.source or "?")


def stale_sources(index, settings: dict[str, str], latest: dict[str, Point] | None = None) -> list[dict]:
    """Sources whose newest point is older than their expected interval (at clock.now());
    ``latest``: :func:`source_points`, when already read."""
    out = []
    t_now = now()
    for name, p in sorted((source_points(index) if latest is None else latest).items()):
        limit = interval_for(settings, name)
        when = p.taken
        if limit is None or not when:
            continue
        age = (t_now - parse_iso(when)).total_seconds()
        if age > limit:
            out.append({"name": name, "point": p.id, "finished": when, "age": age, "interval": limit})
    return out


def evaluate(index, safe_dir: str | Path, points: list[Point] | None = None) -> list[dict]:
    """Check the standing conditions (stale sources, quotas); returns the alerts newly raised.
    ``points``: every point of the safe, when the caller has read them (else read here, once)."""
    settings = effective(load(index))
    raised = []
    latest = source_points(index) if points is None else latest_per(points, lambda p: p.name or p.source or "?")
    stale = {s["name"]: s for s in stale_sources(index, settings, latest)}
    for name in latest:
        key = f"stale:{name}"
        s = stale.get(name)
        if s is None:
            clear(index, key)
            continue
        a = raise_alert(index, "stale", "critical",
                        f"source {name!r} has no new point for {human_duration(s['age'])} (expected every "
                        f"{human_duration(s['interval'])}); its newest point {s['point'][:12]} finished {s['finished']}",
                        key=key, source=name)
        if a:
            raised.append(a)
    sp = quota.space(safe_dir)
    st = quota.state(sp, settings)
    for which, severity in (("soft", "warning"), ("hard", "critical")):
        key = f"quota:{which}"
        # below the hard quota is below the soft one too, when there is a soft one
        breached = (st == "hard" and (which == "hard" or quota.limit_bytes(settings["quota.soft"], sp.total) is not None)
                    ) or (st == "soft" and which == "soft")
        if not breached:
            clear(index, key)
            continue
        a = raise_alert(index, "quota", severity, quota.describe(sp, settings, which), key=key)
        if a:
            raised.append(a)
    return raised


def agent_quota(index, agent_id: str, which: str | None, message: str = "") -> dict | None:
    """The alerts of an agent's quota of bytes stored (docs/SERVER.md), latched per agent id:
    ``which`` "soft" raises the warning (and clears the hard one: the upload was stored),
    "hard" the critical alert (an upload was refused), None clears both. Returns the alert
    newly raised, if any."""
    keys = {w: f"agent-quota:{agent_id}:{w}" for w in ("soft", "hard")}
    for w, key in keys.items():
        if w != which and not (which == "hard" and w == "soft"):
            clear(index, key)
    if which is None:
        return None
    severity = "warning" if which == "soft" else "critical"
    return raise_alert(index, "quota", severity, message, key=keys[which])
