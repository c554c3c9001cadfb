"""PostgreSQL: points taken with --postgres under a continuous writer start as a cluster again.

One private cluster per module. A writer inserts checksummed rows while several points are
taken; every point is restored the way docs/RESTORE.md says (mount, copy out, remove
postmaster.pid, chown, start), must finish recovery from its backup_label with the WAL the
point holds, pass pg_amcheck (B-tree and heap checks from the amcheck extension), and hold a
gap-free prefix of the writer's rows.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from _db_servers import (Postgres, Writer, assert_clean, backup, check_prefix, chown_tree, copy_out, new_dir, payload,
                         point_files, points, postgres_skip_reason)

pytestmark = [pytest.mark.db, pytest.mark.skipif(postgres_skip_reason() is not None,
                                                 reason=postgres_skip_reason() or "")]


@pytest.fixture(scope="module")
def server():
    pg = Postgres.create()
    try:
        pg.start()
        pg.sql("CREATE TABLE rows (id int PRIMARY KEY, data text NOT NULL, sum text NOT NULL)",
               "CREATE INDEX rows_sum ON rows (sum)",
               "CREATE EXTENSION amcheck",
               "CREATE ROLE alice LOGIN PASSWORD 'right'",
               "GRANT pg_read_all_settings TO alice")
        yield pg
    finally:
        pg.destroy()


def insert(con, i: int) -> None:
    data, csum = payload(i)
    con.execute("INSERT INTO rows VALUES (%s, %s, %s)", (i, data, csum))


def restore_and_check(cli, safe: Path, point: dict, low: int, high: int, dump: bool = False) -> int:
    """RESTORE.md, PostgreSQL section, step by step."""
    base = new_dir("ps-postgres-restore-", "postgres")
    restored = Postgres(base / "data", base / "run")
    try:
        with point_files(cli, safe, point["id"]) as mnt:                  # 1. mount the point
            assert (mnt / "backup_label").is_file()                        #    backup_label is there
            copy_out(mnt, restored.datadir)                                # 2. cp -a MOUNT/. NEWDIR/
        (restored.datadir / "postmaster.pid").unlink(missing_ok=True)     # 3. rm postmaster.pid
        chown_tree(restored.datadir, "postgres")                           # 4. chown -R, chmod 700
        os.chmod(restored.datadir, 0o700)
        restored.start()                                                   # 5. pg_ctl start
        log = restored.log.read_text(errors="replace")
        for said in ("starting backup recovery", "consistent recovery state reached", "ready to accept connections"):
            assert said in log, log
        assert not (restored.datadir / "backup_label").exists()           #    consumed by recovery
        r = subprocess.run(["runuser", "-u", "postgres", "--", str(restored.bindir / "pg_amcheck"),  # 6.
                            "-h", str(restored.run), "--all", "--heapallindexed", "--install-missing"],
                           capture_output=True, text=True, timeout=300, cwd="/tmp")
        assert r.returncode == 0, r.stdout + r.stderr
        rows = restored.sql("SELECT id, data, sum FROM rows ORDER BY id")
        if dump:                                                           # 7. pg_dump
            r = restored.as_postgres(restored.bindir / "pg_dump", "-h", restored.run, "-t", "rows", "postgres")
            assert b"COPY public.rows" in r.stdout
        return check_prefix([tuple(x) for x in rows], low, high, f"point {point['id'][:8]}")
    finally:
        restored.destroy()


def test_points_under_a_writer_start_and_hold_a_prefix(server, safe_dir, cli):
    w = Writer(lambda: server.connect(), insert, pause=0.001).start()
    taken = []
    try:
        w.wait_rows(300)
        for _ in range(3):
            low = w.committed
            code, point, err = backup(cli, safe_dir, server.datadir, "--postgres", server.dsn)
            high = w.committed
            wal = (point or {}).get("consistency", {}).get("postgres", {}).get("wal_files", [])
            assert_clean(code, point, err, server.datadir, ["pg_wal/" + f for f in wal], covered=server.datadir)
            taken.append((point, low, high))
            w.wait_rows(high + 150)
    finally:
        w.stop()
    for point, _, _ in taken:
        info = point["consistency"]["postgres"]
        assert info["start_lsn"] and info["stop_lsn"] and info["wal_files"]
    counts = [restore_and_check(cli, safe_dir, *t, dump=(i == 0)) for i, t in enumerate(taken)]
    assert counts == sorted(counts) and counts[0] < counts[-1]


def test_unreachable_server_fails_before_reading_and_makes_no_point(server, safe_dir, cli):
    code, point, err = backup(cli, safe_dir, server.datadir, "--postgres", "host=/nonexistent dbname=postgres")
    assert code == 1 and point is None
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "cannot connect" in lines[0] and "/nonexistent" in lines[0], err
    assert points(cli, safe_dir) == []


def test_wrong_password_fails_with_one_line(server, safe_dir, cli):
    dsn = f"host={server.run} dbname=postgres user=alice password=wrong"
    code, point, err = backup(cli, safe_dir, server.datadir, "--postgres", dsn)
    assert code == 1 and point is None
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "login failed" in lines[0] and "password=wrong" not in lines[0], err
    assert points(cli, safe_dir) == []


def test_backup_mode_refused_fails_then_allow_inconsistent_warns(server, safe_dir, cli):
    dsn = f"host={server.run} dbname=postgres user=alice password=right"  # may not run pg_backup_start
    code, point, err = backup(cli, safe_dir, server.datadir, "--postgres", dsn)
    assert code == 1 and point is None
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "cannot enter backup mode" in lines[0] and "pg_backup_start" in lines[0], err
    assert points(cli, safe_dir) == []

    code, point, err = backup(cli, safe_dir, server.datadir, "--postgres", dsn, "--allow-inconsistent")
    assert code == 3, err
    assert any(w["path"] == "postgres" and "backup mode" in w["message"] for w in point["warnings"])
    assert [p["id"] for p in points(cli, safe_dir)] == [point["id"]]
    # No backup is left running on the server.
    assert server.sql("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pointsafe backup'") == [(0,)]


def test_point_records_lsns(server, safe_dir, cli):
    code, point, err = backup(cli, safe_dir, server.datadir, "--postgres", server.dsn)
    assert code == 0, err
    r = cli("show", point["id"], "--json", safe=safe_dir)
    info = json.loads(r.out)["consistency"]["postgres"]
    assert info["timeline"] == 1 and info["wal_files"][0].startswith("00000001")
    assert info["wal_held_by_slot"] is True  # a superuser may create the temporary slot
    assert server.sql("SELECT count(*) FROM pg_replication_slots") == [(0,)]  # gone with the session


def test_tablespace_restores_through_tablespace_map(server, safe_dir, cli):
    """A table in a tablespace outside the data directory (both inside SOURCE): the point holds
    tablespace_map; RESTORE.md's tablespace step points it at the copied directory."""
    base = server.datadir.parent
    tblspc = base / "tblspc"
    tblspc.mkdir()
    chown_tree(tblspc, "postgres")
    server.sql(f"CREATE TABLESPACE side LOCATION '{tblspc}'",
               "CREATE TABLE far (id int PRIMARY KEY, data text) TABLESPACE side",
               "INSERT INTO far SELECT g, md5(g::text) FROM generate_series(1, 5000) g")
    try:
        code, point, err = backup(cli, safe_dir, base, "--postgres", server.dsn, "--exclude", "run")
        assert_clean(code, point, err, base, [], covered=base)
        root = new_dir("ps-postgres-restore-", "postgres")
        restored = Postgres(root / "data", root / "run")
        try:
            with point_files(cli, safe_dir, point["id"]) as mnt:
                spcmap = (mnt / "data" / "tablespace_map").read_text()
                assert str(tblspc) in spcmap
                copy_out(mnt, root)                                              # data/ and tblspc/
            (restored.datadir / "postmaster.pid").unlink(missing_ok=True)
            mapfile = restored.datadir / "tablespace_map"                         # point it at the copy
            mapfile.write_text(mapfile.read_text().replace(str(tblspc), str(root / "tblspc")))
            chown_tree(root, "postgres")
            os.chmod(restored.datadir, 0o700)
            restored.start()
            assert restored.sql("SELECT count(*), sum(length(data)) FROM far") == [(5000, 5000 * 32)]
            link = next((restored.datadir / "pg_tblspc").iterdir())
            assert os.readlink(link) == str(root / "tblspc")                      # not the live one
        finally:
            restored.destroy()
    finally:
        server.sql("DROP TABLE far", "DROP TABLESPACE side")
