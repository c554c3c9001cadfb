"""MariaDB: points taken with --mysql under a continuous writer start as a database again.

One private server per module (start-up dominates the time). A writer inserts checksummed rows
into an InnoDB and a MyISAM table while several points are taken; every point is then restored
the way docs/RESTORE.md says (mount, copy out, chown, start mariadbd on the copy, mariadb-check)
and must hold a gap-free prefix of the writer's rows, at least everything committed before the
backup began.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from _db_servers import (MariaDB, Writer, assert_clean, backup, check_prefix, chown_tree, copy_out, mariadb_skip_reason,
                         new_dir, payload, point_files, points)

pytestmark = [pytest.mark.db, pytest.mark.skipif(mariadb_skip_reason() is not None,
                                                 reason=mariadb_skip_reason() or "")]


@pytest.fixture(scope="module")
def server():
    m = MariaDB.create()
    try:
        m.start()
        m.sql("CREATE DATABASE app",
              "CREATE TABLE app.inno (id INT PRIMARY KEY, data TEXT NOT NULL, sum CHAR(64) NOT NULL) ENGINE=InnoDB",
              "CREATE TABLE app.my (id INT PRIMARY KEY, data TEXT NOT NULL, sum CHAR(64) NOT NULL) ENGINE=MyISAM",
              "CREATE USER app@localhost IDENTIFIED BY 'secret'",
              "GRANT ALL ON app.* TO app@localhost")
        yield m
    finally:
        m.destroy()


def insert(con, i: int) -> None:
    data, csum = payload(i)
    with con.cursor() as c:
        c.execute("INSERT INTO inno VALUES (%s, %s, %s)", (i, data, csum))
        c.execute("INSERT INTO my VALUES (%s, %s, %s)", (i, data, csum))


def restore_and_check(cli, safe: Path, point: dict, low: int, high: int,
                      replay: tuple[Path, int] | None = None) -> int:
    """RESTORE.md, MariaDB section, step by step.

    ``replay`` = (live binary log, rows the writer committed in all): also dump the restored
    database (step 6) and replay the live binary log from the point's recorded position (step
    7), which must bring back exactly every committed row.
    """
    base = new_dir("ps-mariadb-restore-", "mysql")
    restored = MariaDB(base / "data", base / "run")
    try:
        with point_files(cli, safe, point["id"]) as mnt:                # 1. mount the point
            copy_out(mnt, restored.datadir)                              # 2. cp -a MOUNT/. NEWDIR/
        chown_tree(restored.datadir, "mysql")                            # 3. chown -R mysql:mysql
        restored.start()                                                 # 4. start mariadbd on it
        r = subprocess.run(["mariadb-check", f"--socket={restored.socket}", "--user=root",   # 5. check
                            "--all-databases", "--extended"], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        checked = [ln for ln in r.stdout.splitlines() if ln.strip()]
        assert any(ln.startswith("app.inno") for ln in checked) and any(ln.startswith("app.my") for ln in checked)
        bad = [ln for ln in checked if not ln.rstrip().endswith("OK") and not ln.startswith(("note", "status"))]
        assert not bad, r.stdout
        errors = [ln for ln in restored.log.read_text(errors="replace").splitlines() if "[ERROR]" in ln]
        assert not errors, errors
        counts = []
        for table in ("inno", "my"):
            rows = restored.sql(f"SELECT id, data, sum FROM {table} ORDER BY id", db="app")
            counts.append(check_prefix([tuple(r) for r in rows], low, high, f"point {point['id'][:8]} {table}"))
        # The recorded binary-log position is the end of the binary log in the copy: nothing was
        # committed while the lock was held.
        info = point["consistency"]["mysql"]
        assert (restored.datadir / info["binlog_file"]).stat().st_size == info["binlog_position"]
        shown = json.loads(cli("show", point["id"], "--json", safe=safe).out)["consistency"]["mysql"]
        assert shown["binlog_position"] == info["binlog_position"]                    # step 1
        if replay:
            binlog, total = replay
            dump = subprocess.run(["mariadb-dump", f"--socket={restored.socket}", "--user=root",  # step 6
                                   "--single-transaction", "app"], capture_output=True, timeout=120)
            assert dump.returncode == 0 and b"INSERT INTO `inno`" in dump.stdout, dump.stderr
            events = subprocess.run(["mariadb-binlog", f"--start-position={info['binlog_position']}",  # step 7
                                     str(binlog)], capture_output=True, check=True, timeout=120)
            subprocess.run(["mariadb", f"--socket={restored.socket}", "--user=root"], input=events.stdout,
                           check=True, capture_output=True, timeout=300)
            for table in ("inno", "my"):
                rows = restored.sql(f"SELECT id, data, sum FROM {table} ORDER BY id", db="app")
                check_prefix([tuple(r) for r in rows], total, total, f"replayed {table}")
        return counts[0]
    finally:
        restored.destroy()


def test_points_under_a_writer_start_and_hold_a_prefix(server, safe_dir, cli):
    w = Writer(lambda: server.connect(database="app"), insert, pause=0.001).start()
    taken = []
    try:
        w.wait_rows(300)
        for _ in range(3):
            low = w.committed
            code, point, err = backup(cli, safe_dir, server.datadir, "--mysql", server.dsn)
            high = w.committed
            # Nothing changes under the lock but Aria's log, appended to by its checkpoint thread.
            assert_clean(code, point, err, server.datadir, ["aria_log.00000001", "aria_log_control"])
            taken.append((point, low, high))
            w.wait_rows(high + 200)
    finally:
        total = w.stop()
    for point, _low, _high in taken:
        info = point["consistency"]["mysql"]
        assert info["binlog_file"].startswith("binlog.") and info["lock_held_seconds"] >= 0
    live_binlog = server.datadir / taken[0][0]["consistency"]["mysql"]["binlog_file"]
    counts = [restore_and_check(cli, safe_dir, *t, replay=(live_binlog, total) if i == 0 else None)
              for i, t in enumerate(taken)]
    assert counts == sorted(counts) and counts[0] < counts[-1]


def test_unreachable_server_fails_before_reading_and_makes_no_point(server, safe_dir, cli):
    code, point, err = backup(cli, safe_dir, server.datadir, "--mysql", "mysql://root@localhost/?socket=/nonexistent/mysqld.sock")
    assert code == 1 and point is None
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "cannot connect" in lines[0] and "/nonexistent/mysqld.sock" in lines[0], err
    assert points(cli, safe_dir) == []


def test_wrong_password_fails_with_one_line(server, safe_dir, cli):
    dsn = f"mysql://app:wrong@localhost/?socket={server.socket}"
    code, point, err = backup(cli, safe_dir, server.datadir, "--mysql", dsn)
    assert code == 1 and point is None
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "login failed" in lines[0] and "wrong" not in lines[0], err
    assert points(cli, safe_dir) == []


def test_lock_not_obtainable_fails_then_allow_inconsistent_warns(server, safe_dir, cli):
    blocker = server.connect(database="app")
    try:
        with blocker.cursor() as c:
            c.execute("LOCK TABLES inno WRITE")  # FLUSH TABLES WITH READ LOCK must wait for this
        dsn = server.dsn + "&lock_timeout=1"
        code, point, err = backup(cli, safe_dir, server.datadir, "--mysql", dsn)
        assert code == 1 and point is None
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "FLUSH TABLES WITH READ LOCK not granted within 1 s" in lines[0], err
        assert points(cli, safe_dir) == []

        code, point, err = backup(cli, safe_dir, server.datadir, "--mysql", dsn, "--allow-inconsistent")
        assert code == 3, err
        assert any(w["path"] == "mysql" and "not granted" in w["message"] for w in point["warnings"])
        assert "mysql" not in (point.get("consistency") or {})
        assert [p["id"] for p in points(cli, safe_dir)] == [point["id"]]
    finally:
        blocker.close()
    # The failed attempts left nothing behind: writes go through, the flush setting is restored.
    t0 = time.monotonic()
    server.sql("INSERT INTO app.my VALUES (1000000, 'x', 'y')", "DELETE FROM app.my WHERE id = 1000000")
    assert time.monotonic() - t0 < 10
    assert float(server.sql("SELECT @@GLOBAL.innodb_max_dirty_pages_pct")[0][0]) > 0


def test_datadir_outside_source_is_refused(server, safe_dir, cli, tmp_path):
    (tmp_path / "elsewhere").mkdir()
    code, point, err = backup(cli, safe_dir, tmp_path / "elsewhere", "--mysql", server.dsn)
    assert code == 1 and "is not inside the backup source" in err and len(err.strip().splitlines()) == 1


def test_innodb_written_under_the_lock_is_copied_again(server):
    """If InnoDB's LSN moved while the source was read (a background write under the lock),
    files_read() copies every InnoDB file again under the lock, and those copies start.

    No statement reliably makes InnoDB write under FLUSH TABLES WITH READ LOCK, so the moved LSN
    is simulated by lowering the recorded one; everything else is the real server and files.
    """
    from pointsafe.ingest.db.mysql import MySQL
    base = new_dir("ps-mariadb-rescue-", "mysql")
    restored = MariaDB(base / "data", base / "run")
    c = MySQL(server.dsn, str(server.datadir))
    try:
        c.start()
        shutil.copytree(server.datadir, restored.datadir)       # "the read", with the lock held
        c._info["lsn"] -= 1
        c.files_read()
        assert c.info()["recopied_innodb"] is True and c.info()["lock_held_seconds"] >= 0
        extra = dict(c.extra_files())
        assert {"ibdata1", "ib_logfile0", "app/inno.ibd"} <= set(extra)
        assert not any(rel.startswith("app/my.") for rel in extra)  # MyISAM is not InnoDB's
        for rel, path in extra.items():                              # what the graft does
            shutil.copyfile(path, restored.datadir / rel)
    finally:
        c.close()
    try:
        server.sql("INSERT INTO app.my VALUES (2000000, 'x', 'y')", "DELETE FROM app.my WHERE id = 2000000")
        chown_tree(restored.datadir, "mysql")
        restored.start()
        assert [r[3] for r in restored.sql("CHECK TABLE app.inno, app.my EXTENDED")] == ["OK", "OK"]
    finally:
        restored.destroy()


def test_lock_is_held_from_start_and_released_by_close_on_failure(server):
    """Between start() and files_read() writers wait; when the backup fails in between, close()
    alone releases the lock and puts InnoDB's flush settings back."""
    import pymysql
    from pointsafe.ingest.db.mysql import MySQL
    before = server.sql("SELECT @@GLOBAL.innodb_max_dirty_pages_pct, @@GLOBAL.innodb_io_capacity")
    c = MySQL(server.dsn, str(server.datadir))
    other = server.connect(database="app")
    try:
        c.start()
        with other.cursor() as cur:
            cur.execute("SET SESSION lock_wait_timeout = 1")
            with pytest.raises(pymysql.err.OperationalError, match="Lock wait timeout"):
                cur.execute("INSERT INTO my VALUES (3000000, 'x', 'y')")
    finally:
        c.close()  # the backup "failed": files_read() never ran
    try:
        with other.cursor() as cur:
            cur.execute("INSERT INTO my VALUES (3000000, 'x', 'y')")
            cur.execute("DELETE FROM my WHERE id = 3000000")
    finally:
        other.close()
    assert server.sql("SELECT @@GLOBAL.innodb_max_dirty_pages_pct, @@GLOBAL.innodb_io_capacity") == before
