"""A tree holding the data directory of a running MariaDB or PostgreSQL, backed up without the
matching option, gets a warning naming the database and the option; a stopped server's does not.
"""

from __future__ import annotations

import shutil

import pytest

from _db_servers import MariaDB, Postgres, backup, mariadb_skip_reason, postgres_skip_reason

pytestmark = [pytest.mark.db]
needs_mariadb = pytest.mark.skipif(mariadb_skip_reason() is not None, reason=mariadb_skip_reason() or "")
needs_postgres = pytest.mark.skipif(postgres_skip_reason() is not None, reason=postgres_skip_reason() or "")

MARK = "data directory of a running"


def live_warnings(point: dict) -> list[dict]:
    return [w for w in point["warnings"] if MARK in w["message"]]


@needs_mariadb
def test_live_mariadb_datadir_without_mysql_warns_and_a_stopped_one_does_not(safe_dir, cli):
    m = MariaDB.create()
    try:
        m.start()
        m.sql("CREATE DATABASE app", "CREATE TABLE app.my (id INT PRIMARY KEY) ENGINE=MyISAM",
              "INSERT INTO app.my VALUES (1)")
        code, point, err = backup(cli, safe_dir, m.datadir.parent, "--exclude", "run")
        assert code == 3, err
        [w] = live_warnings(point)
        assert w["path"] == str(m.datadir)
        assert "MariaDB/MySQL" in w["message"] and "--mysql" in w["message"], w
        assert f"pid {m.proc.pid}" in w["message"]

        # With the option, the data directory is covered: no such warning.
        code, point, err = backup(cli, safe_dir, m.datadir.parent, "--exclude", "run", "--mysql", m.dsn)
        assert point is not None and not live_warnings(point), err

        m.stop()
        code, point, err = backup(cli, safe_dir, m.datadir.parent, "--exclude", "run")
        assert code == 0 and point["warnings"] == [], (err, point and point["warnings"])
    finally:
        m.destroy()


@needs_postgres
def test_live_postgres_datadir_without_postgres_warns_and_a_stopped_one_does_not(safe_dir, cli, tmp_path):
    pg = Postgres.create()
    try:
        pg.start()
        code, point, err = backup(cli, safe_dir, pg.datadir.parent, "--exclude", "run")
        assert code == 3, err
        [w] = live_warnings(point)
        assert w["path"] == str(pg.datadir)
        assert "PostgreSQL" in w["message"] and "--postgres" in w["message"], w

        code, point, err = backup(cli, safe_dir, pg.datadir.parent, "--exclude", "run", "--postgres", pg.dsn)
        assert point is not None and not live_warnings(point), err

        # A copy of the live data directory elsewhere (its postmaster.pid names the live
        # server, but not this directory) is not the running server's.
        copy = tmp_path / "copy"
        shutil.copytree(pg.datadir, copy / "data", ignore=shutil.ignore_patterns("pg_wal"))
        code, point, err = backup(cli, safe_dir, copy)
        assert point is not None and not live_warnings(point), err

        pg.stop()
        assert not (pg.datadir / "postmaster.pid").exists()
        code, point, err = backup(cli, safe_dir, pg.datadir.parent, "--exclude", "run")
        assert code == 0 and point["warnings"] == [], (err, point and point["warnings"])
        # A stale pid file (a crashed server) naming a process that is not PostgreSQL.
        (pg.datadir / "postmaster.pid").write_text(f"1\n{pg.datadir}\n0\n5432\n{pg.run}\n")
        code, point, err = backup(cli, safe_dir, pg.datadir.parent, "--exclude", "run")
        assert code == 0 and point["warnings"] == [], (err, point and point["warnings"])
    finally:
        pg.destroy()


def test_ordinary_directories_cost_only_a_look_at_their_names():
    """The walk calls the detector for every directory: unless the names look like a data
    directory it neither asks for the path nor touches the disk."""
    from pointsafe.ingest.db.detect import live_database

    def no_path() -> bytes:
        raise AssertionError("the path was asked for")
    assert live_database([b"src", b"README", b"mysql", b"base"], no_path) is None
    assert live_database([], no_path) is None
