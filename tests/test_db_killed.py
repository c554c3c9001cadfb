"""A `backup --mysql` killed with SIGKILL while it reads never leaves the server's settings changed.

Reading live, the backup lowers innodb_max_dirty_pages_pct to 0 and raises innodb_io_capacity(_max)
to 10000 (ingest/db/mysql.py). Killed, it used to leave them so for good. Now its guardian process
puts them back; when the guardian is killed too, the next `backup --mysql` of the server does, and
says so on its point.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from _db_servers import MariaDB, backup, mariadb_skip_reason
from conftest import run_cli

pytestmark = [pytest.mark.db, pytest.mark.skipif(mariadb_skip_reason() is not None,
                                                 reason=mariadb_skip_reason() or "")]

SETTINGS = "SELECT @@GLOBAL.innodb_max_dirty_pages_pct, @@GLOBAL.innodb_io_capacity, @@GLOBAL.innodb_io_capacity_max"


@pytest.fixture(scope="module")
def server():
    m = MariaDB.create()
    try:
        m.start()
        m.sql("CREATE DATABASE app",
              "CREATE TABLE app.inno (id INT PRIMARY KEY, data TEXT NOT NULL) ENGINE=InnoDB",
              "INSERT INTO app.inno VALUES (1, 'one')")
        # Files beside the data directory make the read last (about a second here), so that the
        # test sees the backup inside it; nothing depends on how long it takes.
        bulk = m.datadir.parent / "bulk"
        bulk.mkdir()
        for i in range(2000):
            (bulk / f"f{i:05d}").write_bytes(os.urandom(32 * 1024))
        yield m
    finally:
        m.destroy()


@pytest.fixture
def state_home(tmp_path, monkeypatch) -> Path:
    """Where the backups keep their state files ($XDG_STATE_HOME), private to the test."""
    d = tmp_path / "state"
    monkeypatch.setenv("XDG_STATE_HOME", str(d))
    return d


def settings(server: MariaDB) -> tuple:
    return tuple(float(v) for v in server.sql(SETTINGS)[0])


def flushes(server: MariaDB) -> int:
    return int(server.sql("SHOW GLOBAL STATUS LIKE 'Com_flush'")[0][1])


def start_backup(server: MariaDB, safe: Path) -> subprocess.Popen:
    """`pointsafe backup DATADIR/.. --mysql DSN` in a process group of its own."""
    cmd = [sys.executable, "-m", "pointsafe.cli", "--safe", str(safe), "backup", str(server.datadir.parent),
           "--name", "db", "--exclude", "run", "--mysql", server.dsn, "-q"]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)


def wait_inside_the_read(server: MariaDB, proc: subprocess.Popen, original: tuple, timeout: float = 120) -> None:
    """Until the backup has changed the settings and holds the read lock (its FLUSH TABLES and
    FLUSH TABLES WITH READ LOCK counted): it is then at rest or reading the source."""
    before = flushes(server)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the backup ended ({proc.returncode}) before it was seen reading: "
                                 f"{proc.stderr.read().decode() if proc.stderr else ''}")
        if settings(server) != original and flushes(server) - before >= 2:
            return
        time.sleep(0.005)
    raise AssertionError("the backup never changed the settings")


def wait_for(pred, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.1)
    return pred()


def state_files(state_home: Path) -> list[Path]:
    d = state_home / "pointsafe" / "mysql-settings"
    return sorted(d.glob("*.json")) if d.is_dir() else []


def kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)
    if proc.stderr:
        proc.stderr.close()


def abandoned_alerts(safe: Path) -> list[str]:
    """The messages of the alerts about abandoned tasks (``alerts`` sweeps dead tasks first)."""
    r = run_cli("alerts", "--json", safe=safe)
    assert r.code in (0, 3), r.err
    return [a["message"] for a in json.loads(r.out) if "abandoned" in a["message"]]


def writes_go_through(server: MariaDB) -> None:
    con = server.connect(database="app")
    try:
        with con.cursor() as c:
            c.execute("SET SESSION lock_wait_timeout = 10")
            c.execute("INSERT INTO inno VALUES (2, 'two')")
            c.execute("DELETE FROM inno WHERE id = 2")
    finally:
        con.close()


def test_sigkill_during_the_read_leaves_the_settings_as_they_were(server, safe_dir, state_home):
    original = settings(server)
    proc = start_backup(server, safe_dir)
    try:
        wait_inside_the_read(server, proc, original)
        assert settings(server)[0] == 0   # lowered for the flush
    finally:
        kill_group(proc)          # the backup's whole process group, as a terminal or a script would
    assert proc.returncode == -signal.SIGKILL
    # The guardian (a session of its own) puts them back and removes its state file.
    assert wait_for(lambda: settings(server) == original, 60), (settings(server), original)
    assert wait_for(lambda: not state_files(state_home), 30), state_files(state_home)
    writes_go_through(server)     # the lock went with the dead connection
    # The abandoned task's alert says that nothing was left changed.
    said = abandoned_alerts(safe_dir)
    assert len(said) == 1 and "no MariaDB setting it may have changed is left changed" in said[0], said


def test_killed_with_its_guardian_the_next_backup_puts_the_settings_back_and_says_so(server, safe_dir, state_home, cli):
    from pointsafe.ingest.db.guardian import left_behind
    original = settings(server)
    proc = start_backup(server, safe_dir)
    try:
        wait_inside_the_read(server, proc, original)
        [state] = state_files(state_home)
        os.kill(json.loads(state.read_text())["guardian_pid"], signal.SIGKILL)   # e.g. the unit's cgroup killed
    finally:
        kill_group(proc)
    time.sleep(1)
    assert settings(server) != original          # nobody was left to put them back
    [left] = left_behind()                        # what a status check can list
    assert left["datadir"].rstrip("/") == str(server.datadir) and left["applied"]["innodb_max_dirty_pages_pct"] == 0
    # The abandoned task's alert names them and what puts them back.
    said = abandoned_alerts(safe_dir)
    assert len(said) == 1 and "may still be changed" in said[0] and "innodb_max_dirty_pages_pct" in said[0], said

    code, point, err = backup(cli, safe_dir, server.datadir, "--mysql", server.dsn)
    assert code == 3, err
    said = [w["message"] for w in point["warnings"] if w["path"] == "mysql"]
    assert len(said) == 1 and "killed" in said[0] and "put back" in said[0], point["warnings"]
    assert f"innodb_max_dirty_pages_pct 0 -> {original[0]:g}" in said[0], said
    assert settings(server) == original
    assert not state_files(state_home) and left_behind() == []
    assert point["consistency"]["mysql"]["repaired_settings"] == said


def test_a_backup_of_a_restarted_server_finds_nothing_to_repair(server, safe_dir, state_home, cli):
    """A state file from before the server last started: the values it runs with now are its
    configuration's (here: set by hand to what the dead backup had set), and are left alone."""
    from pointsafe.ingest.db.guardian import server_key
    d = state_home / "pointsafe" / "mysql-settings"
    d.mkdir(parents=True)
    datadir = server.sql("SELECT @@datadir")[0][0]
    (d / f"{server_key(datadir)}-999999.json").write_text(json.dumps({
        "datadir": datadir, "saved": {"innodb_max_dirty_pages_pct": 90, "innodb_io_capacity": 200,
                                      "innodb_io_capacity_max": 2000},
        "applied": {"innodb_max_dirty_pages_pct": 0, "innodb_io_capacity": 10000, "innodb_io_capacity_max": 10000},
        "pid": 999999, "server_started": 1000.0, "written_at": "2020-01-01T00:00:00Z"}))
    original = settings(server)
    server.sql("SET GLOBAL innodb_io_capacity_max = 10000", "SET GLOBAL innodb_io_capacity = 10000",
               "SET GLOBAL innodb_max_dirty_pages_pct = 0")
    try:
        code, point, err = backup(cli, safe_dir, server.datadir, "--mysql", server.dsn)
        assert code in (0, 3), err
        assert not [w for w in point["warnings"] if w["path"] == "mysql"]
        assert settings(server) == (0, 10000, 10000) and not state_files(state_home)
    finally:
        server.sql(f"SET GLOBAL innodb_io_capacity = {int(original[1])}",
                   f"SET GLOBAL innodb_io_capacity_max = {int(original[2])}",
                   f"SET GLOBAL innodb_max_dirty_pages_pct = {original[0]}")
