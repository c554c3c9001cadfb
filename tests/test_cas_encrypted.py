"""Encryption at rest, the data (issue 14): every kind of point round-trips through an
encrypted safe, and a changed byte anywhere in a record is an integrity error naming the pack
and offset (EIO in the mount), never wrong bytes. Python API (ingest.backup / ingest.restore,
fusefs.View) and one real FUSE mount in a subprocess."""

from __future__ import annotations

import errno
import os
import random
import shutil
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import blake3
import pytest

from _fuse_util import unmount
from _tree_util import all_types_tree, assert_trees_equal, make_tree, snapshot
from conftest import needs_fuse, needs_root
from pointsafe.cas import CIPHERS, IntegrityError, Kind, NeedsPassword, Safe, repair, verify
from pointsafe.cas.pack import REC_HEADER_SIZE, check_record
from pointsafe.ingest.backup import BackupOptions, backup
from pointsafe.ingest.restore import restore

PW = b"a long password"


@pytest.fixture(autouse=True)
def weak_kdf(monkeypatch):
    monkeypatch.setenv("POINTSAFE_KDF_MEMORY_KIB", "8192")
    monkeypatch.setenv("POINTSAFE_KDF_TIME", "1")


def _init(path: Path, cipher: str = "aes-256-gcm") -> Path:
    Safe.init(path, pack_size=256 * 1024, encryption=cipher, password=PW).close()
    return path


def _record(safe: Safe, key: bytes) -> tuple[Path, int, bytearray]:
    """(pack file, offset, the whole record's bytes) of object ``key``."""
    e = safe.entry(key)
    path = safe.pack_path(e.pack)
    with open(path, "rb") as f:
        f.seek(e.offset)
        return path, e.offset, bytearray(f.read(e.record_len))


def _write_forged(path: Path, offset: int, rec: bytearray) -> None:
    """Write ``rec`` at ``offset`` with its check and header CRC made to hold again: what anyone
    can do without the key. Only the authentication tag can catch it then."""
    rec[48:60] = blake3.blake3(bytes(rec[REC_HEADER_SIZE:])).digest()[:12]
    rec[60:64] = zlib.crc32(bytes(rec[:60])).to_bytes(4, "little")
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(rec)


def _chunks(safe_dir: Path, n: int = 3, size: int = 40_000) -> list[tuple[bytes, bytes]]:
    """``n`` random chunks of one length stored in the safe: [(key, data)]."""
    rng = random.Random(5)
    out = []
    with Safe.open(safe_dir, password=PW) as s, s.writer() as w:
        for _ in range(n):
            data = rng.randbytes(size)
            out.append((w.put(Kind.CHUNK, data), data))
    return out


@needs_root
@pytest.mark.parametrize("cipher", CIPHERS)
def test_a_tree_with_every_entry_type_round_trips_byte_for_byte(tmp_path, cipher):
    safe_dir = _init(tmp_path / "safe", cipher)
    src = make_tree(tmp_path / "src", all_types_tree(seed=3))
    before = snapshot(src)
    with Safe.open(safe_dir, password=PW) as s:
        res = backup(s, str(src), BackupOptions(name="all"))
        assert res.warnings == []
        point = s.points()[0]
        assert point.id == res.point.id and point.name == "all"
        restore(s, point, str(tmp_path / "out"))
        assert verify(s, data=True).ok
    assert_trees_equal(before, tmp_path / "out")
    # No file name, content or point name is in the packs or the index in the clear.
    blobs = [p.read_bytes() for p in (safe_dir / "packs").iterdir()]
    blobs.append((safe_dir / "index" / "data.mdb").read_bytes())
    for needle in (b"setuid", b"hello\n", b"#!/bin/sh", b'"all"'):
        assert not any(needle in b for b in blobs), needle


@pytest.mark.parametrize("cipher", CIPHERS)
def test_a_volume_round_trips(tmp_path, cipher):
    safe_dir = _init(tmp_path / "safe", cipher)
    rng = random.Random(9)
    image = tmp_path / "disk.img"
    data = rng.randbytes(700_000) + bytes(300_000) + b"text block " * 50_000
    image.write_bytes(data)
    with Safe.open(safe_dir, password=PW) as s:
        res = backup(s, str(image), BackupOptions(name="disk", volume=True))
        assert res.point.kind == "volume" and res.point.size == len(data)
        restore(s, res.point, str(tmp_path / "out.img"))
    assert (tmp_path / "out.img").read_bytes() == data
    with Safe.open(safe_dir, password=PW) as s:    # an unchanged second backup stores nothing new
        again = backup(s, str(image), BackupOptions(name="disk", volume=True))
        assert again.point.root == res.point.root


