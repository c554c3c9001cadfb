#!/usr/bin/env python3
"""Retention and GC benchmark: pointsafe forget+gc vs restic and borg, defrag, and memory at
millions of objects.

    python scripts/bench/gc.py [--size 200M] [--points 30] [--forget 10] [--change 0.01]
                               [--tools pointsafe,restic,borg] [--objects 5000000]
                               [--skip-history] [--skip-big] [--json OUT] [--markdown OUT]

Part 1, history (one run, every tool on the same history): a copy of the data set
(scripts/bench/data.py) is backed up ``--points`` times, with ``--change`` of its bytes
overwritten (scattered 64 KiB writes) between backups. Then the oldest ``--forget`` points go:
``pointsafe forget --keep-last N --prune`` (forget, then gc); ``restic forget --keep-last N --prune``;
``borg prune --keep-last N`` + ``borg compact``. Measured: wall time, peak RSS (``os.wait4``)
and repository size on disk before and after. pointsafe's safe is then verified (with the
refcount audit) and the newest point restored and checked.

Part 2, defrag on the same safe: the fragmentation figure and a cold restore of the newest
point before ``pointsafe defrag`` and after it, and the same restore from a safe that was
freshly written with one backup of the same data (the goal: ≥ 90% of its speed).

Part 3, scale: a safe of ``--objects`` small objects written with the writer API (ten volume
points, each the previous one with 30% of its blocks replaced, so the newest point is
scattered over the whole history), then ``forget`` of the oldest three points + ``gc``, and
``defrag``. Measured: wall time, peak RSS (``ru_maxrss``, which counts the index pages the
process touched through its LMDB memory map) and peak anonymous memory (``RssAnon`` sampled
from /proc: the process's own heap, what "bounded memory" is about).
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
import data as dataset  # noqa: E402
from _common import (disk_usage, drop_caches, human_bytes, human_secs, log, machine_info,  # noqa: E402
                     markdown_table, parse_size, run, write_json)
from backup import Borg, Restic, pointsafe_argv, tree_digest, tool_version  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------- measuring

def _rss_anon(pid: int) -> int:
    """RssAnon of ``pid`` and its children, in bytes (0 when gone)."""
    total = 0
    pids = [pid]
    try:
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        pids += [int(k) for k in kids]
    except OSError:
        pass
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("RssAnon:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def measured(cmd: list[str], env: dict | None = None, cwd: Path | None = None, timeout: float = 7200,
             cold: bool = False) -> dict[str, Any]:
    """Run ``cmd`` (wall, CPU, peak RSS via wait4) while sampling its anonymous memory."""
    dropped = drop_caches() if cold else False
    peak = [0]
    stop = threading.Event()
    me = os.getpid()

    def sample() -> None:
        while not stop.is_set():
            try:
                kids = Path(f"/proc/{me}/task/{me}/children").read_text().split()
            except OSError:
                kids = []
            for k in kids:
                peak[0] = max(peak[0], _rss_anon(int(k)))
            stop.wait(0.05)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        r = run(cmd, cwd=cwd, env=env, timeout=timeout)
    finally:
        stop.set()
        t.join()
    res = {"cmd": " ".join(map(str, cmd)), "code": r.code, "wall": round(r.wall, 3), "cpu": round(r.cpu, 3),
           "maxrss": r.maxrss, "anon_peak": peak[0], "cold": dropped}
    if r.code not in (0, 3):
        res["error"] = f"exit {r.code}: {(r.stderr.strip() or r.stdout.strip())[-600:]}"
    res["stdout"] = r.stdout
    log(f"  {' '.join(map(str, cmd))[:90]:90s} {human_secs(r.wall):>8s}  rss {human_bytes(r.maxrss):>10s}"
        f"  anon {human_bytes(peak[0]):>10s}" + (f"  ERROR {res['error'][:200]}" if "error" in res else ""))
    return res


def combine(*steps: dict[str, Any]) -> dict[str, Any]:
    """Several commands as one job: times add up, memory is the largest."""
    out = {"wall": round(sum(s["wall"] for s in steps), 3), "cpu": round(sum(s["cpu"] for s in steps), 3),
           "maxrss": max(s["maxrss"] for s in steps), "anon_peak": max(s["anon_peak"] for s in steps),
           "cmd": " && ".join(s["cmd"] for s in steps)}
    errs = [s["error"] for s in steps if "error" in s]
    if errs:
        out["error"] = "; ".join(errs)
    return out


def ps(safe: Path, *args) -> list[str]:
    return pointsafe_argv() + ["--safe", str(safe), *map(str, args)]


def _json(res: dict[str, Any]) -> dict:
    try:
        return json.loads(res.get("stdout") or "{}")
    except ValueError:
        return {}


# --------------------------------------------------------------------------- part 1 and 2

def _next_change(src: Path, fraction: float, i: int) -> dict:
    """Overwrite ``fraction`` of ``src`` (a copy of the data set) and keep the result: data.py's
    mutate keeps one level of undo, so its "mutated" mark is cleared after each step."""
    ch = dataset.mutate(src, fraction, seed=10_000 + i)
    m = dataset.load_manifest(src)
    m["mutated"] = False
    dataset._save_manifest(src, m)
    dataset.undo_path(src).unlink(missing_ok=True)
    return ch


def history(args, work: Path) -> dict[str, Any]:
    size = parse_size(args.size)
    data_dir = Path(args.data or f"/work/bench-data/set-{args.size}").resolve()
    dataset.ensure(data_dir, size, 1)
    src = work / "src"
    log(f"copying {data_dir} to {src}")
    shutil.copytree(data_dir, src, symlinks=True)
    shutil.copy(dataset.manifest_path(data_dir), dataset.manifest_path(src))
    m = dataset.load_manifest(src)
    # Paths in the manifest are relative to the set, so the copy's manifest works as it is.
    tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    safe = work / "safe"
    restic = Restic(work, src, src / m["image"]["path"])
    borg = Borg(work, src, src / m["image"]["path"])
    res: dict[str, Any] = {"dataset": {"size": args.size, "total_bytes": m["total_bytes"]},
                           "points": args.points, "forget": args.forget, "change": args.change,
                           "versions": {"restic": restic.version(), "borg": borg.version(),
                                        "pointsafe": tool_version(pointsafe_argv() + ["--version"])},
                           "backups": {t: [] for t in tools}, "tools": {}}
    if "pointsafe" in tools:
        subprocess.run(ps(safe, "init"), check=True, capture_output=True)
    if "restic" in tools:
        subprocess.run(restic.commands("init")[0], env={**os.environ, **restic.env}, check=True, capture_output=True)
    if "borg" in tools:
        subprocess.run(borg.commands("init")[0], env={**os.environ, **borg.env}, check=True, capture_output=True)
    for i in range(args.points):
        for t in tools:
            if t == "pointsafe":
                cmd, cwd, env = ps(safe, "backup", src, "--name", "bench", "-q"), None, None
            elif t == "restic":
                (cmd, cwd), env = restic.commands("backup"), restic.env
            else:
                cmd, cwd = borg.commands(f"backup{i:03d}")
                env = borg.env
            r = run(cmd, cwd=cwd, env=env, timeout=args.timeout)
            if r.code not in (0, 3):
                raise SystemExit(f"gc.py: {t} backup {i} failed: {r.stderr[-500:]}")
            res["backups"][t].append(round(r.wall, 2))
        log(f"point {i + 1}/{args.points}: " + ", ".join(f"{t} {res['backups'][t][-1]:.1f} s" for t in tools))
        if i < args.points - 1:
            _next_change(src, args.change, i)
    keep = args.points - args.forget
    repos = {"pointsafe": safe, "restic": restic.repo, "borg": borg.repo}
    for t in tools:
        before = disk_usage(repos[t])
        log(f"{t}: forget the oldest {args.forget} of {args.points} points and reclaim")
        if t == "pointsafe":
            # One command, like restic's: forget the points, then gc (--prune).
            job = measured(ps(safe, "forget", "--keep-last", keep, "--prune", "--json"), cold=True)
            rep = _json(job)
            job["forget_report"] = {k: v for k, v in rep.items() if k not in ("decisions", "gc")}
            job["gc_report"] = rep.get("gc") or {}
        elif t == "restic":
            job = measured(["restic", "forget", "--keep-last", str(keep), "--prune"], env=restic.env, cold=True)
        else:
            a = measured(["borg", "prune", "--keep-last", str(keep)], env=borg.env, cold=True)
            b = measured(["borg", "compact"], env=borg.env)
            job = combine(a, b)
        job.pop("stdout", None)
        job["size_before"] = before
        job["size_after"] = disk_usage(repos[t])
        res["tools"][t] = job
    if "pointsafe" in tools:
        v = measured(ps(safe, "verify", "--json"))
        vj = _json(v)
        res["verify"] = {"ok": vj.get("ok"), "refcounts": vj.get("refcounts"), "wall": v["wall"],
                         "errors": vj.get("errors", [])[:20], "error": v.get("error"),
                         "stdout": v["stdout"][:4000] if not vj else None}
        res["defrag"] = defrag_part(args, work, safe, src)
    return res


def _restore(safe: Path, target: Path, times: int = 5) -> dict[str, Any]:
    """Cold restores of the newest point; the fastest of ``times`` (the machine is shared)."""
    best = None
    walls = []
    for _ in range(times):
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        r = measured(ps(safe, "restore", "bench@latest", target, "-q"), cold=True)
        r.pop("stdout", None)
        walls.append(r["wall"])
        if best is None or r["wall"] < best["wall"]:
            best = r
    best["walls"] = walls
    return best


def defrag_part(args, work: Path, safe: Path, src: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    expected = tree_digest(src)
    target = work / "restore"
    out["restore_before"] = _restore(safe, target)
    out["restore_before"]["ok"] = tree_digest(target) == expected
    d = measured(ps(safe, "defrag", "--json"))
    rep = _json(d)
    d.pop("stdout", None)
    out["defrag"] = {**d, "report": {k: rep.get(k) for k in ("objects_moved", "bytes_moved", "bytes_reclaimed",
                                                             "fragmentation_before", "fragmentation_after",
                                                             "size_before", "size_after")}}
    out["restore_after"] = _restore(safe, target)
    out["restore_after"]["ok"] = tree_digest(target) == expected
    fresh = work / "fresh"
    subprocess.run(ps(fresh, "init"), check=True, capture_output=True)
    subprocess.run(ps(fresh, "backup", src, "--name", "bench", "-q"), check=True, capture_output=True)
    fr = measured(ps(fresh, "defrag", "--dry-run", "--json"))
    out["fresh_fragmentation"] = _json(fr).get("fragmentation_before")
    out["restore_fresh"] = _restore(fresh, target)
    out["restore_fresh"]["ok"] = tree_digest(target) == expected
    shutil.rmtree(target, ignore_errors=True)
    shutil.rmtree(fresh, ignore_errors=True)
    return out


# --------------------------------------------------------------------------- part 3

BIG_POINTS = 10
BIG_CHANGE = 0.30


def build_big(path: Path, objects: int, seed: int = 1) -> dict[str, Any]:
    """A safe of about ``objects`` objects: ten volume points of N blocks each, point p being
    point p-1 with 30% of its blocks replaced (N chosen so that the total is ``objects``)."""
    from pointsafe.cas import BlobBuilder, Kind, Safe, prepare, utc_now_iso

    per_point = int(objects / (1 + (BIG_POINTS - 1) * BIG_CHANGE) * 0.995)
    rng = random.Random(seed)
    Safe.init(path, compression="none").close()
    t0 = time.time()
    block = 128
    with Safe.open(path) as safe, safe.writer("bench build") as w:
        def new_chunk() -> bytes:
            p = prepare(Kind.CHUNK, rng.randbytes(block), None)
            w.put_prepared(p, checked=True)   # random bytes: never already stored
            return p.key

        keys: list[bytes] = []
        for p in range(BIG_POINTS):
            if p == 0:
                keys = [new_chunk() for _ in range(per_point)]
            else:
                for j in rng.sample(range(per_point), int(per_point * BIG_CHANGE)):
                    keys[j] = new_chunk()
            b = BlobBuilder(w.put_node, safe.config.list_fanout)
            for k in keys:
                b.add(k, block)
            root = b.finish()
            now = utc_now_iso()
            w.add_point({"name": "big", "kind": "volume", "source": "synthetic", "host": "bench",
                         "started": now, "finished": now, "size": b.size, "warnings": [], "stats": {}}, root)
            log(f"big safe: point {p + 1}/{BIG_POINTS} written ({time.time() - t0:.0f} s)")
    with Safe.open(path) as safe, safe.index.read() as t:
        n = t.stat(safe.index.db["objects"])["entries"]
    return {"objects": n, "per_point": per_point, "block": block, "build_s": round(time.time() - t0, 1),
            "size": disk_usage(path)}


def big(args, work: Path) -> dict[str, Any]:
    base = Path(args.big_base or f"/work/bench-data/gc-big-{args.objects}")
    info_path = Path(str(base) + ".json")
    if not info_path.exists():
        shutil.rmtree(base, ignore_errors=True)
        log(f"building a safe of {args.objects} objects at {base}")
        info = build_big(base, args.objects)
        write_json(info_path, info)
    info = json.loads(info_path.read_text())
    safe = work / "big"
    log(f"copying {base} ({human_bytes(info['size'])}, {info['objects']} objects)")
    shutil.copytree(base, safe)
    out: dict[str, Any] = {"safe": info}
    out["status"] = status_time(safe)
    for name, argv in (("forget", ps(safe, "forget", "--keep-last", BIG_POINTS - 3, "--json")),
                       ("gc", ps(safe, "gc", "--json")), ("defrag", ps(safe, "defrag", "--json"))):
        r = measured(argv, cold=True, timeout=args.timeout)
        rep = _json(r)
        out[name] = {k: r[k] for k in ("wall", "cpu", "maxrss", "anon_peak")}
        out[name]["report"] = {k: (len(v) if isinstance(v, list) else v) for k, v in rep.items()}
        if "error" in r:
            out[name]["error"] = r["error"]
    shutil.rmtree(safe, ignore_errors=True)
    return out


STATUS_PROBE = """
import json, sys, time
from pointsafe.cas import Safe
from pointsafe.ops import status
with Safe.open(sys.argv[1]) as safe:
    best = None
    for _ in range(5):
        t0 = time.perf_counter()
        status.build(safe, evaluate=False)
        dt = time.perf_counter() - t0
        best = dt if best is None else min(best, dt)
