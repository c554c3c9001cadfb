"""docs/FORMAT.md is enough to read a safe: a second reader written from it alone (struct,
zlib, blake3, zstandard, lmdb; for an encrypted safe also cryptography and argon2-cffi; nothing
from pointsafe.cas) reads what the safe wrote."""

from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path

import blake3
import lmdb
import pytest
import zstandard
from argon2.low_level import Type, hash_secret_raw
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from pointsafe.cas import Safe
from pointsafe.cas.release import forget_points

from _cas_util import make_point

# --- the second reader, from docs/FORMAT.md -----------------------------------------------


def read_header(safe: Path) -> tuple[int, dict]:
    data = (safe / "header").read_bytes()
    magic, version, n = struct.unpack_from("<8sII", data)
    assert magic == b"PNTSAFE\0"
    (crc,) = struct.unpack_from("<I", data, 16 + n)
    assert zlib.crc32(data[:16 + n]) == crc
    return version, json.loads(data[16:16 + n])


AEADS = {1: AESGCM, 2: ChaCha20Poly1305, "aes-256-gcm": AESGCM, "chacha20-poly1305": ChaCha20Poly1305}


def walk_pack(path: Path, keys: dict | None = None):
    """Yield (offset, kind, key, raw bytes) for every record of a pack; ``keys`` are an
    encrypted safe's derived keys (``unlock``)."""
    data = path.read_bytes()
    magic, pack_id = struct.unpack_from("<8sQ", data)
    assert magic == b"PSPACK\0\1" and pack_id == int(path.name[:16], 16)
    off = 16
    while off < len(data):
        head = data[off:off + 64]
        magic, kind, codec, cipher, key, raw_len, stored_len, check, crc = struct.unpack("<4sBBH32sII12sI", head)
        assert magic == b"PSR\1" and zlib.crc32(head[:60]) == crc
        stored = data[off + 64:off + 64 + stored_len]
        assert blake3.blake3(stored).digest()[:12] == check
        if keys is None:
            assert cipher == 0
            payload = stored
        else:
            salt = stored[:24]
            subkey = blake3.blake3(salt, key=keys["data"]).digest()
            payload = AEADS[cipher](subkey).decrypt(bytes(12), stored[24:], head[:48])
            assert len(payload) == stored_len - 40
        raw = zstandard.ZstdDecompressor().decompress(payload) if codec == 1 else payload
        want = blake3.blake3(bytes([kind]) + raw, **({} if keys is None else {"key": keys["id"]})).digest()
        assert len(raw) == raw_len and want == key
        yield pack_id, off, kind, key, raw
        off += 64 + stored_len


CONTEXTS = {"data": "pointsafe 2026-12 data key", "id": "pointsafe 2026-12 id key",
            "header": "pointsafe 2026-12 header key", "index": "pointsafe 2026-12 index key"}


