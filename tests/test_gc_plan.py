"""gc runs the plan it prints: the dry run (a plan, reads only) says exactly what the real run
then does, including what the orphans of a crashed backup and an interrupted forget kill when
they cascade; and there is one forget path."""

from __future__ import annotations

import json
import random
from dataclasses import replace
from pathlib import Path

from _cas_util import make_point
from _gc_util import pack_bytes, point_digests, reachable
from pointsafe.cas import Kind, Safe, verify
from pointsafe.cas.audit import audit
from pointsafe.cas.release import forget_points, forget_points_queued, queued
from pointsafe.gc import collect as gc_collect
from pointsafe.gc.collect import plan_gc, run_gc

PACK = 256 * 1024


def _chunks(rng: random.Random, n: int, size: int = 60_000) -> list[bytes]:
    return [rng.randbytes(size) for _ in range(n)]


def _messy_safe(tmp_path: Path) -> tuple[Path, dict, list[bytes]]:
    """A safe where gc has everything to do at once: two live points, a forgotten point whose
    release was queued but never drained (an interrupted forget), and the orphans of a crashed
    backup (a tree and its blobs at count 0, over whole packs and sharing one chunk with a live
    point). Returns the path, the live point that must survive, and the shared chunks."""
    rng = random.Random(11)
    path = tmp_path / "safe"
    Safe.init(path, pack_size=PACK).close()
    shared = _chunks(rng, 3)
    with Safe.open(path) as safe:
        with safe.writer("test") as w:
            keep = make_point(w, "web", {b"a": shared + _chunks(rng, 4)})
            gone = make_point(w, "web", {b"old": _chunks(rng, 12), b"a": shared[:1]})
            mixed = make_point(w, "db", {b"x": _chunks(rng, 3)})
            forget_points(w, [bytes.fromhex(mixed.id)])           # drained: dead already
            forget_points_queued(w, [bytes.fromhex(gone.id)])     # committed, never drained
        w = safe.writer("backup")                                    # a backup that was killed:
        make_point_like_orphan(w, _chunks(rng, 10) + shared[1:2])   # a committed tree, no point
        w.flush()
        w.abort()
        assert queued(safe.index) == 1
    return path, keep, shared


def make_point_like_orphan(w, parts: list[bytes]) -> bytes:
    """What a killed backup leaves: blobs and a tree committed, the point never written."""
    from _cas_util import put_blob
    from pointsafe.cas import encode_tree
    from pointsafe.cas.tree import REG, Entry
    entries = []
    for i in range(0, len(parts), 4):
        root, size = put_blob(w, parts[i:i + 4], 2)
        entries.append(Entry(f"f{i}".encode(), REG, 0o644, size=size, ref=root, mtime_ns=1))
    kids, payload = encode_tree(entries)
    return w.put_node(Kind.TREE, kids, payload)


def _outcome(r) -> dict:
    return {k: getattr(r, k) for k in ("objects_freed", "dead_bytes_freed", "orphans_buried",
                                       "packs_deleted", "packs_rewritten", "objects_moved",
                                       "bytes_moved", "bytes_reclaimed", "size_before", "size_after")}


def test_the_dry_run_says_what_the_run_does_with_orphans_and_a_queued_forget(tmp_path):
    path, keep, _ = _messy_safe(tmp_path)
    with Safe.open(path) as safe:
        before = safe.pack_entries()
        dry = run_gc(safe, threshold=0.3, dry_run=True)
        plan = dry.plan
        # The cascades are in the plan: the orphans' tree kills its blobs (not the shared
        # chunk), the queued forget kills the forgotten point's data, and packs that hold only
        # what they kill are deleted although today they still count as live.
        assert plan["orphans"] == 1 and plan["orphans_buried"] > 10
        assert plan["queued"] == 1 and plan["released"] > 12
        emptied = [p for p in dry.packs_deleted if before[int(p, 16)].live_bytes > 0]
        assert emptied, "the plan misses packs that the cascades empty"
        assert dry.packs_rewritten and dry.bytes_moved > 0
        assert pack_bytes(path) == dry.size_before     # the dry run changed nothing
        assert queued(safe.index) == 1

        real = run_gc(safe, threshold=0.3)
        assert not real.warnings, real.warnings
        assert real.plan == {**plan, "free_before": real.plan["free_before"]}
        assert _outcome(real) == _outcome(dry)
        assert len(real.packs_written) == plan["new_packs"]
        assert real.size_after == pack_bytes(path)
        a = audit(safe)
        assert a.ok, a.errors
        assert a.orphans == 0 and a.dead == 0
        assert queued(safe.index) == 0
        assert verify(safe, data=True).ok
        assert [p.id for p in safe.points()] == [keep.id]
        point_digests(safe, keep)          # every chunk of the live point reads back
        # Nothing is left to do, and the plan says so.
        again = plan_gc(safe, 0.3)
        assert (again.objects_dropped, again.delete, again.rewrite, again.bytes_reclaimed) == (0, (), (), 0)


