#!/usr/bin/env python3
"""Changed-block tracking benchmark (issue 12): the incremental of a large volume after a
scattered change, with the change source against a full read, restic and borg.

Two sources of SIZE bytes (default 4 GiB, random data, fully allocated like a database file):

* ``file``: a raw file backed up with ``backup --volume --changed-blocks RANGES`` (a ranges file
  listing the writes, as a script or dm-era would);
* ``qcow2``: the same data as a qcow2 image with a persistent dirty bitmap, backed up with
  ``backup --volume --changed-blocks qemu:bench`` (read through qemu-nbd; the writes go in through
  a writable qemu-nbd export, so the bitmap records them as a guest's writes would be).

After the first backup of each tool, for each change fraction (default 0.1% then 1% of SIZE,
as 64 KiB writes of random data at random 64 KiB-aligned offsets) the script runs, on the same
changed source: pointsafe's incremental, pointsafe ``--full-read``, ``restic backup`` and
``borg create``, and reports each one's wall time and the bytes it read (pointsafe:
``stats.bytes_scanned``; restic and borg: ``rchar`` of /proc/PID/io, which counts every byte
read by the process, also from the page cache). The page cache is left warm (the machine's
RAM holds the sources): the full readers' figures are their CPU cost, the least they can take.
Each timed command starts after ``sync``, so that none waits in its own fsync for the
write-back of what the commands before it (or the change) wrote.

    python scripts/bench/cbt.py [--size 4G] [--fractions 0.001,0.01] [--work DIR]
                                [--json OUT] [--markdown OUT]

Takes the benchmark lock (``mkdir /tmp/bench.lock``), waits for it if another benchmark runs.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, human_bytes, human_secs, log, machine_info, markdown_table, parse_size, run, tool_version, write_json  # noqa: E402

LOCK = Path("/tmp/bench.lock")
WRITE = 64 << 10
PS = [sys.executable, "-m", "pointsafe.cli"]


def with_io(cmd: list[str]) -> list[str]:
    """``cmd`` under a shell that prints its /proc/PID/io once ``cmd`` is reaped (a reaped
    child's I/O counts in its parent's)."""
    return ["sh", "-c", '"$@"; rc=$?; grep -E "^(rchar|read_bytes):" /proc/$$/io >&2; exit $rc', "sh", *cmd]


def rchar(stderr: str) -> int | None:
    for line in stderr.splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    return None


def make_file(path: Path, size: int, seed: int) -> None:
    rnd = random.Random(seed)
    step = 64 << 20
    with open(path, "wb") as f:
        for off in range(0, size, step):
            f.write(rnd.randbytes(min(step, size - off)))


def offsets(size: int, fraction: float, seed: int) -> list[int]:
    rnd = random.Random(seed)
    n = max(1, int(size * fraction) // WRITE)
    return sorted(rnd.sample(range(size // WRITE), n))


class Peers:
    """restic and borg repositories backing up the directory holding the source."""

    def __init__(self, work: Path, src_dir: Path) -> None:
        self.work, self.src = work, src_dir
        self.restic_env = {"RESTIC_REPOSITORY": str(work / "restic"), "RESTIC_PASSWORD": "bench",
                           "RESTIC_CACHE_DIR": str(work / "restic-cache")}
        self.borg_env = {"BORG_REPO": str(work / "borg"), "BORG_BASE_DIR": str(work / "borg-base"),
                         "BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK": "yes"}
        self.n = 0

    def init(self) -> None:
        check(run(["restic", "init", "--repository-version", "2"], env=self.restic_env))
        check(run(["borg", "init", "-e", "none"], env=self.borg_env))

    def restic(self):
        os.sync()
        return check(run(with_io(["restic", "backup", "--compression", "auto", "--host", "bench", "-q", "."]),
                         cwd=self.src, env=self.restic_env))

    def borg(self):
        self.n += 1
        os.sync()
        return check(run(with_io(["borg", "create", "--compression", "zstd,1", f"::a{self.n}", "."]),
                         cwd=self.src, env=self.borg_env))


def check(r):
    if r.code != 0:
        raise SystemExit(f"{' '.join(r.cmd[:6])} failed ({r.code}): {r.stderr[-800:]}")
    return r


def ps_backup(safe: Path, *args: str) -> dict:
    os.sync()
    r = run(PS + ["--safe", str(safe), "backup", *args, "--json", "-q"], cwd=REPO)
    if r.code not in (0, 3):
        check(r)
    rec = json.loads(r.stdout)
    return {"wall": r.wall, "cpu": r.cpu, "read": rec["stats"]["bytes_scanned"], "code": r.code,
            "change_source": rec.get("change_source")}


def write_raw(path: Path, offs: list[int], seed: int) -> None:
    rnd = random.Random(seed)
    fd = os.open(path, os.O_WRONLY)
    try:
        for o in offs:
            os.pwrite(fd, rnd.randbytes(WRITE), o * WRITE)
    finally:
        os.close(fd)


def write_qcow2(img: Path, offs: list[int], seed: int) -> None:
    """Guest-like writes through a writable qemu-nbd export (tracked by the image's bitmaps)."""
    import subprocess
    import tempfile

    from pointsafe.ingest.qcow2 import nbd_module
    nbd = nbd_module()
    rnd = random.Random(seed)
    d = tempfile.mkdtemp(prefix="cbt-bench-")
    sock = os.path.join(d, "sock")
    subprocess.run(["qemu-nbd", "--fork", "-f", "qcow2", "-k", sock, str(img)], check=True)
    h = nbd.NBD()
    h.connect_unix(sock)
    for o in offs:
        h.pwrite(rnd.randbytes(WRITE), o * WRITE)
    h.flush()
    h.shutdown()
    del h
    for _ in range(500):        # qemu-nbd leaves with its client; wait for its lock to go
        r = subprocess.run(["qemu-img", "info", str(img)], capture_output=True)
        if r.returncode == 0:
            break
        time.sleep(0.02)
    shutil.rmtree(d, ignore_errors=True)


def scenario(kind: str, work: Path, size: int, fractions: list[float], seed: int) -> list[dict]:
    import subprocess
    src = work / "src"
    src.mkdir(parents=True)
    raw = src / "db.img"
    log(f"{kind}: writing {human_bytes(size)} of random data")
    make_file(raw if kind == "file" else work / "seed.raw", size, seed)
    if kind == "qcow2":
        img = src / "vm.qcow2"
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(work / "seed.raw"), str(img)], check=True)
        (work / "seed.raw").unlink()
        source, cb = img, "qemu:bench"
    else:
        source, cb = raw, str(work / "ranges.json")
        Path(cb).write_text("[]")
    safe = work / "safe"
    check(run(PS + ["--safe", str(safe), "init", "--encryption", "none"], cwd=REPO))
    peers = Peers(work, src)
    peers.init()
    log(f"{kind}: first backups")
    first = {"pointsafe": ps_backup(safe, str(source), "--volume", "--changed-blocks", cb)}
    r = peers.restic()
    first["restic"] = {"wall": r.wall, "read": rchar(r.stderr)}
    r = peers.borg()
    first["borg"] = {"wall": r.wall, "read": rchar(r.stderr)}
    rows = [{"source": kind, "change": "first backup", "changed": size, **{f"{k}": v for k, v in first.items()}}]
    for i, frac in enumerate(fractions):
        offs = offsets(size, frac, seed + 10 + i)
        log(f"{kind}: {frac:.1%} change ({len(offs)} writes of 64 KiB)")
        if kind == "file":
            write_raw(raw, offs, seed + 20 + i)
            Path(cb).write_text(json.dumps([[o * WRITE, WRITE] for o in offs]))
        else:
            write_qcow2(source, offs, seed + 20 + i)
        row: dict = {"source": kind, "change": f"{frac:.1%}", "changed": len(offs) * WRITE}
        row["pointsafe"] = ps_backup(safe, str(source), "--volume", "--changed-blocks", cb)
        assert row["pointsafe"]["change_source"]["fallback"] is None, row["pointsafe"]
        full = ["--volume", "--full-read"] + (["--changed-blocks", cb] if kind == "qcow2" else [])
        row["pointsafe --full-read"] = ps_backup(safe, str(source), *full)
        r = peers.restic()
        row["restic"] = {"wall": r.wall, "read": rchar(r.stderr)}
        r = peers.borg()
        row["borg"] = {"wall": r.wall, "read": rchar(r.stderr)}
        rows.append(row)
        log(f"  {json.dumps({k: v for k, v in row.items()}, default=str)}")
    shutil.rmtree(work, ignore_errors=True)
    return rows


