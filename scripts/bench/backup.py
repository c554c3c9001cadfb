#!/usr/bin/env python3
"""Backup benchmark: pointsafe side by side with restic and borg, in one run.

    python scripts/bench/backup.py [--size 2G] [--tools pointsafe,pointsafe-plain,pointsafe-vol,restic,borg]
                                   [--data DIR] [--work DIR] [--keep] [--warm] [--json OUT]
                                   [--markdown OUT]

Each tool gets a fresh repository and goes through the same steps, step by step across tools
(so every tool sees the same data at the same time):

1. ``init``
2. first backup of the data set (page cache dropped before: cold)
3. second backup, nothing changed (cold)
4. the data set is changed: 1% of its bytes as scattered 64 KiB overwrites in the large files
   and inside the ext4 image (``data.py --mutate``); then a third backup (cold)
5. full restore of the third backup into an empty directory (cold), checked file by file
   against the source (names, sizes, BLAKE3 of the contents; not timed)

For every step: wall time, CPU time, peak RSS and the repository size on disk afterwards; for
the change, the bytes stored (repository growth across step 4) against the bytes changed.
``pointsafe-vol`` backs up only the image, as a volume (``backup --volume``), into its own safe.

Settings: restic 0.14 repository v2 with ``--compression auto`` (0.14 has no zstd level
setting; auto is its fastest compressing mode), password-encrypted (it cannot do otherwise);
borg 1.2 ``-e none``, ``--compression zstd,1``; pointsafe with its defaults (zstd level 1,
64 KiB volume blocks, encrypted: the machine's faster AEAD), and ``pointsafe-plain`` the same
with ``init --encryption none``. Client caches (restic's, borg's) live in the work directory and are not
counted in the repository size; pointsafe keeps its change-detection data inside the safe,
which is counted.

Afterwards the data set is put back (``data.py --undo``) so it can be reused.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import blake3

sys.path.insert(0, str(Path(__file__).resolve().parent))
import data as dataset  # noqa: E402
from _common import (Run, disk_usage, drop_caches, human_bytes, human_secs, log,  # noqa: E402
                     machine_info, markdown_table, parse_size, pyspy_summary, run, tool_version,
                     write_json)

REPO_ROOT = Path(__file__).resolve().parents[2]
ALL_TOOLS = ["pointsafe", "pointsafe-plain", "pointsafe-vol", "restic", "borg"]
# An encrypted safe (init's default) needs a password: the benchmark's own, if none is set.
os.environ.setdefault("POINTSAFE_PASSWORD", "pointsafe-benchmark")
STEPS = ["init", "backup1", "backup2", "backup3", "restore"]
STEP_TITLES = {"init": "init", "backup1": "first backup (cold)",
               "backup2": "unchanged re-backup", "backup3": "after 1% change",
               "restore": "full restore"}


# --------------------------------------------------------------------------- the tools

class Tool:
    """One backup program: the commands for each step, run against ``self.repo``."""

    name = ""
    volume = False          # backs up the image only

    def __init__(self, work: Path, src: Path, image: Path) -> None:
        self.work, self.src, self.image = work, src, image
        self.repo = work / f"{self.name}-repo"
        self.env: dict[str, str] = {}
        self.last_json: Any = None

    def commands(self, step: str, target: Path | None = None) -> tuple[list[str], Path | None]:
        """(argv, cwd) for a step."""
        raise NotImplementedError

    def version(self) -> str:
        raise NotImplementedError

    def cache_dirs(self) -> list[Path]:
        return []

    def parse(self, step: str, r: Run) -> dict[str, Any]:
        """Tool-reported figures from the step's output (best effort)."""
        return {}


def pointsafe_argv() -> list[str]:
    exe = REPO_ROOT / ".venv" / "bin" / "pointsafe"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "pointsafe.cli"]


