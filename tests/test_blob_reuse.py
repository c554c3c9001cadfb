"""BlobBuilder.add_from (issue 12): an incremental that takes the previous blob's unchanged
stretches (whole LIST subtrees where it can) makes, object for object, the blob that adding
every block makes; and the builder that stores full nodes at once makes the blobs the one that
waited for the next entry made (the blobs already in safes)."""
from __future__ import annotations

import hashlib
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pointsafe.cas import Kind
from pointsafe.cas.blob import BlobBuilder, BlobReader
from pointsafe.cas.nodes import encode_node

CHUNKS = [bytes([0xC0 + i]) * 32 for i in range(6)]   # few keys: children repeat, as zero-free dedup does


class Store:
    """Nodes in a dict, keyed by a hash of their bytes; counts what is stored and read."""

    def __init__(self) -> None:
        self.nodes: dict[bytes, bytes] = {}
        self.puts: list[bytes] = []
        self.gets = 0

    def put(self, kind: int, children: list[bytes], payload: bytes) -> bytes:
        assert kind == Kind.LIST
        raw = encode_node(children, payload)
        key = hashlib.blake2b(raw, digest_size=32).digest()
        self.nodes[key] = raw
        self.puts.append(key)
        return key

    def get(self, key: bytes) -> bytes:
        self.gets += 1
        return self.nodes[key]

    def kind(self, key: bytes) -> int:
        return Kind.LIST if key in self.nodes else Kind.CHUNK

    def reader(self, root: bytes | None, size: int) -> BlobReader:
        return BlobReader(root, size, self.get, self.kind)


class LazyBuilder(BlobBuilder):
    """The builder before add_from: a full node was stored when the entry after it came."""

    def _add(self, level: int, key: bytes | None, length: int) -> None:
        entries = self.levels[level]
        if key is None and entries and entries[-1][0] is None:
            entries[-1][1] += length
            return
        entries.append([key, length])
        if len(entries) > self.fanout:
            node, keep = entries[:-1], entries[-1]
            self.levels[level] = [keep]
            self._emit(level, node)


def blocks_to_entries(blocks: list[bytes | None], block: int, size: int) -> list[tuple[bytes | None, int]]:
    return [(k, min(block, size - i * block)) for i, k in enumerate(blocks)]


def build(store: Store, entries: list[tuple[bytes | None, int]], fanout: int, cls: Any = BlobBuilder):
    b = cls(store.put, fanout)
    for k, n in entries:
        b.add(k, n)
    return b.finish(), b.size


block_st = st.one_of(st.none(), st.sampled_from(CHUNKS))


@st.composite
def volumes(draw):
    """(fanout, block size, size, old blocks, new blocks, changed block spans)."""
    fanout = draw(st.integers(2, 5))
    block = draw(st.sampled_from([1, 4]))
    nblocks = draw(st.integers(1, 150))
    size = (nblocks - 1) * block + draw(st.integers(1, block))
    # long runs of holes and of data, as disks have
    old = draw(st.lists(st.one_of(block_st, st.just(CHUNKS[0])), min_size=nblocks, max_size=nblocks))
    if draw(st.booleans()):
        old = [None if i % 7 in (2, 3) else k for i, k in enumerate(old)]
    new = list(old)
    spans = []
    for _ in range(draw(st.integers(0, 4))):
        a = draw(st.integers(0, nblocks - 1))
        # spans at and across node boundaries: fanout powers
        b = min(nblocks, a + draw(st.sampled_from([1, 2, fanout, fanout ** 2, fanout + 1, 9])))
        for i in range(a, b):
            new[i] = draw(block_st)
        spans.append((a, b))
    spans.sort()
    merged: list[tuple[int, int]] = []
    for a, b in spans:
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(b, merged[-1][1]))
        else:
            merged.append((a, b))
    return fanout, block, size, old, new, merged


def incremental(store: Store, prev: BlobReader, new: list[bytes | None], spans, block: int, size: int, fanout: int):
    """What read_changed does: the unchanged stretches from ``prev``, the changed blocks added."""
    b = BlobBuilder(store.put, fanout)
    pos = 0
    for a, z in spans + [(len(new), len(new))]:
        b.add_from(prev, pos * block, a * block)
        for i in range(a, z):
            b.add(new[i], min(block, size - i * block))
        pos = z
    return b.finish(), b.size


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(volumes())
def test_add_from_makes_the_blob_of_every_block(vol):
    fanout, block, size, old, new, spans = vol
    store = Store()
    old_root, old_size = build(store, blocks_to_entries(old, block, size), fanout)
    assert old_size == size
    full = Store()
    full_root, _ = build(full, blocks_to_entries(new, block, size), fanout)
    store.puts.clear()
    root, got = incremental(store, store.reader(old_root, size), new, spans, block, size, fanout)
    assert (root, got) == (full_root, size)
    # the incremental stores no node the full read would not (nothing of another shape)
    assert set(store.puts) <= set(full.puts) | {full_root}
    # and what it made reads back as the new blocks
    assert list(store.reader(root, size).extents()) == list(full.reader(full_root, size).extents())


