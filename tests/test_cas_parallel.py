"""cas.parallel.put_many stores exactly what Writer.put stores, once, in input order."""

from __future__ import annotations

import os
import random

import pytest

from pointsafe.cas import Kind, Safe, object_key, verify
from pointsafe.cas.parallel import iter_put_many, put_many

from _cas_util import pack_bytes, random_bytes


@pytest.mark.parametrize("compression", ["none", "zstd:3"])
def test_put_many_matches_put_and_dedups(tmp_path, compression):
    rng = random.Random(3)
    uniq = [random_bytes(rng, rng.choice([0, 10, 5000, 65536]), i % 2 == 0) for i in range(60)]
    datas = uniq + uniq[::3] + [uniq[5]] * 10          # duplicates within the input
    path = tmp_path / "s"
    Safe.init(path, compression=compression, pack_size=256 * 1024).close()
    with Safe.open(path) as safe:
        with safe.writer() as w:
            first = w.put(Kind.CHUNK, uniq[0])          # one already stored before
            keys = put_many(w, Kind.CHUNK, datas, threads=2, group_bytes=100_000)
        assert keys == [object_key(Kind.CHUNK, d) for d in datas] and keys[0] == first
        with safe.index.read() as t:
            assert t.stat(safe.index.db["objects"])["entries"] == len(set(keys))
        for k, d in zip(keys, datas):
            assert safe.get(k) == d
        size = pack_bytes(path)
        with safe.writer() as w:                        # everything known: nothing appended
            assert list(iter_put_many(w, Kind.CHUNK, iter(datas), threads=3)) == keys
            assert w.bytes_written == 0
        assert pack_bytes(path) == size
        assert verify(safe, data=True).ok


def test_put_many_of_nothing(safe):
    with safe.writer() as w:
        assert put_many(w, Kind.CHUNK, []) == []


def test_put_many_error_in_input_abandons_the_batch(safe_dir):
    def gen():
        yield os.urandom(1000)
        raise ValueError("source failed")
    with Safe.open(safe_dir) as safe:
        with pytest.raises(ValueError):
            with safe.writer() as w:
                put_many(w, Kind.CHUNK, gen())
        with safe.index.read() as t:
            assert t.stat(safe.index.db["objects"])["entries"] == 0
        assert verify(safe).ok
