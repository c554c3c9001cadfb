"""Random reads through the mount: every byte range of a large file matches the source, across
chunk boundaries, holes and LIST-node boundaries; and a small read in a cold mount costs about
one chunk read (the path from the blob's root to the chunk goes through cached LIST nodes)."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from _fuse_util import mounted, stats
from conftest import PW, fuse_skip_reason, run_cli

pytestmark = pytest.mark.skipif(fuse_skip_reason() is not None, reason=fuse_skip_reason() or "")

MiB = 1 << 20
NAME = "big.img"


def _content(seed: int) -> list[tuple[int, bytes | None]]:
    """Pieces of the test file: random, text-like (compressible) and holes (None, with a length)."""
    rnd = random.Random(seed)
    words = [b"w%x" % rnd.getrandbits(24) for _ in range(3000)]

    def text(n: int) -> bytes:
        return b" ".join(rnd.choices(words, k=n // 5 + 1))[:n]

    return [(6 * MiB + 123, rnd.randbytes(6 * MiB + 123)), (4 * MiB, None),
            (10 * MiB + 7, text(10 * MiB + 7)), (9 * MiB, rnd.randbytes(9 * MiB)),
            (2 * MiB + 4096, None), (7 * MiB + 999, text(7 * MiB + 999)),
            (5 * MiB + 11, rnd.randbytes(5 * MiB + 11))]


@pytest.fixture(scope="module")
def point(tmp_path_factory):
    """A safe holding one ~43 MiB file of random data, text and holes (several LIST nodes of
    256 chunks); yields (safe, source bytes, chunk boundaries, LIST-node boundaries, hole edges)."""
    base = tmp_path_factory.mktemp("random")
    src = base / "src"
    src.mkdir()
    pieces = _content(13)
    edges = []
    with open(src / NAME, "wb") as f:
        for n, data in pieces:
            edges.append(f.tell())
            if data is None:
                f.seek(n, os.SEEK_CUR)
            else:
                f.write(data)
        f.truncate(f.tell())
    edges.append(os.path.getsize(src / NAME))
    source = (src / NAME).read_bytes()
    safe = base / "safe"
    run_cli("init", safe, check=True)
    run_cli("backup", src, "--name", "rand", safe=safe, check=True, timeout=600)
    chunks, lists = _layout(safe)
    assert len(lists) >= 2, "the file should span several LIST nodes"
    return safe, source, chunks, lists, edges


def _layout(safe: Path) -> tuple[list[tuple[int, int, bool]], list[int]]:
    """The file's extents (offset, length, is a hole) and the offsets where its leaf LIST nodes start."""
    from pointsafe.cas import BlobReader, Kind, Safe, decode_list, find_entry, resolve_point

    s = Safe.open(safe, write=False, password=PW)
    try:
        pt = resolve_point(s, "latest")
        e = find_entry(s.get, pt.root_entry().ref, NAME.encode())
        assert e is not None

        def kind(k: bytes) -> int:
            ent = s.entry(k)
            assert ent is not None
            return Kind(ent.kind)

        blob = BlobReader(e.ref, e.size, s.get, kind)
        extents = [(lo, n, k is None) for lo, n, k in blob.extents()]
        leaf_starts: list[int] = []

        def walk(key: bytes, base: int) -> None:
            node = decode_list(s.get(key))
            if node.level == 0:
                leaf_starts.append(base)
                return
            lo = base
            for end, child in zip(node.ends, node.keys):
                if child is not None:
                    walk(child, lo)
                lo = base + end

        if not blob.root_is_chunk:
            walk(e.ref, 0)
        return extents, leaf_starts
    finally:
        s.close()


@pytest.fixture(scope="module")
def mount(point, tmp_path_factory):
    """The point mounted once for the correctness test (its caches warm up as it goes)."""
    safe = point[0]
    mp = tmp_path_factory.mktemp("mnt") / "m"
    with mounted(safe, mp, "latest", "--cache-size", str(4 * MiB)):
        yield mp


def test_layout_has_holes_chunks_and_lists(point):
    """The data set exercises what the read test is about: many chunks, holes, LIST nodes."""
    _, source, chunks, lists, _ = point
    assert sum(n for _, n, _ in chunks) == len(source)
    assert any(hole for _, _, hole in chunks)
    assert len(chunks) > 256


def _offsets(point) -> st.SearchStrategy[int]:
    _, source, chunks, lists, edges = point
    marks = sorted({lo for lo, _, _ in chunks} | set(lists) | set(edges))
    near = st.tuples(st.sampled_from(marks), st.integers(-70_000, 70_000)).map(lambda t: max(0, t[0] + t[1]))
    return st.one_of(near, st.integers(0, len(source) + 10_000))