class Pointsafe(Tool):
    name = "pointsafe"

    def commands(self, step, target=None):
        ps = pointsafe_argv() + ["--safe", str(self.repo)]
        if step == "init":
            return ps + ["init"], None
        if step.startswith("backup"):
            return ps + ["backup", str(self.src), "--name", "bench", "--json", "-q"], None
        if step == "restore":
            return ps + ["restore", "bench@latest", str(target), "-q"], None
        raise ValueError(step)

    def version(self):
        return tool_version(pointsafe_argv() + ["--version"])

    def parse(self, step, r):
        if not step.startswith("backup"):
            return {}
        text = "\n".join(x for x in r.stdout.splitlines() if not x.startswith("py-spy>"))
        try:
            point = json.loads(text)
        except ValueError:
            return {}
        st = point.get("stats", {}) if isinstance(point, dict) else {}
        return {k: st.get(k) for k in ("files", "bytes_read", "bytes_new", "bytes_stored")}


class PointsafePlain(Pointsafe):
    """pointsafe on a safe made with ``init --encryption none``: beside the encrypted default,
    what encryption costs (issue 14's goal: within 1.10x)."""
    name = "pointsafe-plain"

    def commands(self, step, target=None):
        cmd, cwd = super().commands(step, target)
        return (cmd + ["--encryption", "none"] if step == "init" else cmd), cwd


class PointsafeVolume(Pointsafe):
    name = "pointsafe-vol"
    volume = True

    def commands(self, step, target=None):
        ps = pointsafe_argv() + ["--safe", str(self.repo)]
        if step.startswith("backup"):
            return ps + ["backup", str(self.image), "--volume", "--name", "image", "--json", "-q"], None
        if step == "restore":
            return ps + ["restore", "image@latest", str(target / self.image.name), "-q"], None
        return super().commands(step, target)


class Restic(Tool):
    name = "restic"

    def __init__(self, work, src, image):
        super().__init__(work, src, image)
        self.env = {"RESTIC_REPOSITORY": str(self.repo), "RESTIC_PASSWORD": "bench",
                    "RESTIC_CACHE_DIR": str(work / "restic-cache")}

    def commands(self, step, target=None):
        if step == "init":
            return ["restic", "init", "--repository-version", "2"], None
        if step.startswith("backup"):
            return ["restic", "backup", "--compression", "auto", "--host", "bench", "--json", "."], self.src
        if step == "restore":
            return ["restic", "restore", "latest", "--target", str(target)], None
        raise ValueError(step)

    def version(self):
        return tool_version(["restic", "version"])

    def cache_dirs(self):
        return [self.work / "restic-cache"]

    def parse(self, step, r):
        if not step.startswith("backup"):
            return {}
        for line in reversed(r.stdout.splitlines()):
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if msg.get("message_type") == "summary":
                return {"files_changed": msg.get("files_changed"), "data_added": msg.get("data_added"),
                        "files_unmodified": msg.get("files_unmodified")}
        return {}


class Borg(Tool):
    name = "borg"

    def __init__(self, work, src, image):
        super().__init__(work, src, image)
        self.env = {"BORG_REPO": str(self.repo), "BORG_BASE_DIR": str(work / "borg-base"),
                    "BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK": "yes",
                    "BORG_RELOCATED_REPO_ACCESS_IS_OK": "yes"}
        self.archives = 0
        self.last_archive = ""

    def commands(self, step, target=None):
        if step == "init":
            return ["borg", "init", "-e", "none"], None
        if step.startswith("backup"):
            self.archives += 1                  # repeated steps need distinct archive names
            self.last_archive = f"{step}-{self.archives}"
            return ["borg", "create", "--compression", "zstd,1", "--json",
                    f"::{self.last_archive}", "."], self.src
        if step == "restore":
            return ["borg", "extract", f"::{self.last_archive}"], target
        raise ValueError(step)

    def version(self):
        return tool_version(["borg", "--version"])

    def cache_dirs(self):
        return [self.work / "borg-base"]

    def parse(self, step, r):
        if not step.startswith("backup"):
            return {}
        try:
            st = json.loads(r.stdout)["archive"]["stats"]
        except (ValueError, KeyError, TypeError):
            return {}
        return {"nfiles": st.get("nfiles"), "deduplicated_size": st.get("deduplicated_size"),
                "compressed_size": st.get("compressed_size")}


