#!/usr/bin/env python3
"""Mount benchmark: pointsafe mount next to borg mount, restic mount and the ceiling of a
trivial pyfuse3 filesystem serving bytes from memory, in one run.

    .venv/bin/python scripts/bench/mount.py --json /tmp/mount.json --markdown /tmp/mount.md

Data (generated once under /work/bench-data, reused): the backup benchmark's mixed set
(``data.py``, 2 GiB: large mixed-entropy files, ~29,000 small files, an ext4 image), a tree
of 120,000 small files, and one 1 GiB incompressible file. Each tool backs up the three
sources into its own repository (restic ``--compression auto``, borg ``zstd,1``, pointsafe
``zstd:1``), then for each tool, with its repository read into the page cache first and every
measurement on a *fresh* mount (so the filesystem's own caches start cold):

- mount -> listing: from starting the mount command until the point's root lists (the
  120,000-file point and the mixed point);
- find: ``find ROOT -printf '%s %m\\n'`` over the 120,000-file point (every entry stat'ed);
- tar: ``tar -cf - . | cat > /dev/null`` of the 120,000-file point (every small file read in
  directory order);
- sequential: ``cat`` of the mixed set's large files (1.4 GiB, ``large/*``) and of the 1 GiB
  incompressible file, to /dev/null;
- 4 parallel readers: four ``dd bs=1M`` reading 1 GiB of the mixed set's large files in four
  256 MiB pieces at once;
- sqlite: ``PRAGMA integrity_check`` of a ~300 MB SQLite database (rows inserted in random key
  order, with two indexes: its pages are read in B-tree order, not file order) opened read-only
  through a fresh mount with the page cache dropped (``echo 3 > /proc/sys/vm/drop_caches``), and
  the same on the local copy, cold as well (``sqlite_local``): random page reads through a cold
  mount.

``--steps`` picks the measurements (default all: mount,find,tar,seq_mixed,seq_random,parallel,
sqlite); only the sources those steps need are made and backed up. ``--steps sqlite --tools
pointsafe`` measures the database alone.

The ceiling filesystem (``--memfs``, in this file) serves one 1 GiB buffer as ``big.bin`` and
as four 256 MiB files, with pointsafe's mount settings: ro, default_permissions, read-ahead
raised through /sys/class/bdi, ``keep_cache`` and ``memoryview`` slices.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
import data as dataset  # noqa: E402
from _common import drop_caches, log, machine_info, markdown_table, tool_version, write_json  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]
BENCH = Path("/work/bench-data")
MB = 1_000_000
READ_AHEAD_KB = 4096
MANY_FILES = 120_000
SQLITE_BYTES = 300 * MB
STEPS = ("mount", "find", "tar", "seq_mixed", "seq_random", "parallel", "sqlite")
# which source each step reads ("mount" measures mount -> listing of "many" and "mixed")
STEP_SOURCES = {"mount": ("many", "mixed"), "find": ("many",), "tar": ("many",), "seq_mixed": ("mixed",),
                "seq_random": ("rand",), "parallel": ("mixed",), "sqlite": ("sqlite",)}
DB_NAME = "bench.sqlite"
# integrity_check in a child process, the database opened read-only and immutable (SQLite then
# takes no locks and never looks for a journal: what attaching a database from the mount does)
INTEGRITY = ("import sqlite3, sys; c = sqlite3.connect('file:' + sys.argv[1] + '?mode=ro&immutable=1', uri=True); "
             "r = c.execute('PRAGMA integrity_check').fetchall(); sys.exit(0 if r == [('ok',)] else repr(r))")


# --------------------------------------------------------------------------- the ceiling fs

def memfs(mountpoint: str, size: int) -> None:
    """A trivial read-only pyfuse3 filesystem serving one buffer from memory (foreground)."""
    import errno
    import stat

    import pyfuse3
    import trio

    sys.path.insert(0, str(REPO_ROOT))
    buf = memoryview(os.urandom(size))
    quarter = size // 4
    files = {b"big.bin": (2, size)} | {b"q%d.bin" % i: (3 + i, quarter) for i in range(4)}
    by_ino = {ino: (name, n) for name, (ino, n) in files.items()}

    class Ops(pyfuse3.Operations):
        def _attr(self, ino: int) -> pyfuse3.EntryAttributes:
            a = pyfuse3.EntryAttributes()
            a.st_ino = ino
            a.entry_timeout = a.attr_timeout = 3600
            if ino == pyfuse3.ROOT_INODE:
                a.st_mode, a.st_nlink, a.st_size = stat.S_IFDIR | 0o555, 2, 0
            else:
                a.st_mode, a.st_nlink, a.st_size = stat.S_IFREG | 0o444, 1, by_ino[ino][1]
            a.st_blksize = 128 * 1024
            a.st_blocks = (a.st_size + 511) // 512
            return a

        async def getattr(self, inode, ctx=None):
            if inode != pyfuse3.ROOT_INODE and inode not in by_ino:
                raise pyfuse3.FUSEError(errno.ENOENT)
            return self._attr(inode)

        async def lookup(self, parent, name, ctx=None):
            if parent != pyfuse3.ROOT_INODE or bytes(name) not in files:
                raise pyfuse3.FUSEError(errno.ENOENT)
            return self._attr(files[bytes(name)][0])

        async def opendir(self, inode, ctx):
            return inode

        async def readdir(self, fh, start, token):
            for i, (name, (ino, _)) in enumerate(sorted(files.items())):
                if i >= start and not pyfuse3.readdir_reply(token, name, self._attr(ino), i + 1):
                    break

        async def open(self, inode, flags, ctx):
            return pyfuse3.FileInfo(fh=inode, keep_cache=True)

        async def read(self, fh, off, n):
            end = min(off + n, by_ino[fh][1])
            return buf[off:end] if off < end else b""

    real = os.path.realpath(mountpoint)   # before mounting: stat'ing our own mount would deadlock
    pyfuse3.init(Ops(), mountpoint, {"fsname=memfs", "subtype=memfs", "ro", "default_permissions"})
    from pointsafe.fusefs.mounts import raise_read_ahead

    async def main() -> None:
        async with trio.open_nursery() as n:
            async def later() -> None:
                await trio.sleep(0.2)   # after INIT (which would lower the read-ahead again)
                raise_read_ahead(real, READ_AHEAD_KB)
            n.start_soon(later)
            await pyfuse3.main()
    try:
        trio.run(main)
    finally:
        pyfuse3.close(unmount=False)


# --------------------------------------------------------------------------- data

def ensure_many(dest: Path, n: int = MANY_FILES) -> Path:
    """``n`` small text-like files (0-4 KiB) in a three-level tree; generated once."""
    done = dest.with_name(dest.name + ".done")
    if done.exists():
        return dest
    import random
    shutil.rmtree(dest, ignore_errors=True)
    rnd = random.Random(7)
    words = [("w%x" % rnd.getrandbits(20)).encode() for _ in range(4000)]
    per_leaf = 300
    made = 0
    a = 0
    while made < n:
        for b in range(20):
            d = dest / f"d{a:02d}" / f"e{b:02d}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(min(per_leaf, n - made)):
                size = int(rnd.random() ** 3 * 4096)
                text = b" ".join(rnd.choices(words, k=size // 6 + 1))[:size]
                (d / f"file-{i:04d}.txt").write_bytes(text)
                made += 1
            if made >= n:
                break
        a += 1
    done.touch()
    return dest


def ensure_sqlite(dest: Path, size: int = SQLITE_BYTES) -> Path:
    """A SQLite database of about ``size`` bytes in ``dest``; generated once.

    Two tables, rows inserted in random key order and two secondary indexes, so that a table's
    B-tree pages lie scattered through the file as in a database that has lived a while."""
    db = dest / DB_NAME
    done = dest / (DB_NAME + ".done")
    if done.exists():
        return dest
    import random
    import sqlite3
    dest.mkdir(parents=True, exist_ok=True)
    db.unlink(missing_ok=True)
    rnd = random.Random(11)
    words = ["w%x" % rnd.getrandbits(20) for _ in range(5000)]
    con = sqlite3.connect(db)
    con.execute("PRAGMA journal_mode=OFF")
    con.execute("PRAGMA synchronous=OFF")
    con.execute("CREATE TABLE orders (id INTEGER PRIMARY KEY, customer INTEGER, ts INTEGER, note TEXT)")
    con.execute("CREATE TABLE events (id INTEGER PRIMARY KEY, kind TEXT, payload BLOB)")
    con.execute("CREATE INDEX orders_customer ON orders(customer, ts)")
    con.execute("CREATE INDEX events_kind ON events(kind)")
    rows = max(1000, size // 160)                 # ≈ 160 bytes per row with its index entries
    ids = list(range(1, rows + 1))
    rnd.shuffle(ids)
    for at in range(0, rows, 20_000):
        batch = ids[at:at + 20_000]
        con.executemany("INSERT INTO orders VALUES (?, ?, ?, ?)",
                        [(i, rnd.randrange(100_000), rnd.getrandbits(40), " ".join(rnd.choices(words, k=12)))
                         for i in batch])
        con.executemany("INSERT INTO events VALUES (?, ?, ?)",
                        [(i, rnd.choice(words[:50]), rnd.randbytes(rnd.randrange(16, 64))) for i in batch[::4]])
        con.commit()
    con.close()
    done.touch()
    return dest


def ensure_random(dest: Path, size: int = 1 << 30) -> Path:
    f = dest / "rand.bin"
    if f.exists() and f.stat().st_size == size:
        return dest
    import blake3
    dest.mkdir(parents=True, exist_ok=True)
    h = blake3.blake3(b"mount-bench")
    with open(f, "wb") as out:
        for i in range(0, size, 1 << 20):
            out.write(h.digest(length=1 << 20, seek=i))
    return dest


# --------------------------------------------------------------------------- tools

def sh(cmd: list, *, env: dict | None = None, cwd: Path | None = None, timeout: float = 3600) -> str:
    e = dict(os.environ)
    e.update(env or {})
    p = subprocess.run([str(c) for c in cmd], env=e, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if p.returncode not in (0, 3):
        raise RuntimeError(f"{' '.join(map(str, cmd))} exited {p.returncode}: {p.stderr[-2000:]}")
    return p.stdout


def pointsafe_argv() -> list[str]:
    exe = REPO_ROOT / ".venv" / "bin" / "pointsafe"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "pointsafe.cli"]


class Tool:
    name = ""

    def __init__(self, work: Path):
        self.work = work
        self.repo = work / f"{self.name}-repo"
        self.env: dict[str, str] = {}
        self.points: dict[str, str] = {}
        self.proc: subprocess.Popen | None = None

    def prepare(self, sources: dict[str, Path]) -> None:
        raise NotImplementedError

    def start_mount(self, mp: Path, source: str) -> None:
        raise NotImplementedError

    def root(self, mp: Path, source: str) -> Path:
        return mp

    def pid(self) -> int | None:
        """The process serving the mount (its CPU time is measured)."""
        return self.proc.pid if self.proc is not None else None

    def stop_mount(self, mp: Path) -> None:
        subprocess.run(["fusermount3", "-u", "-z", str(mp)], capture_output=True)
        if self.proc is not None:
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
            self.proc = None


class Pointsafe(Tool):
    name = "pointsafe"
    init_args: list[str] = []       # init's defaults: an encrypted safe

    def prepare(self, sources):
        ps = pointsafe_argv() + ["--safe", str(self.repo)]
        if not (self.repo / "header").exists():
            sh(ps + ["init"] + self.init_args)
        have = {p["name"]: p["id"] for p in json.loads(sh(ps + ["points", "--json"]) or "[]")} \
            if (self.repo / "header").exists() else {}
        for name, src in sources.items():
            if name not in have:
                out = json.loads(sh(ps + ["backup", str(src), "--name", name, "--json", "-q"]))
                have[name] = out["id"] if "id" in out else out["point"]["id"]
            self.points[name] = have[name]

    def start_mount(self, mp, source):
        out = sh(pointsafe_argv() + ["--safe", str(self.repo), "mount", str(mp), self.points[source],
                                     "--log", str(self.work / "pointsafe-mount.log"), "--json"])
        self.daemon = json.loads(out)["pid"]

    def pid(self):
        return self.daemon


class PointsafePlain(Pointsafe):
    """The same on a safe made with ``init --encryption none`` (what encryption costs)."""
    name = "pointsafe-plain"
    init_args = ["--encryption", "none"]


class Borg(Tool):
    name = "borg"

    def __init__(self, work):
        super().__init__(work)
        self.env = {"BORG_REPO": str(self.repo), "BORG_BASE_DIR": str(work / "borg-base"),
                    "BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK": "yes", "BORG_RELOCATED_REPO_ACCESS_IS_OK": "yes"}

    def prepare(self, sources):
        if not self.repo.exists():
            sh(["borg", "init", "-e", "none"], env=self.env)
        have = {a["name"] for a in json.loads(sh(["borg", "list", "--json"], env=self.env))["archives"]}
        for name, src in sources.items():
            if name not in have:
                sh(["borg", "create", "--compression", "zstd,1", f"::{name}", "."], env=self.env, cwd=src)
            self.points[name] = name

    def start_mount(self, mp, source):
        e = dict(os.environ) | self.env
        self.proc = subprocess.Popen(["borg", "mount", "-f", f"::{source}", str(mp)], env=e,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


class Restic(Tool):
    name = "restic"

    def __init__(self, work):
        super().__init__(work)
        self.env = {"RESTIC_REPOSITORY": str(self.repo), "RESTIC_PASSWORD": "bench",
                    "RESTIC_CACHE_DIR": str(work / "restic-cache")}

    def prepare(self, sources):
        if not self.repo.exists():
            sh(["restic", "init", "--repository-version", "2"], env=self.env)
        snaps = json.loads(sh(["restic", "snapshots", "--json"], env=self.env) or "[]")
        have = {t: s["short_id"] for s in snaps for t in (s.get("tags") or [])}
        for name, src in sources.items():
            if name not in have:
                sh(["restic", "backup", "--compression", "auto", "--host", "bench", "--tag", name, "."],
                   env=self.env, cwd=src)
                snaps = json.loads(sh(["restic", "snapshots", "--json"], env=self.env))
                have = {t: s["short_id"] for s in snaps for t in (s.get("tags") or [])}
            self.points[name] = have[name]

    def start_mount(self, mp, source):
        e = dict(os.environ) | self.env
        self.proc = subprocess.Popen(["restic", "mount", str(mp)], env=e,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def root(self, mp, source):
        return mp / "ids" / self.points[source]


class MemFS(Tool):
    name = "memfs"

    def prepare(self, sources):
        pass

    def start_mount(self, mp, source):
        self.proc = subprocess.Popen([sys.executable, __file__, "--memfs", str(mp)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


# --------------------------------------------------------------------------- measuring

def wait_listing(path: Path, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if os.listdir(path):
                return
        except OSError:
            pass
        time.sleep(0.005)
    raise RuntimeError(f"{path}: no listing after {timeout} s")


def warm(path: Path) -> None:
    """Read a repository into the page cache, so every tool reads it from memory."""
    subprocess.run(f"find {path} -type f -print0 | xargs -0 -r cat > /dev/null", shell=True, check=False)


def cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU seconds of a process (and its reaped children) so far."""
    if pid is None:
        return None
    try:
        f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    tick = os.sysconf("SC_CLK_TCK")
    return sum(int(x) for x in f[11:15]) / tick


