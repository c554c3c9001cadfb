#!/usr/bin/env python3
"""Web benchmark: page render times of ``pointsafe web`` on a safe with 1,000 points and
100,000 tasks, and the download of a 1 GiB file through the web against ``cat`` of the same
file through ``pointsafe mount``.

    .venv/bin/python scripts/bench/web.py --json /tmp/web.json --markdown /tmp/web.md

The safe (built once under ``--work``, default /work/bench-data/web-work, and reused): made
on tmpfs through the Python API, then copied to disk. 1,000 tree points of ten sources
(``src0`` .. ``src9``, 100 points each, a 24-file tree of which one file changes per point),
one point ``big`` of a 1 GiB incompressible file (the mount benchmark's ``rand.bin``), and
100,000 task records written through ``ops.tasks.create``/``finish`` in this process (85%
backups of the ten sources, then verify, restore, gc, forget; 90% ok, 6% warning, 3% error,
1% usage; an alert for each error, all but the last five acknowledged).

Then ``pointsafe web`` runs for real (a subprocess on a free loopback port, logged in with a
password), and each page is requested ``--requests`` times (after one warm-up request): the
time from sending the request to the last byte of the answer, median and max. Downloads: the
1 GiB file through ``/points/ID/raw/rand.bin`` (streamed to nowhere) and ``cat`` of it
through a ``pointsafe mount`` of the same safe, each with the page cache dropped first, best
of ``--download-runs``.

``--code DIR`` runs the server (and the mount) from another checkout of pointsafe (e.g.
``git archive main | tar -x -C /tmp/ps-main``) to compare with it on the same safe.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import drop_caches, log, machine_info, markdown_table, write_json  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]
BENCH = Path("/work/bench-data")
BIG_FILE = BENCH / "mount-rand-1G" / "rand.bin"
PASSWORD = "bench web password"
SOURCES = [f"src{i}" for i in range(10)]
ROOMS = ("cas", "cli", "fusefs", "gc", "ingest", "ops", "web")


# --------------------------------------------------------------------------- the safe

def ensure_big(path: Path = BIG_FILE, size: int = 1 << 30) -> Path:
    """The 1 GiB incompressible file (as scripts/bench/mount.py makes it)."""
    if path.exists() and path.stat().st_size == size:
        return path
    import blake3
    path.parent.mkdir(parents=True, exist_ok=True)
    h = blake3.blake3(b"mount-bench")
    with open(path, "wb") as out:
        for i in range(0, size, 1 << 20):
            out.write(h.digest(length=1 << 20, seek=i))
    return path


def _tree(d: Path, version: int) -> None:
    """A small tree: 24 files in three directories; one file's content follows ``version``."""
    for i in range(24):
        f = d / f"dir{i % 3}" / f"file{i:02d}.txt"
        f.parent.mkdir(parents=True, exist_ok=True)
        if not f.exists() or i == version % 24:
            f.write_text(f"file {i} version {version}\n" * (20 + i))


