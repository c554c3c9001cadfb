"""Damage is found (verify, reads) and never returned as data; repair rebuilds the index."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from pointsafe.cas import IntegrityError, Kind, NotASafe, Safe, object_key, repair, verify
from pointsafe.cas.pack import pack_name
from pointsafe.cas.release import forget_points

from _cas_util import check_point, flip_bit, make_point, random_bytes, record_offset_of, stored_offset

import random


@pytest.fixture
def filled(safe_dir):
    """A safe with two points, a forgotten third one and loose chunks, over several packs."""
    rng = random.Random(7)
    chunks = [random_bytes(rng, 60_000, i % 3 == 0) for i in range(12)]
    with Safe.open(safe_dir) as safe:
        with safe.writer("test") as w:
            p1 = make_point(w, "web", {b"a": chunks[:4], b"b": [chunks[4], 100_000, chunks[5]]},
                            subdir={b"c": chunks[6:8]})
            p2 = make_point(w, "web", {b"a": chunks[:4], b"d": chunks[8:10]})
            gone = make_point(w, "db", {b"x": chunks[10:12]})
            loose = w.put(Kind.CHUNK, b"loose chunk")
            forget_points(w, [bytes.fromhex(gone.id)])
    return safe_dir, {"p1": p1, "p2": p2, "gone": gone, "loose": loose, "chunks": chunks}


def _chunk_entry(safe, data):
    return record_offset_of(safe, object_key(Kind.CHUNK, data))


@pytest.mark.parametrize("where", ["data", "header"])
def test_flipped_bit_is_found_by_verify_and_reads(filled, cli, where):
    safe_dir, f = filled
    victim = f["chunks"][1]
    with Safe.open(safe_dir) as safe:
        path, e = _chunk_entry(safe, victim)
        offset = stored_offset(e, 777) if where == "data" else e.offset + 20   # a key byte
        flip_bit(path, offset, 3)
        with pytest.raises(IntegrityError) as ei:
            safe.get(object_key(Kind.CHUNK, victim))
        assert ei.value.pack == e.pack and ei.value.offset == e.offset
        assert pack_name(e.pack) in str(ei.value) and f"offset {e.offset}" in str(ei.value)
        # Other objects still read fine.
        assert safe.get(object_key(Kind.CHUNK, f["chunks"][9])) == f["chunks"][9]

    r = cli("verify", safe=safe_dir)
    assert r.code == 1
    assert f"{pack_name(e.pack)} offset {e.offset}" in r.out, r.out
    assert "FAILED" in r.out
    r = cli("verify", "--json", safe=safe_dir)
    assert r.code == 1
    rep = json.loads(r.out)
    assert rep["ok"] is False
    assert any(err.get("pack") == pack_name(e.pack) and err.get("offset") == e.offset
               for err in rep["errors"]), rep


def test_flipped_bit_in_a_stored_raw_record_is_found_without_data_flag(safe_dir, cli):
    data = os.urandom(10_000)  # incompressible: stored raw, so only the checksum can tell
    with Safe.open(safe_dir) as safe:
        with safe.writer() as w:
            k = w.put(Kind.CHUNK, data)
        path, e = record_offset_of(safe, k)
        assert e.codec == 0
        flip_bit(path, stored_offset(e, 5000))
        with pytest.raises(IntegrityError):
            safe.get(k)
        with pytest.raises(IntegrityError):
            safe.get(k, rehash=True)
    r = cli("verify", safe=safe_dir)
    assert r.code == 1 and f"offset {e.offset}" in r.out


def test_truncated_pack_is_found_by_verify_and_reads(filled, cli):
    safe_dir, f = filled
    victim = f["chunks"][8]
    with Safe.open(safe_dir) as safe:
        path, e = _chunk_entry(safe, victim)
        os.truncate(path, e.offset + 100)       # cut inside the victim's record
        with pytest.raises(IntegrityError) as ei:
            safe.get(object_key(Kind.CHUNK, victim))
        assert ei.value.pack == e.pack
    r = cli("verify", safe=safe_dir)
    assert r.code == 1
    assert f"pack {pack_name(e.pack)} is truncated" in r.out
    assert f"offset {e.offset}" in r.out


def test_clean_safe_verifies_with_data(filled, cli):
    safe_dir, f = filled
    r = cli("verify", "--data", "--json", safe=safe_dir)
    assert r.code == 0, r.err
    rep = json.loads(r.out)
    assert rep["ok"] and rep["errors"] == [] and rep["points"] == 2 and rep["packs"] >= 2


def test_deleted_index_is_rebuilt_by_repair(filled, cli):
    safe_dir, f = filled
    with Safe.open(safe_dir) as safe:
        before = {k: v for k, v in _objects(safe).items()}
        points_before = safe.points()
    shutil.rmtree(safe_dir / "index")

    r = cli("verify", safe=safe_dir)
    assert r.code == 1 and "repair" in r.err and len(r.err.strip().splitlines()) == 1
    with pytest.raises(NotASafe):
        Safe.open(safe_dir)

    r = cli("repair", "--json", safe=safe_dir)
    assert r.code == 0, r.err
    rep = json.loads(r.out)
    assert rep["points"] == 2 and rep["damaged"] == [] and rep["objects"] == len(before)

    with Safe.open(safe_dir) as safe:
        after = _objects(safe)
        assert set(after) == set(before)
        for k, e in after.items():
            raw = safe.get(k)
            assert object_key(e.kind, raw) == k
            b = before[k]
            assert (e.pack, e.offset, e.kind, e.raw_len) == (b.pack, b.offset, b.kind, b.raw_len)
        # Points intact, the forgotten one stays forgotten.
        pts = safe.points()
        assert [p.id for p in pts] == [p.id for p in points_before]
        assert pts == points_before
        assert f["gone"].id not in {p.id for p in pts}
        for p in pts:
            check_point(safe, p)
        # Reference counts of live objects agree with the index the writer kept.
        p1_root = f["p1"].root
        assert after[p1_root].refcount == before[p1_root].refcount
    r = cli("verify", "--data", safe=safe_dir)
    assert r.code == 0, r.out + r.err

    # A writer can carry on from the rebuilt index.
    with Safe.open(safe_dir) as safe:
        with safe.writer() as w:
            p3 = make_point(w, "web", {b"new": [b"after repair"]})
        check_point(safe, p3)
        assert len(safe.points()) == 3


def test_repair_leaves_out_a_damaged_record_and_says_so(filled, cli):
    safe_dir, f = filled
    victim = f["chunks"][2]
    with Safe.open(safe_dir) as safe:
        path, e = _chunk_entry(safe, victim)
    flip_bit(path, stored_offset(e, 10))
    shutil.rmtree(safe_dir / "index")
    r = cli("repair", safe=safe_dir)
    assert r.code == 1
    assert f"{pack_name(e.pack)} offset {e.offset}" in r.out
    with Safe.open(safe_dir) as safe:
        assert not safe.has(object_key(Kind.CHUNK, victim))
        assert safe.get(object_key(Kind.CHUNK, f["chunks"][3])) == f["chunks"][3]


def test_repair_of_a_healthy_safe_changes_nothing_visible(filled, cli):
    safe_dir, f = filled
    with Safe.open(safe_dir) as safe:
        before = _objects(safe)
        pts = safe.points()
        packs = {pid: (pe.committed_len, pe.live_bytes + pe.dead_bytes) for pid, pe in safe.pack_entries().items()}
    r = cli("repair", safe=safe_dir)
    assert r.code == 0 and "2 points" in r.out, r.out + r.err
    with Safe.open(safe_dir) as safe:
        assert set(_objects(safe)) == set(before)
        assert safe.points() == pts
        assert {pid: (pe.committed_len, pe.live_bytes + pe.dead_bytes)
                for pid, pe in safe.pack_entries().items()} == packs


def test_repair_from_python_reports_counts(filled):
    safe_dir, f = filled
    shutil.rmtree(safe_dir / "index")
    rep = repair(safe_dir)
    assert rep.points == 2 and rep.missing_children == 0
    with Safe.open(safe_dir) as safe:
        assert verify(safe, data=True).ok
        assert safe.get(f["loose"]) == b"loose chunk"


def _objects(safe):
    from pointsafe.cas.index import ObjectEntry
    with safe.index.read() as t:
        return {bytes(k): ObjectEntry.decode(v) for k, v in t.cursor(db=safe.index.db["objects"])}


def test_repair_never_reuses_the_id_of_a_deleted_pack(safe_dir, cli):
    """gc deleted the newest packs (a crashed backup's orphans); repair must not hand their
    ids out again."""
    from pointsafe.cas.relocate import bury_orphans, drop_dead
    with Safe.open(safe_dir) as safe:
        with safe.writer() as w:
            make_point(w, "keep", {b"k": [os.urandom(1000)]})
            w.flush(seal=True)
            for _ in range(6):                   # never linked: orphans in packs of their own
                w.put(Kind.CHUNK, os.urandom(60_000))
        with safe.writer() as w:
            assert bury_orphans(w) == 6
            dropped = drop_dead(w)
        with safe.index.read() as t:
            next_pack = safe.index.get_meta_int(t, "next_pack")
        newest = max(safe.pack_entries())
    assert dropped.packs_deleted and max(dropped.packs_deleted) > newest
    r = cli("repair", safe=safe_dir)
    assert r.code == 0, r.out + r.err
    with Safe.open(safe_dir) as safe:
        with safe.writer() as w:
            w.flush(seal=True)
        with safe.writer() as w:
            k = w.put(Kind.CHUNK, os.urandom(5000))
        assert safe.entry(k).pack >= next_pack
        assert safe.entry(k).pack not in dropped.packs_deleted


def test_missing_pack_is_found_by_verify_and_reads(filled, cli):
    safe_dir, f = filled
    victim = f["chunks"][0]
    with Safe.open(safe_dir) as safe:
        path, e = _chunk_entry(safe, victim)
        path.unlink()
        with pytest.raises(IntegrityError, match="missing"):
            safe.get(object_key(Kind.CHUNK, victim))
    r = cli("verify", safe=safe_dir)
    assert r.code == 1 and f"pack {pack_name(e.pack)} is missing" in r.out, r.out
