"""Alerts, the status page, stale sources at synthetic times, the e-mail report, settings."""

from __future__ import annotations

import os
import socket
import time
from datetime import datetime, timedelta, timezone

import pytest

from _ops_util import cli_json, open_alerts
from conftest import run_cli



def _iso(dt: datetime) -> str:
    return dt.strftime("%Y-%m-%dT%H:%M:%SZ")


@pytest.fixture
def src(tmp_path):
    d = tmp_path / "src"
    d.mkdir()
    (d / "text.txt").write_bytes(b"the same line, again and again\n" * 20000)   # compresses
    (d / "copy.txt").write_bytes(b"the same line, again and again\n" * 20000)   # dedups
    (d / "noise.bin").write_bytes(os.urandom(200_000))
    return d


def test_status_json_fields(safe_dir, src):
    assert run_cli("backup", src, "--name", "www", safe=safe_dir).code == 0
    assert run_cli("backup", src, "--name", "www", safe=safe_dir).code == 0
    st, r = cli_json("status", safe=safe_dir)
    assert r.code == 0 and st["ok"] is True and st["alerts"] == []
    s = st["safe"]
    assert s["points"] == 2
    assert s["logical_bytes"] == 2 * (2 * 620000 + 200_000)
    # Two identical text files in two identical points: each stored once.
    assert s["dedup_ratio"] > 3.5
    assert s["compression_ratio"] > 1.5
    assert s["size_on_disk"] > s["stored_bytes"] > 0
    assert s["reclaimable_bytes"] == 0
    assert "fragmentation" in s
    sp = st["space"]
    # (the soft quota's default is off in the tests' environment: test_config_validation checks 20%)
    assert sp["total"] > sp["free"] > 0 and sp["quota_soft"] == "off" and sp["quota_hard"] == "10%"
    assert sp["state"] in ("ok", "soft", "hard")
    (www,) = st["sources"]
    assert www["name"] == "www" and www["points"] == 2 and www["stale"] is False
    assert www["last_point"]["age_seconds"] >= 0
    assert www["last_task"]["state"] == "ok" and www["interval_seconds"] == 36 * 3600
    # Forgetting a point makes bytes reclaimable only if something died; here nothing does.
    human = run_cli("status", safe=safe_dir)
    assert human.code == 0 and "www" in human.out and "no open alerts" in human.out


def test_alert_raise_and_ack_cycle(safe_dir, src, tmp_path):
    assert run_cli("backup", src, "--name", "www", safe=safe_dir).code == 0
    for _ in range(2):   # two failed backups (their pre-hook fails)
        assert run_cli("backup", src, "--name", "www", "--pre-hook", "false", safe=safe_dir).code == 1
    al = open_alerts(safe_dir)
    assert len(al) == 2 and all(a["kind"] == "task" and a["severity"] == "critical" for a in al)
    st = run_cli("status", safe=safe_dir)
    assert st.code == 2 and "2 open alert(s)" in st.out
    assert run_cli("alerts", "ack", str(al[0]["id"]), safe=safe_dir).code == 0
    assert [a["id"] for a in open_alerts(safe_dir)] == [al[1]["id"]]
    assert run_cli("status", safe=safe_dir).code == 2
    assert cli_json("alerts", "ack", "--all", safe=safe_dir)[0] == {"acknowledged": [al[1]["id"]]}
    assert run_cli("status", safe=safe_dir).code == 0
    hist = cli_json("alerts", "--history", safe=safe_dir)[0]
    assert len(hist) == 2 and all(a["acked"] for a in hist)
    bad = run_cli("alerts", "ack", "77", safe=safe_dir)
    assert bad.code == 1 and bad.err.startswith("pointsafe: error: no alert 77")
    assert run_cli("alerts", "ack", safe=safe_dir).code == 1