def timed(fn: Callable[[], Any]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def run_sh(cmd: str, timeout: float = 1800) -> None:
    p = subprocess.run(cmd, shell=True, timeout=timeout, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"{cmd}: {p.stderr[-500:]}")


def integrity_check(db: Path, timeout: float) -> float:
    """Seconds of ``PRAGMA integrity_check`` of ``db`` (read-only, immutable) in a child process;
    RuntimeError unless SQLite answers ok."""
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", INTEGRITY, str(db)], capture_output=True, text=True, timeout=timeout)
    took = time.perf_counter() - t
    if p.returncode != 0:
        raise RuntimeError(f"integrity_check of {db}: {p.stderr.strip()[-500:]}")
    return took


def measure_local_sqlite(src: Path, timeout: float) -> tuple[float, float]:
    """integrity_check of the local copy (the baseline): (seconds with the page cache dropped
    first, seconds again right after, the file in the page cache)."""
    drop_caches()
    cold = integrity_check(src / DB_NAME, timeout)
    return cold, integrity_check(src / DB_NAME, timeout)


def measure_tool(tool: Tool, mp: Path, mixed_large: list[str], timeout: float,
                 steps: tuple[str, ...] = STEPS) -> dict[str, Any]:
    res: dict[str, Any] = {}

    def fresh(source: str) -> Path:
        t0 = time.perf_counter()
        tool.start_mount(mp, source)
        root = tool.root(mp, source)
        wait_listing(root, timeout)
        res.setdefault("mount_s", {})[source] = time.perf_counter() - t0
        return root

    def session(source: str, fn: Callable[[Path], None], label: str | None = None) -> None:
        try:
            root = fresh(source)
            before = cpu_seconds(tool.pid())
            fn(root)
            after = cpu_seconds(tool.pid())
            if label and before is not None and after is not None:
                res[f"{label}_cpu"] = after - before
            if tool.name.startswith("pointsafe"):  # the mount's own counters (objects read, requests)
                res.setdefault("stats", []).append(
                    {source: json.loads(os.getxattr(mp, "user.pointsafe.stats"))})
        finally:
            tool.stop_mount(mp)

    if tool.name == "memfs":
        def seq(root: Path) -> None:
            res["seq_random_s"] = timed(lambda: run_sh(f"cat {root}/big.bin > /dev/null", timeout))
            res["seq_random_bytes"] = (root / "big.bin").stat().st_size

        def par(root: Path) -> None:
            cmd = " & ".join(f"dd if={root}/q{i}.bin of=/dev/null bs=1M status=none" for i in range(4)) + " & wait"
            res["parallel_s"] = timed(lambda: run_sh(cmd, timeout))
            res["parallel_bytes"] = sum((root / f"q{i}.bin").stat().st_size for i in range(4))
        if "seq_random" in steps:
            session("mem", seq, "seq_random")
        if "parallel" in steps:
            session("mem", par, "parallel")
        return res

    if "mount" in steps:
        session("many", lambda root: None)                   # mount -> listing, 120k-file point
    if "find" in steps:
        session("many", lambda root: res.__setitem__(
            "find_s", timed(lambda: run_sh(f"find {root} -printf '%s %m\\n' > /dev/null", timeout))), "find")
    if "tar" in steps:
        # tar reads every small file in directory order (through a pipe: GNU tar skips reading for /dev/null)
        session("many", lambda root: res.__setitem__(
            "tar_s", timed(lambda: run_sh(f"tar -C {root} -cf - . | cat > /dev/null", timeout))), "tar")

    def seq_mixed(root: Path) -> None:
        files = " ".join(str(root / p) for p in mixed_large)
        res["seq_mixed_s"] = timed(lambda: run_sh(f"cat {files} > /dev/null", timeout))
        res["seq_mixed_bytes"] = sum((root / p).stat().st_size for p in mixed_large)
    if "seq_mixed" in steps or "mount" in steps:
        if "seq_mixed" in steps:
            session("mixed", seq_mixed, "seq_mixed")
        else:
            session("mixed", lambda root: None)              # mount -> listing, mixed point

    def seq_random(root: Path) -> None:
        res["seq_random_s"] = timed(lambda: run_sh(f"cat {root}/rand.bin > /dev/null", timeout))
        res["seq_random_bytes"] = (root / "rand.bin").stat().st_size
    if "seq_random" in steps:
        session("rand", seq_random, "seq_random")

    def parallel(root: Path) -> None:
        # 1 GiB of the mixed set's large files as four 256 MiB pieces read at once
        q = 256
        pieces = [("large/big-00.bin", 0), ("large/big-00.bin", q), ("large/big-01.bin", 0), ("large/big-02.bin", 0)]
        cmd = " & ".join(f"dd if={root / f} of=/dev/null bs=1M skip={s} count={q} status=none"
                         for f, s in pieces) + " & wait"
        res["parallel_s"] = timed(lambda: run_sh(cmd, timeout))
        res["parallel_bytes"] = 4 * q << 20
    if "parallel" in steps:
        session("mixed", parallel, "parallel")

    def sqlite(root: Path) -> None:
        drop_caches()           # the packs (and the mount's page cache) cold: random reads from disk
        res["sqlite_s"] = integrity_check(root / DB_NAME, timeout)
        res["sqlite_bytes"] = (root / DB_NAME).stat().st_size
    if "sqlite" in steps:
        session("sqlite", sqlite, "sqlite")
    return res


# --------------------------------------------------------------------------- report

def _rate(r: dict, key: str) -> float | None:
    s, b = r.get(f"{key}_s"), r.get(f"{key}_bytes")
    return b / s / MB if s and b else None


def _per_cpu(r: dict, key: str) -> float | None:
    c, b = r.get(f"{key}_cpu"), r.get(f"{key}_bytes")
    return b / c / MB if c and b else None


def report(result: dict) -> str:
    t = result["tools"]
    names = [n for n in ("pointsafe", "pointsafe-plain", "borg", "restic", "memfs") if n in t]

    def cell(n: str, fn: Callable[[dict], float | None], fmt: str) -> str:
        v = fn(t[n]) if n in t else None
        return "–" if v is None else fmt.format(v)

    rows = [
        ["mount → listing, 120,000-file point (s)"] + [cell(n, lambda r: r.get("mount_s", {}).get("many"), "{:.2f}") for n in names],
        ["mount → listing, mixed 2 GiB point (s)"] + [cell(n, lambda r: r.get("mount_s", {}).get("mixed"), "{:.2f}") for n in names],
        ["find over 120,000 files (s)"] + [cell(n, lambda r: r.get("find_s"), "{:.2f}") for n in names],
        ["tar of 120,000 files (s)"] + [cell(n, lambda r: r.get("tar_s"), "{:.2f}") for n in names],
        ["sequential cat, mixed 1.4 GiB (MB/s)"] + [cell(n, lambda r: _rate(r, "seq_mixed"), "{:,.0f}") for n in names],
        ["sequential cat, incompressible 1 GiB (MB/s)"] + [cell(n, lambda r: _rate(r, "seq_random"), "{:,.0f}") for n in names],
        ["4 parallel readers, 1 GiB (MB/s)"] + [cell(n, lambda r: _rate(r, "parallel"), "{:,.0f}") for n in names],
        ["find: CPU of the mount process (s)"] + [cell(n, lambda r: r.get("find_cpu"), "{:.2f}") for n in names],
        ["tar: CPU of the mount process (s)"] + [cell(n, lambda r: r.get("tar_cpu"), "{:.2f}") for n in names],
        ["sequential mixed: MB per CPU-second of the mount process"] + [cell(n, lambda r: _per_cpu(r, "seq_mixed"), "{:,.0f}") for n in names],
        ["sequential incompressible: MB per CPU-second"] + [cell(n, lambda r: _per_cpu(r, "seq_random"), "{:,.0f}") for n in names],
        ["4 readers: MB per CPU-second"] + [cell(n, lambda r: _per_cpu(r, "parallel"), "{:,.0f}") for n in names],
        ["SQLite integrity_check, ~300 MB, cold mount (s)"] + [cell(n, lambda r: r.get("sqlite_s"), "{:.2f}") for n in names],
        ["SQLite integrity_check: CPU of the mount process (s)"] + [cell(n, lambda r: r.get("sqlite_cpu"), "{:.2f}") for n in names],
    ]
    rows = [r for r in rows if any(c != "–" for c in r[1:])]      # only what this run measured
    out = [markdown_table(["measure"] + names, rows)]
    ps = t.get("pointsafe", {})

    def ratio(a, b):
        return f"{a / b:.2f}×" if a and b else "–"

    g = []
    for peer in ("borg", "restic"):
        r = t.get(peer, {})
        g.append([f"find, {peer} time ÷ pointsafe time", ratio(r.get("find_s"), ps.get("find_s"))])
        g.append([f"tar, {peer} time ÷ pointsafe time", ratio(r.get("tar_s"), ps.get("tar_s"))])
        g.append([f"sequential mixed, pointsafe ÷ {peer}", ratio(_rate(ps, "seq_mixed"), _rate(r, "seq_mixed"))])
        g.append([f"4 readers, pointsafe ÷ {peer}", ratio(_rate(ps, "parallel"), _rate(r, "parallel"))])
    mem = t.get("memfs", {})
    g.append(["sequential incompressible, pointsafe ÷ memory ceiling",
              ratio(_rate(ps, "seq_random"), _rate(mem, "seq_random"))])
    g.append(["4 readers, pointsafe (mixed) ÷ memory ceiling", ratio(_rate(ps, "parallel"), _rate(mem, "parallel"))])
    local, warm_local = result.get("sqlite_local_s"), result.get("sqlite_local_warm_s")
    if local and warm_local:
        g.append(["SQLite integrity_check, local copy, cold (s)", f"{local:.2f}"])
        g.append(["SQLite integrity_check, local copy, in the page cache (s)", f"{warm_local:.2f}"])
        for n in names:
            if t[n].get("sqlite_s"):
                g.append([f"SQLite integrity_check, {n} cold mount ÷ cold local copy", ratio(t[n]["sqlite_s"], local)])
                g.append([f"SQLite integrity_check, {n} cold mount ÷ cached local copy",
                          ratio(t[n]["sqlite_s"], warm_local)])
    plain = t.get("pointsafe-plain")
    if plain:       # what encryption costs the mount (issue 14's goal: within 1.10x)
        g.append(["sequential mixed, encrypted ÷ plain safe", ratio(_rate(ps, "seq_mixed"), _rate(plain, "seq_mixed"))])
        g.append(["sequential incompressible, encrypted ÷ plain safe",
                  ratio(_rate(ps, "seq_random"), _rate(plain, "seq_random"))])
        g.append(["tar, plain time ÷ encrypted time", ratio(plain.get("tar_s"), ps.get("tar_s"))])
    out.append("")
    out.append(markdown_table(["ratio", "value"], [r for r in g if r[1] != "–"]))
    return "\n".join(out)


def parse_steps(text: str) -> tuple[str, ...]:
    """The steps named in ``text`` (comma-separated), in the order they run; ValueError for others."""
    want = [w.strip() for w in text.split(",") if w.strip()]
    bad = [w for w in want if w not in STEPS]
    if bad:
        raise ValueError(f"unknown step(s) {', '.join(bad)}; choose from {', '.join(STEPS)}")
    return tuple(w for w in STEPS if w in want)


def make_sources(steps: tuple[str, ...]) -> tuple[dict[str, Path], list[str]]:
    """The sources the steps read (made once under BENCH), and the mixed set's large files."""
    need = {src for st in steps for src in STEP_SOURCES[st]}
    sources: dict[str, Path] = {}
    mixed_large: list[str] = []
    if "mixed" in need:
        sources["mixed"] = BENCH / "set-2G"
        mixed_large = [f["path"] for f in dataset.ensure(sources["mixed"], 2 << 30)["large"]]
    if "many" in need:
        sources["many"] = ensure_many(BENCH / "mount-many-120k")
    if "rand" in need:
        sources["rand"] = ensure_random(BENCH / "mount-rand-1G")
    if "sqlite" in need:
        sources["sqlite"] = ensure_sqlite(BENCH / "mount-sqlite-300M")
    return sources, mixed_large


def benchmark(args) -> dict:
    steps = parse_steps(args.steps)
    sources, mixed_large = make_sources(steps)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    mp = work / "mnt"
    mp.mkdir(exist_ok=True)
    os.environ.setdefault("POINTSAFE_PASSWORD", "pointsafe-benchmark")   # for the encrypted safe
    tools = [{"pointsafe": Pointsafe, "pointsafe-plain": PointsafePlain, "borg": Borg, "restic": Restic,
              "memfs": MemFS}[n](work)
             for n in args.tools.split(",")]
    result: dict[str, Any] = {"machine": machine_info(), "tools": {}, "versions": {}}
    for tool in tools:
        log(f"{tool.name}: backing up the sources (once)")
        tool.prepare(sources)
    if args.prepare_only:
        return result
    if "sqlite" in steps:
        result["sqlite_local_s"], result["sqlite_local_warm_s"] = measure_local_sqlite(sources["sqlite"], args.timeout)
        log(f"sqlite integrity_check on the local copy: cold {result['sqlite_local_s']:.2f} s, "
            f"warm {result['sqlite_local_warm_s']:.2f} s")
    for tool in tools:
        if tool.name != "memfs" and steps != ("sqlite",):   # sqlite drops the page cache itself
            warm(tool.repo)
        log(f"{tool.name}: measuring")
        try:
            result["tools"][tool.name] = measure_tool(tool, mp, mixed_large, args.timeout, steps)
        except Exception as e:                      # one tool failing must not lose the others
            log(f"{tool.name}: failed: {e}")
            result["tools"][tool.name] = {"error": str(e)}
        log(f"{tool.name}: {result['tools'][tool.name]}")
    result["loadavg_end"] = Path("/proc/loadavg").read_text().split()[:3]
    result["versions"] = {"borg": tool_version(["borg", "--version"]),
                          "restic": tool_version(["restic", "version"])}
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--memfs", metavar="MOUNTPOINT", help=argparse.SUPPRESS)
    ap.add_argument("--memfs-size", default=1 << 30, type=int, help=argparse.SUPPRESS)
    ap.add_argument("--tools", default="pointsafe,pointsafe-plain,borg,restic,memfs")
    ap.add_argument("--steps", default=",".join(STEPS), help="comma-separated: " + ",".join(STEPS))
    ap.add_argument("--work", default=str(BENCH / "mount-work"))
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--prepare-only", action="store_true", help="make the data and the backups, measure nothing")
    ap.add_argument("--json", metavar="OUT")
    ap.add_argument("--markdown", metavar="OUT")
    args = ap.parse_args(argv)
    if args.memfs:
        memfs(args.memfs, args.memfs_size)
        return 0
    try:
        parse_steps(args.steps)
    except ValueError as e:
        ap.error(str(e))
    result = benchmark(args)
    if args.prepare_only:
        return 0
    text = report(result)
    print(text)
    if args.json:
        write_json(args.json, result)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
