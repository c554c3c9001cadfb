#!/usr/bin/env python3
"""How long `pointsafe backup --mysql` holds MariaDB's global read lock, and what a writer feels.

Starts a private MariaDB (as tests/_db_servers.py does), loads SIZE of rows into an InnoDB and a
MyISAM table, and runs a writer that inserts one row per transaction into both as fast as it can,
logging every insert's latency. Then, into a fresh safe:

- ``first``: the first backup of the data directory, writer running;
- ``busy incremental``: the next backups, writer running (the tables' files changed);
- ``writer stopped``: the next backup after the writer stopped (30 s before; MariaDB 10.11 with
  its default settings leaves dirty pages in the buffer pool indefinitely, so there is flushing);
- ``unchanged``: backups of a database that did not change since the previous point.

For each: the lock time pointsafe records (``consistency.mysql.lock_held_seconds``, of which
``rest_seconds`` waiting for InnoDB to flush), the backup's wall time, the longest insert during
the backup (the stall a writer sees) against the median insert outside backups, and, as the
floor, the time to read every file of the data directory (page cache warm).

    .venv/bin/python scripts/bench/db_lock.py --size 200M --runs 3 --markdown /tmp/db.md
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import log, machine_info, markdown_table, parse_size, write_json  # noqa: E402
from _db_servers import MariaDB, new_dir, payload  # noqa: E402


class LatencyWriter(threading.Thread):
    def __init__(self, server: MariaDB, first_id: int):
        super().__init__(daemon=True)
        self.server, self.next_id = server, first_id
        self.samples: list[tuple[float, float]] = []   # (start, latency)
        self.stop_event = threading.Event()

    def run(self) -> None:
        con = self.server.connect(database="app")
        with con.cursor() as c:
            while not self.stop_event.is_set():
                data, csum = payload(self.next_id)
                t0 = time.monotonic()
                c.execute("INSERT INTO inno VALUES (%s, %s, %s)", (self.next_id, data, csum))
                c.execute("INSERT INTO my VALUES (%s, %s, %s)", (self.next_id, data, csum))
                self.samples.append((t0, time.monotonic() - t0))
                self.next_id += 1
        con.close()

    def stop(self) -> None:
        self.stop_event.set()
        self.join(timeout=120)


def load(server: MariaDB, size: int) -> int:
    """Bulk rows (≈ 450 bytes each, in both tables) up to ``size`` bytes of row data."""
    rows = max(1000, size // 900)
    con = server.connect(database="app", autocommit=False)
    with con.cursor() as c:
        batch = 2000
        for start in range(1, rows + 1, batch):
            vals = [(i, *payload(i)) for i in range(start, min(rows, start + batch - 1) + 1)]
            c.executemany("INSERT INTO inno VALUES (%s, %s, %s)", vals)
            c.executemany("INSERT INTO my VALUES (%s, %s, %s)", vals)
            con.commit()
    con.close()
    return rows


def wait_clean(server: MariaDB, timeout: float = 30) -> float:
    """Wait until InnoDB has no dirty page (with its default settings); return the seconds."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        rows = server.sql("SHOW GLOBAL STATUS LIKE 'Innodb_buffer_pool_pages_dirty'")
        if int(rows[0][1]) == 0:
            break
        time.sleep(0.5)
    time.sleep(1)
    return time.monotonic() - t0


def read_floor(datadir: Path) -> float:
    t0 = time.monotonic()
    for dirpath, _, files in os.walk(datadir):
        for f in files:
            p = os.path.join(dirpath, f)
            try:
                with open(p, "rb") as fh:
                    while fh.read(1 << 20):
                        pass
            except OSError:
                pass
    return time.monotonic() - t0


def backup(safe: Path, server: MariaDB) -> tuple[float, dict]:
    cmd = [sys.executable, "-m", "pointsafe.cli", "--safe", str(safe), "backup", str(server.datadir),
           "--name", "db", "--mysql", server.dsn, "--json", "-q"]
    t0 = time.monotonic()
    r = subprocess.run(cmd, capture_output=True, timeout=3600)
    wall = time.monotonic() - t0
    if r.returncode not in (0, 3):
        raise SystemExit(f"backup failed ({r.returncode}): {r.stderr.decode()}")
    return wall, json.loads(r.stdout)["consistency"]["mysql"]


def mariabackup(server: MariaDB) -> float:
    """The peer: a full physical backup with mariabackup (it copies the redo log while it runs
    and takes BACKUP STAGE locks only at the end). Returns its wall time."""
    target = new_dir("ps-bench-mariabackup-")
    try:
        t0 = time.monotonic()
        r = subprocess.run(["mariabackup", "--no-defaults", "--backup", f"--target-dir={target}/b",
                            f"--socket={server.socket}", "--user=root", f"--datadir={server.datadir}"],
                           capture_output=True, timeout=3600)
        if r.returncode != 0:
            raise SystemExit(f"mariabackup failed: {r.stderr.decode()[-2000:]}")
        return time.monotonic() - t0
    finally:
        shutil.rmtree(target, ignore_errors=True)