SPOTS = {
    "ciphertext": lambda rec: REC_HEADER_SIZE + 24 + 100,
    "tag": lambda rec: len(rec) - 3,
    "salt": lambda rec: REC_HEADER_SIZE + 5,
    "record header (kind)": lambda rec: 4,
    "record header (raw length)": lambda rec: 41,
}


@pytest.mark.parametrize("spot", SPOTS)
def test_a_flipped_bit_anywhere_in_a_record_is_detected(tmp_path, spot):
    safe_dir = _init(tmp_path / "safe")
    (key, data), (other, odata) = _chunks(safe_dir, 2)
    with Safe.open(safe_dir, password=PW) as s:
        path, off, rec = _record(s, key)
        rec[SPOTS[spot](rec)] ^= 0x04
        _write_forged(path, off, rec)
        with pytest.raises(IntegrityError) as e:
            s.get(key)
        assert e.value.offset == off and f"offset {off}" in str(e.value) and path.name in str(e.value)
        assert s.get(other) == odata
        rep = verify(s)
        assert not rep.ok and any(err.get("offset") == off and err.get("pack") == path.name
                                  for err in rep.errors), rep.errors


def test_a_flipped_bit_fails_the_framing_checks_without_the_key_too(tmp_path):
    safe_dir = _init(tmp_path / "safe")
    ((key, _),) = _chunks(safe_dir, 1)
    with Safe.open(safe_dir, password=PW) as s:
        path, off, rec = _record(s, key)
        with open(path, "r+b") as f:
            f.seek(off + REC_HEADER_SIZE + 30)
            f.write(bytes([rec[REC_HEADER_SIZE + 30] ^ 1]))
        with pytest.raises(IntegrityError) as e:
            s.get(key)
        assert e.value.offset == off
        _, _, now = _record(s, key)
    with pytest.raises(IntegrityError, match="checksum mismatch"):
        check_record(bytes(now), 1, off)       # framing: no key needed


def test_a_record_copied_over_another_of_the_same_length_is_detected(tmp_path):
    safe_dir = _init(tmp_path / "safe")
    (a, _), (b, bdata), (c, cdata) = _chunks(safe_dir, 3)
    with Safe.open(safe_dir, password=PW) as s:
        pa, oa, ra = _record(s, a)
        _, _, rb = _record(s, b)
        assert len(ra) == len(rb)
        with open(pa, "r+b") as f:             # b's record, as it is, in a's place
            f.seek(oa)
            f.write(rb)
        with pytest.raises(IntegrityError, match="index expected"):
            s.get(a)
        rb[8:40] = a                           # ... and relabelled as a (check and CRC fixed)
        _write_forged(pa, oa, rb)
        with pytest.raises(IntegrityError, match="authentication") as e:
            s.get(a)
        assert e.value.offset == oa
        assert s.get(b) == bdata and s.get(c) == cdata


def test_a_plaintext_record_forged_into_an_encrypted_safe_is_refused(tmp_path):
    safe_dir = _init(tmp_path / "safe")
    ((key, _),) = _chunks(safe_dir, 1)
    with Safe.open(safe_dir, password=PW) as s:
        path, off, rec = _record(s, key)
        forged = bytearray(rec)
        forged[5:8] = b"\0\0\0"                # codec raw, cipher none
        body = b"evil" * ((len(rec) - REC_HEADER_SIZE) // 4)
        forged[REC_HEADER_SIZE:] = body
        forged[40:48] = len(body).to_bytes(4, "little") * 2
        _write_forged(path, off, forged)
        with pytest.raises(IntegrityError, match="not encrypted"):
            s.get(key)


def test_repair_rebuilds_an_encrypted_index_only_with_the_key(tmp_path):
    safe_dir = _init(tmp_path / "safe")
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "f").write_bytes(random.Random(2).randbytes(300_000))
    (src / "g").write_text("hello\n" * 1000)
    with Safe.open(safe_dir, password=PW) as s:
        point = backup(s, str(src), BackupOptions(name="data")).point
    shutil.rmtree(safe_dir / "index")
    with pytest.raises(NeedsPassword, match="repair needs its password"):
        repair(safe_dir)
    assert not (safe_dir / "index").exists()
    keys_before = {p.name: p.read_bytes() for p in (safe_dir / "keys").iterdir()}
    rep = repair(safe_dir, password=lambda: PW)
    assert rep.points == 1 and rep.damaged == []
    assert {p.name: p.read_bytes() for p in (safe_dir / "keys").iterdir()} == keys_before
    with Safe.open(safe_dir, password=PW) as s:
        (p,) = s.points()
        assert p.id == point.id and p.name == "data"
        restore(s, p, str(tmp_path / "out"))
        assert verify(s, data=True).ok
    assert (tmp_path / "out" / "d" / "f").read_bytes() == (src / "d" / "f").read_bytes()


