"""Task history: every backup, restore, forget, gc, defrag, verify and repair, in the safe.

A task record (JSON, table ``tasks``) holds: ``id`` (a number, in start order), ``kind``,
``state`` (running, ok, warning, error, abandoned, or usage: refused for a usage error before
any work, with no alert; see ops/recorder.py), ``started``/``finished`` (ISO UTC),
``argv``, the process identity (pid, host, boot_id, proc_start; see procs.py), ``fields``
(what the command reported: source, name, point, bytes and counts), ``warnings`` (a list of
{path, message}, the first MAX_WARNINGS kept, ``warning_count`` counts all) and ``error``.

Commands report details of the running task with :func:`report` and :func:`add_warning`;
both do nothing when no task is being recorded, so rooms and commands can call them freely.

Queries cost what they return, not the history: every record is also indexed by facet
(kind, state, the name or source it reported, and their pairs; see "the index" below), kept in
the same write transaction as the record. :func:`page` gives a page of tasks newest first
below an id, :func:`count` the size of a facet, :func:`last_backup` and
:func:`backup_names` what ``status`` shows per source. A safe made before the index gets it
built from its whole history once, by the first writer or reader that may write; a read-only
safe without it is scanned (the same answers, at the old cost).
"""

from __future__ import annotations

import hashlib
import heapq
import json
import struct
from typing import Any, Iterator

import lmdb

from pointsafe.cas import SafeError

from .clock import iso, real_now
from .db import ensure_tables, get_json, id_key, index_tables, key_id, next_id, put_json
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
    tabs = _made_tables(index)
    rec = {"kind": kind, "state": "running", "started": iso(real_now()), "finished": None,
           "argv": list(argv), "fields": dict(fields or {}), "warnings": [], "warning_count": 0,
           "error": None, **identity()}
    with index.write() as t:
        rec["id"] = next_id(t, dbs["tasks"])
        put_json(t, dbs["tasks"], id_key(rec["id"]), rec)
        dbs["tasks_running"].put(t, id_key(rec["id"]), b"")
        _maintain(t, dbs, tabs, None, rec)
    return rec


def finish(index, task_id: int, state: str, *, error: str | None = None, fields: dict | None = None,
           warnings: list[dict] | None = None, warning_count: int = 0, exit_code: int | None = None) -> dict | None:
    """End a task: set its state, end time, reported fields, warnings and error."""
    assert state in STATES
    dbs = ensure_tables(index)
    tabs = _made_tables(index)
    with index.write() as t:
        rec = get_json(t, dbs["tasks"], id_key(task_id))
        if rec is None:
            return None
        old = json.loads(json.dumps(rec))
        rec["state"] = state
        rec["finished"] = iso(real_now())
        rec["fields"].update(fields or {})
        rec["warnings"] = (warnings or [])[:MAX_WARNINGS]
        rec["warning_count"] = max(warning_count, len(rec["warnings"]))
        rec["error"] = error
        rec["exit_code"] = exit_code
        put_json(t, dbs["tasks"], id_key(task_id), rec)
        dbs["tasks_running"].delete(t, id_key(task_id))
        _maintain(t, dbs, tabs, old, rec)
    return rec


def record_finished(index, done: list[dict]) -> list[dict]:
    """Record tasks that are already over, many in one write transaction (a server's requests:
    one short transaction for a batch of them instead of two each). Each of ``done`` holds
    ``kind``, ``argv``, ``started``, ``finished``, ``state`` and optionally ``fields`` and
    ``error``; returns the records as stored (with their ``id``)."""
    dbs = ensure_tables(index)
    tabs = _made_tables(index)
    out = []
    me = identity()
    with index.write() as t:
        n = next_id(t, dbs["tasks"])
        for d in done:
            assert d["state"] in STATES
            rec = {"kind": d["kind"], "state": d["state"], "started": d["started"], "finished": d["finished"],
                   "argv": list(d["argv"]), "fields": dict(d.get("fields") or {}), "warnings": [],
                   "warning_count": 0, "error": d.get("error"), "exit_code": None, **me, "id": n}
            put_json(t, dbs["tasks"], id_key(n), rec)
            _maintain(t, dbs, tabs, None, rec)
            out.append(rec)
            n += 1
    return out