def test_stale_source_with_synthetic_times(safe_dir, src):
    assert run_cli("backup", src, "--name", "www", safe=safe_dir).code == 0
    assert run_cli("backup", src, "--name", "db", safe=safe_dir).code == 0
    assert run_cli("config", "set", "interval.db", "3d", safe=safe_dir).code == 0
    now = datetime.now(timezone.utc)
    in_2d = {"POINTSAFE_NOW": _iso(now + timedelta(days=2))}
    # Two days on: www (default 36h) is stale, db (3 days) is not.
    st, r = cli_json("status", safe=safe_dir, env=in_2d, ok_codes=(2,))
    assert r.code == 2
    assert {s["name"]: s["stale"] for s in st["sources"]} == {"www": True, "db": False}
    (a,) = st["alerts"]
    assert a["kind"] == "stale" and a["source"] == "www" and "expected every 1d 12h" in a["message"]
    assert run_cli("alerts", "ack", "--all", safe=safe_dir).code == 0
    # Acknowledged and still stale: stays quiet.
    assert run_cli("status", safe=safe_dir, env=in_2d).code == 0
    # Four days on, db is stale too; www is not raised again.
    st, _ = cli_json("status", safe=safe_dir, env={"POINTSAFE_NOW": _iso(now + timedelta(days=4))},
                     ok_codes=(2,))
    assert [x["source"] for x in st["alerts"]] == ["db"]
    assert run_cli("alerts", "ack", "--all", safe=safe_dir).code == 0
    # Fresh again (real time), then stale again: a new alert.
    assert run_cli("status", safe=safe_dir).code == 0
    st, _ = cli_json("status", safe=safe_dir, env=in_2d, ok_codes=(2,))
    assert [x["source"] for x in st["alerts"]] == ["www"]
    # 'off' silences a source.
    assert run_cli("alerts", "ack", "--all", safe=safe_dir).code == 0
    assert run_cli("config", "set", "interval.www", "off", safe=safe_dir).code == 0
    assert run_cli("status", safe=safe_dir).code == 0
    st, _ = cli_json("status", safe=safe_dir, env={"POINTSAFE_NOW": _iso(now + timedelta(days=30))},
                     ok_codes=(2,))
    assert [x["source"] for x in st["alerts"]] == ["db"]