def test_repair_reports_a_forged_record_as_damage_and_keeps_the_rest(tmp_path):
    safe_dir = _init(tmp_path / "safe")
    (a, _), (b, bdata) = _chunks(safe_dir, 2)
    with Safe.open(safe_dir, password=PW) as s:
        path, off, rec = _record(s, a)
    rec[REC_HEADER_SIZE + 200] ^= 0x80
    _write_forged(path, off, rec)
    rep = repair(safe_dir, password=PW)
    assert [(d["pack"], d["offset"]) for d in rep.damaged] == [(path.name, off)]
    with Safe.open(safe_dir, password=PW) as s:
        assert s.get(b) == bdata and not s.has(a)


def test_verify_with_data_decrypts_and_rehashes_every_object(tmp_path):
    safe_dir = _init(tmp_path / "safe", "chacha20-poly1305")
    chunks = _chunks(safe_dir, 4)
    with Safe.open(safe_dir, password=PW) as s:
        rep = verify(s, data=True)
        assert rep.ok, rep.errors
        assert rep.objects == 4
        path, off, rec = _record(s, chunks[2][0])
    rec[-1] ^= 1
    _write_forged(path, off, rec)
    with Safe.open(safe_dir, password=PW) as s:
        for data in (False, True):
            rep = verify(s, data=data)
            assert [(e["pack"], e["offset"]) for e in rep.errors if "offset" in e] == [(path.name, off)]


def _tampered_view_safe(tmp_path: Path) -> tuple[Path, dict[str, bytes], bytes]:
    """An encrypted safe with one point of two files; the middle chunk of big.bin forged."""
    safe_dir = _init(tmp_path / "safe")
    src = tmp_path / "src"
    src.mkdir()
    files = {"big.bin": random.Random(4).randbytes(1_200_000), "fine.txt": b"still readable\n"}
    for name, data in files.items():
        (src / name).write_bytes(data)
    with Safe.open(safe_dir, password=PW) as s:
        backup(s, str(src), BackupOptions(name="m"))
        master = s.master_key
    return safe_dir, files, master


