"""The task history's index (ops/tasks.py: tasks per facet): the filtered, paged and
per-source queries that ``status``, ``tasks`` and the web's task page make must give what a
scan of the whole history gives, after any sequence of creates and finishes, for abandoned
tasks, and on a safe made before the index existed (built lazily once, or scanned when the
safe is read-only)."""

from __future__ import annotations

import json
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import run_cli
from pointsafe.cas import Safe
from pointsafe.cas.index import Index
from pointsafe.cas.store import INDEX_DIR
from pointsafe.ops import alerts, tasks
from pointsafe.ops.db import ensure_tables, get_json, id_key, index_tables, put_json

NAMES = ["www", "db", "/srv/www", "a&src=b", ""]
KINDS = ["backup", "restore", "verify", "gc"]
STATES = ["ok", "warning", "error", "usage"]


def _ids(rows: list[dict]) -> list[int]:
    return [r["id"] for r in rows]


def _status_backup_names(rows: list[dict]) -> dict:
    """What ops/status.py computed from a scan before the index: name -> source of its oldest
    backup that ran."""
    out: dict = {}
    for t in rows:
        n = t["fields"].get("name")
        if t["kind"] == "backup" and t["state"] != "usage" and n and n not in out:
            out[n] = t["fields"].get("source")
    return out


def _status_last_backup(rows: list[dict], name: str, source: str | None) -> int | None:
    last = None
    for t in rows:
        f = t["fields"]
        if t["kind"] != "backup" or t["state"] == "usage":
            continue
        if f.get("name") == name or (not f.get("name") and source and f.get("source") == source):
            last = t["id"]
    return last


def assert_index_agrees(index) -> None:
    """Every filter of the pages and of ``status`` gives what a full scan gives."""
    every = tasks.scan(index)
    for state in [None, *STATES, "running", "abandoned"]:
        for kind in [None, *KINDS]:
            for source in [None, *[n for n in NAMES if n], "nosuch"]:
                want = tasks.scan(index, state=state, kind=kind, source=source)
                got = tasks.page(index, state, kind, source, limit=10 ** 9)
                assert _ids(got) == _ids(want)[::-1], (state, kind, source)
                n = tasks.count(index, state, kind, source)
                assert n is None or n == len(want), (state, kind, source)
                # Pages of 3, walked with before=, are the same tasks.
                paged, before = [], None
                while True:
                    pg = tasks.page(index, state, kind, source, before=before, limit=3)
                    paged += pg
                    if len(pg) < 3:
                        break
                    before = pg[-1]["id"]
                assert _ids(paged) == _ids(want)[::-1]
            assert _ids(tasks.list_tasks(index, state=state, kind=kind)) == \
                _ids(tasks.scan(index, state=state, kind=kind))
            assert _ids(tasks.list_tasks(index, state=state, kind=kind, last=2)) == \
                _ids(tasks.scan(index, state=state, kind=kind))[-2:]
    assert tasks.backup_names(index) == _status_backup_names(every)
    for name in NAMES[:3]:
        for source in [None, "/srv/www", "www"]:
            got = tasks.last_backup(index, name, source)
            assert (got and got["id"]) == _status_last_backup(every, name, source) or \
                (got is None and _status_last_backup(every, name, source) is None)
    newest = tasks.newest_of_kinds(index, tuple(KINDS))
    for k in KINDS:
        of_kind = [t for t in every if t["kind"] == k]
        assert (newest[k] or {}).get("id") == (of_kind[-1]["id"] if of_kind else None)


ops = st.lists(st.tuples(st.sampled_from(KINDS), st.sampled_from(NAMES), st.sampled_from(NAMES),
                         st.one_of(st.none(), st.sampled_from(STATES)), st.sampled_from(NAMES)),
               min_size=1, max_size=25)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops)
def test_indexed_queries_agree_with_a_scan_after_any_history(tmp_path_factory, history):
    path = tmp_path_factory.mktemp("idx") / "safe"
    with Safe.init(path) as safe:
        made = []
        for kind, name, source, state, late_name in history:
            fields = {k: v for k, v in (("name", name), ("source", source)) if v}
            made.append(tasks.create(safe.index, kind, [kind], fields))
            if state is not None:       # finished at once, the backup reporting its name then
                tasks.finish(safe.index, made[-1]["id"], state,
                             fields={"name": late_name} if late_name and kind == "backup" else None)
        # Tasks finished late, out of order: a running one ends after newer ones.
        for rec in made[::3]:
            if tasks.get(safe.index, rec["id"])["state"] == "running":
                tasks.finish(safe.index, rec["id"], "error", error="late")
        assert_index_agrees(safe.index)


