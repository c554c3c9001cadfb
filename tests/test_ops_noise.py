"""Operations noise, tried as an administrator would: a mistyped command is refused with one
line, kept in the task history as 'usage', and raises no alert and no phantom source; a real
failure still alerts and still shows its source."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest

from _ops_util import cli_json, open_alerts, task_list
from conftest import run_cli


@pytest.fixture
def src(tmp_path):
    d = tmp_path / "src"
    d.mkdir()
    (d / "a.txt").write_bytes(b"hello pointsafe\n" * 1000)
    (d / "sub").mkdir()
    (d / "sub" / "b.txt").write_bytes(b"more\n" * 100)
    return d


def test_mistyped_commands_raise_no_alert_and_no_phantom_source(safe_dir, src, tmp_path):
    assert run_cli("backup", src, "--name", "www", safe=safe_dir).code == 0
    log = tmp_path / "ops.jsonl"
    typos = [
        ("backup", "/nonexistent", "--name", "typo"),           # a source that is not there
        ("backup", tmp_path / "srcc", "--name", "www"),         # ... under a real source's name
        ("restore", "nosuchpoint", tmp_path / "x"),             # an unknown point
        ("restore", "nosuch@latest", tmp_path / "x"),           # an unknown name
        ("restore", "latest", tmp_path / "y", "--path", "no/such"),   # a --path not in the point
        ("ls", "latest", "no/such/path"),                       # (not a task)
        ("forget", "--name", "nosuch", "--keep-last", "1"),
    ]
    for args in typos:
        r = run_cli("--log-file", log, *args, safe=safe_dir)
        assert r.code == 1, (args, r.err)
        assert r.err.startswith("pointsafe: error: ") and len(r.err.splitlines()) == 1, (args, r.err)
    # No alert: the check a monitoring system runs every minute stays OK.
    r = run_cli("status", "--check", safe=safe_dir)
    assert r.code == 0 and r.out.startswith("POINTSAFE OK - 1 source(s)"), r.out
    assert open_alerts(safe_dir) == []
    st, r = cli_json("status", safe=safe_dir)
    assert r.code == 0 and st["ok"] is True
    (www,) = st["sources"]                     # no phantom "typo"
    assert www["name"] == "www" and www["last_task"]["id"] == 1 and www["last_task"]["state"] == "ok"
    human = run_cli("status", safe=safe_dir)
    assert human.code == 0 and "typo" not in human.out and "no open alerts" in human.out
    # The history keeps them, as refused.
    rows = task_list(safe_dir)
    assert [(t["kind"], t["state"]) for t in rows] == [("backup", "ok")] + [
        ("backup", "usage"), ("backup", "usage"), ("restore", "usage"), ("restore", "usage"),
        ("restore", "usage"), ("forget", "usage")]
    assert "no such file or directory" in rows[1]["error"] and "nosuchpoint" in rows[3]["error"]
    assert all(t["exit_code"] == 1 for t in rows[1:])
    assert [t["id"] for t in task_list(safe_dir, "--state", "usage")] == [2, 3, 4, 5, 6, 7]
    assert "usage" in run_cli("tasks", safe=safe_dir).out
    # The log says so, at warning level, and raises no alert there either.
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    ends = [x for x in lines if x.get("state") == "usage"]
    assert len(ends) == 6 and all(x["level"] == "warning" and "refused" in x["message"] for x in ends)
    assert not any(x.get("alert") for x in lines)


def test_mistyped_commands_are_not_reported_by_mail(safe_dir, src, tmp_path):
    assert run_cli("backup", src, "--name", "www", safe=safe_dir).code == 0
    assert run_cli("restore", "nosuch@latest", tmp_path / "x", safe=safe_dir).code == 1
    r = run_cli("report", "--print", safe=safe_dir)
    assert r.code == 0 and "nosuch" not in r.out, r.out


def test_a_real_failure_still_alerts_and_shows_its_source(safe_dir, src):
    assert run_cli("backup", src, "--name", "www", safe=safe_dir).code == 0
    # A new source whose pre-hook (say, a database dump) fails: a real failure, before any point.
    r = run_cli("backup", src, "--name", "db", "--pre-hook", "exit 7", safe=safe_dir)
    assert r.code == 1 and len(r.err.splitlines()) == 1, r.err
    t = task_list(safe_dir)[-1]
    assert (t["kind"], t["state"]) == ("backup", "error")
    r = run_cli("status", "--check", safe=safe_dir)
    assert r.code == 2 and r.out.startswith("POINTSAFE CRITICAL - 1 open alert(s); #1: backup task 2 failed")
    st, _ = cli_json("status", safe=safe_dir, ok_codes=(2,))
    by_name = {s["name"]: s for s in st["sources"]}
    assert set(by_name) == {"db", "www"}
    assert by_name["db"]["points"] == 0 and by_name["db"]["last_point"] is None
    assert by_name["db"]["last_task"]["state"] == "error" and "pre-hook" in by_name["db"]["last_task"]["error"]
    (a,) = open_alerts(safe_dir)
    assert a["severity"] == "critical" and a["source"] == "db"


def test_a_source_that_vanished_is_still_caught_by_its_stale_alert(safe_dir, src, tmp_path):
    assert run_cli("backup", src, "--name", "www", safe=safe_dir).code == 0
    later = {"POINTSAFE_NOW": (datetime.now(timezone.utc) + timedelta(days=2)).strftime("%Y-%m-%dT%H:%M:%SZ")}
    # The nightly job goes on running, but its source is gone: refused, no alert of its own...
    r = run_cli("backup", tmp_path / "gone", "--name", "www", safe=safe_dir, env=later)
    assert r.code == 1 and "no such file or directory" in r.err
    assert task_list(safe_dir)[-1]["state"] == "usage"
    # ...and the source's stale alert says that www has no new point.
    st, _ = cli_json("status", safe=safe_dir, env=later, ok_codes=(2,))
    (a,) = st["alerts"]
    assert a["kind"] == "stale" and a["source"] == "www" and a["severity"] == "critical"
    assert [s["last_task"]["state"] for s in st["sources"]] == ["ok"]