@settings(max_examples=300, deadline=None)
@given(st.integers(2, 5), st.lists(st.tuples(block_st, st.integers(1, 9)), max_size=200))
def test_storing_full_nodes_at_once_keeps_the_old_blobs(fanout, entries):
    eager, lazy = Store(), Store()
    assert build(eager, entries, fanout) == build(lazy, entries, fanout, LazyBuilder)
    assert set(eager.puts) == set(lazy.puts)


def test_unchanged_subtrees_are_taken_whole_not_read():
    # 4^5 = 1024 blocks, fanout 4 (five levels), one changed block in the middle
    fanout, block, n = 4, 4, 1024
    old = [CHUNKS[i % 5] for i in range(n)]
    store = Store()
    old_root, size = build(store, blocks_to_entries(old, block, n * block), fanout)
    new = list(old)
    new[517] = CHUNKS[5]
    store.gets, store.puts = 0, []
    root, _ = incremental(store, store.reader(old_root, size), new, [(517, 518)], block, size, fanout)
    assert root == build(Store(), blocks_to_entries(new, block, size), fanout)[0]
    # only the path to the changed block and the blob's last path (which may be partial, so
    # it is rebuilt) are read and stored again: one node per level each, of 1365 nodes
    assert store.gets <= 2 * 5 and len(store.puts) <= 2 * 5


def test_a_chunk_cut_by_the_range_is_refused():
    store = Store()
    root, size = build(store, [(CHUNKS[1], 10), (CHUNKS[2], 10), (None, 5), (CHUNKS[3], 10)], 2)
    b = BlobBuilder(store.put, 2)
    b.add_from(store.reader(root, size), 0, 22)      # a hole may be cut
    try:
        b.add_from(store.reader(root, size), 22, 30)
    except ValueError as e:
        assert "not whole" in str(e)
    else:
        raise AssertionError("a cut chunk was taken")
    one = Store()
    b = BlobBuilder(one.put, 2)
    b.add_from(one.reader(CHUNKS[0], 8), 0, 8)       # a one-chunk blob is the chunk
    assert b.finish() == CHUNKS[0]




def test_read_changed_through_the_pipeline_equals_a_full_read(tmp_path):
    """read_changed in a safe, fanout 4 (four levels over 300 blocks): the incremental's root
    is the full read's, it holds the new volume's bytes, and it read the previous blob's LIST
    nodes on the paths to the changes only."""
    import random

    from pointsafe.cas import Entry, Safe
    from pointsafe.cas.tree import REG
    from pointsafe.ingest.changed_blocks import aligned, read_changed
    from pointsafe.ingest.pipeline import Pipeline
    from pointsafe.ingest.volume import feed

    bs, fanout = 4096, 4
    rnd = random.Random(7)
    old = bytearray(rnd.randbytes(bs * 200) + bytes(bs * 60) + rnd.randbytes(bs * 40 + 99))
    new = bytearray(old)
    # inside a block, zeros over one block (a new hole), data in the hole, the short last block
    changes = [(3 * bs + 5, 10), (63 * bs, bs), (199 * bs, bs), (230 * bs, 3000), (300 * bs + 1, 5)]
    for i, (o, n) in enumerate(changes):
        new[o:o + n] = bytes(n) if i == 1 else rnd.randbytes(n)

    def full(w, data):
        pipe = Pipeline(w, fanout)
        pipe.file(Entry(name=b"v", type=REG))
        feed(lambda n, o: bytes(data[o:o + n]), pipe, bs, 0, len(data), lambda n: None)
        pipe.end()
        return pipe.finish()[0]

    Safe.init(tmp_path / "safe", block_size=bs).close()
    with Safe.open(tmp_path / "safe", write=True) as s:
        w = s.writer("test")
        try:
            prev_root = full(w, old)
            w.flush()
            read: list[bytes] = []
            prev = BlobReader(prev_root, len(old), lambda k: read.append(k) or s.get(k), s.kind)
            pipe = Pipeline(w, fanout)
            spans = aligned(changes, bs, len(new))
            read_changed(lambda n, o: bytes(new[o:o + n]), len(new), pipe, bs, prev, spans, "v")
            inc_root = pipe.finish()[0]
            assert pipe.stats.bytes_read == len(new)
            assert pipe.stats.bytes_scanned == sum(b - a for a, b in spans) == 4 * bs + 99
            assert inc_root == full(w, new)
            w.flush()
            assert BlobReader(inc_root, len(new), s.get, s.kind).read(0, len(new)) == bytes(new)
            # of the blob's 82 LIST nodes: the changed paths, the last one, and after the data
            # written into the hole (two more entries: nothing after it lines up) the ~10 nodes
            # that hold the blocks to the end
            assert len(set(read)) <= 30
        finally:
            w.close()