TOOL_CLASSES = {c.name: c for c in (Pointsafe, PointsafePlain, PointsafeVolume, Restic, Borg)}


# --------------------------------------------------------------------------- verification

def tree_digest(top: Path) -> dict[str, Any]:
    """relative path -> ('d',) for directories, ('f', size, blake3) for files, ('l', target)."""
    out: dict[str, Any] = {}
    for root, dirs, files in os.walk(top):
        for d in dirs:
            p = os.path.join(root, d)
            if os.path.islink(p):
                out[os.path.relpath(p, top)] = ("l", os.readlink(p))
            else:
                out[os.path.relpath(p, top)] = ("d",)
        for f in files:
            p = os.path.join(root, f)
            rel = os.path.relpath(p, top)
            if os.path.islink(p):
                out[rel] = ("l", os.readlink(p))
                continue
            h = blake3.blake3(max_threads=blake3.blake3.AUTO)
            with open(p, "rb") as fh:
                while chunk := fh.read(8 << 20):
                    h.update(chunk)
            out[rel] = ("f", os.path.getsize(p), h.hexdigest())
    return out


def find_restored_root(target: Path, marker: str) -> Path:
    """restic restores under the absolute source path; find the directory holding ``marker``."""
    if (target / marker).exists():
        return target
    for root, dirs, files in os.walk(target):
        if marker in files or marker in dirs:
            return Path(root)
    return target


def verify(tool: Tool, target: Path, expected: dict[str, Any]) -> dict[str, Any]:
    if tool.volume:
        got = tree_digest(target)
        want = {tool.image.name: expected[tool.image.name]}
    else:
        got = tree_digest(find_restored_root(target, tool.image.name))
        want = expected
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    differ = sorted(k for k in set(want) & set(got) if want[k] != got[k])
    return {"ok": not (missing or extra or differ), "checked": len(want), "missing": len(missing),
            "extra": len(extra), "differ": len(differ),
            "examples": (missing[:3] + extra[:3] + differ[:3])}


# --------------------------------------------------------------------------- the run

def pyspy() -> str:
    exe = REPO_ROOT / ".venv" / "bin" / "py-spy"
    return str(exe) if exe.exists() else "py-spy"


def loadavg() -> float | None:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def measure(tool: Tool, step: str, *, cold: bool, timeout: float,
            target: Path | None = None, profile: Path | None = None) -> dict[str, Any]:
    argv, cwd = tool.commands(step, target)
    prof_out = None
    if profile and tool.name.startswith("pointsafe") and step != "init":
        prof_out = profile / f"{tool.name}-{step}.txt"
        argv = [pyspy(), "record", "-r", "100", "-f", "raw", "--threads", "--idle",
                "-o", str(prof_out), "--"] + argv
    load = loadavg()
    size_before = disk_usage(tool.repo)
    dropped = drop_caches() if cold else False
    r = run(argv, cwd=cwd, env=tool.env, timeout=timeout)
    os.sync()
    res: dict[str, Any] = {"loadavg_before": load, "profiled": bool(prof_out),
                           "code": r.code, "wall": round(r.wall, 3), "cpu": round(r.cpu, 3),
                           "user": round(r.user, 3), "sys": round(r.sys, 3), "maxrss": r.maxrss,
                           "cold": dropped, "repo_size_before": size_before,
                           "repo_size": disk_usage(tool.repo),
                           "cache_size": sum(disk_usage(d) for d in tool.cache_dirs()),
                           "cmd": " ".join(argv), "reported": tool.parse(step, r)}
    ok = r.code in (0, 3) if tool.name.startswith("pointsafe") else r.code == 0
    if r.timed_out:
        res["error"] = f"timed out after {timeout:.0f} s"
    elif not ok:
        res["error"] = f"exit {r.code}: {(r.stderr.strip() or r.stdout.strip())[-600:]}"
    elif r.code == 3:
        res["warnings"] = r.stderr.strip()[-600:]
    log(f"{tool.name:14s} {step:8s} {human_secs(r.wall):>8s}  cpu {human_secs(r.cpu):>8s}  "
        f"rss {human_bytes(r.maxrss):>10s}  repo {human_bytes(res['repo_size']):>10s}  load {load}"
        + (f"  ERROR {res['error'][:300]}" if "error" in res else ""))
    if prof_out and prof_out.exists():
        res["profile"] = str(prof_out)
        res["profile_summary"] = pyspy_summary(prof_out)
        log(f"profile of {tool.name} {step} ({prof_out}):\n{res['profile_summary']}")
    return res


