"""Database-consistent points made by an agent through the safe server (``backup --server URL
--sqlite/--postgres``): the agent coordinates with its database on its own machine exactly as a
local backup does, the consistent copies (SQLite's online backup, PostgreSQL's backup_label and
WAL) are grafted into the point it uploads, and the point starts as a database again.

Real ``pointsafe serve`` on loopback, real SQLite writers and a real PostgreSQL cluster; the
points are checked the way docs/RESTORE.md says, through the served safe."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from _db_servers import Postgres, Writer, assert_clean, check_prefix, postgres_skip_reason
from _server_util import add_agent, agent, make_safe, running
from test_db_postgres import insert, restore_and_check
from test_db_sqlite import MODES, PREFILL, check_point, replaced, source, sqlite_args, writer  # noqa: F401 - source: a fixture

pytestmark = pytest.mark.db


def agent_backup(server, tok: str, src: Path, *args: str) -> tuple[int, dict | None, str]:
    """``pointsafe backup SRC --name db ARGS --json --server URL`` as the agent: (exit code, point, stderr)."""
    r = agent(server, tok, "backup", src, "--name", "db", "--json", "-q", *args)
    point = json.loads(r.out) if r.code in (0, 3) and r.out.strip() else None
    return r.code, point, r.err


def test_agent_sqlite_points_under_writers_open_from_the_served_safe(source, tmp_path, cli):  # noqa: F811 - the fixture
    safe = make_safe(tmp_path)
    tok = add_agent(safe, "app1", "--can-restore")
    writers = {name: writer(source / "app" / name).start(PREFILL + 1) for name in MODES}
    taken = []
    try:
        with running(safe) as server:
            for w in writers.values():
                w.wait_rows(PREFILL + 200)
            for _ in range(2):
                low = {n: w.committed for n, w in writers.items()}
                code, point, err = agent_backup(server, tok, source, *sqlite_args(source))
                high = {n: w.committed for n, w in writers.items()}
                assert_clean(code, point, err, source, replaced())
                assert point is not None and point["upload"]["objects_uploaded"] > 0
                taken.append((point, {n: (low[n], high[n]) for n in MODES}))
                for n, w in writers.items():
                    w.wait_rows(high[n] + 100)
            # the agent reads its own point back: the consistent copies are what it restores
            out = tmp_path / "restored"
            r = agent(server, tok, "restore", taken[-1][0]["id"], out)
            assert r.code == 0, r.err
            for name in MODES:
                import sqlite3
                con = sqlite3.connect(f"file:{out}/app/{name}?mode=ro", uri=True)
                assert con.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
                rows = con.execute("SELECT id, data, sum FROM rows ORDER BY id").fetchall()
                con.close()
                check_prefix(rows, *taken[-1][1][name], f"restored {name}")
    finally:
        for w in writers.values():
            w.stop()
    for point, _ in taken:
        assert set(point["consistency"]) == {f"sqlite:{source}/app/{n}" for n in MODES}
    counts = [check_point(cli, safe, source, *t) for t in taken]
    for name in MODES:
        assert counts[0][name] < counts[1][name]


@pytest.mark.skipif(postgres_skip_reason() is not None, reason=postgres_skip_reason() or "")
def test_agent_postgres_points_under_a_writer_start_as_a_cluster(tmp_path, cli):
    pg = Postgres.create()
    try:
        pg.start()
        pg.sql("CREATE TABLE rows (id int PRIMARY KEY, data text NOT NULL, sum text NOT NULL)",
               "CREATE INDEX rows_sum ON rows (sum)", "CREATE EXTENSION amcheck")
        safe = make_safe(tmp_path)
        tok = add_agent(safe, "db1", "--sources", str(pg.datadir))
        w = Writer(lambda: pg.connect(), insert, pause=0.001).start()
        taken = []
        try:
            with running(safe) as server:
                w.wait_rows(300)
                for _ in range(2):
                    low = w.committed
                    code, point, err = agent_backup(server, tok, pg.datadir, "--postgres", pg.dsn)
                    high = w.committed
                    wal = (point or {}).get("consistency", {}).get("postgres", {}).get("wal_files", [])
                    assert_clean(code, point, err, pg.datadir, ["pg_wal/" + f for f in wal], covered=pg.datadir)
                    assert wal, point
                    taken.append((point, low, high))
                    w.wait_rows(high + 150)
                # no backup left running on the database server
                assert pg.sql("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pointsafe backup'") \
                    == [(0,)]
                # an unreachable database: one line, no point on the server
                code, point, err = agent_backup(server, tok, pg.datadir, "--postgres", "host=/nonexistent dbname=postgres")
                assert code == 1 and point is None
                lines = err.strip().splitlines()
                assert len(lines) == 1 and "cannot connect" in lines[0], err
                r = agent(server, tok, "points", "--json")
                assert r.code == 0, r.err
                listed = json.loads(r.out)
                listed = listed if isinstance(listed, list) else listed.get("points", [])
                assert sorted(p["id"] for p in listed) == sorted(p["id"] for p, _, _ in taken)
        finally:
            w.stop()
        counts = [restore_and_check(cli, safe, *t) for t in taken]
        assert counts[0] < counts[1]
    finally:
        pg.destroy()


def test_what_an_agent_records_reaches_the_admins_terminal_without_escape_sequences(tmp_path):
    safe = make_safe(tmp_path)
    tok = add_agent(safe, "web1")
    evil = "\x1b]0;pwned\x07\x1b[2J"
    with running(safe) as server, server.client(tok) as a:
        r = a.post("/api/v1/points", json={"name": "db", "kind": "tree", "source": "/srv", "root": None,
                                           "warnings": [{"path": f"/srv/{evil}", "message": f"changed {evil}"}],
                                           "consistency": {f"sqlite:/srv/{evil}": {"note": evil, "wal": [evil]}}})
        assert r.status_code == 200, r.text
        pid = r.json()["id"]
    from conftest import run_cli
    shown = run_cli("show", pid, safe=safe)
    assert shown.code == 0, shown.err
    assert "\x1b" not in shown.out and "\x07" not in shown.out
    assert "changed \\x1b]0;pwned\\x07\\x1b[2J" in shown.out
    # --json keeps the record as it is (JSON escapes control characters itself)
    rec = json.loads(run_cli("show", pid, "--json", safe=safe).out)
    assert rec["consistency"][f"sqlite:/srv/{evil}"]["note"] == evil
