"""The integrations in snapshot mode, driven in the engine's order without the snapshot engine.

snapshot_mode = True, start(), (the snapshot: a stand-in here), snapshot_taken(), files_read(),
extra_files(), info(), close(). MySQL: the read lock is held from start() to snapshot_taken()
only, and no server setting changes at any moment. PostgreSQL: backup mode brackets the stand-in
snapshot and the copy starts. SQLite: nothing is copied or locked.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import threading
import time

import pytest

from _db_servers import MariaDB, Postgres, chown_tree, mariadb_skip_reason, new_dir, postgres_skip_reason

pytestmark = [pytest.mark.db]
needs_mariadb = pytest.mark.skipif(mariadb_skip_reason() is not None, reason=mariadb_skip_reason() or "")
needs_postgres = pytest.mark.skipif(postgres_skip_reason() is not None, reason=postgres_skip_reason() or "")

SETTINGS = ("SELECT @@GLOBAL.innodb_max_dirty_pages_pct, @@GLOBAL.innodb_io_capacity, "
            "@@GLOBAL.innodb_io_capacity_max, @@GLOBAL.innodb_fast_shutdown")


@pytest.fixture(autouse=True)
def state_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    return tmp_path / "state"


@pytest.fixture(scope="module")
def mariadb():
    m = MariaDB.create()
    try:
        m.start()
        m.sql("CREATE DATABASE app", "CREATE TABLE app.inno (id INT PRIMARY KEY) ENGINE=InnoDB",
              "CREATE TABLE app.my (id INT PRIMARY KEY) ENGINE=MyISAM")
        yield m
    finally:
        m.destroy()


class SettingsWatch:
    """Another connection reading InnoDB's settings every few milliseconds, in a thread."""

    def __init__(self, server: MariaDB):
        self.server, self.seen, self.stop_ = server, set(), threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        con = self.server.connect()
        try:
            with con.cursor() as c:
                while not self.stop_.is_set():
                    c.execute(SETTINGS)
                    self.seen.add(tuple(float(v) for v in c.fetchone()))
                    time.sleep(0.003)
        finally:
            con.close()

    def __enter__(self) -> "SettingsWatch":
        self.thread.start()
        while not self.seen:
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.stop_.set()
        self.thread.join(timeout=30)


def insert_blocked(server: MariaDB, i: int) -> bool:
    """Whether an INSERT into a MyISAM and an InnoDB table waits for the global read lock."""
    import pymysql
    con = server.connect(database="app")
    try:
        with con.cursor() as c:
            c.execute("SET SESSION lock_wait_timeout = 1")
            try:
                c.execute(f"INSERT INTO my VALUES ({i})")
                c.execute(f"INSERT INTO inno VALUES ({i})")
                return False
            except pymysql.err.OperationalError as e:
                assert "Lock wait timeout" in str(e), e
                return True
    finally:
        con.close()


@needs_mariadb
def test_mysql_lock_is_held_for_the_snapshot_only_and_no_setting_changes(mariadb, state_home):
    from pointsafe.ingest.db.mysql import MySQL
    c = MySQL(mariadb.dsn, str(mariadb.datadir))
    c.snapshot_mode = True
    with SettingsWatch(mariadb) as watch:
        try:
            c.start()
            assert insert_blocked(mariadb, 1)                     # the lock is on: "the snapshot" now
            assert not state_home.exists()                        # nothing to guard: nothing changed
            c.snapshot_taken()
            assert not insert_blocked(mariadb, 2)                 # released before the snapshot is read
            c.files_read()
            assert c.extra_files() == []
            info = c.info()
        finally:
            c.close()
    assert len(watch.seen) == 1, watch.seen                       # not one setting moved, at any time
    assert info["mode"] == "snapshot" and info["binlog_file"].startswith("binlog.")
    assert 0 <= info["lock_held_seconds"] and "lsn" not in info and "preflush_seconds" not in info
    # The recorded position is the binary log's end while the lock was held: the insert made
    # after snapshot_taken() comes after it.
    rows = mariadb.sql("SHOW BINLOG EVENTS IN '%s' FROM %d" % (info["binlog_file"], info["binlog_position"]))
    assert any("INSERT INTO my VALUES (2)" in str(r) for r in rows)
    assert not any("INSERT INTO my VALUES (1)" in str(r) for r in rows)
    assert c.covered_paths() == [""]