def stall(writer: LatencyWriter | None, t0: float, t1: float) -> float | None:
    if writer is None:
        return None
    inside = [lat for start, lat in writer.samples if start + lat >= t0 and start <= t1]
    return max(inside) if inside else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="200M", help="row data to load (default 200M)")
    ap.add_argument("--runs", type=int, default=3, help="backups per scenario (default 3)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--markdown", help="write the markdown table here")
    args = ap.parse_args()

    from pointsafe.cas import Safe
    server = MariaDB.create()
    safe_parent = new_dir("ps-bench-db-")
    safe = safe_parent / "safe"
    results: list[dict] = []
    try:
        server.start()
        server.sql("CREATE DATABASE app",
                   "CREATE TABLE app.inno (id INT PRIMARY KEY, data TEXT NOT NULL, sum CHAR(64) NOT NULL) ENGINE=InnoDB",
                   "CREATE TABLE app.my (id INT PRIMARY KEY, data TEXT NOT NULL, sum CHAR(64) NOT NULL) ENGINE=MyISAM")
        log(f"loading {args.size} of rows")
        rows = load(server, parse_size(args.size))
        Safe.init(safe).close()
        du = sum(f.stat().st_size for f in server.datadir.rglob("*") if f.is_file())
        floor = min(read_floor(server.datadir) for _ in range(2))
        log(f"{rows} rows per table, data directory {du / 1e6:.0f} MB, read floor {floor:.2f} s")

        writer = LatencyWriter(server, rows + 1)
        writer.start()
        time.sleep(2)
        peer = shutil.which("mariabackup") is not None
        plan = ([("first", True)] + [("busy incremental", True)] * args.runs
                + [("mariabackup (full)", True)] * (args.runs if peer else 0)
                + [("writer stopped", False)] + [("unchanged", False)] * args.runs)
        for scenario, busy in plan:
            if not busy and writer is not None:
                writer.stop()
                baseline = statistics.median(lat for _, lat in writer.samples)
                inserts = len(writer.samples)
                writer = None
                idle_wait = wait_clean(server)  # InnoDB may keep dirty pages: it is not forced here
            t0 = time.monotonic()
            if scenario.startswith("mariabackup"):
                wall, info = mariabackup(server), {}
            else:
                wall, info = backup(safe, server)
            t1 = time.monotonic()
            results.append({"scenario": scenario, "wall_s": round(wall, 3),
                            "lock_held_s": info.get("lock_held_seconds"), "rest_s": info.get("rest_seconds"),
                            "lock_wait_s": info.get("lock_wait_seconds"), "preflush_s": info.get("preflush_seconds"), "recopied": info.get("recopied_innodb"),
                            "longest_insert_s": stall(writer, t0, t1)})
            log(f"{scenario}: {results[-1]}")
            if busy:
                time.sleep(1)
        if writer is not None:
            writer.stop()
            baseline = statistics.median(lat for _, lat in writer.samples)
            inserts = len(writer.samples)
    finally:
        server.destroy()
        shutil.rmtree(safe_parent, ignore_errors=True)

    out = {"machine": machine_info(), "size": args.size, "idle_wait_s": round(idle_wait, 1), "rows": rows, "datadir_bytes": du,
           "read_floor_s": round(floor, 3), "median_insert_s": round(baseline, 5), "inserts": inserts,
           "runs": results}
    table_rows = []
    def med(rs, key, fmt="{:.2f}"):
        vals = [r[key] for r in rs if r[key] is not None]
        return fmt.format(statistics.median(vals)) if vals else "—"

    for scenario in ("first", "busy incremental", "mariabackup (full)", "writer stopped", "unchanged"):
        rs = [r for r in results if r["scenario"] == scenario]
        if not rs:
            continue
        stalls = [r["longest_insert_s"] for r in rs if r["longest_insert_s"] is not None]
        held = [r["lock_held_s"] for r in rs if r["lock_held_s"] is not None]
        table_rows.append([scenario, len(rs), med(rs, "preflush_s"), med(rs, "wall_s"),
                           f"{statistics.median(held):.2f}, {max(held):.2f}" if held else "—",
                           med(rs, "rest_s"),
                           f"{max(stalls):.2f}" if stalls else "—"])
    md = markdown_table(["backup", "runs", "flush before lock s", "wall s (median)", "lock held s (median, max)", "of which InnoDB flush s",
                         "longest insert s"], table_rows)
    md += (f"\n\nData directory {du / 1e6:.0f} MB ({rows:,} rows per table); reading all of it with the page "
           f"cache warm takes {floor:.2f} s; the median insert outside backups takes "
           f"{baseline * 1000:.1f} ms. The writer was stopped {idle_wait:.0f} s before "
           f"the 'writer stopped' backup.\n")
    print(md)
    if args.json:
        write_json(args.json, out)
    if args.markdown:
        Path(args.markdown).write_text(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
