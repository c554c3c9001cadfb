"""PostgreSQL points under pgbench: no false warnings, and exactly the WAL the backup needs.

- A --postgres backup while pgbench writes ends with exit 0 and no warning: relation files that
  change while read in backup mode are repaired by WAL replay, which is the point of backup mode.
- The point's pg_wal holds exactly the segments from the backup's start LSN to its stop LSN,
  not every segment the live server keeps (here wal_keep_size keeps many); the copy starts.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from _db_servers import Postgres, backup, chown_tree, copy_out, new_dir, point_files, postgres_skip_reason

pytestmark = [pytest.mark.db, pytest.mark.skipif(postgres_skip_reason() is not None,
                                                 reason=postgres_skip_reason() or "")]

SEGMENT = 16 << 20


@pytest.fixture(scope="module")
def server():
    pg = Postgres.create()
    try:
        with open(pg.datadir / "postgresql.conf", "a") as f:
            f.write("\nwal_keep_size = 1GB\n")     # the live pg_wal keeps many old segments
        pg.start()
        pg.as_postgres(pg.bindir / "pgbench", "-h", pg.run, "-i", "-s", "8", "-q", "postgres", timeout=600)
        pg.sql("CREATE EXTENSION amcheck")
        yield pg
    finally:
        pg.destroy()


def segments(lsn_text: str) -> int:
    hi, lo = lsn_text.split("/")
    return ((int(hi, 16) << 32) | int(lo, 16)) // SEGMENT


def expected_wal(info: dict) -> list[str]:
    """The segment names from the start LSN's segment to the stop LSN's (the segment holding
    the last byte before the stop LSN), on the point's timeline."""
    first = segments(info["start_lsn"])
    hi, lo = info["stop_lsn"].split("/")
    last = max(first, (((int(hi, 16) << 32) | int(lo, 16)) - 1) // SEGMENT)
    per = 0x100000000 // SEGMENT
    return [f"{info['timeline']:08X}{n // per:08X}{n % per:08X}" for n in range(first, last + 1)]


class Pgbench:
    """pgbench writing (TPC-B transactions) until stopped."""

    def __init__(self, pg: Postgres, seconds: int = 600):
        self.proc = subprocess.Popen(["runuser", "-u", "postgres", "--", str(pg.bindir / "pgbench"), "-h",
                                      str(pg.run), "-c", "2", "-j", "2", "-T", str(seconds), "-n", "postgres"],
                                     cwd="/tmp", stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     start_new_session=True)

    def stop(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGINT)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)


def restore(cli, safe: Path, point: dict) -> tuple[list, str]:
    """RESTORE.md's steps; (the pgbench balances of the restored cluster, its log)."""
    base = new_dir("ps-postgres-restore-", "postgres")
    restored = Postgres(base / "data", base / "run")
    try:
        with point_files(cli, safe, point["id"]) as mnt:
            copy_out(mnt, restored.datadir)
        (restored.datadir / "postmaster.pid").unlink(missing_ok=True)
        chown_tree(restored.datadir, "postgres")
        os.chmod(restored.datadir, 0o700)
        restored.start()
        log = restored.log.read_text(errors="replace")
        r = subprocess.run(["runuser", "-u", "postgres", "--", str(restored.bindir / "pg_amcheck"),
                            "-h", str(restored.run), "--all", "--heapallindexed"],
                           capture_output=True, text=True, timeout=600, cwd="/tmp")
        assert r.returncode == 0, r.stdout + r.stderr
        sums = restored.sql("SELECT (SELECT sum(abalance) FROM pgbench_accounts),"
                            " (SELECT sum(bbalance) FROM pgbench_branches),"
                            " (SELECT sum(tbalance) FROM pgbench_tellers),"
                            " (SELECT coalesce(sum(delta), 0) FROM pgbench_history)")
        return list(sums[0]), log
    finally:
        restored.destroy()


def test_backup_under_pgbench_has_no_false_warnings(server, safe_dir, cli):
    load = Pgbench(server)
    try:
        before = server.sql("SELECT count(*) FROM pgbench_history")[0][0]
        points = []
        for _ in range(2):   # a first backup and an incremental one
            code, point, err = backup(cli, safe_dir, server.datadir, "--postgres", server.dsn)
            assert point is not None, err
            assert point["warnings"] == [] and code == 0, point["warnings"]
            points.append(point)
        assert server.sql("SELECT count(*) FROM pgbench_history")[0][0] > before   # it did write meanwhile
    finally:
        load.stop()
    sums, log = restore(cli, safe_dir, points[-1])
    assert "consistent recovery state reached" in log
    assert len(set(sums)) == 1 and sums[0] != 0, sums   # TPC-B: every balance sum equals the history's


def test_point_holds_only_the_wal_from_start_to_stop(server, safe_dir, cli):
    for _ in range(6):   # more segments in the live pg_wal than any backup needs
        server.sql("INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) SELECT 1, 1, 1, 0, now() "
                   "FROM generate_series(1, 1000)", "SELECT pg_switch_wal()")
    live = sorted(n for n in os.listdir(server.datadir / "pg_wal") if len(n) == 24)
    code, point, err = backup(cli, safe_dir, server.datadir, "--postgres", server.dsn)
    assert code == 0, (err, point and point["warnings"])
    info = point["consistency"]["postgres"]
    want = expected_wal(info)
    assert len(live) > len(want) + 4, (live, want)
    with point_files(cli, safe_dir, point["id"]) as mnt:
        held = sorted(n for n in os.listdir(mnt / "pg_wal") if len(n) == 24)
        assert (mnt / "pg_wal" / "archive_status").is_dir()
    assert held == want == info["wal_files"], (held, want, live)
    sums, log = restore(cli, safe_dir, point)
    assert "starting backup recovery" in log and "consistent recovery state reached" in log
    assert len(set(sums)) == 1, sums
