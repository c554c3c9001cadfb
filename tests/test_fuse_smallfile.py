"""A small file (one chunk) read from the cache on the adapter's own thread — how tar's reads
are answered once the read-ahead of siblings has loaded them — gives exactly the file's bytes
at any offset, and a chunk whose length is not the file's size is damage there as well."""

from __future__ import annotations

import os
import random

import pytest

from pointsafe.fusefs.view import Damaged
from test_view import open_view, resolve
from test_view_damage import _crafted

from pointsafe.cas import Entry, Kind, Safe, encode_tree, utc_now_iso
from pointsafe.cas.tree import REG


def _small_files(safe_dir) -> tuple[dict, dict[bytes, bytes]]:
    """A point of small one-chunk files of several sizes."""
    rnd = random.Random(6)
    files = {b"f%d" % n: rnd.randbytes(n) for n in (1, 100, 4096, 5000, 70_000)}
    with Safe.open(safe_dir) as s, s.writer("test") as w:
        entries = [Entry(name, REG, 0o644, size=len(d), ref=w.put(Kind.CHUNK, d)) for name, d in sorted(files.items())]
        root = w.put_node(Kind.TREE, *encode_tree(entries))
        now = utc_now_iso()
        p = w.add_point({"name": "small", "kind": "tree", "source": "/small", "host": "test", "started": now,
                         "finished": now, "size": 0,
                         "root_meta": {"mode": 0o755, "uid": 0, "gid": 0, "mtime_ns": 0, "xattrs": []}}, root)
    return p, files


def test_cached_small_files_read_exactly_at_any_offset(safe_dir):
    point, files = _small_files(safe_dir)
    with open_view(safe_dir, point) as v:
        for name, data in files.items():
            node = resolve(v, name)
            fh = v.open(node.ino, os.O_RDONLY)
            try:
                assert bytes(v.read(fh, 0, 1 << 17)) == data              # loads the chunk (or the read-ahead did)
                n = len(data)
                for off, size in ((0, 1 << 17), (0, n), (0, 1), (n // 2, 7), (n - 1, 10), (n, 10), (n + 5, 1)):
                    got = v.read(fh, off, size, cached_only=True)
                    assert got is not None
                    assert bytes(got) == data[off:off + size], (name, off, size)
            finally:
                v.release(fh)


@pytest.mark.parametrize("name", [b"chunk-says-less", b"chunk-says-more"])
def test_a_cached_chunk_of_the_wrong_length_is_damage(safe_dir, name):
    point, _ = _crafted(safe_dir)
    with open_view(safe_dir, point) as v:
        node = resolve(v, name)
        fh = v.open(node.ino, os.O_RDONLY)
        try:
            with pytest.raises(Damaged):
                v.read(fh, 0, 10)                         # loads the chunk (it stays cached)
            for off, size in ((0, 10), (0, 1 << 17), (100, 5)):
                with pytest.raises(Damaged) as err:
                    v.read(fh, off, size, cached_only=True)
                assert f"/{name.decode()}" in str(err.value)
        finally:
            v.release(fh)
