"""Database points from btrfs snapshots, under a continuous write load, end to end.

MariaDB with its data directory on a btrfs subvolume, while a writer moves money between
accounts (InnoDB transactions, and single-statement transfers in a MyISAM table) so that each
table's total stays constant: points taken with ``--mysql --snapshot btrfs`` each, copied out of
the mount, start, pass CHECK TABLE, keep both totals, and end their binary log at the recorded
position; no InnoDB setting changes at any moment. The same for PostgreSQL under pgbench
(TPC-B's balance sums agree, pg_amcheck passes, the point holds the WAL from start to stop).
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from _db_servers import (INSTALL_DB, MariaDB, Postgres, backup, chown_tree, copy_out, mariadb_skip_reason, new_dir,
                         point_files, postgres_skip_reason)

try:
    import pointsafe.ingest.snapshot  # noqa: F401
    _ENGINE = None
except ImportError:
    _ENGINE = "needs the snapshot engine (pointsafe.ingest.snapshot)"

pytestmark = [pytest.mark.db, pytest.mark.skipif(_ENGINE is not None, reason=_ENGINE or "")]
needs_mariadb = pytest.mark.skipif(mariadb_skip_reason() is not None, reason=mariadb_skip_reason() or "")
needs_postgres = pytest.mark.skipif(postgres_skip_reason() is not None, reason=postgres_skip_reason() or "")

ACCOUNTS = 200
START_BALANCE = 1000
POINTS = 3
SETTINGS = "SELECT @@GLOBAL.innodb_max_dirty_pages_pct, @@GLOBAL.innodb_io_capacity, @@GLOBAL.innodb_io_capacity_max"


@pytest.fixture(autouse=True)
def state_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))


@contextmanager
def subvolume_for(owner: str, name: str):
    """A btrfs subvolume on a loop device, in a directory the database's user can reach
    (pytest's own base directory is private to root)."""
    from btrfs_util import btrfs_volume, make_subvolume
    base = new_dir(f"ps-btrfs-{name}-")
    os.chmod(base, 0o755)
    try:
        with btrfs_volume(base, size="1G") as mnt:
            sub = make_subvolume(mnt, name)
            chown_tree(sub, owner)
            yield sub
    finally:
        shutil.rmtree(base, ignore_errors=True)


# ----------------------------------------------------------------------------------- MariaDB

class Transfers:
    """A thread moving money between random accounts until stopped: an InnoDB transaction of two
    updates, and a single UPDATE statement in the MyISAM table (atomic under the read lock)."""

    def __init__(self, server: MariaDB):
        self.server, self.done, self.error = server, 0, None
        self.stop_ = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        rnd = random.Random(7)
        try:
            con = self.server.connect(database="bank", autocommit=False)
            with con.cursor() as c:
                while not self.stop_.is_set():
                    a, b = rnd.sample(range(1, ACCOUNTS + 1), 2)
                    x = rnd.randint(1, 50)
                    c.execute("UPDATE inno SET balance = balance - %s WHERE id = %s", (x, a))
                    c.execute("UPDATE inno SET balance = balance + %s WHERE id = %s", (x, b))
                    con.commit()
                    c.execute("UPDATE my SET balance = balance + IF(id = %s, -%s, %s) WHERE id IN (%s, %s)",
                              (a, x, x, a, b))
                    con.commit()
                    self.done += 1
            con.close()
        except BaseException as e:  # reported by stop()
            self.error = e

    def __enter__(self) -> "Transfers":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop_.set()
        self.thread.join(timeout=60)
        if self.error and not exc[0]:
            raise self.error


class SettingsWatch(threading.Thread):
    def __init__(self, server: MariaDB):
        super().__init__(daemon=True)
        self.server, self.seen, self.stop_ = server, set(), threading.Event()

    def run(self) -> None:
        con = self.server.connect()
        with con.cursor() as c:
            while not self.stop_.is_set():
                c.execute(SETTINGS)
                self.seen.add(tuple(float(v) for v in c.fetchone()))
                time.sleep(0.005)
        con.close()


def mariadb_on(sub: Path) -> MariaDB:
    datadir, run = sub / "data", new_dir("ps-mariadb-run-", "mysql")
    datadir.mkdir()
    chown_tree(sub, "mysql")
    subprocess.run([INSTALL_DB, "--no-defaults", "--user=mysql", f"--datadir={datadir}",
                    "--auth-root-authentication-method=socket", "--skip-test-db"],
                   check=True, capture_output=True, timeout=120)
    return MariaDB(datadir, run)


def check_mariadb_point(cli, safe: Path, point: dict) -> None:
    base = new_dir("ps-mariadb-restore-", "mysql")
    restored = MariaDB(base / "data", base / "run")
    try:
        with point_files(cli, safe, point["id"]) as mnt:
            copy_out(mnt, restored.datadir)
        chown_tree(restored.datadir, "mysql")
        restored.start()
        checks = restored.sql("CHECK TABLE bank.inno, bank.my EXTENDED")
        assert [r[3] for r in checks if r[2] == "status"] == ["OK", "OK"], checks
        for table in ("inno", "my"):
            total, n = restored.sql(f"SELECT sum(balance), count(*) FROM bank.{table}")[0]
            assert (int(total), n) == (ACCOUNTS * START_BALANCE, ACCOUNTS), (point["id"][:8], table, total)
        info = point["consistency"]["mysql"]
        assert (restored.datadir / info["binlog_file"]).stat().st_size == info["binlog_position"]
    finally:
        restored.destroy()


@needs_mariadb
def test_mariadb_points_from_btrfs_snapshots_start_and_keep_the_total(safe_dir, cli):
    with subvolume_for("mysql", "mysql") as sub:
        server = mariadb_on(sub)
        try:
            server.start()
            rows = ", ".join(f"({i}, {START_BALANCE})" for i in range(1, ACCOUNTS + 1))
            server.sql("CREATE DATABASE bank",
                       "CREATE TABLE bank.inno (id INT PRIMARY KEY, balance INT NOT NULL) ENGINE=InnoDB",
                       "CREATE TABLE bank.my (id INT PRIMARY KEY, balance INT NOT NULL) ENGINE=MyISAM",
                       f"INSERT INTO bank.inno VALUES {rows}", f"INSERT INTO bank.my VALUES {rows}")
            watch = SettingsWatch(server)
            watch.start()
            taken = []
            try:
                with Transfers(server) as load:
                    while load.done < 50 and load.error is None:
                        time.sleep(0.05)
                    for _ in range(POINTS):
                        before = load.done
                        code, point, err = backup(cli, safe_dir, server.datadir, "--mysql", server.dsn,
                                                  "--snapshot", "btrfs")
                        assert code == 0 and point["warnings"] == [], (err, point and point["warnings"])
                        assert point["snapshot"]["method"] == "btrfs"
                        info = point["consistency"]["mysql"]
                        assert info["mode"] == "snapshot" and info["lock_held_seconds"] >= 0
                        taken.append(point)
                        while load.done < before + 50 and load.error is None:
                            time.sleep(0.05)
            finally:
                watch.stop_.set()
                watch.join(timeout=30)
            assert len(watch.seen) == 1, watch.seen       # no InnoDB setting changed, ever
            for point in taken:
                check_mariadb_point(cli, safe_dir, point)
            # Read from a snapshot too, a live data directory backed up without --mysql is named.
            code, point, err = backup(cli, safe_dir, sub, "--snapshot", "btrfs")
            assert code == 3 and point["snapshot"]["method"] == "btrfs", err
            live = [w for w in point["warnings"] if "data directory of a running" in w["message"]]
            assert [w["path"] for w in live] == [str(server.datadir)] and "--mysql" in live[0]["message"], live
        finally:
            server.destroy()


# ----------------------------------------------------------------------------------- PostgreSQL

def postgres_on(sub: Path) -> Postgres:
    pg = Postgres(sub / "data", new_dir("ps-postgres-run-", "postgres"))
    pg.as_postgres(pg.bindir / "initdb", "-D", pg.datadir, "-U", "postgres", "-A", "trust", "-k",
                   "--no-sync", "-E", "UTF8", "--locale=C.UTF-8")
    with open(pg.datadir / "postgresql.conf", "a") as f:
        f.write("\nlisten_addresses = ''\nmax_wal_size = 64MB\nmin_wal_size = 32MB\nwal_keep_size = 512MB\n"
                "shared_buffers = 32MB\nlog_min_messages = warning\n")
    return pg


def pgbench_sums(pg: Postgres) -> list:
    return list(pg.sql("SELECT (SELECT sum(abalance) FROM pgbench_accounts), (SELECT sum(bbalance) FROM pgbench_branches),"
                       " (SELECT sum(tbalance) FROM pgbench_tellers), (SELECT coalesce(sum(delta), 0) FROM pgbench_history)")[0])


def check_postgres_point(cli, safe: Path, point: dict) -> None:
    base = new_dir("ps-postgres-restore-", "postgres")
    restored = Postgres(base / "data", base / "run")
    try:
        with point_files(cli, safe, point["id"]) as mnt:
            wal = sorted(n for n in os.listdir(mnt / "pg_wal") if len(n) == 24)
            assert wal == point["consistency"]["postgres"]["wal_files"], wal
            copy_out(mnt, restored.datadir)
        (restored.datadir / "postmaster.pid").unlink(missing_ok=True)
        chown_tree(restored.datadir, "postgres")
        os.chmod(restored.datadir, 0o700)
        restored.start()
        log = restored.log.read_text(errors="replace")
        assert "starting backup recovery" in log and "consistent recovery state reached" in log, log
        r = subprocess.run(["runuser", "-u", "postgres", "--", str(restored.bindir / "pg_amcheck"), "-h",
                            str(restored.run), "--all", "--heapallindexed", "--install-missing"],
                           capture_output=True, text=True, timeout=600, cwd="/tmp")
        assert r.returncode == 0, r.stdout + r.stderr
        sums = pgbench_sums(restored)
        assert len(set(sums)) == 1, sums
    finally:
        restored.destroy()


@needs_postgres
def test_postgres_points_from_btrfs_snapshots_recover_under_pgbench(safe_dir, cli):
    with subvolume_for("postgres", "pg") as sub:
        pg = postgres_on(sub)
        try:
            pg.start()
            pg.as_postgres(pg.bindir / "pgbench", "-h", pg.run, "-i", "-s", "4", "-q", "postgres", timeout=600)
            load = subprocess.Popen(["runuser", "-u", "postgres", "--", str(pg.bindir / "pgbench"), "-h", str(pg.run),
                                     "-c", "2", "-j", "2", "-T", "600", "-n", "postgres"], cwd="/tmp",
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
            taken = []
            try:
                time.sleep(2)
                for _ in range(POINTS):
                    code, point, err = backup(cli, safe_dir, pg.datadir, "--postgres", pg.dsn, "--snapshot", "btrfs")
                    assert code == 0 and point["warnings"] == [], (err, point and point["warnings"])
                    assert point["snapshot"]["method"] == "btrfs"
                    assert point["consistency"]["postgres"]["mode"] == "snapshot"
                    taken.append(point)
                    time.sleep(1)
            finally:
                os.killpg(load.pid, 9)
                load.wait(timeout=30)
            for point in taken:
                check_postgres_point(cli, safe_dir, point)
        finally:
            pg.destroy()
