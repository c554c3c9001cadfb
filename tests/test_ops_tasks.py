"""Task history: every command that declares a task kind is recorded, killed ones become
abandoned, and the log outputs (JSON lines, syslog) say what happened."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from _ops_util import SyslogReceiver, cli_json, open_alerts, task_list
from conftest import run_cli


@pytest.fixture
def src(tmp_path):
    d = tmp_path / "src"
    d.mkdir()
    (d / "a.txt").write_bytes(b"hello pointsafe\n" * 1000)
    (d / "b.bin").write_bytes(os.urandom(300_000))
    return d


def test_each_command_leaves_a_task_record(safe_dir, src, tmp_path):
    assert run_cli("backup", src, "--name", "www", safe=safe_dir).code == 0
    assert run_cli("restore", "www@latest", tmp_path / "out", safe=safe_dir).code == 0
    assert run_cli("verify", "--data", safe=safe_dir).code == 0
    assert run_cli("repair", safe=safe_dir).code == 0      # the history survives the rebuilt index
    assert run_cli("restore", "nosuch@latest", tmp_path / "out2", safe=safe_dir).code == 1
    (src / "a.txt").write_bytes(b"changed\n")
    assert run_cli("backup", src, "--name", "www", safe=safe_dir).code == 0
    assert run_cli("forget", "--keep-last", "1", safe=safe_dir).code == 0
    assert run_cli("gc", safe=safe_dir).code == 0
    assert run_cli("defrag", safe=safe_dir).code == 0

    rows = task_list(safe_dir)
    assert [(t["kind"], t["state"]) for t in rows] == [
        ("backup", "ok"), ("restore", "ok"), ("verify", "ok"), ("repair", "ok"), ("restore", "usage"),
        ("backup", "ok"), ("forget", "ok"), ("gc", "ok"), ("defrag", "ok")]
    backup = rows[5]
    point = cli_json("show", "www@latest", safe=safe_dir)[0]
    assert backup["fields"]["point"] == point["id"]
    assert backup["fields"]["name"] == "www"
    assert backup["fields"]["files"] == 2
    assert backup["pid"] > 0 and backup["host"] and backup["finished"] >= backup["started"]
    assert rows[2]["fields"]["objects"] > 0                 # verify reported what it checked
    assert "nosuch" in rows[4]["error"]
    # One-task view and filters.
    shown = cli_json("tasks", "show", str(rows[4]["id"]), safe=safe_dir)[0]
    assert shown["argv"][-2:] == ["nosuch@latest", str(tmp_path / "out2")]
    assert [t["kind"] for t in task_list(safe_dir, "--state", "usage")] == ["restore"]
    assert task_list(safe_dir, "--since", "2099-01-01") == []
    assert len(task_list(safe_dir, "--since", "1h")) == 9
    assert [t["id"] for t in task_list(safe_dir, "--last", "2")] == [8, 9]
    human = run_cli("tasks", safe=safe_dir)
    assert human.code == 0 and "restore  usage" in human.out
    # The restore of an unknown point was refused (a usage error): no alert.
    assert open_alerts(safe_dir) == []
    assert run_cli("tasks", "show", "999", safe=safe_dir).code == 1


def test_failed_verify_raises_a_verify_alert(safe_dir, src):
    assert run_cli("backup", src, "--name", "www", safe=safe_dir).code == 0
    pack = sorted((safe_dir / "packs").iterdir())[0]
    with open(pack, "r+b") as f:      # flip bytes in the middle of a record
        f.seek(os.path.getsize(pack) // 2)
        b = f.read(16)
        f.seek(-16, 1)
        f.write(bytes(x ^ 0xFF for x in b))
    r = run_cli("verify", safe=safe_dir)
    assert r.code == 1
    t = task_list(safe_dir, "--kind", "verify")[-1]
    assert t["state"] == "error" and t["warning_count"] >= 1
    al = open_alerts(safe_dir)
    assert [a["kind"] for a in al] == ["verify"] and al[0]["severity"] == "critical"
    assert r"failed" in al[0]["message"]
    st = run_cli("status", safe=safe_dir)
    assert st.code == 2 and "verify" in st.out


def test_killed_backup_is_marked_abandoned(safe_dir, src):
    # The pre-hook keeps the backup busy; SIGKILL it (and its hook) while its task runs. The
    # polling below runs 'tasks' (which sweeps) while the backup lives: it must stay running.
    cmd = [sys.executable, "-m", "pointsafe.cli", "--safe", str(safe_dir), "backup", str(src),
           "--name", "www", "--pre-hook", "sleep 60"]
    p = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            rows = task_list(safe_dir)
            if rows and rows[-1]["state"] == "running":
                break
            time.sleep(0.1)
        else:
            pytest.fail("the backup task never showed as running")
        assert rows[-1]["pid"] == p.pid
    finally:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait(timeout=30)
    # The next command (any) notices: the task is abandoned and an alert is open.
    assert run_cli("points", safe=safe_dir).code == 0
    rows = task_list(safe_dir)
    assert rows[-1]["state"] == "abandoned"
    assert str(p.pid) in rows[-1]["error"]
    al = open_alerts(safe_dir)
    assert len(al) == 1 and "abandoned" in al[0]["message"] and al[0]["task"] == rows[-1]["id"]
    assert cli_json("points", safe=safe_dir)[0] == []       # and no partial point


def test_json_log_file_and_syslog(safe_dir, src, tmp_path):
    log = tmp_path / "pointsafe.jsonl"
    sock = SyslogReceiver(tmp_path / "log.sock")
    try:
        r = run_cli("backup", src, "--name", "www", "--log-file", log, "--syslog-socket", sock.path,
                    safe=safe_dir)
        assert r.code == 0, r.err
        r = run_cli("--log-file", log, "--syslog-socket", sock.path, "backup", src, "--name", "www",
                    "--pre-hook", "false", safe=safe_dir)
        assert r.code == 1
        msgs = sock.messages()
    finally:
        sock.close()
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    ends = [x for x in lines if x.get("state") not in (None, "running")]
    assert [(x["kind"], x["state"], x["level"]) for x in ends] == [("backup", "ok", "info"),
                                                                   ("backup", "error", "error")]
    assert "backup task 1 ended ok" in ends[0]["message"] and ends[0]["name"] == "www"
    assert "pre-hook 'false' failed" in ends[1]["message"]
    assert all({"time", "pid", "host", "message"} <= set(x) for x in lines)
    (alert,) = [x for x in lines if x.get("alert")]
    assert alert["level"] == "error" and alert["message"].startswith("alert #1 (critical): backup task 2 failed")
    # Syslog datagrams: "<PRI>pointsafe[PID]: message", facility daemon (3).
    assert any("backup task 1 ended ok" in m for m in msgs)
    err = [m for m in msgs if "backup task 2 ended error" in m]
    assert err and err[0].startswith(f"<{3 * 8 + 3}>pointsafe[")
    assert any("alert #1 (critical)" in m for m in msgs)


def test_sigterm_ends_the_task_as_error(safe_dir, src):
    cmd = [sys.executable, "-m", "pointsafe.cli", "--safe", str(safe_dir), "backup", str(src),
           "--name", "www", "--pre-hook", "sleep 60"]
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not (task_list(safe_dir) and task_list(safe_dir)[-1]["state"] == "running"):
            assert time.monotonic() < deadline, "the backup task never showed as running"
            time.sleep(0.1)
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=30)
    finally:
        try:
            os.killpg(p.pid, signal.SIGKILL)     # the hook's sleep, if it outlived its parent
        except ProcessLookupError:
            pass
        if p.poll() is None:
            p.wait(timeout=30)
    assert p.returncode == 130 and b"Traceback" not in err
    t = task_list(safe_dir)[-1]
    assert t["state"] == "error" and "SIGTERM" in t["error"]
    assert cli_json("points", safe=safe_dir)[0] == []
