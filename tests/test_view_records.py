"""The one record decoder (``cas.pack``) as the mount uses it: checked, and zero-copy for raw records."""

from __future__ import annotations

import os
import random

import pytest

from pointsafe.cas import IntegrityError, Kind, Safe, prepare
from pointsafe.cas.pack import CODEC_RAW, CODEC_ZSTD, REC_HEADER_SIZE, decode_record, decode_record_view
from pointsafe.fusefs.objects import ChunkSource


def _record(data: bytes, level: int | None = 1) -> tuple[bytes, bytes, int]:
    p = prepare(Kind.CHUNK, data, level)
    return p.key, p.record(), p.codec


def test_a_raw_record_comes_back_as_a_view_of_the_buffer():
    key, rec, codec = _record(os.urandom(50_000))
    assert codec == CODEC_RAW
    buf = b"\0" * 100 + rec + b"\0" * 7                # a record inside a larger read
    mv = memoryview(buf)[100:100 + len(rec)]
    h, raw = decode_record_view(mv, 1, 100, rehash=False, expect_key=key)
    assert isinstance(raw, memoryview) and raw.obj is buf     # no copy
    assert bytes(raw) == rec[REC_HEADER_SIZE:] and h.key == key
    _, copied = decode_record(mv, 1, 100, expect_key=key)
    assert type(copied) is bytes and copied == bytes(raw)


def test_a_compressed_record_is_decompressed():
    data = b"compressible " * 5000
    key, rec, codec = _record(data)
    assert codec == CODEC_ZSTD
    for decode in (decode_record_view, decode_record):
        _, raw = decode(rec, 1, 16, rehash=True, expect_key=key)
        assert type(raw) is bytes and raw == data


@pytest.mark.parametrize("data", [os.urandom(20_000), b"compressible " * 2000])
@pytest.mark.parametrize("where", [10, 45, 62, REC_HEADER_SIZE + 5, -1])
def test_a_flipped_byte_anywhere_is_an_integrity_error(data, where):
    key, rec, _ = _record(data)
    bad = bytearray(rec)
    bad[where] ^= 0x01
    for decode in (decode_record_view, decode_record):
        with pytest.raises(IntegrityError) as e:
            decode(bytes(bad), 7, 4096, rehash=False, expect_key=key)
        assert "offset 4096" in str(e.value)


def test_a_record_of_another_object_is_refused():
    key, rec, _ = _record(b"one object")
    other, _, _ = _record(b"another object")
    with pytest.raises(IntegrityError, match="index expected"):
        decode_record_view(rec, 1, 16, expect_key=other)
    assert decode_record_view(rec, 1, 16, expect_key=key)[1] == b"one object"


def test_the_mount_serves_a_lone_raw_chunk_without_copying_and_checks_each(safe_dir):
    rng = random.Random(9)
    chunks = [rng.randbytes(40_000) for _ in range(3)] + [b"squeeze me " * 4000]
    with Safe.open(safe_dir) as s:
        with s.writer("test") as w:
            keys = [w.put(Kind.CHUNK, c) for c in chunks]
        src = ChunkSource(s, 64 << 20)
        try:
            alone = src.get_many([keys[0]])[keys[0]]
            assert isinstance(alone, memoryview) and bytes(alone) == chunks[0]
            assert len(alone.obj) == s.entry(keys[0]).record_len      # a view of its own record's read
            together = src.get_many(keys[1:])
            for k, c in zip(keys[1:], chunks[1:]):
                assert bytes(together[k]) == c
                assert not isinstance(together[k], memoryview)        # copied out of a shared read
        finally:
            src.close()