def sweep_abandoned(index) -> list[dict]:
    """Mark abandoned the running tasks whose process is gone; returns them."""
    dbs = ensure_tables(index)
    with index.read() as t:
        running = [key_id(k) for k in dbs["tasks_running"].keys(t)]
        recs = [get_json(t, dbs["tasks"], id_key(i)) for i in running]
    dead = [r for r in recs if r is not None and r["state"] == "running" and is_dead(r)]
    if not dead:
        return []
    tabs = _made_tables(index)
    out = []
    with index.write() as t:
        for r in dead:
            cur = get_json(t, dbs["tasks"], id_key(r["id"]))
            if cur is None or cur["state"] != "running":
                continue
            old = dict(cur)
            cur["state"] = "abandoned"
            cur["error"] = (f"the process (pid {cur['pid']} on {cur['host']}) ended without finishing "
                            "the task: killed, crashed or the machine stopped")
            put_json(t, dbs["tasks"], id_key(cur["id"]), cur)
            dbs["tasks_running"].delete(t, id_key(cur["id"]))
            _maintain(t, dbs, tabs, old, cur)
            out.append(cur)
    return out


def get(index, task_id: int) -> dict | None:
    """Task ``task_id``'s record, or None when there is no such task."""
    dbs = ensure_tables(index)
    with index.read() as t:
        return get_json(t, dbs["tasks"], id_key(task_id))


# -- the index: tasks per facet --------------------------------------------------------------
#
# A facet is a string naming a set of tasks: ``kind=K``, ``state=S``, ``kind=K&state=S``,
# ``src=X`` (the task's reported name or source is X: the web's source filter),
# ``kind=K&src=X`` and ``kind=K&name=N``. Each facet has a number n (its row in
# ``task_facets``: {facet, n, count}); ``task_index`` holds a key n + task id per task in it, so
# the tasks of a facet read newest first are a cursor walk backwards over one key range.
# create/finish/sweep_abandoned keep it in the same write transaction as the record. A safe
# made before the index has no ``\x00meta`` row: the first writer (or a reader of a writable
# safe) builds it from the whole history once; a read-only one is scanned instead.

META = b"\x00meta"
INDEX_VERSION = 1
FACET = struct.Struct(">I")
ENTRY = struct.Struct(">IQ")
MAX_ID = (1 << 64) - 1
MAX_KEY = 400        # a longer facet (a very long source path) is keyed by its hash (LMDB keys <= 511 bytes)


def facets_of(rec: dict) -> set[str]:
    """The facets task ``rec`` is in (see above)."""
    k, s = rec["kind"], rec["state"]
    out = {f"kind={k}", f"state={s}", f"kind={k}&state={s}"}
    f = rec.get("fields") or {}
    for x in {v for v in (f.get("name"), f.get("source")) if isinstance(v, str) and v}:
        out |= {f"src={x}", f"kind={k}&src={x}"}
    n = f.get("name")
    if isinstance(n, str) and n:
        out.add(f"kind={k}&name={n}")
    return out


def _lmdb(table: Any) -> Any:
    """The LMDB database of an ops table (its ``db`` once ops/db.py wraps tables to seal values)."""
    return getattr(table, "db", table)


def _records(t: Any, table: Any) -> Iterator[dict]:
    """Every task record of ``table``, in id order, decoded as :func:`get_json` decodes one."""
    for k in t.cursor(db=_lmdb(table)).iternext(keys=True, values=False):
        rec = get_json(t, table, bytes(k))
        if rec is not None:
            yield rec


def _keys(t: Any, table: Any) -> list[bytes]:
    """Every row key of ``table`` (no value read)."""
    return [bytes(k) for k in t.cursor(db=_lmdb(table)).iternext(keys=True, values=False)]


def _made_tables(index) -> dict:
    """The index tables, made when missing (a writer's)."""
    tabs = index_tables(index, create=True)
    assert tabs is not None, "create=True always gives the tables"
    return tabs


def _facet_key(tabs: dict, name: str) -> bytes:
    """The row key of facet ``name``: its UTF-8 bytes (a hash when too long for LMDB), or the
    table's keyed hash of it where ops/db.py hashes row names (an encrypted safe)."""
    table = tabs["task_facets"]
    if getattr(table, "crypto", None) is not None and hasattr(table, "row"):
        return table.row(name)
    raw = name.encode("utf-8", "surrogatepass")
    return raw if len(raw) <= MAX_KEY else b"\x01" + hashlib.sha256(raw).digest()