TOOLS = ["pointsafe", "pointsafe --full-read", "restic", "borg"]


def table(rows: list[dict]) -> str:
    out = []
    for r in rows:
        if r["change"] == "first backup":
            continue
        inc = r["pointsafe"]
        for t in TOOLS:
            m = r[t]
            ratio = f"{m['wall'] / inc['wall']:.1f}×" if t != "pointsafe" else "1×"
            out.append([r["source"], r["change"], human_bytes(r["changed"]), t, human_secs(m["wall"]),
                        human_bytes(m["read"]), ratio,
                        f"{m['read'] / r['changed']:.2f}×" if m["read"] is not None else "–"])
    return markdown_table(["source", "change", "changed bytes", "tool", "time", "bytes read",
                           "time vs incremental", "read / changed"], out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="4G")
    ap.add_argument("--fractions", default="0.001,0.01")
    ap.add_argument("--sources", default="file,qcow2")
    ap.add_argument("--work", default="/tmp/cbt-bench")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", metavar="OUT")
    ap.add_argument("--markdown", metavar="OUT")
    a = ap.parse_args()
    size = parse_size(a.size)
    fractions = [float(x) for x in a.fractions.split(",")]
    while True:
        try:
            LOCK.mkdir()
            break
        except FileExistsError:
            log("another benchmark holds /tmp/bench.lock; waiting")
            time.sleep(15)
    t0 = time.perf_counter()
    try:
        rows = []
        for kind in a.sources.split(","):
            work = Path(a.work) / kind
            shutil.rmtree(work, ignore_errors=True)
            rows += scenario(kind, work, size, fractions, a.seed)
        result = {"machine": machine_info(), "size": size, "rows": rows, "seconds": time.perf_counter() - t0,
                  "versions": {"restic": tool_version(["restic", "version"]),
                               "borg": tool_version(["borg", "--version"]),
                               "qemu": tool_version(["qemu-img", "--version"])}}
    finally:
        try:
            LOCK.rmdir()
        except FileNotFoundError:
            log("warning: /tmp/bench.lock was removed by someone else during the run: figures may be disturbed")
    md = table(rows)
    print(md)
    log(f"done in {result['seconds']:.0f} s")
    if a.json:
        write_json(a.json, result)
    if a.markdown:
        Path(a.markdown).write_text(md + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
