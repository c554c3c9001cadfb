"""defrag and the fragmentation figure; gc and defrag next to readers and backups."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path


from pointsafe.cas import Safe, verify
from pointsafe.gc.collect import run_gc
from pointsafe.gc.defrag import defrag
from pointsafe.gc.forget import forget, plan_forget
from pointsafe.gc.fragmentation import fragmentation, measure

from test_gc import _assert_clean, _assert_points, _history

TESTS = Path(__file__).resolve().parent


def test_defrag_brings_the_figure_to_its_floor_and_keeps_every_point(tmp_path):
    path, hist = _history(tmp_path, 8, files=12, size=384 * 1024)
    with Safe.open(path) as safe:
        before = fragmentation(safe)
        assert before["excess"] > 3, before    # eight rounds of 5% changes scatter the newest point
        r = defrag(safe)
        assert r.objects_moved > 0 and r.fragmentation_before["seeks"] == before["seeks"]
        after = r.fragmentation_after
        assert after == {**measure(safe), "cached": False}
        assert after["seeks"] <= after["minimum_seeks"] * 1.25 + 1, after
        assert after["seeks_per_gib"] < before["seeks_per_gib"] / 3
        _assert_clean(safe)
        _assert_points(safe, hist)
        assert verify(safe).ok
        again = defrag(safe)              # nothing left to do
        assert again.objects_moved == 0 and again.fragmentation_after["seeks"] == after["seeks"]


def test_fragmentation_is_cached_until_the_layout_or_the_newest_point_changes(tmp_path):
    path, hist = _history(tmp_path, 3, files=4)
    with Safe.open(path) as safe:
        first = fragmentation(safe)
        assert not first["cached"] and first["points"] == [hist[-1][0].id]
        assert fragmentation(safe)["cached"]
        forget(safe, plan_forget(safe, [hist[0][0].id]))
        assert fragmentation(safe)["cached"]          # the newest point did not change
        r = run_gc(safe, threshold=0.0)               # objects moved: the figure is measured again
        assert r.objects_moved and r.fragmentation_after["cached"] is False
        assert fragmentation(safe)["cached"]
        with safe.index.write() as t:                 # another relocation elsewhere bumps the layout
            from pointsafe.cas.relocate import LAYOUT_GEN
            safe.index.put_meta_int(t, LAYOUT_GEN, safe.index.get_meta_int(t, LAYOUT_GEN) + 1)
        assert not fragmentation(safe)["cached"]
        from _gc_util import backup
        rec = backup(safe, tmp_path / "src", "src")   # a new newest point
        f = fragmentation(safe)
        assert not f["cached"] and f["points"] == [rec.id]


def test_cli_defrag_reports(tmp_path, cli):
    path, hist = _history(tmp_path, 5, files=8)
    r = cli("defrag", "--dry-run", "--json", safe=path)
    assert r.code == 0, r.err
    plan = json.loads(r.out)
    assert plan["dry_run"] and plan["objects_moved"] > 0
    r = cli("defrag", safe=path)
    assert r.code == 0, r.err
    assert "fragmentation:" in r.out and "seeks/GiB" in r.out and "move" in r.out
    r = cli("defrag", "--json", safe=path)
    out = json.loads(r.out)
    assert out["objects_moved"] == 0
    assert out["fragmentation_after"]["seeks"] <= plan["fragmentation_before"]["seeks"]
    assert cli("verify", safe=path).code == 0


def _expected(hist, safe) -> dict:
    live = {p.id for p in safe.points()}
    return {rec.id: {**d, "__root__": rec.root.hex()} for rec, d in hist if rec.id in live}


def test_readers_in_another_process_see_correct_bytes_during_gc_and_defrag(tmp_path):
    path, hist = _history(tmp_path, 8, files=10, size=256 * 1024)
    with Safe.open(path) as safe:
        forget(safe, plan_forget(safe, [hist[i][0].id for i in range(4)]))
        exp = tmp_path / "expected.json"
        exp.write_text(json.dumps(_expected(hist, safe)))
    stop, out = tmp_path / "stop", tmp_path / "reader.json"
    reader = subprocess.Popen([sys.executable, str(TESTS / "_gc_reader.py"), str(path), str(exp), str(stop), str(out)])
    try:
        deadline = time.time() + 60
        while not Path(str(out) + ".ready").exists():
            assert time.time() < deadline and reader.poll() is None, "the reader did not start"
            time.sleep(0.02)
        with Safe.open(path) as safe:
            r = run_gc(safe, threshold=0.0)
            assert r.packs_rewritten
            d = defrag(safe)
            assert d.objects_moved
            run_gc(safe, threshold=0.0)
        time.sleep(0.3)
    finally:
        stop.touch()
        reader.wait(timeout=120)
    res = json.loads(out.read_text())
    assert res["errors"] == []
    assert res["rounds"] >= 3, res   # the reader kept reading while packs moved


def test_a_backup_during_gc_is_told_to_wait(tmp_path, cli):
    path, hist = _history(tmp_path, 4, files=6)
    with Safe.open(path) as safe:
        forget(safe, plan_forget(safe, [hist[0][0].id]))
        # gc, defrag and forget hold the writer lock exactly like this (safe.writer("gc")).
        with safe.writer("gc"):
            r = cli("backup", tmp_path / "src", "--name", "src", safe=path)
            assert r.code == 1
            assert r.err.startswith("pointsafe: error: the safe is busy:") and "(gc," in r.err and "wait" in r.err
        with safe.writer("backup src"):
            for cmd in (["gc"], ["defrag"], ["forget", "--keep-last", "1"]):
                r = cli(*cmd, safe=path)
                assert r.code == 1 and "the safe is busy" in r.err and "(backup src," in r.err, r.err
    # For real: gc and a backup started together; each finishes or is told to wait.
    env = {**os.environ}
    env.pop("POINTSAFE_SAFE", None)
    g = subprocess.Popen([sys.executable, "-m", "pointsafe.cli", "--safe", str(path), "gc", "--threshold", "0"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    b = subprocess.Popen([sys.executable, "-m", "pointsafe.cli", "--safe", str(path), "backup", str(tmp_path / "src"),
                          "--name", "src"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    for p in (g, b):
        _out, err = p.communicate(timeout=120)
        assert p.returncode == 0 or (p.returncode == 1 and b"the safe is busy" in err), err
    assert cli("verify", safe=path).code == 0