def _facet(t: Any, tabs: dict, name: str) -> dict | None:
    row = get_json(t, tabs["task_facets"], _facet_key(tabs, name))
    return row if row is not None and row.get("facet") == name else None


def _add(t: Any, tabs: dict, meta: dict, tid: int, names: set[str]) -> None:
    for name in names:
        row = _facet(t, tabs, name)
        if row is None:
            row = {"facet": name, "n": meta["next"], "count": 0}
            meta["next"] += 1
        if t.put(ENTRY.pack(row["n"], tid), b"", db=_lmdb(tabs["task_index"]), overwrite=False):
            row["count"] += 1
        put_json(t, tabs["task_facets"], _facet_key(tabs, name), row)


def _remove(t: Any, tabs: dict, tid: int, names: set[str]) -> None:
    for name in names:
        row = _facet(t, tabs, name)
        if row is not None and t.delete(ENTRY.pack(row["n"], tid), db=_lmdb(tabs["task_index"])):
            row["count"] -= 1
            put_json(t, tabs["task_facets"], _facet_key(tabs, name), row)


def _built(t: Any, tabs: dict) -> dict | None:
    meta = get_json(t, tabs["task_facets"], META)
    return meta if meta and meta.get("built") and meta.get("version") == INDEX_VERSION else None


def _build(t: Any, dbs: dict, tabs: dict) -> None:
    """(Re)build the index from every task record, inside the write transaction ``t``."""
    t.drop(_lmdb(tabs["task_facets"]), delete=False)
    t.drop(_lmdb(tabs["task_index"]), delete=False)
    members: dict[str, list[int]] = {}
    for r in _records(t, dbs["tasks"]):
        for name in facets_of(r):
            members.setdefault(name, []).append(r["id"])
    for n, (name, ids) in enumerate(sorted(members.items()), start=1):
        for tid in ids:
            t.put(ENTRY.pack(n, tid), b"", db=_lmdb(tabs["task_index"]))
        put_json(t, tabs["task_facets"], _facet_key(tabs, name), {"facet": name, "n": n, "count": len(ids)})
    put_json(t, tabs["task_facets"], META, {"built": True, "version": INDEX_VERSION, "next": len(members) + 1})


def _maintain(t: Any, dbs: dict, tabs: dict, old: dict | None, new: dict) -> None:
    """Bring the index up to date with a task record that changed from ``old`` to ``new``."""
    meta = _built(t, tabs)
    if meta is None:
        _build(t, dbs, tabs)      # (the new record is in the table already)
        return
    before, after = (facets_of(old) if old else set()), facets_of(new)
    _remove(t, tabs, new["id"], before - after)
    nxt = meta["next"]
    _add(t, tabs, meta, new["id"], after - before)
    if meta["next"] != nxt:
        put_json(t, tabs["task_facets"], META, meta)


def rebuild_index(index) -> None:
    """Build the task index from the whole history now (what a safe made before it gets lazily)."""
    dbs = ensure_tables(index)
    tabs = _made_tables(index)
    with index.write() as t:
        _build(t, dbs, tabs)


def _ready(index) -> tuple[dict, dict] | None:
    """The ops tables and the built index tables; the index is built first when missing and
    the safe is writable. None when it cannot be had (read-only, a full disk): scan instead."""
    dbs = ensure_tables(index)
    tabs = index_tables(index, create=False)
    if tabs is not None:
        with index.read() as t:
            if _built(t, tabs):
                return dbs, tabs
    if getattr(index, "readonly", False):
        return None
    try:
        tabs = _made_tables(index)
        with index.write() as t:
            if not _built(t, tabs):
                _build(t, dbs, tabs)
    except (SafeError, lmdb.Error, OSError):
        return None
    return dbs, tabs


def _seek_le(cur: Any, n: int, x: int) -> int | None:
    """The highest task id <= x in facet n (a cursor of ``task_index``), or None."""
    found = cur.set_range(ENTRY.pack(n, x + 1)) if x < MAX_ID else cur.set_range(FACET.pack(n + 1))
    if not (cur.prev() if found else cur.last()):
        return None
    k = cur.key()
    return ENTRY.unpack(k)[1] if k[:4] == FACET.pack(n) else None