print(json.dumps({"status_s": best}))
"""


def status_time(safe: Path) -> dict[str, Any]:
    """Seconds ``status`` spends on the safe (in-process, best of 5; Python start-up apart)."""
    r = subprocess.run([sys.executable, "-c", STATUS_PROBE, str(safe)], capture_output=True, text=True)
    if r.returncode != 0:
        return {"error": r.stderr.strip().splitlines()[-1:]}
    return json.loads(r.stdout)


# --------------------------------------------------------------------------- report

def _mib(n) -> str:
    return human_bytes(n) if n is not None else "–"


def report(result: dict[str, Any]) -> str:
    lines = []
    h = result.get("history")
    if h:
        lines.append(f"History: {h['points']} backups of the {h['dataset']['size']} data set "
                     f"({human_bytes(h['dataset']['total_bytes'])}), {h['change'] * 100:g}% of its bytes "
                     f"overwritten between backups; then the oldest {h['forget']} points are forgotten "
                     f"and their space reclaimed. Cold page cache at the start of each job.\n")
        rows = []
        for t, j in h["tools"].items():
            cmd = {"pointsafe": f"forget --keep-last {h['points'] - h['forget']} --prune",
                   "restic": f"forget --keep-last {h['points'] - h['forget']} --prune",
                   "borg": f"prune --keep-last {h['points'] - h['forget']} + compact"}[t]
            rows.append([t, cmd, human_secs(j["wall"]), _mib(j["maxrss"]), _mib(j["anon_peak"]),
                         _mib(j["size_before"]), _mib(j["size_after"]),
                         _mib(j["size_before"] - j["size_after"]), j.get("error", "")[:60]])
        lines.append(markdown_table(["tool", "job", "time", "peak RSS", "peak anon", "size before",
                                     "size after", "reclaimed", "error"], rows, "llrrrrrrl"))
        ps_ = h["tools"].get("pointsafe")
        goals = []
        if ps_ and "restic" in h["tools"]:
            goals.append(["forget+gc vs restic forget --prune", "≥ 5× faster",
                          f"{h['tools']['restic']['wall'] / ps_['wall']:.1f}×"])
        peers = [h["tools"][p]["size_after"] for p in ("restic", "borg") if p in h["tools"]]
        if ps_ and peers:
            goals.append(["final size vs the smaller peer", "≤ 1.05×", f"{ps_['size_after'] / min(peers):.3f}×"])
        if ps_:
            g = ps_.get("gc_report", {})
            lines.append(f"\npointsafe gc: {g.get('objects_freed')} dead objects dropped, "
                         f"{len(g.get('packs_deleted', []))} packs deleted, {len(g.get('packs_rewritten', []))} "
                         f"rewritten ({human_bytes(g.get('bytes_moved', 0))} moved); verify after: "
                         f"{'ok' if h.get('verify', {}).get('ok') else 'FAILED'} (refcount audit "
                         f"{'ok' if (h.get('verify', {}).get('refcounts') or {}).get('ok') else 'FAILED'}).")
        d = h.get("defrag")
        if d:
            fb = d["defrag"]["report"]["fragmentation_before"] or {}
            fa = d["defrag"]["report"]["fragmentation_after"] or {}
            ff = d.get("fresh_fragmentation") or {}
            lines.append("\nDefrag (same safe, after the gc): cold restore of the newest point "
                         "(`pointsafe restore bench@latest`), page cache dropped before each, fastest of five.\n")
            rows = [["history safe, before defrag", fb.get("seeks_per_gib"), fb.get("seeks"),
                     human_secs(d["restore_before"]["wall"]), "ok" if d["restore_before"]["ok"] else "DIFFERS"],
                    ["history safe, after defrag", fa.get("seeks_per_gib"), fa.get("seeks"),
                     human_secs(d["restore_after"]["wall"]), "ok" if d["restore_after"]["ok"] else "DIFFERS"],
                    ["freshly written safe", ff.get("seeks_per_gib"), ff.get("seeks"),
                     human_secs(d["restore_fresh"]["wall"]), "ok" if d["restore_fresh"]["ok"] else "DIFFERS"]]
            lines.append(markdown_table(["layout", "seeks/GiB", "seeks", "restore time", "restored data"], rows, "lrrrl"))
            dd = d["defrag"]
            lines.append(f"\n`pointsafe defrag`: {human_secs(dd['wall'])}, peak RSS {_mib(dd['maxrss'])}, moved "
                         f"{human_bytes(dd['report'].get('bytes_moved') or 0)}; floor of the figure "
                         f"{fa.get('minimum_per_gib')} seeks/GiB.")
            goals.append(["newest point's restore after defrag vs a fresh safe", "≥ 90% of its speed",
                          f"{d['restore_fresh']['wall'] / d['restore_after']['wall'] * 100:.0f}%"])
        if goals:
            lines.append("\n" + markdown_table(["goal", "target", "measured"], goals, "llr"))
    b = result.get("big")
    if b:
        s = b["safe"]
        lines.append(f"\nScale: a safe of {s['objects']:,} objects ({human_bytes(s['size'])}; ten volume "
                     f"points of {s['per_point']:,} blocks of {s['block']} B, each point the previous one with "
                     f"30% of its blocks replaced), written with the writer API.\n")
        rows = []
        for k, label in (("forget", "forget the oldest 3 points"), ("gc", "gc"), ("defrag", "defrag")):
            j = b[k]
            r = j.get("report", {})
            what = {"forget": f"{r.get('objects_freed')} objects died",
                    "gc": f"{r.get('objects_freed')} dropped, {r.get('packs_rewritten')} packs rewritten, "
                          f"{human_bytes(r.get('bytes_reclaimed') or 0)} reclaimed",
                    "defrag": f"{r.get('objects_moved')} objects moved"}[k]
            rows.append([label, human_secs(j["wall"]), _mib(j["maxrss"]), _mib(j["anon_peak"]), what])
        lines.append(markdown_table(["job", "time", "peak RSS", "peak anon", "what it did"], rows, "lrrrl"))
        st = b.get("status", {})
        if "status_s" in st:
            lines.append(f"\n`status` on this safe: {st['status_s'] * 1000:.1f} ms (in-process, best of 5).")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="200M")
    ap.add_argument("--data", help="the data set directory (default /work/bench-data/set-SIZE)")
    ap.add_argument("--work", help="work directory (default /work/bench-data/gc-work)")
    ap.add_argument("--points", type=int, default=30)
    ap.add_argument("--forget", type=int, default=10)
    ap.add_argument("--change", type=float, default=0.01)
    ap.add_argument("--tools", default="pointsafe,restic,borg")
    ap.add_argument("--objects", type=int, default=5_000_000)
    ap.add_argument("--big-base", help="where the big safe is built once and kept")
    ap.add_argument("--skip-history", action="store_true")
    ap.add_argument("--skip-big", action="store_true")
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--json")
    ap.add_argument("--markdown")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args(argv)
    work = Path(args.work or "/work/bench-data/gc-work").resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    result: dict[str, Any] = {"machine": machine_info()}
    try:
        if not args.skip_history:
            result["history"] = history(args, work)
        if not args.skip_big:
            result["big"] = big(args, work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    text = report(result)
    print(text)
    if args.json:
        write_json(args.json, result)
    if args.markdown:
        Path(args.markdown).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