def test_config_validation(safe_dir, quota_defaults):
    ok = cli_json("config", "set", "quota.soft", "25%", safe=safe_dir)[0]
    assert ok == {"quota.soft": "25%"}
    assert run_cli("config", "get", "quota.soft", safe=safe_dir).out.strip() == "25%"
    assert run_cli("config", "get", "interval.anything", safe=safe_dir).out.strip() == "36h"
    for bad in (("quota.soft", "120%"), ("quota.hard", "lots"), ("interval.www", "soon"),
                ("smtp.port", "http"), ("smtp.security", "tls1"), ("colour", "blue")):
        r = run_cli("config", "set", *bad, safe=safe_dir)
        assert r.code == 1 and r.err.startswith("pointsafe: error: ") and r.err.count("\n") == 1, r.err
    assert run_cli("config", "unset", "quota.soft", safe=safe_dir).code == 0
    st = cli_json("config", safe=safe_dir)[0]
    assert st["settings"]["quota.soft"] == "20%" and st["stored"] == {}
    # a machine's own default (a test machine's disk is fuller than 20% by design)
    st = cli_json("config", safe=safe_dir, env={"POINTSAFE_DEFAULT_QUOTA_SOFT": "5%"})[0]
    assert st["settings"]["quota.soft"] == "5%"
    r = run_cli("status", safe=safe_dir, env={"POINTSAFE_DEFAULT_QUOTA_SOFT": "lots"})
    assert r.code == 1 and r.err.count("\n") == 1 and "POINTSAFE_DEFAULT_QUOTA_SOFT" in r.err, r.err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_report_mail_through_a_local_smtp_server(safe_dir, src, tmp_path):
    from aiosmtpd.controller import Controller
    from aiosmtpd.handlers import Message

    got = []

    class Keep(Message):
        def handle_message(self, message):
            got.append(message)

    port = _free_port()
    ctl = Controller(Keep(), hostname="127.0.0.1", port=port)
    ctl.start()
    try:
        for k, v in (("smtp.host", "127.0.0.1"), ("smtp.port", str(port)), ("smtp.to", "ops@example.org, dba@example.org"),
                     ("smtp.from", "pointsafe@backup1.example.org")):
            run_cli("config", "set", k, v, safe=safe_dir, check=True)
        # Nothing to report: nothing sent.
        res = cli_json("report", safe=safe_dir)[0]
        assert res["sent"] is False and not got
        # A server that refuses connections: one clear line, and the report task is an error.
        run_cli("config", "set", "smtp.port", str(_free_port()), safe=safe_dir, check=True)
        r = run_cli("report", "--always", safe=safe_dir)
        assert r.code == 1 and r.err.startswith("pointsafe: error: cannot send the report through 127.0.0.1:")
        run_cli("config", "set", "smtp.port", str(port), safe=safe_dir, check=True)
        # A backup, a failed one: two tasks with problems (with the failed report), two alerts.
        run_cli("backup", src, "--name", "www", safe=safe_dir, check=True)
        assert run_cli("backup", src, "--name", "www", "--pre-hook", "false", safe=safe_dir).code == 1
        res = cli_json("report", safe=safe_dir)[0]
        assert res["sent"] is True and res["to"] == ["ops@example.org", "dba@example.org"]
        deadline = time.monotonic() + 10
        while not got and time.monotonic() < deadline:
            time.sleep(0.05)
        (m,) = got
        assert m["To"] == "ops@example.org, dba@example.org"
        assert m["From"] == "pointsafe@backup1.example.org"
        assert "2 open alerts" in m["Subject"] and "2 tasks with problems" in m["Subject"]
        body = m.get_payload()
        assert "backup error" in body and "pre-hook 'false' failed" in body
        assert "report error" in body and "cannot send the report" in body
        # The next report starts after this one: the old failure is not repeated as a task.
        run_cli("alerts", "ack", "--all", safe=safe_dir, check=True)
        res = cli_json("report", safe=safe_dir)[0]
        assert res["sent"] is False and len(got) == 1
        # The report runs are tasks too.
        kinds = [t["kind"] for t in cli_json("tasks", "--kind", "report", safe=safe_dir)[0]]
        assert len(kinds) == 4
    finally:
        ctl.stop()


def test_status_check_is_a_nagios_plugin(safe_dir, src, tmp_path):
    r = run_cli("status", "--check", safe=safe_dir)
    assert r.code == 0 and r.out.startswith("POINTSAFE OK - 0 source(s)") and r.out.count("\n") == 1
    run_cli("config", "set", "quota.soft", "99%", safe=safe_dir, check=True)   # a warning alert
    r = run_cli("status", "--check", safe=safe_dir)
    assert r.code == 1 and r.out.startswith("POINTSAFE WARNING - 1 open alert(s); #1: the safe's filesystem")
    assert run_cli("backup", src, "--pre-hook", "false", safe=safe_dir).code == 1   # a critical one
    r = run_cli("status", "--check", safe=safe_dir)
    assert r.code == 2 and r.out.startswith("POINTSAFE CRITICAL - 2 open alert(s); #2: backup task")
    r = run_cli("status", "--check", safe=tmp_path / "nowhere")
    assert r.code == 3 and r.out.startswith("POINTSAFE UNKNOWN - ")


def test_below_the_hard_quota_with_the_soft_one_off_raises_only_the_hard_alert(safe_dir):
    run_cli("config", "set", "quota.soft", "off", safe=safe_dir, check=True)
    run_cli("config", "set", "quota.hard", "99%", safe=safe_dir, check=True)
    st = cli_json("status", safe=safe_dir, ok_codes=(2,))[0]
    alerts = [a for a in st["alerts"] if a["kind"] == "quota"]
    assert [a["severity"] for a in alerts] == ["critical"], alerts
    assert "hard quota" in alerts[0]["message"] and "off" not in alerts[0]["message"]
    run_cli("config", "set", "quota.soft", "99.5%", safe=safe_dir, check=True)
    st = cli_json("status", safe=safe_dir, ok_codes=(2,))[0]
    assert sorted(a["severity"] for a in st["alerts"] if a["kind"] == "quota") == ["critical", "warning"]