def test_the_plan_is_the_same_when_its_overlay_spills_to_disk(tmp_path, monkeypatch):
    """Small batches and a spilled overlay (what a big safe sees) change nothing."""
    path, _, _ = _messy_safe(tmp_path)
    with Safe.open(path) as safe:
        in_memory = plan_gc(safe, 0.3)
        monkeypatch.setattr(gc_collect, "SPILL", 5)
        monkeypatch.setattr(gc_collect, "READ_BATCH", 3)
        spills = []
        real_spill = gc_collect._Overlay._spill
        monkeypatch.setattr(gc_collect._Overlay, "_spill", lambda self: (spills.append(1), real_spill(self)))
        spilled = plan_gc(safe, 0.3)
    assert spills == [1]
    assert replace(spilled, free_before=0) == replace(in_memory, free_before=0)


def test_cli_gc_prints_the_plan_then_runs_it(tmp_path, cli):
    path, _, _ = _messy_safe(tmp_path)
    dry = cli("gc", "--dry-run", "--threshold", "30", safe=path)
    assert dry.code == 0, dry.err
    dry_json = json.loads(cli("gc", "--dry-run", "--json", "--threshold", "30", safe=path).out)
    run = cli("gc", "--threshold", "30", safe=path)
    assert run.code == 0, run.out + run.err
    # The real run first prints the very plan the dry run printed, then what it did.
    planned = [ln.removeprefix("dry run: would ") for ln in dry.out.splitlines() if ln.startswith("dry run: would ")]
    executed = [ln.removeprefix("plan: ") for ln in run.out.splitlines() if ln.startswith("plan: ")]
    assert planned == executed and len(planned) == 2
    assert "bury 1 orphans of an interrupted backup" in planned[0]
    assert "finish an interrupted forget" in planned[0]
    assert f"done: freed {dry_json['objects_freed']} dead objects" in run.out
    assert f"done: deleted {len(dry_json['packs_deleted'])} packs, rewrote {len(dry_json['packs_rewritten'])} packs" in run.out
    done = json.loads(cli("gc", "--json", safe=path).out)
    assert "points_dropped" not in done and "points_dropped" not in dry_json
    assert done["objects_freed"] == 0 and done["plan"]["delete"] == []
    assert cli("verify", "--data", safe=path).code == 0


def test_forget_points_is_one_commit_then_a_drain(tmp_path):
    """The one forget path commits the writer's pending objects with the forget, drains the
    queue and kills exactly what only the forgotten point reached."""
    rng = random.Random(2)
    path = tmp_path / "safe"
    Safe.init(path, pack_size=PACK).close()
    with Safe.open(path) as safe:
        with safe.writer("test") as w:
            shared = _chunks(rng, 2)
            keep = make_point(w, "a", {b"f": shared})
            gone = make_point(w, "a", {b"f": shared + _chunks(rng, 3)})
            loose = w.put(Kind.CHUNK, b"pending in the writer's batch")
            w.flush()
            unique = reachable(safe, [bytes.fromhex(gone.id)]) - reachable(safe, [bytes.fromhex(keep.id)])
            loose2 = w.put(Kind.CHUNK, b"pending in the writer's batch, too")
            died = forget_points(w, [bytes.fromhex(gone.id)])
        assert died == len(unique) and len(unique) >= 5
        assert safe.has(loose) and safe.has(loose2) and queued(safe.index) == 0
        assert [p.id for p in safe.points()] == [keep.id]
        a = audit(safe)
        assert a.ok, a.errors
        assert a.dead == died


def test_forget_drops_every_count_when_a_chunk_and_its_other_parent_die_in_one_batch(tmp_path):
    """A chunk that is both a file of its own and a chunk of another file is released twice
    while the queue drains; when the other file's list node comes first in the same batch, the
    drop it queues for the chunk must not be lost (the count would stay 1 for ever)."""
    rng = random.Random(4)
    path = tmp_path / "safe"
    Safe.init(path, pack_size=PACK).close()
    with Safe.open(path) as safe:
        with safe.writer("test") as w:
            files = {}
            for i in range(8):
                c = rng.randbytes(3000)
                files[f"one{i}".encode()] = [c]                      # the tree names the chunk
                files[f"two{i}".encode()] = [c, rng.randbytes(3000)]  # and so does a list node
            gone = make_point(w, "x", files, fanout=4)
        with safe.writer("test") as w:
            died = forget_points(w, [bytes.fromhex(gone.id)])
        a = audit(safe)
        assert a.ok, a.errors
        assert died == a.dead and died == 1 + 1 + 8 + 16        # point, tree, lists, chunks