_held: list[int] = []


def _lock_data_set(data_dir: Path) -> None:
    """Hold the data set for this run (the third backup changes it and puts it back): a second
    run on the same data set stops at once instead of reading it half changed."""
    import fcntl
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(str(data_dir) + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise SystemExit(f"backup.py: another run is using the data set {data_dir} (it changes it and puts it "
                         "back); wait for it, or give --data another directory") from None
    _held.append(fd)


def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    size = parse_size(args.size)
    data_dir = Path(args.data or f"/work/bench-data/set-{args.size}").resolve()
    work = Path(args.work or f"/work/bench-data/backup-work-{args.size}").resolve()
    tools_wanted = [t.strip() for t in args.tools.split(",") if t.strip()]
    for t in tools_wanted:
        if t not in TOOL_CLASSES:
            raise SystemExit(f"backup.py: unknown tool {t!r} (known: {', '.join(ALL_TOOLS)})")

    _lock_data_set(data_dir)
    m = dataset.ensure(data_dir, size, args.seed)
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    image = data_dir / m["image"]["path"]
    tools = [TOOL_CLASSES[t](work, data_dir, image) for t in tools_wanted]
    result: dict[str, Any] = {
        "machine": machine_info(), "dataset": {k: m[k] for k in ("size", "seed", "files", "dirs",
                                                                 "total_bytes")},
        "versions": {t.name: t.version() for t in tools}, "cold": not args.warm,
        "results": {t.name: {} for t in tools}, "change": None,
    }
    result["dataset"]["image_bytes"] = m["image"]["size"]
    result["dataset"]["path"] = str(data_dir)
    failed: set[str] = set()
    cold = not args.warm
    profile = Path(args.profile).resolve() if args.profile else None
    if profile:
        if not Path(pyspy()).exists() and not shutil.which(pyspy()):
            raise SystemExit("backup.py: --profile needs py-spy (.venv/bin/pip install py-spy)")
        profile.mkdir(parents=True, exist_ok=True)
        result["profiled"] = True
    if cold and not drop_caches():
        log("cannot drop caches (not root?): runs are warm")
        cold = False
        result["cold"] = False

    def keep_best(t: Tool, step: str, res: dict[str, Any]) -> None:
        """Repeated steps keep their fastest run (the least disturbed by other load) and
        list every wall time."""
        old = result["results"][t.name].get(step)
        if old is None:
            res["walls"] = [res["wall"]]
            result["results"][t.name][step] = res
            return
        walls = old["walls"] + [res["wall"]]
        if "error" in res or ("error" not in old and res["wall"] < old["wall"]):
            for k in ("repo_size", "repo_size_before", "verify", "restored_size"):
                if k in old:
                    res[k] = old[k]     # sizes and checks stay those of the first run
            result["results"][t.name][step] = res
        result["results"][t.name][step]["walls"] = walls

    def step_all(step: str, reps: int = 1) -> None:
        for _ in range(reps):
            for t in tools:
                if t.name in failed:
                    continue
                res = measure(t, step, cold=cold and step != "init", timeout=args.timeout,
                              profile=profile)
                keep_best(t, step, res)
                if "error" in res:
                    failed.add(t.name)

    try:
        step_all("init")
        step_all("backup1")
        step_all("backup2", args.repeat)
        change = dataset.mutate(data_dir, args.change)
        change["image_bytes"] = change["image_writes"] * change["write_size"]
        result["change"] = change
        log(f"data: changed {human_bytes(change['bytes'])} in {change['writes']} writes of 64 KiB "
            f"({change['image_writes']} inside the image)")
        step_all("backup3")
        log("hashing the source for the restore check")
        expected = tree_digest(data_dir)
        for rep in range(args.repeat):
            for t in tools:
                if t.name in failed:
                    continue
                target = work / f"{t.name}-restore"
                if target.exists():
                    shutil.rmtree(target)
                target.mkdir()
                res = measure(t, "restore", cold=cold, timeout=args.timeout, target=target,
                              profile=profile)
                if "error" not in res and rep == 0:
                    res["verify"] = verify(t, target, expected)
                    if not res["verify"]["ok"]:
                        log(f"{t.name}: restore differs from the source: {res['verify']}")
                    res["restored_size"] = disk_usage(target)
                keep_best(t, "restore", res)
                if "error" in res:
                    failed.add(t.name)
                if not args.keep or rep < args.repeat - 1:
                    shutil.rmtree(target)
    finally:
        dataset.undo(data_dir)
        if not args.keep:
            for t in tools:
                shutil.rmtree(t.repo, ignore_errors=True)
            shutil.rmtree(work, ignore_errors=True)
    return result


# --------------------------------------------------------------------------- reporting

def _get(result, tool, step, key):
    return result["results"].get(tool, {}).get(step, {}).get(key)


def _ratio(a, b, fmt="{:.2f}") -> str:
    if a is None or b is None or not b:
        return "–"
    return fmt.format(a / b)


def report(result: dict[str, Any]) -> str:
    """The markdown that goes into docs/BENCHMARKS.md."""
    res = result["results"]
    peers = [p for p in ("restic", "borg") if p in res]
    main = [t for t in ("pointsafe", "pointsafe-plain", "restic", "borg") if t in res]
    both = "pointsafe" in res and "pointsafe-plain" in res    # encrypted and plain: their ratio too
    ds, ch, mi = result["dataset"], result.get("change") or {}, result["machine"]
    lines = []
    lines.append(
        f"Run of {mi['date']} on {mi.get('cpu', '?')} ({mi['cpus']} cores, {mi.get('mem_gib', '?')} GiB), "
        f"load average before the run {' '.join(mi.get('loadavg', []))}. "
        + ("Page cache dropped before every backup and restore. " if result["cold"] else "Warm page cache. ")
        + "Versions: " + "; ".join(f"{k}: {v}" for k, v in result["versions"].items()) + ".")
    lines.append("")
    lines.append(
        f"Data set (`scripts/bench/data.py`, seed {ds['seed']}): {human_bytes(ds['total_bytes'])} in "
        f"{ds['files']:,} files and {ds['dirs']:,} directories, including a "
        f"{human_bytes(ds['image_bytes'])} ext4 image. "
        + (f"The change: {ch['writes']} scattered 64 KiB overwrites = {human_bytes(ch['bytes'])} "
           f"({ch['fraction']:.0%} of the data; {ch['image_writes']} of them inside the image)."
           if ch else ""))
    if result.get("profiled"):
        lines.append("**pointsafe ran under py-spy in this run: its times and memory are not comparable.**")
    lines.append("")
    # times
    hdr = ["step"] + main + [f"pointsafe/{p}" for p in peers if "pointsafe" in res]
    rows = []
    for step in STEPS:
        row = [STEP_TITLES[step]]
        for t in main:
            w, c = _get(result, t, step, "wall"), _get(result, t, step, "cpu")
            err = _get(result, t, step, "error")
            row.append("failed" if err else (f"{w:.2f} s (cpu {c:.1f})" if w is not None else "–"))
        if "pointsafe" in res:
            for p in peers:
                row.append(_ratio(_get(result, "pointsafe", step, "wall"), _get(result, p, step, "wall")))
        if both:
            row.append(_ratio(_get(result, "pointsafe", step, "wall"), _get(result, "pointsafe-plain", step, "wall")))
        rows.append(row)
    lines.append("Wall time (CPU time in brackets: user + system, both cores):")
    lines.append("")
    lines.append(markdown_table(hdr + (["encrypted ÷ plain"] if both else []), rows))
    lines.append("")
    reps = [f"{t} {STEP_TITLES[s]}: {', '.join(f'{w:.2f}' for w in r['walls'])} s"
            for t in res for s, r in res[t].items() if len(r.get("walls", [])) > 1]
    if reps:
        lines.append("Repeated steps keep their fastest run; all runs: " + "; ".join(reps) + ".")
        lines.append("")
    # peak RSS
    rows = []
    for step in STEPS:
        row = [STEP_TITLES[step]] + [human_bytes(_get(result, t, step, "maxrss")) for t in main]
        if "pointsafe" in res:
            row += [_ratio(_get(result, "pointsafe", step, "maxrss"), _get(result, p, step, "maxrss"))
                    for p in peers]
        rows.append(row)
    lines.append("Peak resident memory:")
    lines.append("")
    lines.append(markdown_table(hdr, rows))
    lines.append("")
    # sizes
    rows = []
    for step in ("init", "backup1", "backup2", "backup3"):
        row = [f"after {STEP_TITLES[step]}".replace("after after", "after")] + [
            _mib(_get(result, t, step, "repo_size")) for t in main]
        if "pointsafe" in res:
            row += [_ratio(_get(result, "pointsafe", step, "repo_size"), _get(result, p, step, "repo_size"))
                    for p in peers]
        rows.append(row)
    stored = {t: _stored(result, t) for t in main}
    if ch:
        row = [f"stored for the change ({human_bytes(ch['bytes'])})"] + [
            f"{human_bytes(stored[t])} ({stored[t] / ch['bytes']:.1f}×)" if stored[t] is not None else "–"
            for t in main]
        if "pointsafe" in res:
            row += [_ratio(stored["pointsafe"], stored[p]) for p in peers]
        rows.append(row)
    lines.append("Repository size on disk (allocated bytes; client caches not included) and the "
                 "bytes stored for the change (growth across the third backup, × the change):")
    lines.append("")
    lines.append(markdown_table(["" ] + hdr[1:], rows))
    lines.append("")
    if "pointsafe-vol" in res:
        lines.append(_volume_table(result))
        lines.append("")
    if "pointsafe" in res and peers:
        lines.append("Goals (issue 3), speed-ups are peer time ÷ pointsafe time:")
        lines.append("")
        lines.append(_goals_table(result, peers))
        lines.append("")
    bad = [f"{t}: {r['restore']['verify']}" for t, r in res.items()
           if r.get("restore", {}).get("verify", {}).get("ok") is False]
    errs = [f"{t} {s}: {v['error']}" for t, r in res.items() for s, v in r.items() if "error" in v]
    if bad or errs:
        lines.append("Problems: " + "; ".join(bad + errs))
    else:
        lines.append("Every restore matched the source (names, sizes and BLAKE3 of every file).")
    return "\n".join(lines)


def _mib(n: int | None) -> str:
    if n is None:
        return "–"
    return human_bytes(n) if n < 10 << 20 else f"{n / (1 << 20):,.1f} MiB"


def _stored(result, tool):
    """Repository growth across the third backup."""
    a, b = _get(result, tool, "backup3", "repo_size_before"), _get(result, tool, "backup3", "repo_size")
    return None if a is None or b is None else b - a


def _volume_table(result) -> str:
    ch = result.get("change") or {}
    rows = []
    for step in STEPS:
        if step not in result["results"]["pointsafe-vol"]:
            continue
        g = lambda k: _get(result, "pointsafe-vol", step, k)  # noqa: E731
        rows.append([STEP_TITLES[step], "failed" if g("error") else human_secs(g("wall")),
                     human_secs(g("cpu")), human_bytes(g("maxrss")),
                     human_bytes(g("repo_size")) if step != "restore" else ""])
    out = ["pointsafe `backup --volume` of the image alone (own safe):", "",
           markdown_table(["step", "wall", "cpu", "peak RSS", "safe size after"], rows)]
    s = _stored(result, "pointsafe-vol")
    if ch and s is not None and ch.get("image_bytes"):
        out += ["", f"Stored for the image's share of the change ({human_bytes(ch['image_bytes'])}): "
                    f"{human_bytes(s)} ({s / ch['image_bytes']:.1f}×)."]
    return "\n".join(out)


def _goals_table(result, peers) -> str:
    rows = []

    def speed(step, peer, goal, label):
        ps, pe = _get(result, "pointsafe", step, "wall"), _get(result, peer, step, "wall")
        if ps is None or pe is None or _get(result, "pointsafe", step, "error"):
            rows.append([label, f"≥ {goal:g}×", "–", "–"])
            return
        x = pe / ps
        rows.append([label, f"≥ {goal:g}×", f"{x:.2f}×", "yes" if x >= goal else "**no**"])

    for p in peers:
        speed("backup1", p, 1.5 if p == "borg" else 1.0, f"first backup vs {p}")
    for p in peers:
        speed("backup2", p, 3.0, f"unchanged re-backup vs {p}")
    for p in peers:
        speed("backup3", p, 2.0, f"1% incremental vs {p}")
    ch = result.get("change") or {}
    s = _stored(result, "pointsafe")
    if ch and s is not None:
        x = s / ch["bytes"]
        peer_x = ", ".join(f"{p} {_stored(result, p) / ch['bytes']:.1f}×" for p in peers
                           if _stored(result, p) is not None)
        rows.append(["bytes stored for the 1% change", "≤ 3× the change",
                     f"{x:.1f}× ({peer_x})", "yes" if x <= 3 else "**no**"])
    if "restic" in peers:
        speed("restore", "restic", 1.5, "full restore vs restic")
    if "borg" in peers:
        a, b = _get(result, "pointsafe", "backup1", "repo_size"), _get(result, "borg", "backup1", "repo_size")
        a3, b3 = _get(result, "pointsafe", "backup3", "repo_size"), _get(result, "borg", "backup3", "repo_size")
        if a and b:
            after3 = f" (after all three: {a3 / b3:.2f}×)" if a3 and b3 else ""
            rows.append(["safe size vs borg, after the first backup", "≤ 1.05×", f"{a / b:.3f}×{after3}",
                         "yes" if a / b <= 1.05 else "**no**"])
    return markdown_table(["goal", "target", "measured", "met"], rows, align="lrrl")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--size", default="2G", help="data set size (default 2G)")
    ap.add_argument("--seed", type=int, default=dataset.DEFAULT_SEED, help="data set seed (default 1)")
    ap.add_argument("--tools", default=",".join(ALL_TOOLS),
                    help=f"comma-separated, from {', '.join(ALL_TOOLS)} (default: all)")
    ap.add_argument("--data", help="data set directory (default /work/bench-data/set-SIZE)")
    ap.add_argument("--work", help="repositories and restores (default /work/bench-data/backup-work-SIZE)")
    ap.add_argument("--change", type=float, default=0.01, help="fraction changed before the third backup")
    ap.add_argument("--repeat", type=int, default=1, metavar="N",
                    help="run the unchanged re-backup and the restore N times and keep the fastest "
                         "(the machine is shared; default 1)")
    ap.add_argument("--keep", action="store_true", help="keep repositories and restored trees")
    ap.add_argument("--warm", action="store_true", help="do not drop the page cache before steps")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per command (default 3600)")
    ap.add_argument("--profile", metavar="DIR",
                    help="run pointsafe's steps under py-spy (raw stacks into DIR, a summary in the "
                         "log and JSON); slows pointsafe, so its figures are not comparable then")
    ap.add_argument("--json", metavar="OUT", help="write every figure as JSON to OUT")
    ap.add_argument("--markdown", metavar="OUT", help="write the tables as markdown to OUT")
    ap.add_argument("--from-json", metavar="IN",
                    help="run nothing: print the tables of a result saved with --json")
    args = ap.parse_args(argv)
    if args.from_json:
        print(report(json.loads(Path(args.from_json).read_text())))
        return 0
    result = benchmark(args)
    text = report(result)
    print(text)
    if args.json:
        write_json(args.json, result)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")
    errors = [s for r in result["results"].values() for s in r.values() if "error" in s]
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