def _walk(t: Any, tabs: dict, n: int, before: int | None = None, newest_first: bool = True) -> Iterator[int]:
    """The task ids of facet n, newest first (below ``before``) or oldest first."""
    cur = t.cursor(db=_lmdb(tabs["task_index"]))
    prefix = FACET.pack(n)
    if newest_first:
        x = _seek_le(cur, n, MAX_ID if before is None else before - 1)
        if x is None:
            return
        for k in cur.iterprev(keys=True, values=False):
            if k[:4] != prefix:
                return
            yield ENTRY.unpack(k)[1]
    else:
        if not cur.set_range(prefix):
            return
        for k in cur.iternext(keys=True, values=False):
            if k[:4] != prefix:
                return
            yield ENTRY.unpack(k)[1]


def _intersect(t: Any, tabs: dict, ns: list[int], before: int | None) -> Iterator[int]:
    """The task ids in every facet of ``ns``, newest first, below ``before`` (a leapfrog join:
    each step seeks, so a rare facet costs what it holds, not what the others hold)."""
    if len(ns) == 1:
        yield from _walk(t, tabs, ns[0], before)
        return
    curs = [t.cursor(db=_lmdb(tabs["task_index"])) for _ in ns]
    x = MAX_ID if before is None else before - 1
    while x >= 1:
        agreed = True
        for cur, n in zip(curs, ns):
            v = _seek_le(cur, n, x)
            if v is None:
                return
            if v != x:
                x, agreed = v, False
        if agreed:
            yield x
            x -= 1


def _query_facets(state: str | None, kind: str | None, source: str | None) -> list[str]:
    """The facets whose intersection is the tasks of these filters (none: every task)."""
    out = []
    if kind and source:
        out.append(f"kind={kind}&src={source}")
    elif source:
        out.append(f"src={source}")
    if kind and state:
        out.append(f"kind={kind}&state={state}")
    elif state:
        out.append(f"state={state}")
    elif kind and not source:
        out.append(f"kind={kind}")
    return out


def matches(r: dict, state: str | None = None, kind: str | None = None, source: str | None = None,
            since: str | None = None) -> bool:
    """Whether task ``r`` passes the filters (source: its reported name or source is that)."""
    if state and r["state"] != state:
        return False
    if kind and r["kind"] != kind:
        return False
    if source and source not in (r["fields"].get("name"), r["fields"].get("source")):
        return False
    return not (since and r["started"] < since)


def _ids(t: Any, dbs: dict, tabs: dict | None, state, kind, source, before) -> Iterator[int] | None:
    """Candidate ids newest first from the index (None when it has no candidate at all)."""
    names = _query_facets(state, kind, source)
    if tabs is None or not names:
        cur = t.cursor(db=_lmdb(dbs["tasks"]))
        ok = cur.set_range(id_key(before)) if before is not None else False
        if not (cur.prev() if ok else cur.last()):
            return None
        return (key_id(k) for k in cur.iterprev(keys=True, values=False))
    ns = []
    for name in names:
        row = _facet(t, tabs, name)
        if row is None:
            return None
        ns.append(row["n"])
    return _intersect(t, tabs, ns, before)


def page(index, state: str | None = None, kind: str | None = None, source: str | None = None,
         since: str | None = None, before: int | None = None, limit: int = 100) -> list[dict]:
    """Up to ``limit`` tasks with an id below ``before``, newest first, filtered as
    :func:`matches` says. It reads the tasks it returns (and, for combined filters, seeks over
    the index), not the whole history."""
    got = _ready(index)
    dbs = got[0] if got else ensure_tables(index)
    tabs = got[1] if got else None
    out: list[dict] = []
    with index.read() as t:
        ids = _ids(t, dbs, tabs, state, kind, source, before)
        if ids is None or limit <= 0:
            return out
        for i in ids:
            if before is not None and i >= before:
                continue
            r = get_json(t, dbs["tasks"], id_key(i))
            if r is not None and matches(r, state, kind, source, since):
                out.append(r)
                if len(out) >= limit:
                    break
    return out


def count(index, state: str | None = None, kind: str | None = None, source: str | None = None) -> int | None:
    """How many tasks pass the filters, when the index says so at once (no filter or one
    facet); None for combined filters (state and source) or without the index."""
    names = _query_facets(state, kind, source)
    got = _ready(index) if names else None
    with index.read() as t:
        if not names:
            return int(t.stat(_lmdb(ensure_tables(index)["tasks"]))["entries"])
        if got is None or len(names) > 1:
            return None
        row = _facet(t, got[1], names[0])
        return row["count"] if row else 0


