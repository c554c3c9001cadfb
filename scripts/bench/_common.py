"""What the benchmark scripts share: running a command with its wall time, CPU time and peak
RSS, dropping the page cache for cold runs, sizes on disk, tables and JSON.

Peak RSS comes from ``os.wait4`` on the child (``ru_maxrss``): the kernel reports the largest
resident set of the child *or of any descendant it waited for*, so a tool that forks workers
is still measured whole. It is the figure ``/usr/bin/time -v`` prints as "Maximum resident
set size".
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
REPO = Path(__file__).resolve().parents[2]


def as_installed() -> None:
    """Run pointsafe as an installed package runs: its modules compiled to ``.pyc`` once (pip
    does that at install time), not recompiled by every command. A machine with
    ``PYTHONDONTWRITEBYTECODE=1`` (these do) would otherwise charge each pointsafe command
    0.1-0.25 s of compiling that no user pays; restic and borg are measured installed too."""
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    import compileall
    rooms = [REPO / d for d in ("cas", "ingest", "fusefs", "gc", "cli", "ops", "web", "server", "pointsafe_pkg")]
    for d in rooms:
        if d.is_dir():
            compileall.compile_dir(str(d), quiet=1)


as_installed()


def parse_size(text: str) -> int:
    """'2G', '200M', '512K', '1.5G' or a plain byte count -> bytes (binary units)."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = t[-1:] if t[-1:] in UNITS else ""
    number = t[: len(t) - len(unit)] if unit else t
    try:
        return int(float(number) * UNITS[unit])
    except ValueError:
        raise ValueError(f"bad size {text!r}: use e.g. 200M or 2G") from None


def human_bytes(n: float | None) -> str:
    if n is None:
        return "–"
    sign = "-" if n < 0 else ""
    n = abs(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{sign}{n:.0f} {unit}" if unit == "B" else f"{sign}{n:.1f} {unit}"
        n /= 1024
    return f"{sign}{n} B"


def human_secs(s: float | None) -> str:
    if s is None:
        return "–"
    return f"{s:.2f} s" if s < 10 else f"{s:.1f} s"


@dataclass
class Run:
    """One measured command."""
    cmd: list[str]
    code: int
    wall: float          # seconds
    user: float          # CPU seconds in user mode (child and its waited-for descendants)
    sys: float           # CPU seconds in the kernel
    maxrss: int          # peak resident set, bytes
    stdout: str = ""
    stderr: str = ""
    timed_out: bool = False

    @property
    def cpu(self) -> float:
        return self.user + self.sys

    def summary(self) -> dict[str, Any]:
        d = asdict(self)
        d["stdout"] = self.stdout[-2000:]
        d["stderr"] = self.stderr[-2000:]
        return d


def run(cmd: Sequence[str], *, cwd: str | os.PathLike | None = None, env: dict | None = None,
        timeout: float | None = None) -> Run:
    """Run ``cmd`` to completion and measure it with ``os.wait4``.

    stdout/stderr go to temporary files (not pipes: reading pipes would need the Popen
    machinery that also reaps the child, and then its rusage is lost). On timeout the
    child's process group is killed and ``timed_out`` is set.
    """
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        p = subprocess.Popen(list(map(str, cmd)), cwd=cwd, env=full_env, stdin=subprocess.DEVNULL,
                             stdout=out, stderr=err, start_new_session=True)
        timed_out = threading.Event()

        def _kill() -> None:
            timed_out.set()
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

        timer = threading.Timer(timeout, _kill) if timeout else None
        if timer:
            timer.start()
        try:
            _, status, ru = os.wait4(p.pid, 0)
        finally:
            if timer:
                timer.cancel()
        wall = time.perf_counter() - t0
        code = os.waitstatus_to_exitcode(status)
        p.returncode = code            # tell Popen the child is reaped
        out.seek(0)
        err.seek(0)
        return Run(cmd=list(map(str, cmd)), code=code, wall=wall, user=ru.ru_utime, sys=ru.ru_stime,
                   maxrss=ru.ru_maxrss * 1024, stdout=out.read().decode(errors="replace"),
                   stderr=err.read().decode(errors="replace"), timed_out=timed_out.is_set())


def drop_caches() -> bool:
    """``sync; echo 3 > /proc/sys/vm/drop_caches``: page cache, dentries and inodes.

    Needs root; returns False (and the run is then warm) when it is not allowed.
    """
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def disk_usage(path: str | os.PathLike) -> int:
    """Bytes allocated on disk under ``path`` (like ``du -s --block-size=1``).

    Allocated rather than apparent size, so a sparse file (e.g. an LMDB map that was
    extended with ftruncate) counts for what it really occupies. Hardlinks count once.
    """
    total = 0
    seen: set[tuple[int, int]] = set()
    p = Path(path)
    if not p.exists():
        return 0
    for root, dirs, files in os.walk(p):
        for name in dirs + files:
            try:
                st = os.lstat(os.path.join(root, name))
            except FileNotFoundError:
                continue
            if st.st_nlink > 1:
                if (st.st_dev, st.st_ino) in seen:
                    continue
                seen.add((st.st_dev, st.st_ino))
            total += st.st_blocks * 512
    return total


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]],
                   align: str | None = None) -> str:
    """A GitHub markdown table; ``align`` is one char per column, 'l' or 'r' (default: first
    column left, the rest right)."""
    rows = [["" if c is None else str(c) for c in r] for r in rows]
    align = align or "l" + "r" * (len(headers) - 1)
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) if a == "l" else c.rjust(w)
                                 for c, w, a in zip(cells, widths, align)) + " |"

    sep = "|" + "|".join(("-" * (w + 1) + ":") if a == "r" else ("-" * (w + 2))
                         for w, a in zip(widths, align)) + "|"
    return "\n".join([line(headers), sep] + [line(r) for r in rows])