def test_an_abandoned_task_moves_to_its_new_state(safe):
    idx = safe.index
    a = tasks.create(idx, "backup", ["backup"], {"name": "www"})
    b = tasks.create(idx, "verify", ["verify"])
    dbs = ensure_tables(idx)
    with idx.write() as t:      # task a's process ran in another boot of this machine: gone
        rec = get_json(t, dbs["tasks"], id_key(a["id"]))
        put_json(t, dbs["tasks"], id_key(a["id"]), {**rec, "boot_id": "another boot"})
    assert [t["id"] for t in alerts.sweep_abandoned(idx)] == [a["id"]]
    assert _ids(tasks.page(idx, state="abandoned")) == [a["id"]]
    assert _ids(tasks.page(idx, state="running")) == [b["id"]]
    assert tasks.count(idx, state="abandoned") == 1 and tasks.count(idx, state="running") == 1
    assert _ids(tasks.page(idx, kind="backup", source="www")) == [a["id"]]
    assert tasks.page(idx, kind="backup", state="running") == []
    assert_index_agrees(idx)


def _old_safe(path: Path) -> None:
    """A safe whose history was written before the index existed: tasks, no index tables."""
    with Safe.init(path) as safe:
        for i, (kind, name) in enumerate([("backup", "www"), ("backup", "db"), ("verify", None), ("backup", "www"),
                                          ("restore", "www"), ("gc", None)] * 3):
            rec = tasks.create(safe.index, kind, [kind], {"name": name} if name else {})
            tasks.finish(safe.index, rec["id"], ["ok", "error", "warning"][i % 3])
        with safe.index.write() as t:
            for name in ("task_facets", "task_index"):
                t.drop(safe.index.table(name), delete=True)
    with Safe.open(path) as safe:
        assert index_tables(safe.index, create=False) is None


def test_a_safe_made_before_the_index_is_read_right_and_indexed_once(tmp_path):
    path = tmp_path / "safe"
    _old_safe(path)
    # Read-only: nothing is written, the queries scan and agree.
    ro = Index(path / INDEX_DIR, readonly=True)
    try:
        assert ro.existing("task_facets") is None
        assert_index_agrees(ro)
        assert tasks.count(ro, kind="backup") is None
    finally:
        ro.close()
    with Safe.open(path) as safe:
        assert index_tables(safe.index, create=False) is None
    # Through the CLI on the writable safe: the same answers as before the index, which the
    # first query built.
    with Safe.open(path) as safe:
        before = {s: tasks.scan(safe.index, state=s) for s in STATES}
    for s in STATES:
        got = json.loads(run_cli("tasks", "--state", s, "--json", safe=path, check=True).out)
        assert _ids(got) == _ids(before[s]), s
    with Safe.open(path) as safe:
        assert index_tables(safe.index, create=False) is not None
        assert tasks.count(safe.index, kind="backup") == 9
        assert_index_agrees(safe.index)


def test_the_first_task_on_an_old_safe_indexes_the_whole_history(tmp_path):
    path = tmp_path / "safe"
    _old_safe(path)
    with Safe.open(path) as safe:
        new = tasks.create(safe.index, "backup", ["backup"], {"name": "www"})
        assert _ids(tasks.page(safe.index, kind="backup", source="www", limit=2)) == [new["id"], 16]
        assert tasks.count(safe.index, source="www") == 10
        assert_index_agrees(safe.index)


def test_status_and_the_task_page_agree_with_the_history_on_an_old_safe(tmp_path):
    path = tmp_path / "safe"
    _old_safe(path)
    for k in ("quota.soft", "quota.hard"):       # (the test machine's disk may be nearly full)
        run_cli("config", "set", k, "off", safe=path, check=True)
    st = json.loads(run_cli("status", "--json", safe=path, check=True).out)
    with Safe.open(path) as safe:
        every = tasks.scan(safe.index)
    assert [s["name"] for s in st["sources"]] == ["db", "www"]
    for s in st["sources"]:
        assert s["last_task"]["id"] == _status_last_backup(every, s["name"], None)
    # status ran a sweep and recorded nothing; its recent tasks are the newest five
    assert [t["id"] for t in st["recent_tasks"]] == _ids(every)[-5:]