def unlock(safe: Path, password: bytes, config: dict) -> dict:
    """The derived keys of an encrypted safe, from its one key slot and ``password``; checks
    the header's ``auth``."""
    (slot_file,) = (safe / "keys").iterdir()
    slot = json.loads(slot_file.read_bytes())
    assert slot["kdf"] == "argon2id" and slot["slot"] == slot_file.name[:8]
    kek = hash_secret_raw(password, bytes.fromhex(slot["salt"]), time_cost=slot["t"],
                          memory_cost=slot["m_kib"], parallelism=slot["p"], hash_len=32, type=Type.ID)
    aad = b"pointsafe-slot" + config["safe_id"].encode() + slot["slot"].encode()
    master = AESGCM(kek).decrypt(bytes.fromhex(slot["nonce"]), bytes.fromhex(slot["wrapped"]), aad)
    keys = {name: blake3.blake3(master, derive_key_context=ctx).digest() for name, ctx in CONTEXTS.items()}
    canon = dict(config, encryption={k: v for k, v in config["encryption"].items() if k != "auth"})
    text = json.dumps(canon, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
    assert blake3.blake3(text, key=keys["header"]).hexdigest() == config["encryption"]["auth"]
    keys["cipher"] = config["encryption"]["cipher"]
    return keys


def open_value(keys: dict, table: bytes, row: bytes, value: bytes) -> bytes:
    sub = blake3.blake3(value[:24], key=keys["index"]).digest()
    return AEADS[keys["cipher"]](sub).decrypt(bytes(12), value[24:], table + row)


def split_node(raw: bytes) -> tuple[list[bytes], bytes]:
    (n,) = struct.unpack_from("<I", raw)
    return [raw[4 + 32 * i:36 + 32 * i] for i in range(n)], raw[4 + 32 * n:]


def blob_bytes(objects: dict, kinds: dict, ref: bytes | None, size: int) -> bytes:
    if ref is None:
        return b""
    if kinds[ref] == 1:
        return objects[ref]
    children, payload = split_node(objects[ref])
    level, m = struct.unpack_from("<BI", payload)
    out = b""
    for i in range(m):
        idx, length = struct.unpack_from("<IQ", payload, 5 + 12 * i)
        out += bytes(length) if idx == 0xFFFFFFFF else blob_bytes(objects, kinds, children[idx], length)
    assert len(out) == size
    return out


def tree_entries(raw: bytes) -> dict[bytes, tuple[int, int, bytes | None, bytes]]:
    children, p = split_node(raw)
    (count,) = struct.unpack_from("<I", p)
    off = 4
    out = {}
    for _ in range(count):
        f = struct.unpack_from("<HBHIIqqqQQQIQQIHH", p, off)
        nl, typ, size, child, tl, nx = f[0], f[1], f[8], f[14], f[15], f[16]
        off += 89
        name = p[off:off + nl]
        off += nl + tl
        for _ in range(nx):
            xn, xv = struct.unpack_from("<HI", p, off)
            off += 6 + xn + xv
        out[name] = (typ, size, None if child == 0xFFFFFFFF else children[child], b"")
    return out


# --- the test ------------------------------------------------------------------------------


def test_a_second_reader_from_the_format_doc(safe_dir):
    a, b = os.urandom(70_000), b"compressible " * 5000
    with Safe.open(safe_dir) as safe:
        with safe.writer() as w:
            p = make_point(w, "doc", {b"a": [a, 300_000, b], b"empty": []}, fanout=2,
                           subdir={b"inner": [b]})
            gone = make_point(w, "doc", {b"x": [b"bye"]})
            forget_points(w, [bytes.fromhex(gone.id)])

    version, config = read_header(safe_dir)
    assert (safe_dir / "header.copy").read_bytes() == (safe_dir / "header").read_bytes()
    assert version == 3 and config["pack_size"] == 256 * 1024 and len(config["safe_id"]) == 32

    objects, kinds, places = {}, {}, {}
    for path in sorted((safe_dir / "packs").iterdir()):
        for pack_id, off, kind, key, raw in walk_pack(path):
            objects.setdefault(key, raw)
            kinds.setdefault(key, kind)
            places.setdefault(key, (pack_id, off))

    env = lmdb.open(str(safe_dir / "index"), readonly=True, lock=False, max_dbs=64)
    try:
        with env.begin() as t:
            db_objects = env.open_db(b"objects", txn=t, create=False)
            db_packs = env.open_db(b"packs", txn=t, create=False)
            db_points = env.open_db(b"points", txn=t, create=False)
            db_tombs = env.open_db(b"tombstones", txn=t, create=False)
            db_meta = env.open_db(b"meta", txn=t, create=False)
            index = {bytes(k): struct.unpack("<QQIIBBHI", v) for k, v in t.cursor(db=db_objects)}
            packs = {struct.unpack(">Q", k)[0]: struct.unpack("<QQQQII", v) for k, v in t.cursor(db=db_packs)}
            points = {bytes(k): json.loads(v) for k, v in t.cursor(db=db_points)}
            tombs = {bytes(k): bytes(v) for k, v in t.cursor(db=db_tombs)}
            next_pack = struct.unpack("<Q", t.get(b"next_pack", db=db_meta))[0]
    finally:
        env.close()

    assert set(index) == set(objects)
    for key, (pack, off, _stored_len, raw_len, kind, _codec, _flags, _refcount) in index.items():
        assert (pack, off) == places[key] and kind == kinds[key] and raw_len == len(objects[key])
    assert next_pack > max(packs)
    for pid, (committed, _live, _dead, _created, n, _sealed) in packs.items():
        assert (safe_dir / "packs" / f"{pid:016x}.pack").stat().st_size == committed
        assert n == sum(1 for e in index.values() if e[0] == pid)

    # The forgotten point is a tombstone naming it; the live one reads back in full.
    gone_key = bytes.fromhex(gone.id)
    assert list(points) == [bytes.fromhex(p.id)] and gone_key in tombs
    assert kinds[tombs[gone_key]] == 5 and split_node(objects[tombs[gone_key]]) == ([], gone_key)
    assert index[gone_key][6] & 1 and index[gone_key][7] == 0          # dead, count 0
    pkey = bytes.fromhex(p.id)
    children, payload = split_node(objects[pkey])
    record = json.loads(payload)
    assert "id" not in record and record["root"] == p.root.hex() and children == [p.root]
    assert points[pkey] == {**record, "id": p.id}
    top = tree_entries(objects[children[0]])
    assert blob_bytes(objects, kinds, top[b"a"][2], top[b"a"][1]) == a + bytes(300_000) + b
    assert top[b"empty"][2] is None and top[b"empty"][1] == 0
    inner = tree_entries(objects[top[b"sub"][2]])
    assert blob_bytes(objects, kinds, inner[b"inner"][2], inner[b"inner"][1]) == b
    # Counts: the point has its one reference; the top tree has its point.
    assert index[pkey][7] == 1 and index[children[0]][7] == 1


@pytest.mark.parametrize("cipher", ["aes-256-gcm", "chacha20-poly1305"])
def test_a_second_reader_decrypts_an_encrypted_safe_from_the_format_doc(tmp_path, monkeypatch, cipher):
    monkeypatch.setenv("POINTSAFE_KDF_MEMORY_KIB", "8192")
    monkeypatch.setenv("POINTSAFE_KDF_TIME", "1")
    safe_dir = tmp_path / "safe"
    a, b = os.urandom(70_000), b"compressible " * 5000
    with Safe.init(safe_dir, pack_size=256 * 1024, encryption=cipher, password=b"doc pw") as safe:
        with safe.writer() as w:
            p = make_point(w, "secret-name", {b"a": [a, 300_000, b]}, fanout=2, subdir={b"inner": [b]})

    version, config = read_header(safe_dir)
    assert version == 4 and config["encryption"]["cipher"] == cipher
    keys = unlock(safe_dir, b"doc pw", config)

    objects, kinds = {}, {}
    for path in sorted((safe_dir / "packs").iterdir()):
        assert b"compressible" not in path.read_bytes()
        for _pack_id, _off, kind, key, raw in walk_pack(path, keys):
            objects.setdefault(key, raw)
            kinds.setdefault(key, kind)

    env = lmdb.open(str(safe_dir / "index"), readonly=True, lock=False, max_dbs=64)
    try:
        with env.begin() as t:
            db_points = env.open_db(b"points", txn=t, create=False)
            sealed = {bytes(k): bytes(v) for k, v in t.cursor(db=db_points)}
    finally:
        env.close()
    pkey = bytes.fromhex(p.id)
    assert list(sealed) == [pkey] and b"secret-name" not in sealed[pkey]
    record = json.loads(open_value(keys, b"points", pkey, sealed[pkey]))
    assert record["name"] == "secret-name" and record["id"] == p.id
    children, payload = split_node(objects[pkey])
    assert json.loads(payload) == {k: v for k, v in record.items() if k != "id"}
    top = tree_entries(objects[children[0]])
    assert blob_bytes(objects, kinds, top[b"a"][2], top[b"a"][1]) == a + bytes(300_000) + b
    inner = tree_entries(objects[top[b"sub"][2]])
    assert blob_bytes(objects, kinds, inner[b"inner"][2], inner[b"inner"][1]) == b