def write_json(path: str | os.PathLike, obj: Any) -> None:
    Path(path).write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def machine_info() -> dict[str, Any]:
    """Enough context to read a result later: host, CPUs, memory, load, kernel."""
    info: dict[str, Any] = {"cpus": os.cpu_count(), "kernel": os.uname().release,
                            "host": os.uname().nodename,
                            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    try:
        info["loadavg"] = Path("/proc/loadavg").read_text().split()[:3]
        mem = Path("/proc/meminfo").read_text().split("\n")[0].split()
        info["mem_gib"] = round(int(mem[1]) / (1 << 20), 1)
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return info


def tool_version(cmd: Sequence[str]) -> str:
    try:
        r = subprocess.run(list(cmd), capture_output=True, text=True, timeout=30)
        return (r.stdout or r.stderr).strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return "unknown"


def pyspy_summary(path: str | os.PathLike, top: int = 15) -> str:
    """Where the time went, from ``py-spy record -f raw --threads --idle`` output: per thread,
    its share of the samples, then the lines that were on top of the stack most often (a
    thread blocked in a lock or a syscall counts at the line that waits)."""
    import collections
    import re
    threads: collections.Counter = collections.Counter()
    leaf: collections.Counter = collections.Counter()
    total = 0
    for line in Path(path).read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        frames = stack.split(";")
        th = re.sub(r"_\d+$", "", re.sub(r"^thread \(\d+\): ", "", frames[0]))
        total += int(n)
        threads[th] += int(n)
        leaf[(th, frames[-1] if len(frames) > 1 else "?")] += int(n)
    if not total:
        return "no samples"
    out = ["threads: " + ", ".join(f"{t} {100 * n / total:.0f}%" for t, n in threads.most_common())]
    out += [f"{100 * n / total:5.1f}%  {t:22s} {f}" for (t, f), n in leaf.most_common(top)]
    return "\n".join(out)


@dataclass
class Timer:
    """A wall-clock stopwatch for phases of a script that are not child processes."""
    started: float = field(default_factory=time.perf_counter)

    def elapsed(self) -> float:
        return time.perf_counter() - self.started
