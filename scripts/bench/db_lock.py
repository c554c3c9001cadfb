#!/usr/bin/env python3
"""How long `pointsafe backup --mysql` holds MariaDB's global read lock, and what a writer feels:
`--snapshot btrfs` (the lock held for the snapshot only) against `--snapshot none` (the lock held,
and InnoDB kept at rest, for the whole read of the live data directory).

For each database size: a btrfs filesystem on a loop device (a sparse image file), a subvolume
holding a private MariaDB's data directory (as tests/test_db_snapshot_e2e.py makes it), SIZE of
rows loaded into an InnoDB and a MyISAM table, and a writer inserting one row per transaction
into both as fast as it can, logging every insert's latency. Then, into one fresh safe per mode,
a first backup and RUNS incremental ones, writer running. For each backup: the lock time
pointsafe records (``consistency.mysql.lock_held_seconds``), the freeze the point records
(``snapshot.held_s``: pre-freeze hook to post-thaw hook), the backup's wall time, and the
longest insert during the backup (the writer's stall) against the median insert outside.

    .venv/bin/python scripts/bench/db_lock.py                        # smoke run: 50M, 1 run
    .venv/bin/python scripts/bench/db_lock.py --sizes 1G,4G --runs 3 --json /tmp/db.json --markdown /tmp/db.md

Needs root, mariadb-server, btrfs-progs and loop devices. Goal (issue 11): with --snapshot btrfs
the lock held < 0.2 s and the writer's stall < 0.5 s whatever the size.
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
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import human_bytes, log, machine_info, markdown_table, parse_size, write_json  # noqa: E402
from _db_servers import INSTALL_DB, MariaDB, chown_tree, new_dir, payload  # noqa: E402


class LatencyWriter(threading.Thread):
    """Inserts one row per transaction into both tables, as fast as it can, timing each."""

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

    def longest(self, t0: float, t1: float) -> float | None:
        inside = [lat for start, lat in self.samples if start + lat >= t0 and start <= t1]
        return max(inside) if inside else None

    def median_outside(self, windows: list[tuple[float, float]]) -> float | None:
        out = [lat for start, lat in self.samples
               if not any(start + lat >= a and start <= b for a, b in windows)]
        return statistics.median(out) if out else None


@contextmanager
def btrfs_subvolume(size: int) -> Iterator[Path]:
    """A subvolume on a new loop-mounted btrfs (image file sparse, ``size`` bytes)."""
    base = new_dir("ps-bench-btrfs-")
    os.chmod(base, 0o755)
    img, mnt = base / "fs.img", base / "mnt"
    mnt.mkdir()
    subprocess.run(["truncate", "-s", str(size), str(img)], check=True)
    subprocess.run(["mkfs.btrfs", "-q", str(img)], check=True, capture_output=True)
    subprocess.run(["mount", "-o", "loop", str(img), str(mnt)], check=True, capture_output=True)
    try:
        sub = mnt / "mysql"
        subprocess.run(["btrfs", "subvolume", "create", str(sub)], check=True, capture_output=True)
        yield sub
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


def mariadb_on(sub: Path) -> MariaDB:
    datadir, run = sub / "data", new_dir("ps-bench-mariadb-run-", "mysql")
    datadir.mkdir()
    chown_tree(sub, "mysql")
    subprocess.run([INSTALL_DB, "--no-defaults", "--user=mysql", f"--datadir={datadir}",
                    "--auth-root-authentication-method=socket", "--skip-test-db"],
                   check=True, capture_output=True, timeout=300)
    return MariaDB(datadir, run)


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


def has_snapshot_option() -> bool:
    r = subprocess.run([sys.executable, "-m", "pointsafe.cli", "backup", "--help"], capture_output=True, text=True)
    return "--snapshot" in r.stdout


def backup(safe: Path, server: MariaDB, mode: str, state: Path) -> tuple[float, dict]:
    cmd = [sys.executable, "-m", "pointsafe.cli", "--safe", str(safe), "backup", str(server.datadir),
           "--name", "db", "--mysql", server.dsn, "--json", "-q", "--snapshot", mode]
    t0 = time.monotonic()
    r = subprocess.run(cmd, capture_output=True, timeout=7200, env={**os.environ, "XDG_STATE_HOME": str(state)})
    wall = time.monotonic() - t0
    if r.returncode not in (0, 3):
        raise SystemExit(f"backup --snapshot {mode} failed ({r.returncode}): {r.stderr.decode()}")
    return wall, json.loads(r.stdout)


def measure_size(size: int, modes: list[str], runs: int) -> tuple[dict, list[dict]]:
    """Everything for one database size: (facts about it, one result per backup)."""
    from pointsafe.cas import Safe
    results: list[dict] = []
    with btrfs_subvolume(max(4 << 30, size * 4)) as sub:
        server = mariadb_on(sub)
        work = new_dir("ps-bench-db-")
        try:
            server.start()
            server.sql("CREATE DATABASE app",
                       "CREATE TABLE app.inno (id INT PRIMARY KEY, data TEXT NOT NULL, sum CHAR(64) NOT NULL) ENGINE=InnoDB",
                       "CREATE TABLE app.my (id INT PRIMARY KEY, data TEXT NOT NULL, sum CHAR(64) NOT NULL) ENGINE=MyISAM")
            log(f"loading {human_bytes(size)} of rows")
            rows = load(server, size)
            du = sum(f.stat().st_size for f in server.datadir.rglob("*") if f.is_file())
            log(f"{rows} rows per table, data directory {du / 1e6:.0f} MB")
            writer = LatencyWriter(server, rows + 1)
            writer.start()
            time.sleep(2)
            windows = []
            try:
                for mode in modes:
                    safe = work / f"safe-{mode}"
                    Safe.init(safe).close()
                    for i in range(runs + 1):
                        t0 = time.monotonic()
                        wall, point = backup(safe, server, mode, work / "state")
                        t1 = time.monotonic()
                        windows.append((t0, t1))
                        info = point.get("consistency", {}).get("mysql", {})
                        snap = point.get("snapshot")
                        results.append({
                            "size": size, "mode": mode, "backup": "first" if i == 0 else "incremental",
                            "wall_s": round(wall, 3), "lock_held_s": info.get("lock_held_seconds"),
                            "freeze_s": snap.get("held_s") if isinstance(snap, dict) else None,
                            "snapshot": snap.get("method") if isinstance(snap, dict) else "none",
                            "longest_insert_s": writer.longest(t0, t1), "warnings": len(point.get("warnings", []))})
                        log(f"{human_bytes(size)} --snapshot {mode}: {results[-1]}")
                        time.sleep(1)
            finally:
                writer.stop()
            facts = {"size": size, "rows": rows, "datadir_bytes": du, "inserts": len(writer.samples),
                     "median_insert_s": writer.median_outside(windows)}
        finally:
            server.destroy()
            shutil.rmtree(work, ignore_errors=True)
    return facts, results


def table(results: list[dict], facts: list[dict]) -> str:
    rows = []
    for f in facts:
        for mode in dict.fromkeys(r["mode"] for r in results):
            for kind in ("first", "incremental"):
                rs = [r for r in results if r["size"] == f["size"] and r["mode"] == mode and r["backup"] == kind]
                if not rs:
                    continue
                held = [r["lock_held_s"] for r in rs if r["lock_held_s"] is not None]
                stalls = [r["longest_insert_s"] for r in rs if r["longest_insert_s"] is not None]
                rows.append([human_bytes(f["size"]), f"{mode}", kind, len(rs),
                             f"{statistics.median(held):.3f} / {max(held):.3f}" if held else "–",
                             f"{max(stalls):.3f}" if stalls else "–",
                             f"{statistics.median(r['wall_s'] for r in rs):.2f}"])
    md = markdown_table(["database", "--snapshot", "backup", "runs", "lock held s (median / max)",
                         "writer's longest insert s", "wall s (median)"], rows)
    for f in facts:
        med = f["median_insert_s"]
        md += (f"\n\n{human_bytes(f['size'])}: data directory {f['datadir_bytes'] / 1e6:.0f} MB, {f['rows']:,} rows "
               f"per table; median insert outside backups {med * 1000:.1f} ms." if med else "")
    return md


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="50M", help="row data to load, comma-separated (default 50M; the "
                                                   "benchmark proper: 1G,4G)")
    ap.add_argument("--runs", type=int, default=1, help="incremental backups per mode after the first (default 1)")
    ap.add_argument("--modes", default="none,btrfs", help="--snapshot modes to compare (default none,btrfs)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--markdown", help="write the markdown table here")
    args = ap.parse_args()
    modes = [m for m in args.modes.split(",") if m]
    if not has_snapshot_option():
        raise SystemExit("this pointsafe has no backup --snapshot option (the snapshot engine is missing)")
    facts, results = [], []
    for size in (parse_size(s) for s in args.sizes.split(",") if s):
        f, rs = measure_size(size, modes, args.runs)
        facts.append(f)
        results += rs
    md = table(results, facts)
    print(md)
    out = {"machine": machine_info(), "sizes": facts, "runs": results}
    print(json.dumps(out, indent=1))
    if args.json:
        write_json(args.json, out)
    if args.markdown:
        Path(args.markdown).write_text(md + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
