"""SIGKILL at random instants of forget, gc and defrag: the safe verifies (with the refcount
audit), every remaining point reads back byte-identical, and a rerun finishes the job."""

from __future__ import annotations

import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pointsafe.cas import Safe, verify
from pointsafe.gc.forget import forget, plan_forget

from _gc_util import pack_bytes, point_digests

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def crash_base(tmp_path_factory):
    """A history of 8 points in small packs (many commits, many crash instants) with the
    oldest 4 forgotten: gc has dead objects to drop and packs to rewrite."""
    base = tmp_path_factory.mktemp("gccrash")
    small = base / "small"
    Safe.init(small, pack_size=128 * 1024).close()
    from _gc_util import backup, mutate, source_digests, write_source
    rng = random.Random(7)
    src = base / "src2"
    write_source(src, rng, files=24, size=256 * 1024)
    hist = []
    with Safe.open(small) as safe:
        for _ in range(8):
            rec = backup(safe, src, "src")
            hist.append((rec, source_digests(src)))
            mutate(src, rng, 0.05, new_file=40_000)
        forget(safe, plan_forget(safe, [hist[i][0].id for i in range(4)]))
    return small, hist


def _pointsafe(*args) -> list[str]:
    return [sys.executable, "-m", "pointsafe.cli", *map(str, args)]


def _duration(cmd: list[str]) -> float:
    t = time.monotonic()
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    return time.monotonic() - t


def _check(path: Path, hist) -> None:
    with Safe.open(path) as safe:
        rep = verify(safe)
        assert rep.ok, rep.errors
        assert rep.refcounts["ok"]
        live = {p.id for p in safe.points()}
        for rec, digests in hist:
            if rec.id in live:
                assert point_digests(safe, rec) == digests


def _trials(tmp_path, base, hist, args: list, n: int, seed: int) -> list[float]:
    rng = random.Random(seed)
    probe = tmp_path / "probe"
    shutil.copytree(base, probe)
    full = _duration(_pointsafe("--safe", probe, *args))
    shutil.rmtree(probe)
    delays = []
    for i in range(n):
        trial = tmp_path / f"t{i}"
        shutil.copytree(base, trial)
        p = subprocess.Popen(_pointsafe("--safe", trial, *args), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        delay = rng.uniform(0.25, max(0.3, full * 0.95))   # startup takes about 0.25 s
        time.sleep(delay)
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=60)
        delays.append(round(delay, 2))
        _check(trial, hist)
        r = subprocess.run(_pointsafe("--safe", trial, *args, "--json"), capture_output=True, timeout=300)
        assert r.returncode == 0, r.stderr
        _check(trial, hist)
        shutil.rmtree(trial)
    return delays


def test_kill9_during_gc(tmp_path, crash_base):
    base, hist = crash_base
    _trials(tmp_path, base, hist, ["gc", "--threshold", "0"], 6, seed=1)


def test_kill9_during_gc_then_rerun_reclaims_everything(tmp_path, crash_base):
    base, hist = crash_base
    ref = tmp_path / "ref"
    shutil.copytree(base, ref)
    subprocess.run(_pointsafe("--safe", ref, "gc", "--threshold", "0"), check=True, capture_output=True)
    trial = tmp_path / "trial"
    shutil.copytree(base, trial)
    p = subprocess.Popen(_pointsafe("--safe", trial, "gc", "--threshold", "0"))
    time.sleep(0.45)
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=60)
    r = subprocess.run(_pointsafe("--safe", trial, "gc", "--threshold", "0"), capture_output=True)
    assert r.returncode == 0, r.stderr
    # The interrupted-then-finished gc leaves no more than an uninterrupted one (headers aside).
    assert pack_bytes(trial) <= pack_bytes(ref) + 16 * 64
    with Safe.open(trial) as safe:
        assert all(pe.dead_bytes == 0 for pe in safe.pack_entries().values())
    _check(trial, hist)


def test_kill9_during_defrag(tmp_path, crash_base):
    base, hist = crash_base
    _trials(tmp_path, base, hist, ["defrag"], 6, seed=2)


def test_kill9_during_forget(tmp_path, crash_base):
    base, hist = crash_base
    _trials(tmp_path, base, hist, ["forget", "--keep-last", "1", "--prune"], 3, seed=3)
