"""SQLite: points taken with --sqlite under continuous writers open straight from the mount.

Two databases, one in WAL mode and one in rollback-journal mode, each with its own writer
inserting checksummed rows in autocommit. Every point is mounted and each database is ATTACHed
read-only straight from the mount (docs/RESTORE.md), must pass PRAGMA integrity_check and hold
a gap-free prefix of its writer's rows; then it is copied out and opened read-write as an
application would.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
from pathlib import Path

import pytest

from _db_servers import Writer, assert_clean, backup, check_prefix, copy_out, new_dir, payload, point_files, points

pytestmark = pytest.mark.db

MODES = {"wal.db": "wal", "journal.db": "delete"}
PREFILL = 8000


@pytest.fixture
def source():
    d = new_dir("ps-sqlite-")
    try:
        app = d / "app"
        app.mkdir()
        for name, mode in MODES.items():
            con = sqlite3.connect(app / name, isolation_level=None)
            con.execute(f"PRAGMA journal_mode={mode}")
            con.execute("CREATE TABLE rows (id INTEGER PRIMARY KEY, data TEXT NOT NULL, sum TEXT NOT NULL)")
            con.execute("CREATE INDEX rows_sum ON rows (sum)")
            # Big enough (≈ 8 MB) that the tree walk reads it in many pieces while it changes.
            con.execute("BEGIN")
            con.executemany("INSERT INTO rows VALUES (?, ?, ?)", ((i, *payload(i)) for i in range(1, PREFILL + 1)))
            con.execute("COMMIT")
            con.close()
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def writer(path: Path) -> Writer:
    def connect():
        con = sqlite3.connect(path, isolation_level=None, timeout=30, check_same_thread=False)
        con.execute("PRAGMA wal_autocheckpoint = 16")  # WAL mode: the main file changes often too
        return con

    def insert(con, i):
        con.execute("INSERT INTO rows VALUES (?, ?, ?)", (i, *payload(i)))
    return Writer(connect, insert, pause=0.001, committed=PREFILL)


def sqlite_args(src: Path) -> list[str]:
    out = []
    for name in MODES:
        out += ["--sqlite", str(src / "app" / name)]
    return out


def replaced() -> list[str]:
    return [f"app/{n}{s}" for n in MODES for s in ("", "-wal", "-shm", "-journal")]


def check_point(cli, safe: Path, source: Path, point: dict, bounds: dict) -> dict:
    counts = {}
    with point_files(cli, safe, point["id"]) as mnt:
        for name in MODES:
            # RESTORE.md step 2: look at it in place, read-only, straight from the mount.
            uri = f"file:{mnt}/app/{name}?mode=ro"
            r = subprocess.run(["sqlite3", uri, "PRAGMA integrity_check;"], capture_output=True, text=True, timeout=60)
            assert r.returncode == 0 and r.stdout.strip() == "ok", r.stdout + r.stderr
            con = sqlite3.connect("file::memory:", uri=True)
            con.execute("ATTACH DATABASE ? AS p", (uri,))
            assert con.execute("PRAGMA p.integrity_check").fetchall() == [("ok",)]
            with pytest.raises(sqlite3.OperationalError, match="readonly"):
                con.execute("INSERT INTO p.rows VALUES (0, 'x', 'y')")
            rows = con.execute("SELECT id, data, sum FROM p.rows ORDER BY id").fetchall()
            con.close()
            low, high = bounds[name]
            counts[name] = check_prefix(rows, low, high, f"point {point['id'][:8]} {name}")
        # RESTORE.md step 3, over a directory holding the live databases' (stale) files:
        # remove the companions, copy the database and its companions from the point.
        out = new_dir("ps-sqlite-restore-")
        try:
            copy_out(source / "app", out)
            for name in MODES:
                for suffix in ("-wal", "-shm", "-journal"):
                    (out / (name + suffix)).unlink(missing_ok=True)
                files = sorted(str(p) for p in (mnt / "app").glob(name + "*"))
                subprocess.run(["cp", "-a", *files, f"{out}/"], check=True, timeout=60)
            for name in MODES:
                con = sqlite3.connect(out / name, isolation_level=None)
                assert con.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
                n = con.execute("SELECT count(*) FROM rows").fetchone()[0]
                con.execute("INSERT INTO rows VALUES (?, ?, ?)", (n + 1, *payload(n + 1)))
                assert con.execute("SELECT max(id) FROM rows").fetchone()[0] == counts[name] + 1
                con.close()
        finally:
            shutil.rmtree(out, ignore_errors=True)
    return counts


def test_points_under_writers_attach_read_only_from_the_mount(source, safe_dir, cli):
    writers = {name: writer(source / "app" / name).start(PREFILL + 1) for name in MODES}
    taken = []
    try:
        for w in writers.values():
            w.wait_rows(PREFILL + 200)
        for _ in range(3):
            low = {n: w.committed for n, w in writers.items()}
            code, point, err = backup(cli, safe_dir, source, *sqlite_args(source))
            high = {n: w.committed for n, w in writers.items()}
            assert_clean(code, point, err, source, replaced())
            taken.append((point, {n: (low[n], high[n]) for n in MODES}))
            for n, w in writers.items():
                w.wait_rows(high[n] + 100)
    finally:
        for w in writers.values():
            w.stop()
    for point, _ in taken:
        assert set(point["consistency"]) == {f"sqlite:{source}/app/{n}" for n in MODES}
    counts = [check_point(cli, safe_dir, source, *t) for t in taken]
    for name in MODES:
        seq = [c[name] for c in counts]
        assert seq == sorted(seq) and seq[0] < seq[-1]


def test_missing_or_foreign_file_fails_with_one_line(source, safe_dir, cli):
    code, point, err = backup(cli, safe_dir, source, "--sqlite", str(source / "app" / "nope.db"))
    assert code == 1 and "no such database file" in err and len(err.strip().splitlines()) == 1, err
    (source / "app" / "notes.txt").write_bytes(b"not a database, just text\n" * 100)
    code, point, err = backup(cli, safe_dir, source, "--sqlite", str(source / "app" / "notes.txt"))
    assert code == 1 and "not a database" in err and len(err.strip().splitlines()) == 1, err
    code, point, err = backup(cli, safe_dir, source / "app", "--sqlite", "/etc/hostname")
    assert code == 1 and "not inside the backup source" in err, err
    assert points(cli, safe_dir) == []


def test_locked_database_fails_then_allow_inconsistent_warns(source, safe_dir, cli):
    path = source / "app" / "journal.db"
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")  # no reader may start until it ends
    try:
        env = {"POINTSAFE_SQLITE_TIMEOUT": "0.5"}
        r = cli("backup", source, "--name", "db", "--sqlite", path, "--json", safe=safe_dir, env=env)
        assert r.code == 1 and len(r.err.strip().splitlines()) == 1, r.err
        assert "could not get a read lock within 0.5 s" in r.err
        assert points(cli, safe_dir) == []
        r = cli("backup", source, "--name", "db", "--sqlite", path, "--allow-inconsistent", "--json",
                safe=safe_dir, env=env)
        assert r.code == 3, r.err
        point = json.loads(r.out)
        assert [w["path"] for w in point["warnings"]] == ["sqlite"]
        assert "could not get a read lock" in point["warnings"][0]["message"]
        assert [p["id"] for p in points(cli, safe_dir)] == [point["id"]]
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()


def test_database_options_refused_for_volumes(source, safe_dir, cli):
    img = source / "disk.img"
    img.write_bytes(b"\0" * 65536)
    r = cli("backup", img, "--volume", "--sqlite", source / "app" / "wal.db", safe=safe_dir)
    assert r.code == 1 and "directory backups, not --volume" in r.err and len(r.err.strip().splitlines()) == 1
