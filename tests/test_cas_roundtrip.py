"""Objects and blobs come back exactly as stored, at every compression setting; duplicates store once."""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pointsafe.cas import (BlobReader, Kind, NodeCache, Safe, encode_node, object_key, verify)
from pointsafe.cas.pack import CODEC_RAW, CODEC_ZSTD

from _cas_util import (blob_bytes, check_point, make_point, pack_bytes, put_blob, random_bytes,
                       tree_files)

COMPRESSIONS = ["none", "zstd:1", "zstd:19"]
_safes: dict[str, Path] = {}
_tmp = tempfile.TemporaryDirectory(prefix="pointsafe-roundtrip-")


def _shared_safe(compression: str) -> Path:
    """One safe per compression setting for all hypothesis examples (a new safe per example
    would spend the time creating LMDB environments)."""
    if compression not in _safes:
        path = Path(_tmp.name) / compression.replace(":", "-")
        Safe.init(path, compression=compression, pack_size=256 * 1024).close()
        _safes[compression] = path
    return _safes[compression]


objects = st.lists(
    st.one_of(
        st.binary(max_size=300),                                       # small, incl. empty
        st.binary(min_size=1, max_size=4).map(lambda b: b * 20000),   # very compressible
        st.integers(0, 2**32).map(lambda s: random.Random(s).randbytes(70000)),  # incompressible
        st.integers(0, 2**32).map(lambda s: random_bytes(random.Random(s), 50000, True)),
    ),
    min_size=1, max_size=12,
)


@pytest.mark.parametrize("compression", COMPRESSIONS)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(datas=objects, kind=st.sampled_from([Kind.CHUNK, Kind.LIST, Kind.TREE]))
def test_random_objects_round_trip(compression, datas, kind):
    path = _shared_safe(compression)
    with Safe.open(path) as safe:
        with safe.writer("test") as w:
            keys = [w.put(kind, d) for d in datas]
        # Fresh handle: nothing can come from the writer's memory.
    with Safe.open(path) as safe:
        for d, k in zip(datas, keys):
            assert k == object_key(kind, d)
            assert safe.get(k) == d
            e = safe.entry(k)
            assert e.kind == kind and e.raw_len == len(d)
            if compression == "none" or len(d) <= 64:
                assert e.codec == CODEC_RAW
            # Stored raw unless compression shrinks it; never bigger than the raw bytes.
            assert e.stored_len <= len(d)
            if e.codec == CODEC_ZSTD:
                assert e.stored_len < len(d)


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_empty_and_incompressible_objects(tmp_path, compression):
    safe = Safe.init(tmp_path / "s", compression=compression)
    rnd = os.urandom(1 << 20)
    text = b"pointsafe " * 10000
    with safe.writer() as w:
        k_empty = w.put(Kind.CHUNK, b"")
        k_rnd = w.put(Kind.CHUNK, rnd)
        k_text = w.put(Kind.CHUNK, text)
    assert safe.get(k_empty) == b"" and safe.entry(k_empty).stored_len == 0
    assert safe.get(k_rnd) == rnd
    assert safe.entry(k_rnd).codec == CODEC_RAW         # zstd cannot shrink random bytes
    assert safe.get(k_text) == text
    if compression != "none":
        assert safe.entry(k_text).codec == CODEC_ZSTD
        assert safe.entry(k_text).stored_len < len(text) // 10
    assert verify(safe, data=True).ok
    safe.close()


def test_kinds_are_separate_key_domains(safe):
    data = encode_node([], b"same bytes")
    with safe.writer() as w:
        keys = {kind: w.put(kind, data) for kind in (Kind.CHUNK, Kind.LIST, Kind.TREE)}
    assert len(set(keys.values())) == 3
    for kind, k in keys.items():
        assert safe.entry(k).kind == kind and safe.get(k) == data


