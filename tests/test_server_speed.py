"""The server stores what an agent compressed as it came (no second compression), and the
compressed-input path of cas writes the same records as :func:`prepare`."""

from __future__ import annotations

import json
import os

import pytest
import zstandard

from _server_util import add_agent, agent, backup_json, make_safe, running, safe_state
from conftest import PW, run_cli
from pointsafe.cas import Kind, Safe
from pointsafe.cas.crypto import OVERHEAD
from pointsafe.cas.pack import decode_record, prepare
from pointsafe.server import protocol

TEXT = b"".join(b"line %d of a log file that compresses well\n" % i for i in range(3000))


def _record(raw: bytes, frame: bytes | None) -> bytes:
    """An upload stream of one chunk: ``frame`` (zstd) when given, else raw."""
    oid = protocol.agent_id(Kind.CHUNK, raw)
    if frame is None:
        return b"".join(protocol.encode(Kind.CHUNK, oid, protocol.CODEC_RAW, len(raw), raw))
    return b"".join(protocol.encode(Kind.CHUNK, oid, protocol.CODEC_ZSTD, len(raw), frame))


def _entry(safe, raw: bytes):
    with Safe.open(safe, password=PW, write=False) as s:
        sid = s.object_key(Kind.CHUNK, raw)
        return s.entry(sid), s.get(sid)


@pytest.mark.parametrize("encryption", [(), ("--encryption", "none")])
def test_an_uploaded_zstd_frame_is_stored_as_sent_and_reads_back(tmp_path, encryption):
    safe = make_safe(tmp_path, *encryption)
    tok = add_agent(safe, "a")
    # a frame the safe's own compressor would not write (it adds a checksum): the server
    # stores the agent's frame, it does not compress the bytes again
    frame = zstandard.ZstdCompressor(level=3, write_checksum=True).compress(TEXT)
    with running(safe) as server:
        r = server.client(tok).post("/api/v1/objects", content=_record(TEXT, frame))
        assert r.status_code == 200, r.text
    e, got = _entry(safe, TEXT)
    assert got == TEXT
    assert e.codec == 1 and e.stored_len == len(frame) + (OVERHEAD if not encryption else 0)
    assert run_cli("verify", safe=safe).code == 0


def test_a_chunk_sent_raw_is_stored_raw_and_one_whose_frame_is_larger_too(tmp_path):
    safe = make_safe(tmp_path)
    tok = add_agent(safe, "a")
    noise = os.urandom(50_000)
    bloated = zstandard.ZstdCompressor(level=1).compress(noise)    # larger than the bytes
    assert len(bloated) > len(noise)
    with running(safe) as server:
        c = server.client(tok)
        assert c.post("/api/v1/objects", content=_record(TEXT, None)).status_code == 200
        assert c.post("/api/v1/objects", content=_record(noise, bloated)).status_code == 200
    for raw in (TEXT, noise):
        e, got = _entry(safe, raw)
        assert got == raw and e.codec == 0 and e.stored_len == len(raw) + OVERHEAD


def test_bytes_after_the_zstd_frame_are_refused_and_nothing_is_stored(tmp_path):
    safe = make_safe(tmp_path)
    tok = add_agent(safe, "a")
    frame = zstandard.ZstdCompressor(level=3).compress(TEXT)
    with running(safe) as server:
        before = safe_state(safe)
        r = server.client(tok).post("/api/v1/objects", content=_record(TEXT, frame + b"\0" * 4096))
        assert r.status_code == 400 and "does not decompress" in r.json()["error"], r.text
        assert safe_state(safe) == before


def test_a_backup_through_the_server_is_stored_compressed_and_restores(tmp_path):
    safe = make_safe(tmp_path)
    tok = add_agent(safe, "a", "--can-restore")
    src = tmp_path / "src"
    src.mkdir()
    (src / "log").write_bytes(TEXT * 20)
    (src / "noise").write_bytes(os.urandom(300_000))
    with running(safe) as server:
        out = backup_json(server, tok, src)
        r = agent(server, tok, "restore", out["id"], tmp_path / "back")
        assert r.code == 0, r.err
    assert (tmp_path / "back" / "log").read_bytes() == TEXT * 20
    assert (tmp_path / "back" / "noise").read_bytes() == (src / "noise").read_bytes()
    with Safe.open(safe, password=PW, write=False) as s:
        c = s.counters()
        assert c.pack_bytes < len(TEXT) * 20 // 4 + 400_000      # the log went in compressed
    assert run_cli("verify", safe=safe).code == 0


@pytest.mark.parametrize("encrypted", [False, True])
def test_prepare_compressed_writes_the_record_prepare_writes(tmp_path, encrypted):
    from pointsafe.cas.pack import prepare_compressed
    s = Safe.init(tmp_path / "s", encryption="aes-256-gcm" if encrypted else "none",
                  password=PW if encrypted else None)
    try:
        key = s.object_key(Kind.CHUNK, TEXT)
        p = prepare(Kind.CHUNK, TEXT, 3, key=key, crypto=s.crypto)
        frame = zstandard.ZstdCompressor(level=3).compress(TEXT)
        q = prepare_compressed(Kind.CHUNK, frame, len(TEXT), key, s.crypto)
        if not encrypted:          # deterministic: the very same record
            assert q.record() == p.record()
        assert (q.codec, q.raw_len, q.key, len(q.stored)) == (p.codec, p.raw_len, p.key, len(p.stored))
        h, raw = decode_record(q.record(), 1, 16, crypto=s.crypto)
        assert raw == TEXT and h.key == key
        with pytest.raises(ValueError):
            prepare_compressed(Kind.CHUNK, frame, len(frame), key, s.crypto)
    finally:
        s.close()


def _fetch_requests(safe) -> int:
    r = run_cli("tasks", "--json", safe=safe)
    assert r.code == 0, r.err
    tasks = json.loads(r.out)
    return sum(1 for t in tasks if "/api/v1/objects/fetch" in json.dumps(t))


def test_change_detection_through_the_server_fetches_trees_in_batches(tmp_path):
    safe = make_safe(tmp_path)
    tok = add_agent(safe, "wide")
    src = tmp_path / "src"
    for i in range(120):                       # 241 directories: 1 + 120 + 120
        (src / f"d{i:03d}" / "sub").mkdir(parents=True)
        (src / f"d{i:03d}" / "sub" / "f").write_bytes(b"file %d\n" % i)
    with running(safe) as server:
        backup_json(server, tok, src)
        before = _fetch_requests(safe)
        second = backup_json(server, tok, src)
        fetches = _fetch_requests(safe) - before
    assert second["stats"]["bytes_read"] == 0 and second["upload"]["objects_uploaded"] == 0
    assert second["stats"]["files"] == 120
    # one request per tree would be 241; batches of subdirectories take a handful
    assert 0 < fetches <= 30, fetches
