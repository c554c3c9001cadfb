#!/usr/bin/env python3
"""The cost of an incremental backup against the size of the source.

For sources of 1,000, 10,000 and 100,000 files (in directories of 100), back up once, change
one file, back up again, and report what the incremental read, wrote and stored. With
hierarchical reference counts and change detection, the bytes read and the objects and bytes
written should follow the change (one file and the directories above it), not the source.
Counts, not times: the figures are the same on a busy machine.

    python scripts/bench/incremental.py [--sizes 1000,10000,100000] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time


def run(*args: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "pointsafe.cli", *args, "--json"], check=True,
                         capture_output=True).stdout
    return json.loads(out)


def make_tree(root: str, n: int) -> None:
    for i in range(n):
        d = os.path.join(root, f"d{i // 100:05d}")
        if i % 100 == 0:
            os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, f"f{i:07d}"), "wb") as f:
            f.write(os.urandom(64) + b"x" * (i % 3000))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1000,10000,100000")
    ap.add_argument("--json", metavar="OUT")
    a = ap.parse_args()
    rows = []
    for n in (int(x) for x in a.sizes.split(",")):
        work = tempfile.mkdtemp(prefix="ps-incr-")
        try:
            src, safe = os.path.join(work, "src"), os.path.join(work, "safe")
            make_tree(src, n)
            run("--safe", safe, "init")
            first = run("--safe", safe, "backup", src, "--name", "s")
            time.sleep(0.01)
            victim = os.path.join(src, f"d{(n // 2) // 100:05d}", f"f{n // 2:07d}")
            with open(victim, "r+b") as f:
                f.write(os.urandom(64))
            t = time.perf_counter()
            second = run("--safe", safe, "backup", src, "--name", "s")
            wall = time.perf_counter() - t
            st = second["stats"]
            rows.append({"files": n, "first_objects_new": first["stats"]["objects_new"],
                         "first_bytes_stored": first["stats"]["bytes_stored"],
                         "incr_bytes_read": st["bytes_read"], "incr_objects_new": st["objects_new"],
                         "incr_bytes_stored": st["bytes_stored"], "incr_files_unchanged": st["files_unchanged"],
                         "incr_wall_s": round(wall, 2)})
        finally:
            shutil.rmtree(work, ignore_errors=True)
    print(f"{'files':>8} {'1st objects':>12} {'1st stored':>12} {'incr read':>10} {'incr objects':>13} "
          f"{'incr stored':>12} {'unchanged':>10} {'incr wall':>10}")
    for r in rows:
        print(f"{r['files']:>8} {r['first_objects_new']:>12} {r['first_bytes_stored']:>12} {r['incr_bytes_read']:>10} "
              f"{r['incr_objects_new']:>13} {r['incr_bytes_stored']:>12} {r['incr_files_unchanged']:>10} "
              f"{r['incr_wall_s']:>9}s")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