@needs_mariadb
def test_mysql_snapshot_that_fails_is_unlocked_by_close(mariadb):
    from pointsafe.ingest.db.mysql import MySQL
    c = MySQL(mariadb.dsn, str(mariadb.datadir))
    c.snapshot_mode = True
    try:
        c.start()
        assert insert_blocked(mariadb, 10)
    finally:
        c.close()                                                 # snapshot_taken() never came
    assert not insert_blocked(mariadb, 11)


@needs_postgres
def test_postgres_backup_mode_brackets_the_snapshot_and_the_copy_starts():
    from pointsafe.ingest.db.postgres import Postgres as PgIntegration
    pg = Postgres.create()
    base = new_dir("ps-postgres-restore-", "postgres")
    restored = Postgres(base / "data", base / "run")
    try:
        pg.start()
        pg.sql("CREATE TABLE t (id int PRIMARY KEY, v text)",
               "INSERT INTO t SELECT g, md5(g::text) FROM generate_series(1, 20000) g")
        c = PgIntegration(pg.dsn, str(pg.datadir))
        c.snapshot_mode = True
        try:
            c.start()
            # "The snapshot": a copy taken while the server runs in backup mode, without the
            # files the integration excludes (its live WAL segments) and the pid file.
            [pattern] = c.excludes()
            assert pattern == "pg_wal/" + "[0-9A-F]" * 24
            shutil.copytree(pg.datadir, restored.datadir, symlinks=True,
                            ignore=lambda d, names: [n for n in names if n == "postmaster.pid"
                                                     or (d.endswith("pg_wal") and len(n) == 24)])
            pg.sql("INSERT INTO t VALUES (20001, 'after the snapshot')")
            c.snapshot_taken()
            info = c.info()
            assert info["mode"] == "snapshot" and info["stop_lsn"] and info["wal_files"]
            c.files_read()                                        # nothing left to do
            extra = c.extra_files()
            assert {rel for rel, _ in extra} >= {"backup_label", *("pg_wal/" + w for w in info["wal_files"])}
            for rel, content in extra:                            # what the graft does
                dst = restored.datadir / rel
                if isinstance(content, bytes):
                    dst.write_bytes(content)
                else:
                    shutil.copyfile(content, dst)
        finally:
            c.close()
        assert c.covered_paths() == [""]
        chown_tree(restored.datadir, "postgres")
        os.chmod(restored.datadir, 0o700)
        restored.start()
        log = restored.log.read_text(errors="replace")
        assert "starting backup recovery" in log and "consistent recovery state reached" in log, log
        assert restored.sql("SELECT count(*) FROM t WHERE id <= 20000") == [(20000,)]
        r = subprocess.run(["runuser", "-u", "postgres", "--", str(restored.bindir / "pg_amcheck"), "-h",
                            str(restored.run), "--all", "--heapallindexed", "--install-missing"],
                           capture_output=True, text=True, timeout=300, cwd="/tmp")
        assert r.returncode == 0, r.stdout + r.stderr
    finally:
        restored.destroy()
        pg.destroy()


def test_sqlite_in_a_snapshot_is_neither_copied_nor_locked(tmp_path):
    from pointsafe.ingest.db import ConsistencyError
    from pointsafe.ingest.db.sqlite import SQLite
    db = tmp_path / "app.db"
    con = sqlite3.connect(db, isolation_level=None)
    con.execute("CREATE TABLE t (x)")
    con.execute("BEGIN EXCLUSIVE")                                # a writer holds the database
    con.execute("INSERT INTO t VALUES (1)")
    try:
        live = SQLite(str(db), str(tmp_path), lock_timeout=0.2)
        with pytest.raises(ConsistencyError, match="read lock"):
            live.start()                                          # live, it needs a read lock
        c = SQLite(str(db), str(tmp_path), lock_timeout=0.2)
        c.snapshot_mode = True
        try:
            c.start()
            c.snapshot_taken()
            c.files_read()
            assert c.extra_files() == []                          # the snapshot's file is the copy
            assert c.info()["copy"] == "snapshot" and c.info()["path"] == "app.db"
        finally:
            c.close()
    finally:
        con.execute("ROLLBACK")
        con.close()
    outside = SQLite("/etc/hostname", str(tmp_path))
    outside.snapshot_mode = True
    with pytest.raises(ConsistencyError):
        outside.start()
