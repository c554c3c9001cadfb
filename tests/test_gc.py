"""forget + gc on real safes: counts cascade exactly, gc gives back exactly the forgotten
points' unique bytes, every remaining point keeps its data, the audit agrees at every step."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Callable

from pointsafe.cas import Kind, Point, Safe, verify
from pointsafe.cas.audit import audit
from pointsafe.cas.index import FLAG_DEAD, ObjectEntry
from pointsafe.gc.collect import run_gc
from pointsafe.gc.forget import forget, plan_forget

from _gc_util import backup, mutate, pack_bytes, point_digests, reachable, source_digests, write_source

PACK = 1 << 20


def _history(tmp_path: Path, points: int, seed: int = 1, files: int = 10, size: int = 256 * 1024,
             fraction: float = 0.05, home: Callable[[], str] | None = None) -> tuple[Path, list[tuple[Point, dict]]]:
    """A safe with ``points`` real backups of one source, each after changing ``fraction``
    of it (and adding a file); returns the safe's path (a bucket safe's cache directory, when
    ``home`` makes one) and (point, expected digests) pairs."""
    rng = random.Random(seed)
    src = tmp_path / "src"
    write_source(src, rng, files=files, size=size)
    with Safe.init(home() if home else tmp_path / "safe", pack_size=PACK) as made:
        path = made.path
    out = []
    with Safe.open(path) as safe:
        for _ in range(points):
            rec = backup(safe, src, "src")
            out.append((rec, source_digests(src)))
            mutate(src, rng, fraction, new_file=40_000)
    return path, out


def _assert_clean(safe: Safe) -> None:
    a = audit(safe)
    assert a.ok, a.errors
    assert a.orphans == 0


def _assert_points(safe: Safe, history: list[tuple[Point, dict]]) -> None:
    live = {p.id for p in safe.points()}
    for rec, digests in history:
        if rec.id in live:
            assert point_digests(safe, rec) == digests, f"point {rec.id[:12]} reads back wrong data"


def test_forget_kills_exactly_what_no_other_point_reaches(tmp_path, safe_home):
    path, hist = _history(tmp_path, 4, home=safe_home)
    with Safe.open(path) as safe:
        keys = [bytes.fromhex(r.id) for r, _ in hist]
        others = reachable(safe, keys[1:])
        unique = reachable(safe, keys[:1]) - others
        assert len(unique) > 5   # the first point has data of its own
        rep = forget(safe, plan_forget(safe, [hist[0][0].id[:10]]))
        assert rep.points_dropped == 1
        assert rep.objects_freed == len(unique)
        with safe.index.read() as t:
            dead = {bytes(k) for k, v in t.cursor(db=safe.index.db["objects"])
                    if ObjectEntry.decode(v).flags & FLAG_DEAD}
        assert dead == unique
        assert rep.dead_bytes == sum(safe.entry(k).record_len for k in unique)
        a = audit(safe)
        assert a.ok, a.errors
        assert a.dead == len(unique)
        _assert_points(safe, hist)


def test_gc_reclaims_exactly_the_unique_bytes(tmp_path, safe_home):
    path, hist = _history(tmp_path, 4, home=safe_home)
    with Safe.open(path) as safe:
        keys = [bytes.fromhex(r.id) for r, _ in hist]
        unique = reachable(safe, keys[:2]) - reachable(safe, keys[2:])
        unique_bytes = sum(safe.entry(k).record_len for k in unique)
        forget(safe, plan_forget(safe, [hist[0][0].id, hist[1][0].id]))
        before = pack_bytes(path)
        r = run_gc(safe, threshold=0.0)   # rewrite every pack with any dead byte
        after = pack_bytes(path)
        assert r.objects_freed == len(unique)
        assert r.bytes_reclaimed == before - after
        # Every dead byte went back; only pack headers (16 bytes) differ.
        headers = 16 * (len(r.packs_deleted) + len(r.packs_rewritten) - len(r.packs_written))
        assert before - after == unique_bytes + headers
        assert all(pe.dead_bytes == 0 for pe in safe.pack_entries().values())
        for k in unique:
            assert not safe.has(k)
        _assert_clean(safe)
        _assert_points(safe, hist)
        assert verify(safe).ok
        # A second gc finds nothing to do.
        again = run_gc(safe, threshold=0.0)
        assert (again.objects_freed, again.packs_rewritten, again.packs_deleted, again.bytes_reclaimed) == (0, [], [], 0)


def test_history_forgotten_point_by_point_with_audit_after_every_step(tmp_path, safe_home):
    path, hist = _history(tmp_path, 8, seed=2, files=6, size=128 * 1024, fraction=0.1, home=safe_home)
    rng = random.Random(5)
    order = list(range(len(hist)))
    rng.shuffle(order)
    with Safe.open(path) as safe:
        start = pack_bytes(path)
        for i in order[:-1]:
            forget(safe, plan_forget(safe, [hist[i][0].id]))
            a = audit(safe)
            assert a.ok, a.errors
            r = run_gc(safe)
            assert not r.warnings
            _assert_clean(safe)
            _assert_points(safe, hist)
        # One point is left: the safe holds about that point's data, not the history's.
        last = bytes.fromhex(hist[order[-1]][0].id)
        live = sum(safe.entry(k).record_len for k in reachable(safe, [last]))
        r = run_gc(safe, threshold=0.0)
        assert pack_bytes(path) < live * 1.05 + 64 * 1024
        assert pack_bytes(path) < start / 2
        assert verify(safe).ok


def test_backup_after_forget_revives_dead_data_and_gc_keeps_it(tmp_path):
    """A backup that meets data a forget just killed brings it back to life: gc must not
    collect it, and the counts must still add up."""
    rng = random.Random(3)
    src = tmp_path / "src"
    write_source(src, rng, files=4, size=200_000)
    path = tmp_path / "safe"
    Safe.init(path, pack_size=PACK).close()
    with Safe.open(path) as safe:
        first = backup(safe, src, "a")
        digests = source_digests(src)
        forget(safe, plan_forget(safe, [first.id]))
        assert audit(safe).dead > 0
        again = backup(safe, src, "a")      # the same bytes, all of them dead right now
        _assert_clean(safe)
        run_gc(safe, threshold=0.0)
        _assert_clean(safe)
        assert point_digests(safe, again) == digests
        assert verify(safe).ok


def test_gc_buries_a_crashed_backups_orphans(tmp_path, safe_dir):
    with Safe.open(safe_dir) as safe:
        w = safe.writer("backup")
        keys = [w.put(Kind.CHUNK, random.Random(i).randbytes(50_000)) for i in range(8)]
        w.flush()
        w.abort()   # committed objects, no point: what a killed backup leaves
        rep = verify(safe)
        assert rep.ok
        assert rep.refcounts["orphans"] == 8
        assert any("interrupted backup" in n for n in rep.notes)
        r = run_gc(safe)
        assert r.orphans_buried == 8 and r.objects_freed == 8
        assert r.bytes_reclaimed >= 8 * 50_000
        for k in keys:
            assert not safe.has(k)
        _assert_clean(safe)


def test_verify_reports_a_wrong_count(tmp_path, cli):
    path, hist = _history(tmp_path, 2, files=3)
    with Safe.open(path) as safe:
        with safe.index.write() as t:
            k, v = next(iter(t.cursor(db=safe.index.db["objects"])))
            k = bytes(k)
            e = ObjectEntry.decode(v)
            e.refcount += 1
            safe.index.put_object(t, k, e)
    r = cli("verify", safe=path)
    assert r.code == 1
    assert f"refcount audit: object {k.hex()[:12]}: stored count {e.refcount}, recomputed {e.refcount - 1}" in r.out
    r = cli("verify", "--json", safe=path)
    assert json.loads(r.out)["refcounts"]["problems"] == 1


def test_cli_forget_gc_report_and_dry_runs(tmp_path, cli):
    path, hist = _history(tmp_path, 3, files=4)
    size = pack_bytes(path)
    r = cli("gc", "--dry-run", "--json", safe=path)
    assert r.code == 0, r.err
    assert json.loads(r.out)["objects_freed"] == 0
    oldest = hist[0][0].id
    r = cli("forget", oldest[:8], "--dry-run", safe=path)
    assert r.code == 0, r.err
    assert f"would forget {oldest[:12]}" in r.out and "named on the command line" in r.out
    with Safe.open(path) as safe:
        assert len(safe.points()) == 3
    r = cli("forget", oldest[:8], "--json", safe=path)
    assert r.code == 0, r.err
    out = json.loads(r.out)
    assert out["points_dropped"] == 1 and out["objects_freed"] > 0 and out["dead_bytes"] > 0
    r = cli("gc", "--dry-run", "--json", safe=path)
    plan = json.loads(r.out)
    assert plan["dry_run"] and plan["objects_freed"] == out["objects_freed"]
    assert pack_bytes(path) >= size     # the dry run changed nothing
    r = cli("gc", "--threshold", "0", safe=path)
    assert r.code == 0, r.err
    assert f"free {out['objects_freed']} dead objects" in r.out and "reclaimed" in r.out
    assert "fragmentation:" in r.out
    r = cli("gc", "--json", safe=path)
    done = json.loads(r.out)
    assert done["objects_freed"] == 0 and done["bytes_reclaimed"] == 0
    for key in ("packs_rewritten", "packs_deleted", "fragmentation_before",
                "fragmentation_after", "bytes_reclaimed"):
        assert key in done
    r = cli("forget", oldest[:8], safe=path)
    assert r.code == 1 and r.err.startswith("pointsafe: error: no point with id")
    r = cli("forget", safe=path)
    assert r.code == 1 and "nothing to forget" in r.err
    r = cli("gc", "--threshold", "120", safe=path)
    assert r.code == 2 and "between 0 and 100" in r.err
    r = cli("verify", safe=path)
    assert r.code == 0, r.out + r.err


def test_forget_prune_with_policy_through_real_backups(tmp_path, cli):
    path, hist = _history(tmp_path, 5, files=3)
    r = cli("forget", "--keep-last", "2", "--prune", "--json", safe=path)
    assert r.code == 0, r.err
    out = json.loads(r.out)
    assert out["points_dropped"] == 3 and out["points_kept"] == 2
    assert out["gc"]["objects_freed"] == out["objects_freed"]
    with Safe.open(path) as safe:
        assert [p.id for p in safe.points()] == [h[0].id for h in hist[3:]]
        _assert_clean(safe)
        _assert_points(safe, hist)


def test_a_forget_interrupted_before_its_cascade_verifies_and_gc_finishes_it(tmp_path):
    from pointsafe.cas.release import forget_points_queued, queued
    path, hist = _history(tmp_path, 3, files=4)
    with Safe.open(path) as safe:
        unique = reachable(safe, [bytes.fromhex(hist[0][0].id)]) - reachable(
            safe, [bytes.fromhex(r.id) for r, _ in hist[1:]])
        with safe.writer("forget") as w:
            forget_points_queued(w, [bytes.fromhex(hist[0][0].id)])   # committed, not drained
        assert queued(safe.index) == 1
        rep = verify(safe)
        assert rep.ok, rep.errors      # the audit counts the queued drop
        r = run_gc(safe, threshold=0.0)
        assert r.objects_freed == len(unique)
        assert queued(safe.index) == 0
        _assert_clean(safe)
        _assert_points(safe, hist)


def _cost_of_forgetting(tmp_path: Path, extra_sources: int) -> tuple[int, int]:
    """Objects read by forget + gc of one point, in a safe with ``extra_sources`` other
    sources of 1 MiB each around it."""
    rng = random.Random(9)
    path = tmp_path / f"safe{extra_sources}"
    Safe.init(path, pack_size=PACK).close()
    with Safe.open(path) as safe:
        for i in range(extra_sources):
            other = tmp_path / f"other{extra_sources}-{i}"
            write_source(other, random.Random(100 + i), files=4, size=256 * 1024)
            backup(safe, other, f"other{i}")
        src = tmp_path / f"victim{extra_sources}"
        write_source(src, random.Random(1), files=6, size=128 * 1024)
        first = backup(safe, src, "victim")
        mutate(src, rng, 0.2)
        backup(safe, src, "victim")
    with Safe.open(path) as safe:     # a fresh process-like view: count only what forget+gc read
        forget(safe, plan_forget(safe, [first.id]))
        r = run_gc(safe, threshold=1.0)   # no pack is partly dead enough to rewrite
        assert not r.packs_rewritten
        return safe.objects_read, r.objects_freed


def test_forget_and_gc_cost_follows_the_point_not_the_safe(tmp_path):
    small = _cost_of_forgetting(tmp_path, 0)
    big = _cost_of_forgetting(tmp_path, 8)
    assert small[1] > 0
    assert big == small


def test_cli_default_threshold_matches_gc():
    from pointsafe.cli.cmd_gc import DEFAULT_THRESHOLD
    from pointsafe.gc.collect import DEFAULT_THRESHOLD as real
    assert DEFAULT_THRESHOLD == real
