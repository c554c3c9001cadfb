"""Index segments without a store: applying several in one transaction (the new machine's fast
catch-up) gives the rows that applying them one by one gives."""

from __future__ import annotations

import random
from pathlib import Path

from pointsafe.cas import segments
from pointsafe.cas.index import Index

Change = tuple[str, bytes, "bytes | None"]


def _segments(rng: random.Random, n: int) -> list[list[Change]]:
    """``n`` segments that put, change and delete the same few hundred rows of three tables,
    each through encode/decode (the bytes a bucket holds)."""
    out = []
    for i in range(n):
        changes: segments.Changes = {}
        for _ in range(rng.randrange(1, 120)):
            table = rng.choice(("objects", "meta", "tombstones"))
            key = rng.randrange(300).to_bytes(2, "big") * rng.choice((1, 16))   # prefixes of each other too
            changes[(table, key)] = None if rng.random() < 0.3 else rng.randbytes(rng.randrange(0, 40))
        out.append(segments.decode(segments.encode(i + 1, changes, None), i + 1, None, f"seg {i + 1}"))
    return out


def _rows(idx: Index) -> dict[str, dict[bytes, bytes]]:
    with idx.read() as t:
        return {name: {bytes(k): bytes(v) for k, v in t.cursor(db=idx.db[name])} for name in segments.JOURNALLED}


def test_apply_many_gives_the_rows_of_apply_one_by_one(tmp_path: Path) -> None:
    rng = random.Random(15)
    segs = _segments(rng, 60)
    one, many = Index(tmp_path / "one", create=True), Index(tmp_path / "many", create=True)
    try:
        for changes in segs:
            with one.env.begin(write=True) as txn:
                segments.apply(one, txn, changes)
        # into empty tables (appended), then into tables that hold rows (put and deleted)
        for part in (segs[:25], segs[25:40], segs[40:]):
            with many.env.begin(write=True) as txn:
                segments.apply_many(many, txn, part)
        expected = _rows(one)
        assert expected["objects"] and expected["meta"] and expected["tombstones"]
        assert _rows(many) == expected
    finally:
        one.close()
        many.close()


def test_segments_are_written_in_key_order() -> None:
    changes: segments.Changes = {("objects", b"\x02"): b"b", ("meta", b"z"): None, ("objects", b"\x01"): b"a"}
    got = segments.decode(segments.encode(1, changes, None), 1, None, "seg 1")
    assert got == [("meta", b"z", None), ("objects", b"\x01", b"a"), ("objects", b"\x02", b"b")]