def build_safe(dest: Path, points: int, ntasks: int, big: bool = True) -> dict[str, Any]:
    """Build the safe on tmpfs, then copy it to ``dest`` (see the module docstring)."""
    sys.path.insert(0, str(REPO_ROOT))
    from pointsafe.cas import Safe
    from pointsafe.ingest.backup import BackupOptions, backup
    from pointsafe.ops import alerts, logs, tasks
    logs.setup()      # the alerts raised are logged nowhere

    tmp = Path("/dev/shm/pointsafe-bench-web")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    t0 = time.perf_counter()
    safe = Safe.init(tmp / "safe")
    trees = {s: tmp / "src" / s for s in SOURCES}
    for i in range(points):
        name = SOURCES[i % len(SOURCES)]
        _tree(trees[name], i // len(SOURCES))
        backup(safe, str(trees[name]), BackupOptions(name=name, snapshot="none", workers=1))
        if i % 100 == 99:
            log(f"{i + 1} points")
    if big:
        backup(safe, str(ensure_big().parent), BackupOptions(name="big", snapshot="none"))
    log(f"points made in {time.perf_counter() - t0:.0f} s")
    t1 = time.perf_counter()
    import random
    rnd = random.Random(16)
    idx = safe.index
    for i in range(ntasks):
        x = rnd.random()
        kind = ("backup" if x < 0.85 else "verify" if x < 0.90 else "restore" if x < 0.95
                else "gc" if x < 0.98 else "forget")
        name = rnd.choice(SOURCES)
        fields = {"name": name, "source": str(trees[name])} if kind in ("backup", "restore") else {}
        rec = tasks.create(idx, kind, [kind, name], fields)
        y = rnd.random()
        state = "ok" if y < 0.90 else "warning" if y < 0.96 else "error" if y < 0.99 else "usage"
        done = tasks.finish(idx, rec["id"], state, error="it failed" if state == "error" else None,
                            fields={"bytes": rnd.randrange(1 << 30), "bytes_stored": rnd.randrange(1 << 20)},
                            warnings=[{"path": "/x", "message": "unreadable"}] if state == "warning" else [],
                            warning_count=1 if state == "warning" else 0, exit_code=0)
        if state == "error":
            alerts.raise_alert(idx, "task", "critical", f"{kind} task {done['id']} failed: it failed",
                               task=done["id"], source=name)
        if i % 20000 == 19999:
            log(f"{i + 1} tasks")
    open_ids = [a["id"] for a in alerts.list_alerts(idx)]
    alerts.ack(idx, open_ids[:-5])
    log(f"tasks made in {time.perf_counter() - t1:.0f} s")
    safe.close()
    shutil.rmtree(tmp / "src")
    shutil.rmtree(dest, ignore_errors=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["cp", "-a", str(tmp / "safe"), str(dest)], check=True)
    shutil.rmtree(tmp)
    (dest.parent / (dest.name + ".done")).write_text(f"{points} {ntasks}\n")
    return {"build_seconds": round(time.perf_counter() - t0, 1)}


# --------------------------------------------------------------------------- running it

def code_env(code: Path | None, work: Path) -> dict[str, str]:
    """The environment that runs pointsafe from ``code`` (another checkout), or this one."""
    env = {k: v for k, v in os.environ.items() if k != "POINTSAFE_SAFE"}
    if code is None:
        return env
    farm = work / "code-farm" / "pointsafe"
    shutil.rmtree(farm.parent, ignore_errors=True)
    farm.mkdir(parents=True)
    for f in (code / "pointsafe_pkg").iterdir():
        (farm / f.name).symlink_to(f)
    for room in ROOMS:
        if (code / room).is_dir():
            (farm / room).symlink_to(code / room)
    env["PYTHONPATH"] = str(farm.parent)
    return env


def ps(safe: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "pointsafe.cli", "--safe", str(safe), *args]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_web(safe: Path, env: dict[str, str], log_path: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(ps(safe, "web", "--listen", f"127.0.0.1:{port}"), stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + 60
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"pointsafe web exited: {log_path.read_text()[-2000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, f"http://127.0.0.1:{port}"
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError("pointsafe web did not listen") from None
            time.sleep(0.1)


def login(url: str):
    import httpx
    c = httpx.Client(base_url=url, follow_redirects=False, timeout=600)
    token = re.search(r'name="token" value="([^"]+)"', c.get("/login").text).group(1)
    r = c.post("/login", data={"password": PASSWORD, "token": token, "next": "/"})
    if r.status_code != 303:
        raise RuntimeError(f"login failed: {r.status_code}")
    return c


def pages(c) -> list[tuple[str, str]]:
    """(label, URL) of the pages measured, with ids read from the safe."""
    pts = c.get("/points?format=json").json()
    mine = [p for p in pts if p["name"] == "src3"]
    a, b = mine[-2]["id"], mine[-1]["id"]
    last_task = c.get("/tasks?format=json&last=1").json()[0]["id"]
    err = c.get("/tasks?format=json&state=error&last=1").json()[0]["id"]
    return [("dashboard", "/"), ("dashboard (JSON)", "/?format=json"),
            ("tasks", "/tasks"), ("tasks, page 500 (before=ID)", f"/tasks?before={last_task // 2}"),
            ("tasks by source", "/tasks?source=src3"), ("tasks by state (error)", "/tasks?state=error"),
            ("tasks by source and state", "/tasks?source=src3&state=error"),
            ("tasks by command (verify)", "/tasks?kind=verify"),
            ("a task", f"/tasks/{err}"), ("alerts", "/alerts"),
            ("points (all)", "/points"), ("a point", f"/points/{b}"),
            ("a directory", f"/points/{b}/tree/dir1/"), ("diff", f"/diff?a={a}&b={b}")]


def time_pages(base: str, n: int) -> list[dict[str, Any]]:
    out = []
    c = login(base)
    for label, url in pages(c):
        r = c.get(url)
        if r.status_code != 200:
            log(f"{label}: {url} answers {r.status_code}; not measured")
            c = login(base)       # (the server closed the connection)
            out.append({"page": label, "url": url, "status": r.status_code, "bytes": len(r.content),
                        "median_ms": None, "max_ms": None})
            continue
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            r = c.get(url)
            r.read()
            times.append(time.perf_counter() - t0)
        out.append({"page": label, "url": url, "bytes": len(r.content),
                    "median_ms": round(1000 * statistics.median(times), 1), "max_ms": round(1000 * max(times), 1)})
        log(f"{label:32s} median {out[-1]['median_ms']:8.1f} ms  max {out[-1]['max_ms']:8.1f} ms")
    return out


def web_download(c, pid: str, runs: int) -> float:
    """Best seconds to stream the big file through the web (page cache dropped before each)."""
    best = float("inf")
    for _ in range(runs):
        drop_caches()
        t0 = time.perf_counter()
        n = 0
        with c.stream("GET", f"/points/{pid}/raw/rand.bin") as r:
            for chunk in r.iter_raw(1 << 20):
                n += len(chunk)
        if n != 1 << 30:
            raise RuntimeError(f"web download gave {n} bytes")
        best = min(best, time.perf_counter() - t0)
    return best


def mount_cat(safe: Path, pid: str, env: dict[str, str], work: Path, runs: int) -> float:
    """Best seconds of ``cat`` of the big file through ``pointsafe mount`` (caches dropped)."""
    mp = work / "mnt"
    mp.mkdir(exist_ok=True)
    best = float("inf")
    for _ in range(runs):
        subprocess.run(ps(safe, "mount", str(mp), pid, "--log", str(work / "mount.log")), check=True,
                       env=env, capture_output=True, timeout=120)
        try:
            f = mp / "rand.bin"
            deadline = time.monotonic() + 60
            while not f.exists():
                if time.monotonic() > deadline:
                    raise RuntimeError("the mount did not show rand.bin")
                time.sleep(0.1)
            drop_caches()
            t0 = time.perf_counter()
            subprocess.run(f"cat '{f}' > /dev/null", shell=True, check=True)
            best = min(best, time.perf_counter() - t0)
        finally:
            subprocess.run(["fusermount3", "-u", "-z", str(mp)], capture_output=True)
            time.sleep(1)
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=BENCH / "web-work")
    ap.add_argument("--points", type=int, default=1000)
    ap.add_argument("--tasks", type=int, default=100_000)
    ap.add_argument("--requests", type=int, default=10, help="requests per page (after one warm-up)")
    ap.add_argument("--download-runs", type=int, default=2)
    ap.add_argument("--no-download", action="store_true")
    ap.add_argument("--rebuild", action="store_true", help="build the safe again")
    ap.add_argument("--build-only", action="store_true", help="build the safe (when needed) and stop")
    ap.add_argument("--code", type=Path, help="run pointsafe from this checkout (default: this one)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--markdown", type=Path)
    args = ap.parse_args()
    work: Path = args.work
    work.mkdir(parents=True, exist_ok=True)
    safe = work / "safe"
    done = work / "safe.done"
    result: dict[str, Any] = {"machine": machine_info(), "points": args.points, "tasks": args.tasks,
                              "code": str(args.code or REPO_ROOT)}
    if args.rebuild or not done.exists() or done.read_text().split() != [str(args.points), str(args.tasks)]:
        log(f"building the safe: {args.points} points, {args.tasks} tasks")
        result.update(build_safe(safe, args.points, args.tasks, big=not args.no_download))
    if args.build_only:
        return 0
    env = code_env(args.code, work)
    subprocess.run(ps(safe, "web", "passwd"), input=(PASSWORD + "\n").encode(), check=True, env=env,
                   capture_output=True, timeout=120)
    proc, url = start_web(safe, env, work / "web.log")
    try:
        result["pages"] = time_pages(url, args.requests)
        c = login(url)
        if not args.no_download:
            big = [p for p in c.get("/points?format=json").json() if p["name"] == "big"][-1]["id"]
            result["web_seconds"] = web_download(c, big, args.download_runs)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    if not args.no_download:
        result["mount_seconds"] = mount_cat(safe, big, env, work, args.download_runs)
        for k in ("web", "mount"):
            result[f"{k}_mb_s"] = round((1 << 30) / result[f"{k}_seconds"] / 1e6, 1)
    rows = [[p["page"], p["median_ms"] if p["median_ms"] is not None else f"HTTP {p['status']}",
             p["max_ms"], p["bytes"]] for p in result["pages"]]
    table = markdown_table(["page", "median ms", "max ms", "bytes"], rows)
    dl = ""
    if not args.no_download:
        dl = markdown_table(["1 GiB file, page cache dropped", "seconds", "MB/s"],
                            [["web: GET /points/ID/raw/rand.bin", f"{result['web_seconds']:.2f}", result["web_mb_s"]],
                             ["mount: cat", f"{result['mount_seconds']:.2f}", result["mount_mb_s"]]])
    text = f"{args.points} points, {args.tasks} tasks, {args.requests} requests a page\n\n{table}\n\n{dl}\n"
    print(text)
    if args.json:
        write_json(args.json, result)
    if args.markdown:
        args.markdown.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