def list_tasks(index, state: str | None = None, since: str | None = None, kind: str | None = None,
               last: int | None = None) -> list[dict]:
    """Tasks, oldest first, filtered by state, kind and start time (ISO UTC, inclusive); with
    ``last``, only the newest ``last`` of them (read from the newest backwards)."""
    if last:
        return list(reversed(page(index, state=state, kind=kind, since=since, limit=last)))
    if state or kind:
        return list(reversed(page(index, state=state, kind=kind, since=since, limit=MAX_ID)))
    dbs = ensure_tables(index)
    out = []
    with index.read() as t:
        for r in _records(t, dbs["tasks"]):
            if matches(r, since=since):
                out.append(r)
    return out


def scan(index, state: str | None = None, kind: str | None = None, source: str | None = None,
         since: str | None = None) -> list[dict]:
    """Every task passing the filters, oldest first, by reading the whole history (no index):
    what the indexed queries must agree with."""
    dbs = ensure_tables(index)
    with index.read() as t:
        rows = list(_records(t, dbs["tasks"]))
    return [r for r in rows if matches(r, state, kind, source, since)]


def newest_of_kinds(index, kinds: tuple[str, ...]) -> dict[str, dict | None]:
    """The newest task of each of ``kinds`` (None for a kind never run): one index lookup each."""
    out: dict[str, dict | None] = {}
    for k in kinds:
        got = page(index, kind=k, limit=1)
        out[k] = got[0] if got else None
    return out


def task_names(index) -> list[str]:
    """The names tasks reported (``fields.name``), sorted: the web's source choices."""
    got = _ready(index)
    if got is None:
        return sorted({r["fields"]["name"] for r in scan(index) if isinstance(r["fields"].get("name"), str)
                       and r["fields"]["name"]})
    out = set()
    with index.read() as t:
        for k in _keys(t, got[1]["task_facets"]):
            if k == META:
                continue
            row = get_json(t, got[1]["task_facets"], k)
            f = row["facet"] if row else ""
            if row and row["count"] > 0 and f.startswith("kind=") and "&name=" in f:
                out.add(f.split("&name=", 1)[1])
    return sorted(out)


def backup_names(index) -> dict[str, str | None]:
    """Each name a backup that really ran (any state but usage) reported, with the source of
    the oldest such backup of that name (what ``status`` lists as a source with no point)."""
    got = _ready(index)
    out: dict[str, str | None] = {}
    if got is None:
        for r in scan(index, kind="backup"):
            n = r["fields"].get("name")
            if r["state"] != "usage" and n and n not in out:
                out[n] = r["fields"].get("source")
        return out
    dbs, tabs = got
    prefix = "kind=backup&name="
    with index.read() as t:
        rows = [get_json(t, tabs["task_facets"], k) for k in _keys(t, tabs["task_facets"]) if k != META]
        for row in rows:
            if not row or not row["facet"].startswith(prefix) or row["count"] <= 0:
                continue
            for i in _walk(t, tabs, row["n"], newest_first=False):
                rec = get_json(t, dbs["tasks"], id_key(i))
                if rec is not None and rec["state"] != "usage" and rec["kind"] == "backup":
                    out[row["facet"][len(prefix):]] = rec["fields"].get("source")
                    break
    return out


def _is_backup_of(r: dict, name: str, source: str | None) -> bool:
    f = r["fields"]
    return r["kind"] == "backup" and r["state"] != "usage" and (
        f.get("name") == name or (not f.get("name") and bool(source) and f.get("source") == source))


def last_backup(index, name: str, source: str | None) -> dict | None:
    """The newest backup that really ran of source ``name``: one that reported that name, or
    no name and the source ``source``. Reads backwards from the newest of that name or source."""
    got = _ready(index)
    if got is None:
        rows = [r for r in scan(index, kind="backup") if _is_backup_of(r, name, source)]
        return rows[-1] if rows else None
    dbs, tabs = got
    with index.read() as t:
        walks = []
        for x in {name, source} - {None, ""}:
            row = _facet(t, tabs, f"kind=backup&src={x}")
            if row is not None:
                walks.append(_walk(t, tabs, row["n"]))
        seen = None
        for i in heapq.merge(*walks, reverse=True):
            if i == seen:
                continue
            seen = i
            r = get_json(t, dbs["tasks"], id_key(i))
            if r is not None and _is_backup_of(r, name, source):
                return r
    return None