def _forge_middle_chunk(s: Safe, view, node) -> tuple[int, int]:
    from test_view import extents
    chunks = [(lo, n, k) for lo, n, k in extents(view, node) if k is not None]
    lo, n, key = chunks[len(chunks) // 2]
    path, off, rec = _record(s, key)
    rec[REC_HEADER_SIZE + 24 + n // 3] ^= 0x01
    _write_forged(path, off, rec)
    return lo, n


def test_the_view_reads_the_right_bytes_and_eio_on_a_forged_record(tmp_path):
    from pointsafe.fusefs.ops import _errno
    from pointsafe.fusefs.view import Damaged, View
    from test_view import read_all, resolve
    safe_dir, files, _ = _tampered_view_safe(tmp_path)
    with Safe.open(safe_dir, password=PW) as s:
        v = View(s, s.points()[0])
        try:
            node = resolve(v, "big.bin")
            assert read_all(v, node) == files["big.bin"]
        finally:
            v.close()
    with Safe.open(safe_dir, password=PW) as s:
        v = View(s, s.points()[0])
        try:
            node = resolve(v, "big.bin")
            lo, n = _forge_middle_chunk(s, v, node)
            fh = v.open(node.ino, os.O_RDONLY)
            try:
                with pytest.raises(Damaged) as err:
                    v.read(fh, lo, n)
                assert _errno(err.value) == errno.EIO
                data = files["big.bin"]
                assert bytes(v.read(fh, 0, lo)) == data[:lo]
            finally:
                v.release(fh)
            assert read_all(v, resolve(v, "fine.txt")) == files["fine.txt"]
        finally:
            v.close()


MOUNT_SCRIPT = textwrap.dedent("""
    import sys
    from pathlib import Path
    from pointsafe.fusefs.runner import MountOptions, mount
    key = bytes.fromhex(sys.stdin.readline().strip())
    m = mount(MountOptions(safe=Path(sys.argv[1]), mountpoint=Path(sys.argv[2]), log_file=Path(sys.argv[3]),
                           master_key=key))
    print(m.pid, flush=True)
""")


@needs_fuse
def test_a_real_mount_of_an_encrypted_safe_reads_the_right_bytes_and_eio_when_forged(tmp_path):
    safe_dir, files, master = _tampered_view_safe(tmp_path)
    mp = tmp_path / "mnt"
    mp.mkdir()
    p = subprocess.run([sys.executable, "-c", MOUNT_SCRIPT, str(safe_dir), str(mp), str(tmp_path / "mount.log")],
                       input=master.hex().encode() + b"\n", capture_output=True, timeout=120)
    assert p.returncode == 0, p.stderr.decode()
    try:
        bigs = sorted(mp.rglob("big.bin"))     # the point's folder and its "latest" alias
        assert bigs and all(b.read_bytes() == files["big.bin"] for b in bigs), bigs
        with Safe.open(safe_dir, password=PW) as s:
            from pointsafe.fusefs.view import View
            from test_view import resolve
            v = View(s, s.points()[0])
            try:
                lo, n = _forge_middle_chunk(s, v, resolve(v, "big.bin"))
            finally:
                v.close()
        # The mount cached what it read: read through a fresh mount.
        unmount(mp)
        p = subprocess.run([sys.executable, "-c", MOUNT_SCRIPT, str(safe_dir), str(mp),
                            str(tmp_path / "mount.log")],
                           input=master.hex().encode() + b"\n", capture_output=True, timeout=120)
        assert p.returncode == 0, p.stderr.decode()
        big = sorted(mp.rglob("big.bin"))[0]
        with open(big, "rb") as f:
            f.seek(lo)
            with pytest.raises(OSError) as err:
                f.read(n)
            assert err.value.errno == errno.EIO
        fine = sorted(mp.rglob("fine.txt"))[0]
        assert fine.read_bytes() == files["fine.txt"]
    finally:
        unmount(mp)


def test_forget_gc_and_defrag_keep_an_encrypted_safe_readable(tmp_path):
    from pointsafe.cas.release import forget_points
    from pointsafe.gc.collect import run_gc
    from pointsafe.gc.defrag import defrag
    from _cas_util import check_point, make_point
    safe_dir = _init(tmp_path / "safe")
    rng = random.Random(3)
    with Safe.open(safe_dir, password=PW) as s:
        with s.writer() as w:
            pts = [make_point(w, f"p{i}", {f"f{j}".encode(): [rng.randbytes(30_000)] for j in range(6)})
                   for i in range(4)]
            forget_points(w, [bytes.fromhex(p.id) for p in pts[:3]])
        before = {p.id: p for p in s.points()}
        salts_before = {k: _record(s, k)[2][REC_HEADER_SIZE:REC_HEADER_SIZE + 24]
                        for k in (bytes.fromhex(pts[3].id), pts[3].root)}
        where = {k: (s.entry(k).pack, s.entry(k).offset) for k in salts_before}
        run_gc(s, threshold=0.0)
        defrag(s, threshold=0.0)
        assert any((s.entry(k).pack, s.entry(k).offset) != where[k] for k in where), "nothing moved"
        assert set(before) == {p.id for p in s.points()} == {pts[3].id}
        assert check_point(s, s.points()[0]) > 6
        rep = verify(s, data=True)
        assert rep.ok, rep.errors
        # Relocation copies records verbatim: the same salt (no new encryption of old bytes).
        for k, salt in salts_before.items():
            assert _record(s, k)[2][REC_HEADER_SIZE:REC_HEADER_SIZE + 24] == salt