part = st.one_of(
    st.integers(1, 200_000),                                              # a hole
    st.binary(min_size=1, max_size=3000),
    st.integers(0, 2**32).map(lambda s: random.Random(s).randbytes(random.Random(s).randint(1, 70000))),
)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(parts=st.lists(part, min_size=0, max_size=40), fanout=st.integers(2, 6),
       reads=st.lists(st.tuples(st.integers(0, 3_000_000), st.integers(0, 300_000)), max_size=15))
def test_blob_round_trip_with_holes_and_random_reads(parts, fanout, reads):
    path = _shared_safe("zstd:1")
    with Safe.open(path) as safe:
        with safe.writer() as w:
            root, size = put_blob(w, parts, fanout)
    data = blob_bytes(parts)
    assert size == len(data)
    with Safe.open(path) as safe:
        r = BlobReader(root, size, safe.get, lambda k: safe.entry(k).kind, nodes=NodeCache())
        assert r.read(0, size + 10) == data
        for off, n in reads:
            assert r.read(off, n) == data[off:off + n]
        # Extents cover the blob exactly, holes included, in order.
        pos = 0
        for off, length, key in r.extents():
            assert off == pos and length > 0
            if key is None:
                assert data[off:off + length] == bytes(length)
            pos += length
        assert pos == size


def test_holes_are_not_stored(safe_dir):
    with Safe.open(safe_dir) as safe:
        before = pack_bytes(safe_dir)
        with safe.writer() as w:
            root, size = put_blob(w, [1 << 30, b"x" * 100, 1 << 30], 4)
        assert size == (2 << 30) + 100
        assert pack_bytes(safe_dir) - before < 4096
        r = BlobReader(root, size, safe.get, lambda k: safe.entry(k).kind)
        assert r.read((1 << 30) - 2, 6) == b"\0\0xxxx"
        assert r.read(5 << 20, 8) == bytes(8)


def test_duplicate_puts_store_once(safe_dir):
    data = [os.urandom(50_000) for _ in range(10)]
    with Safe.open(safe_dir) as safe:
        with safe.writer() as w:
            keys = [w.put(Kind.CHUNK, d) for d in data]
            keys_again = [w.put(Kind.CHUNK, d) for d in data]        # same batch
        assert keys == keys_again
        size = pack_bytes(safe_dir)
        with safe.writer() as w:                                     # later batch
            assert [w.put(Kind.CHUNK, d) for d in data] == keys
            assert w.objects_written == 0 and w.bytes_written == 0
        assert pack_bytes(safe_dir) == size
        with safe.index.read() as t:
            assert t.stat(safe.index.db["objects"])["entries"] == 10
        assert sum(pe.objects for pe in safe.pack_entries().values()) == 10


def test_point_round_trip_and_refcounts(safe_dir):
    shared = os.urandom(30_000)
    with Safe.open(safe_dir) as safe:
        with safe.writer() as w:
            p1 = make_point(w, "a", {b"f1": [shared, 5000, b"tail"], b"f2": [shared]})
            p2 = make_point(w, "a", {b"f1": [shared, 5000, b"tail"], b"f3": [b"new"]})
        assert [p.id for p in safe.points()] == [p1.id, p2.id]
        assert check_point(safe, p1) > 3 and check_point(safe, p2) > 3
        # Counts are hierarchical: the shared chunk has two parents (f1's list node and the
        # first tree, where it is f2's whole blob); the second point reuses f1's list node,
        # which adds one count to that node and none below it.
        k = object_key(Kind.CHUNK, shared)
        assert safe.entry(k).refcount == 2
        t1, t2 = (safe.children(bytes.fromhex(p.id))[0] for p in (p1, p2))
        f1_list = tree_files(safe, t1)[b"f1"].ref
        assert tree_files(safe, t2)[b"f1"].ref == f1_list
        assert safe.entry(f1_list).refcount == 2
        assert [safe.entry(bytes.fromhex(p.id)).refcount for p in (p1, p2)] == [1, 1]
