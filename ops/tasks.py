"""Task history: every backup, restore, forget, gc, defrag, verify and repair, in the safe.

A task record (JSON, table ``tasks``) holds: ``id`` (a number, in start order), ``kind``,
``state`` (running, ok, warning, error, abandoned, or usage: refused for a usage error before
any work, with no alert; see ops/recorder.py), ``started``/``finished`` (ISO UTC),
``argv``, the process identity (pid, host, boot_id, proc_start; see procs.py), ``fields``
(what the command reported: source, name, point, bytes and counts), ``warnings`` (a list of
{path, message}, the first MAX_WARNINGS kept, ``warning_count`` counts all) and ``error``.

Commands report details of the running task with :func:`report` and :func:`add_warning`;
both do nothing when no task is being recorded, so rooms and commands can call them freely.
"""

from __future__ import annotations

from typing import Any

from .clock import iso, real_now
from .db import ensure_tables, get_json, id_key, key_id, next_id, put_json
from .procs import identity, is_dead

STATES = ("running", "ok", "warning", "error", "abandoned", "usage")
KINDS = ("backup", "restore", "forget", "gc", "defrag", "verify", "repair", "report")
MAX_WARNINGS = 1000


class ActiveTask:
    """The details the running command reports, kept in memory until the task ends."""

    def __init__(self, kind: str):
        self.kind = kind
        self.fields: dict[str, Any] = {}
        self.warnings: list[dict] = []
        self.warning_count = 0


_active: ActiveTask | None = None


def activate(kind: str) -> ActiveTask:
    """Make a new :class:`ActiveTask` of ``kind`` the running one (what :func:`report` adds to); returns it."""
    global _active
    _active = ActiveTask(kind)
    return _active


def deactivate() -> None:
    """No running task any more: :func:`report` does nothing until the next :func:`activate`."""
    global _active
    _active = None


def report(**fields: Any) -> None:
    """Add details to the running task (e.g. ``point=``, ``name=``, ``bytes_new=``, ``files=``)."""
    if _active is not None:
        _active.fields.update(fields)


def add_warning(path: str | bytes | None, message: str) -> None:
    """Note a problem the command got past (an unreadable file, a damaged record)."""
    if _active is None:
        return
    _active.warning_count += 1
    if len(_active.warnings) < MAX_WARNINGS:
        if isinstance(path, bytes):
            path = path.decode(errors="backslashreplace")
        _active.warnings.append({"path": path, "message": message})


# -- records ---------------------------------------------------------------------------------

def create(index, kind: str, argv: list[str], fields: dict | None = None) -> dict:
    """Record a new running task of this process; returns its record."""
    dbs = ensure_tables(index)
    rec = {"kind": kind, "state": "running", "started": iso(real_now()), "finished": None,
           "argv": list(argv), "fields": dict(fields or {}), "warnings": [], "warning_count": 0,
           "error": None, **identity()}
    with index.write() as t:
        rec["id"] = next_id(t, dbs["tasks"])
        put_json(t, dbs["tasks"], id_key(rec["id"]), rec)
        dbs["tasks_running"].put(t, id_key(rec["id"]), b"")
    return rec


def finish(index, task_id: int, state: str, *, error: str | None = None, fields: dict | None = None,
           warnings: list[dict] | None = None, warning_count: int = 0, exit_code: int | None = None) -> dict | None:
    """End a task: set its state, end time, reported fields, warnings and error."""
    assert state in STATES
    dbs = ensure_tables(index)
    with index.write() as t:
        rec = get_json(t, dbs["tasks"], id_key(task_id))
        if rec is None:
            return None
        rec["state"] = state
        rec["finished"] = iso(real_now())
        rec["fields"].update(fields or {})
        rec["warnings"] = (warnings or [])[:MAX_WARNINGS]
        rec["warning_count"] = max(warning_count, len(rec["warnings"]))
        rec["error"] = error
        rec["exit_code"] = exit_code
        put_json(t, dbs["tasks"], id_key(task_id), rec)
        dbs["tasks_running"].delete(t, id_key(task_id))
    return rec


def sweep_abandoned(index) -> list[dict]:
    """Mark abandoned the running tasks whose process is gone; returns them."""
    dbs = ensure_tables(index)
    with index.read() as t:
        running = [key_id(k) for k in dbs["tasks_running"].keys(t)]
        recs = [get_json(t, dbs["tasks"], id_key(i)) for i in running]
    dead = [r for r in recs if r is not None and r["state"] == "running" and is_dead(r)]
    if not dead:
        return []
    out = []
    with index.write() as t:
        for r in dead:
            cur = get_json(t, dbs["tasks"], id_key(r["id"]))
            if cur is None or cur["state"] != "running":
                continue
            cur["state"] = "abandoned"
            cur["error"] = (f"the process (pid {cur['pid']} on {cur['host']}) ended without finishing "
                            "the task: killed, crashed or the machine stopped")
            put_json(t, dbs["tasks"], id_key(cur["id"]), cur)
            dbs["tasks_running"].delete(t, id_key(cur["id"]))
            out.append(cur)
    return out


def get(index, task_id: int) -> dict | None:
    """Task ``task_id``'s record, or None when there is no such task."""
    dbs = ensure_tables(index)
    with index.read() as t:
        return get_json(t, dbs["tasks"], id_key(task_id))


def list_tasks(index, state: str | None = None, since: str | None = None, kind: str | None = None) -> list[dict]:
    """Tasks, oldest first, filtered by state, kind and start time (ISO UTC, inclusive)."""
    import json
    dbs = ensure_tables(index)
    out = []
    with index.read() as t:
        for _, v in dbs["tasks"].items(t):
            r = json.loads(v)
            if state and r["state"] != state:
                continue
            if kind and r["kind"] != kind:
                continue
            if since and r["started"] < since:
                continue
            out.append(r)
    return out


def newest_of_kinds(index, kinds: tuple[str, ...]) -> dict[str, dict | None]:
    """The newest task of each of ``kinds`` (None for a kind never run), reading the history
    backwards from the newest task and stopping once every kind is found (the dashboard's
    "last verify, last gc" without a pass over 100,000 tasks)."""
    import json
    dbs = ensure_tables(index)
    out: dict[str, dict | None] = dict.fromkeys(kinds)
    with index.read() as t:
        cur = t.cursor(db=dbs["tasks"])
        if not cur.last():
            return out
        for _, v in cur.iterprev():
            r = json.loads(v)     # decoded as list_tasks decodes them
            if r["kind"] in out and out[r["kind"]] is None:
                out[r["kind"]] = r
                if all(x is not None for x in out.values()):
                    break
    return out
