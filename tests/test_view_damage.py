"""Damaged, missing and inconsistent data through ``fusefs.View``, without FUSE.

What a user must see: the damaged range of the damaged file fails (Damaged, which the adapter
answers with EIO) and names the file; every other byte still reads correctly; wrong bytes, zeros
in place of lost data, or a silently shortened file never come back.
"""

from __future__ import annotations

import errno
import os
import random

import pytest

from pointsafe.cas import Entry, Kind, Safe, encode_list, encode_tree, utc_now_iso
from pointsafe.cas.pack import CODEC_RAW, CODEC_ZSTD, REC_HEADER_SIZE
from pointsafe.cas.tree import REG
from pointsafe.fusefs.ops import _errno
from pointsafe.fusefs.view import (ROOT_INO, BadHandle, Damaged, IsADir, NoAttr, NotADir, NotALink, NotFound,
                                   ReadOnly, View, ViewError)
from test_view import backup, extents, open_view, read_all, resolve


def _words(n: int, seed: int) -> bytes:
    rng = random.Random(seed)
    vocab = [bytes(rng.choices(b"abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 9))) for _ in range(400)]
    return b" ".join(rng.choice(vocab) for _ in range(n))


def _flip(path: os.PathLike, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


def _reads_only_right_bytes_or_damage(view: View, fh: int, data: bytes, off: int, size: int) -> bool:
    """True when the read reports damage; fails the test if it returns bytes that are not the source's."""
    for cached_only in (True, False):
        try:
            got = view.read(fh, off, size, cached_only)
        except Damaged:
            return True
        if got is not None:
            assert bytes(got) == data[off:off + size], (off, size)
    return False


@pytest.fixture
def victim(safe_dir, tmp_path):
    """A safe holding one point with a raw (random) and a compressed (text) multi-chunk file."""
    src = tmp_path / "src"
    src.mkdir()
    files = {b"random.bin": random.Random(1).randbytes(900_000), b"text.txt": _words(200_000, 2),
             b"fine.txt": b"still readable\n"}
    for name, data in files.items():
        (src / os.fsdecode(name)).write_bytes(data)
    (src / "sub").mkdir()
    (src / "sub" / "inner").write_bytes(b"inner\n")
    return safe_dir, backup(safe_dir, src, "dmg"), files


@pytest.mark.parametrize("name,codec,where", [(b"random.bin", CODEC_RAW, "body"), (b"text.txt", CODEC_ZSTD, "body"),
                                             (b"random.bin", CODEC_RAW, "header")])
def test_a_flipped_byte_fails_that_range_only(victim, name, codec, where):
    safe, point, files = victim
    data = files[name]
    with open_view(safe, point) as v:
        node = resolve(v, name)
        chunks = [(lo, n, k) for lo, n, k in extents(v, node) if k is not None]
        assert len(chunks) > 4
        lo, n, key = chunks[len(chunks) // 2]
        e = v.safe.entry(key)
        assert e.codec == codec
        _flip(v.safe.pack_path(e.pack), e.offset + (REC_HEADER_SIZE + e.stored_len // 2 if where == "body" else 40))
        fh = v.open(node.ino, os.O_RDONLY)
        try:
            for off, size in ((lo, n), (lo + n - 1, 2), (lo - 1, 2), (lo + 10, 1), (0, len(data))):
                with pytest.raises(Damaged) as err:
                    v.read(fh, off, size)
                assert f"/{name.decode()}" in str(err.value)
                assert _errno(err.value) == errno.EIO
                assert _reads_only_right_bytes_or_damage(v, fh, data, off, size)
            for off, size in ((0, lo), (lo + n, len(data)), (lo - 4096, 4096), (lo + n, 1)):
                assert bytes(v.read(fh, off, size)) == data[off:off + size]
        finally:
            v.release(fh)
        assert read_all(v, resolve(v, "fine.txt")) == b"still readable\n"


def test_a_damaged_directory_is_damaged_and_the_rest_reads(victim):
    safe, point, files = victim
    with open_view(safe, point) as v:
        sub = resolve(v, "sub")
        e = v.safe.entry(sub.entry.ref)
        _flip(v.safe.pack_path(e.pack), e.offset + REC_HEADER_SIZE + e.stored_len // 2)
        with pytest.raises(Damaged) as err:
            v.lookup(sub.ino, b"inner")
        assert "/sub" in str(err.value) and _errno(err.value) == errno.EIO
        with pytest.raises(Damaged):
            v.opendir(sub.ino)
        assert read_all(v, resolve(v, "random.bin")) == files[b"random.bin"]


def test_a_lost_pack_fails_the_data_it_held(victim):
    safe, point, files = victim
    data = files[b"random.bin"]
    with open_view(safe, point) as v:
        node = resolve(v, "random.bin")
        chunks = [(lo, n, k) for lo, n, k in extents(v, node) if k is not None]
        lo, n, key = chunks[len(chunks) // 2]
        lost = v.safe.entry(key).pack
        os.unlink(v.safe.pack_path(lost))
        fh = v.open(node.ino, os.O_RDONLY)
        try:
            with pytest.raises(Damaged):
                v.read(fh, lo, n)
            for clo, cn, k in chunks:
                if v.safe.entry(k).pack != lost:
                    assert bytes(v.read(fh, clo, cn)) == data[clo:clo + cn]
        finally:
            v.release(fh)


def test_an_object_missing_from_the_index_is_damage(victim):
    safe, point, files = victim
    data = files[b"text.txt"]
    with open_view(safe, point) as v:
        node = resolve(v, "text.txt")
        chunks = [(lo, n, k) for lo, n, k in extents(v, node) if k is not None]
        lo, _, key = chunks[1]
        with v.safe.index.write() as t:               # as after a repair that could not keep it
            assert t.delete(key, db=v.safe.index.db["objects"])
        fh = v.open(node.ino, os.O_RDONLY)
        try:
            with pytest.raises(Damaged) as err:
                v.read(fh, lo, 1)
            assert "not in the safe" in str(err.value)
            assert bytes(v.read(fh, 0, lo)) == data[:lo]
        finally:
            v.release(fh)
        # a file whose blob root is gone cannot even be opened
        text_root = node.entry.ref
        with v.safe.index.write() as t:
            t.delete(text_root, db=v.safe.index.db["objects"])
        with pytest.raises(Damaged):
            v.open(node.ino, os.O_RDONLY)


# -- entries that do not match their blob (crafted or damaged trees) ---------------------------------

def _crafted(safe_dir) -> tuple[dict, dict[bytes, bytes]]:
    """A point whose files' tree entries say sizes their blobs do not have (and one that is right)."""
    a, b = random.Random(3).randbytes(600), random.Random(4).randbytes(700)
    with Safe.open(safe_dir) as s, s.writer("test") as w:
        ka, kb = w.put(Kind.CHUNK, a), w.put(Kind.CHUNK, b)
        flat = w.put_node(Kind.LIST, *encode_list(0, [(ka, 600), (kb, 700)]))
        # a level-1 node that says its child covers 2000 bytes; the child covers 1300
        tall = w.put_node(Kind.LIST, *encode_list(1, [(flat, 2000)]))
        entries = [Entry(b"exact", REG, 0o644, size=1300, ref=flat),
                   Entry(b"says-less", REG, 0o644, size=1000, ref=flat),
                   Entry(b"says-more", REG, 0o644, size=1500, ref=flat),
                   Entry(b"chunk-says-less", REG, 0o644, size=500, ref=ka),
                   Entry(b"chunk-says-more", REG, 0o644, size=650, ref=ka),
                   Entry(b"list-says-more", REG, 0o644, size=2000, ref=tall)]
        root = w.put_node(Kind.TREE, *encode_tree(entries))
        now = utc_now_iso()
        p = w.add_point({"name": "crafted", "kind": "tree", "source": "/crafted", "host": "test", "started": now,
                         "finished": now, "size": 1300,
                         "root_meta": {"mode": 0o755, "uid": 0, "gid": 0, "mtime_ns": 0, "xattrs": []}}, root)
    return p, {b"exact": a + b}


@pytest.mark.parametrize("name", [b"says-less", b"says-more", b"chunk-says-less", b"chunk-says-more"])
def test_a_size_that_does_not_match_the_blob_is_damage_not_padding(safe_dir, name):
    """Which is wrong, the size or the blob, cannot be known: every read of the file reports it."""
    point, good = _crafted(safe_dir)
    with open_view(safe_dir, point) as v:
        assert read_all(v, resolve(v, "exact")) == good[b"exact"]
        node = resolve(v, name)
        size = node.entry.size
        fh = v.open(node.ino, os.O_RDONLY)
        try:
            for off, n in ((0, 1 << 20), (0, 10), (size // 2, 100), (size - 1, 1)):
                with pytest.raises(Damaged) as err:
                    v.read(fh, off, n)
                assert f"/{name.decode()}" in str(err.value)
        finally:
            v.release(fh)


def test_a_list_node_shorter_than_its_parent_says_fails_the_missing_range(safe_dir):
    point, good = _crafted(safe_dir)
    data = good[b"exact"]               # what the inner node really holds: 1300 of the 2000 bytes
    with open_view(safe_dir, point) as v:
        node = resolve(v, "list-says-more")
        fh = v.open(node.ino, os.O_RDONLY)
        try:
            for off, n in ((0, 10), (590, 20), (0, 1300)):
                assert bytes(v.read(fh, off, n)) == data[off:off + n]
            for off, n in ((0, 1 << 20), (1299, 2), (1300, 1), (1999, 1)):
                with pytest.raises(Damaged):
                    v.read(fh, off, n)
        finally:
            v.release(fh)


def test_every_view_error_has_its_errno():
    import pyfuse3
    want = {NotFound: errno.ENOENT, NotADir: errno.ENOTDIR, IsADir: errno.EISDIR, NotALink: errno.EINVAL,
            NoAttr: pyfuse3.ENOATTR, ReadOnly: errno.EROFS, Damaged: errno.EIO, BadHandle: errno.EBADF}
    assert set(want) == set(ViewError.__subclasses__())
    for cls, n in want.items():
        assert _errno(cls("x")) == n
    assert _errno(RuntimeError("a program error")) == errno.EIO      # logged with its traceback


def test_root_of_a_point_with_a_missing_root_is_damage(safe_dir):
    point, _ = _crafted(safe_dir)
    with open_view(safe_dir, point) as v:
        with v.safe.index.write() as t:
            t.delete(point.root, db=v.safe.index.db["objects"])
        with pytest.raises(Damaged):
            v.lookup(ROOT_INO, b"exact")
        assert v.getattr(ROOT_INO).mode == 0o40755         # its attributes come from the point record
