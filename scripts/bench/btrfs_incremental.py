#!/usr/bin/env python3
"""btrfs tree incrementals (issue 12): a large file and many small ones on a loop-mounted btrfs,
changed by scattered 16 KiB writes; pointsafe's incremental (the send stream names what changed)
beside ``--full-read``, restic and borg on the same change, in one run.

    python scripts/bench/btrfs_incremental.py [--big 1G] [--files 10000] [--json FILE]

Each tool backs the subvolume up once, then after each change (0.1% and 1% of the large file as
16 KiB writes at 4 KiB-aligned offsets, plus nothing else) again. Bytes read: pointsafe's
``stats.bytes_scanned``; restic's and borg's ``rchar`` from /proc/PID/io. The page cache is left
warm, so the full readers' times are about their CPU cost, the least they can take.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, log, markdown_table, parse_size, write_json  # noqa: E402

PASSWORD = "bench-password"
WRITE = 16 << 10


def pointsafe() -> list[str]:
    exe = REPO / ".venv" / "bin" / "pointsafe"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "pointsafe.cli"]


def timed(cmd: list[str], env: dict[str, str]) -> tuple[float, int, str]:
    """(wall seconds, bytes the process read (rchar, sampled until it exits), stdout)."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    rchar = [0]

    def sample() -> None:
        while p.poll() is None:
            try:
                for line in Path(f"/proc/{p.pid}/io").read_text().splitlines():
                    if line.startswith("rchar:"):
                        rchar[0] = max(rchar[0], int(line.split()[1]))
            except OSError:
                pass
            time.sleep(0.02)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    out, err = p.communicate()
    wall = time.perf_counter() - t0
    t.join()
    if p.returncode not in (0, 3):
        raise RuntimeError(f"{cmd[0]} failed ({p.returncode}): {err.strip()[-400:]}")
    return wall, rchar[0], out


def make_source(vol: Path, big: int, files: int, rng: random.Random) -> Path:
    src = vol / "data"
    subprocess.run(["btrfs", "subvolume", "create", str(src)], check=True, capture_output=True)
    with open(src / "big.db", "wb") as f:
        for _ in range(big // (4 << 20)):
            f.write(rng.randbytes(4 << 20))
    for i in range(files):
        d = src / "small" / f"d{i % 100:02d}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i:05d}").write_bytes(rng.randbytes(rng.randint(100, 8000)))
    return src


def change(src: Path, fraction: float, big: int, rng: random.Random) -> int:
    n = max(1, int(big * fraction) // WRITE)
    with open(src / "big.db", "r+b") as f:
        for _ in range(n):
            f.seek(rng.randrange(0, big - WRITE, 4096))
            f.write(rng.randbytes(WRITE))
    return n * WRITE


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--big", default="1G")
    ap.add_argument("--files", type=int, default=10000)
    ap.add_argument("--work", default="/tmp/bench-btrfs-incremental")
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    big = parse_size(a.big)
    work = Path(a.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    img, mnt = work / "btrfs.img", work / "mnt"
    subprocess.run(["truncate", "-s", str(big * 3 + (1 << 30)), str(img)], check=True)
    subprocess.run(["mkfs.btrfs", "-q", str(img)], check=True)
    mnt.mkdir()
    subprocess.run(["mount", "-o", "loop", str(img), str(mnt)], check=True)
    rng = random.Random(12)
    env = {**os.environ, "POINTSAFE_PASSWORD": PASSWORD, "RESTIC_PASSWORD": PASSWORD,
           "BORG_PASSPHRASE": PASSWORD, "RESTIC_REPOSITORY": str(work / "restic"),
           "BORG_REPO": str(work / "borg"), "RESTIC_CACHE_DIR": str(work / "rcache"),
           "BORG_BASE_DIR": str(work / "borgbase"), "BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK": "yes"}
    rows: list[dict[str, Any]] = []
    try:
        src = make_source(mnt, big, a.files, rng)
        log(f"source: {big >> 20} MiB file + {a.files} small files on btrfs")
        ps = pointsafe()
        for safe in ("safe", "full"):
            subprocess.run(ps + ["init", str(work / safe), "--encryption", "none"], env=env, check=True,
                           capture_output=True)
        subprocess.run(["restic", "init", "-q"], env=env, check=True, capture_output=True)
        subprocess.run(["borg", "init", "-e", "none"], env=env, check=True, capture_output=True)
        tools = {
            "pointsafe": ps + ["--safe", str(work / "safe"), "backup", str(src), "--snapshot", "btrfs", "--json", "-q"],
            "pointsafe --full-read": ps + ["--safe", str(work / "full"), "backup", str(src), "--snapshot", "btrfs",
                                           "--full-read", "--json", "-q"],
            "restic": ["restic", "backup", "-q", str(src)],
            "borg": None,
        }
        k = 0

        def run_all(label: str, written: int) -> None:
            nonlocal k
            for name, cmd in tools.items():
                if name == "borg":
                    k += 1
                    cmd = ["borg", "create", "--compression", "zstd,1", f"::b{k}", str(src)]
                wall, rchar, out = timed(cmd, env)
                scanned = json.loads(out)["stats"]["bytes_scanned"] if name.startswith("pointsafe") else rchar
                kind = json.loads(out).get("change_source", {}).get("kind") if name == "pointsafe" else None
                rows.append({"change": label, "written": written, "tool": name, "wall": wall, "read": scanned,
                             "change_source": kind})
                log(f"{label}: {name} {wall:.2f} s, read {scanned / 1e6:.1f} MB" + (f" ({kind})" if kind else ""))

        run_all("first", 0)
        for frac in (0.001, 0.01):
            w = change(src, frac, big, rng)
            run_all(f"{frac * 100:g}%", w)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
    table = []
    for r in rows:
        if r["change"] == "first":
            continue
        inc = next(x for x in rows if x["change"] == r["change"] and x["tool"] == "pointsafe")
        table.append([r["change"], f"{r['written'] / 1e6:.2f} MB", r["tool"], f"{r['wall']:.2f} s",
                      f"{r['read'] / 1e6:.1f} MB", f"{r['wall'] / inc['wall']:.1f}×",
                      f"{r['read'] / r['written']:.2f}×"])
    print(markdown_table(["change", "written", "tool", "time", "bytes read", "time vs incremental",
                          "read / written"], table))
    if a.json:
        write_json(a.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