_SIZES = st.one_of(st.integers(1, 8192), st.integers(1, 300_000), st.integers(1, 3 * MiB))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_reads_match_source(point, mount, data):
    """Any pread of the mounted file returns exactly the source's bytes (short only at the end)."""
    source = point[1]
    off = data.draw(_offsets(point), label="offset")
    size = data.draw(_SIZES, label="size")
    fd = os.open(mount / NAME, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        got = os.pread(fd, size, off)
    finally:
        os.close(fd)
    assert got == source[off:off + size]


def test_sequential_read_matches_source(point, mount):
    """The whole file read front to back (the read-ahead path) matches the source."""
    source = point[1]
    with open(mount / NAME, "rb") as f:
        got = f.read()
    assert got == source


def test_small_random_reads_cost_one_chunk_each(point, tmp_path):
    """4 KiB reads at scattered offsets of a cold mount, as a database reads its pages: each
    loads about the one chunk it falls in, plus each LIST node once, never a run of chunks."""
    safe, source, chunks, lists, _ = point
    data = [(lo, n) for lo, n, hole in chunks if not hole and n >= 3 * 4096]
    rnd = random.Random(5)
    picks = rnd.sample(data, 60)
    mp = tmp_path / "m"
    with mounted(safe, mp, "latest"):
        fd = os.open(mp / NAME, os.O_RDONLY)      # no fadvise: what SQLite does
        try:
            os.pread(fd, 1, 0)                    # open and the size check: the root's LIST node
            before = stats(mp)["objects_read"]
            for lo, n in picks:
                off = (lo + n // 2) & ~4095
                if off < lo:
                    off += 4096
                assert os.pread(fd, 4096, off) == source[off:off + 4096]
            used = stats(mp)["objects_read"] - before
        finally:
            os.close(fd)
    # one chunk per read, and each leaf LIST node at most once; nothing read ahead of the reader
    assert used <= len(picks) + len(lists) + 1, f"{used} objects for {len(picks)} page reads"


def test_page_reads_close_together_load_no_read_ahead(point, tmp_path):
    """A database's page reads hop around one neighbourhood of the file (a B-tree's pages a few
    hundred KiB apart, back and forth): none of that is a sequential reader, so the mount loads
    the chunks those pages lie in and nothing ahead of them."""
    safe, source, chunks, lists, _ = point
    lo = next(a for a, n, hole in chunks if not hole and a >= 12 * MiB)
    rnd = random.Random(9)
    offs: list[int] = []
    while len(offs) < 40:
        off = lo + rnd.randrange(0, 900 << 10) // 4096 * 4096
        if not offs or abs(off - offs[-1]) >= 64 << 10:
            offs.append(off)
    touched = {a for a, n, hole in chunks for off in offs if not hole and a < off + 4096 and off < a + n}
    mp = tmp_path / "m"
    with mounted(safe, mp, "latest"):
        fd = os.open(mp / NAME, os.O_RDONLY)
        try:
            os.pread(fd, 1, 0)
            before = stats(mp)["objects_read"]
            for off in offs:
                assert os.pread(fd, 4096, off) == source[off:off + 4096]
            used = stats(mp)["objects_read"] - before
        finally:
            os.close(fd)
    assert used <= len(touched) + len(lists) + 1, f"{used} objects for {len(touched)} chunks touched"


def test_small_files_read_in_directory_order(tmp_path):
    """tar of a directory of small files through the mount gets every file's bytes, and the
    files after the first few come from the caches: loaded ahead while tar was still on the
    files before them (opens and reads answered without waiting for the safe)."""
    src = tmp_path / "src"
    d = src / "many"
    d.mkdir(parents=True)
    rnd = random.Random(3)
    want = {}
    for i in range(600):
        data = rnd.randbytes(rnd.randrange(0, 20_000)) if i % 3 else b"line %d\n" % i * rnd.randrange(1, 500)
        (d / f"f{i:04}").write_bytes(data)
        want[f"f{i:04}"] = data
    (d / "large.bin").write_bytes(rnd.randbytes(3 * MiB))          # not a small file: read as usual
    want["large.bin"] = (d / "large.bin").read_bytes()
    safe = tmp_path / "safe"
    run_cli("init", safe, check=True)
    run_cli("backup", src, "--name", "small", safe=safe, check=True, timeout=600)
    mp = tmp_path / "m"
    out = tmp_path / "out"
    out.mkdir()
    import subprocess
    with mounted(safe, mp, "latest"):
        p = subprocess.run(f"tar -C {mp} -cf - many | tar -C {out} -xf -", shell=True, capture_output=True,
                           timeout=300)
        assert p.returncode == 0, p.stderr
        s = stats(mp)
    got = {f.name: f.read_bytes() for f in (out / "many").iterdir()}
    assert got == want
    files = sum(1 for v in want.values() if v)
    assert s["opens_here"] >= 0.8 * len(want), s
    assert s["loaded_reads"] <= 0.2 * files, s
