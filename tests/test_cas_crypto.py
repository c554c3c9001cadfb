"""Encryption at rest, the keys (issue 14): key slots, passwords, keyed ids, the header's
authentication and sealed index values, through the Python API of pointsafe.cas."""

from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path

import pytest

from pointsafe.cas import (CIPHERS, IntegrityError, Kind, NeedsPassword, Safe, UsageError, WrongPassword,
                           default_cipher)
from pointsafe.cas import keyslots
from pointsafe.cas.crypto import Crypto

PW = b"correct horse"


@pytest.fixture(autouse=True)
def weak_kdf(monkeypatch):
    """Argon2id at its floor (8 MiB, t=1): the tests unlock many times."""
    monkeypatch.setenv("POINTSAFE_KDF_MEMORY_KIB", "8192")
    monkeypatch.setenv("POINTSAFE_KDF_TIME", "1")


def _enc_safe(path: Path, cipher: str = "aes-256-gcm", data: bytes = b"some file content " * 50) -> bytes:
    """An encrypted safe at ``path`` holding one chunk and one point; returns the chunk's key."""
    with Safe.init(path, encryption=cipher, password=PW) as s, s.writer() as w:
        k = w.put(Kind.CHUNK, data)
        w.add_point({"name": "p", "kind": "tree"}, None)
    return k


def _files(path: Path) -> dict[str, tuple[int, bytes]]:
    """Every file below ``path`` with its mtime and bytes (to show nothing was written)."""
    out = {}
    for dirpath, _, names in os.walk(path):
        for n in names:
            p = Path(dirpath) / n
            out[str(p)] = (p.stat().st_mtime_ns, p.read_bytes())
    return out


def _rewrite_header(path: Path, edit, names=("header", "header.copy")) -> None:
    """Change the header JSON with ``edit`` and fix its CRC (what anyone without the key can do)."""
    for name in names:
        data = (path / name).read_bytes()
        _, version, n = struct.unpack_from("<8sII", data)
        fields = json.loads(data[16:16 + n])
        version = edit(fields) or version
        body = json.dumps(fields, sort_keys=True).encode()
        head = struct.pack("<8sII", b"PNTSAFE\0", version, len(body)) + body
        (path / name).write_bytes(head + struct.pack("<I", zlib.crc32(head)))


@pytest.mark.parametrize("cipher", CIPHERS)
def test_an_encrypted_safe_opens_only_with_its_password(tmp_path, cipher):
    safe = tmp_path / "safe"
    key = _enc_safe(safe, cipher)
    with pytest.raises(NeedsPassword) as e:
        Safe.open(safe)
    assert "encrypted" in str(e.value) and "POINTSAFE_PASSWORD" in str(e.value)
    with Safe.open(safe, password=PW) as s:
        assert s.encrypted and s.crypto.cipher == cipher
        assert s.get(key) == b"some file content " * 50
        assert [p.name for p in s.points()] == ["p"]
    # The header says which cipher; a plain safe ignores any password.
    assert json.loads((safe / "header").read_bytes()[16:-4])["encryption"]["cipher"] == cipher
    plain = tmp_path / "plain"
    Safe.init(plain).close()
    with Safe.open(plain, password=b"whatever") as s:
        assert not s.encrypted and s.crypto is None


def test_a_wrong_password_is_one_error_and_writes_nothing(tmp_path):
    safe = tmp_path / "safe"
    _enc_safe(safe)
    before = _files(safe)
    for how in (b"wrong", lambda: b"wrong"):
        with pytest.raises(WrongPassword) as e:
            Safe.open(safe, password=how)
        assert str(e.value) == f"wrong password (no key slot of {safe} opens with it)"
    assert _files(safe) == before


def test_a_password_callable_is_called_only_for_an_encrypted_safe(tmp_path):
    plain = tmp_path / "plain"
    Safe.init(plain).close()
    called = []
    Safe.open(plain, password=lambda: called.append(1) or b"x").close()
    assert called == []
    safe = tmp_path / "safe"
    _enc_safe(safe)
    Safe.open(safe, password=lambda: called.append(1) or PW).close()
    assert called == [1]


def test_key_slots_add_remove_and_change_password(tmp_path):
    safe = tmp_path / "safe"
    key = _enc_safe(safe)
    with Safe.open(safe, password=PW) as s:
        master = s.master_key
    (first,) = keyslots.list_slots(safe)
    assert (first.kdf, first.m_kib, first.t, first.p) == ("argon2id", 8192, 1, 2)
    assert oct((safe / "keys").stat().st_mode & 0o777) == "0o700"
    assert oct((safe / "keys" / f"{first.slot}.json").stat().st_mode & 0o777) == "0o600"
    packs_before = {p.name: p.read_bytes() for p in (safe / "packs").iterdir()}

    second = keyslots.add_slot(safe, master, b"second", label="laptop")
    assert {s.slot for s in keyslots.list_slots(safe)} == {first.slot, second.slot}
    for pw in (PW, b"second"):
        with Safe.open(safe, password=pw) as s:
            assert s.get(key).startswith(b"some file")

    keyslots.change_password(safe, master, first.slot, b"renewed")
    with pytest.raises(WrongPassword):
        Safe.open(safe, password=PW)
    with Safe.open(safe, password=b"renewed") as s:
        assert s.get(key).startswith(b"some file")
    assert [s.label for s in keyslots.list_slots(safe) if s.slot == first.slot] == ["init"]

    keyslots.remove_slot(safe, second.slot)
    with pytest.raises(WrongPassword):
        Safe.open(safe, password=b"second")
    with pytest.raises(UsageError) as e:
        keyslots.remove_slot(safe, first.slot)
    assert "last key slot" in str(e.value)
    with pytest.raises(UsageError):
        keyslots.remove_slot(safe, "deadbeef")
    # Key management never rewrote the data.
    assert {p.name: p.read_bytes() for p in (safe / "packs").iterdir()} == packs_before


def test_an_exported_key_opens_the_safe_without_a_password(tmp_path):
    safe = tmp_path / "safe"
    key = _enc_safe(safe)
    with Safe.open(safe, password=PW) as s:
        text = keyslots.export_key(s.master_key, s.config.safe_id)
    assert keyslots.exported_safe_id(text) is not None
    master = keyslots.import_key(text)
    with Safe.open(safe, master_key=master) as s:
        assert s.get(key).startswith(b"some file")
        # and a new password can be set from it (``key import``)
        keyslots.add_slot(safe, s.master_key, b"after import")
    Safe.open(safe, password=b"after import").close()
    typo = "\n".join(line[:-1] + ("0" if line[-1] != "0" else "1") if line.startswith("key:") else line
                     for line in text.splitlines())
    with pytest.raises(UsageError):
        keyslots.import_key(typo)
    with pytest.raises(UsageError):
        keyslots.import_key("nothing here")
    with pytest.raises(WrongPassword):
        Safe.open(safe, master_key=os.urandom(32))


def test_ids_of_the_same_content_differ_between_safes_and_from_plain_ids(tmp_path):
    data = b"the same file in two safes" * 10
    a, b, plain = tmp_path / "a", tmp_path / "b", tmp_path / "plain"
    ka, kb = _enc_safe(a, data=data), _enc_safe(b, data=data)
    with Safe.init(plain) as s, s.writer() as w:
        kp = w.put(Kind.CHUNK, data)
    assert len({ka, kb, kp}) == 3
    # Nothing in the packs shows the plaintext, compressed or not.
    for safe in (a, b):
        for p in (safe / "packs").iterdir():
            assert b"the same file" not in p.read_bytes()


def test_a_header_setting_changed_without_the_key_is_detected(tmp_path):
    safe = tmp_path / "safe"
    _enc_safe(safe)

    def cheaper(fields):
        fields["compression"] = "none"
    _rewrite_header(safe, cheaper)
    with pytest.raises(IntegrityError) as e:
        Safe.open(safe, password=PW)
    assert "header was changed without the key" in str(e.value)


def test_a_header_made_plain_beside_key_slots_is_refused(tmp_path):
    safe = tmp_path / "safe"
    _enc_safe(safe)

    def plain(fields):
        del fields["encryption"]
        return 3
    _rewrite_header(safe, plain)
    for pw in (None, PW):
        with pytest.raises(IntegrityError) as e:
            Safe.open(safe, password=pw)
        assert "not encrypted, yet the safe has key slots" in str(e.value)


def test_a_flipped_bit_in_a_key_slot_is_a_wrong_password(tmp_path):
    safe = tmp_path / "safe"
    _enc_safe(safe)
    (slot,) = (safe / "keys").iterdir()
    doc = json.loads(slot.read_bytes())
    for field in ("salt", "nonce", "wrapped"):
        bad = dict(doc)
        v = bytearray(bytes.fromhex(doc[field]))
        v[0] ^= 1
        bad[field] = v.hex()
        slot.write_text(json.dumps(bad))
        with pytest.raises(WrongPassword):
            Safe.open(safe, password=PW)
    slot.write_text(json.dumps(doc))
    Safe.open(safe, password=PW).close()


def test_point_values_are_sealed_and_bound_to_their_row(tmp_path):
    safe = tmp_path / "safe"
    with Safe.init(safe, encryption="chacha20-poly1305", password=PW) as s, s.writer() as w:
        p1 = w.add_point({"name": "first-secret-name", "kind": "tree"}, None)
        p2 = w.add_point({"name": "second", "kind": "tree"}, None)
    with Safe.open(safe, password=PW) as s:
        with s.index.read() as t:
            raw = {k: bytes(v) for k, v in t.cursor(db=s.index.db["points"])}
        assert all(b"secret" not in v and b"{" not in v[:1] for v in raw.values())
        k1, k2 = bytes.fromhex(p1.id), bytes.fromhex(p2.id)
        with s.index.write() as t:          # a value moved to another row
            t.put(k2, raw[k1], db=s.index.db["points"])
        with pytest.raises(IntegrityError):
            s.points()
        assert s.point(p1.id).name == "first-secret-name"


def test_crypto_records_and_values_round_trip_and_fail_when_changed():
    c = Crypto(os.urandom(32), "aes-256-gcm")
    aad = bytes(range(48))
    sealed = c.seal_record(aad, b"payload" * 100)
    assert len(sealed) == 700 + 40
    assert c.open_record(aad, sealed, 1, 16) == b"payload" * 100
    assert c.seal_record(aad, b"payload") != c.seal_record(aad, b"payload")   # a fresh salt each time
    for where in (0, 23, 24, len(sealed) - 17, len(sealed) - 1):   # salt, ciphertext, tag
        bad = bytearray(sealed)
        bad[where] ^= 0x10
        with pytest.raises(IntegrityError) as e:
            c.open_record(aad, bytes(bad), 7, 1234)
        assert e.value.pack == 7 and e.value.offset == 1234 and "offset 1234" in str(e.value)
    with pytest.raises(IntegrityError):
        c.open_record(aad[:-1] + b"\xff", sealed, 1, 16)
    with pytest.raises(IntegrityError):
        Crypto(os.urandom(32), "aes-256-gcm").open_record(aad, sealed, 1, 16)
    v = c.seal_value(b"t", b"row", b"value")
    assert c.open_value(b"t", b"row", v) == b"value"
    with pytest.raises(IntegrityError):
        c.open_value(b"t", b"other", v)
    assert default_cipher() in CIPHERS


def test_a_header_made_plain_with_the_key_slots_removed_too_gets_no_plaintext_written(tmp_path):
    from pointsafe.cas import repair
    safe = tmp_path / "safe"
    key = _enc_safe(safe)

    def plain(fields):
        del fields["encryption"]
        return 3
    _rewrite_header(safe, plain)
    for f in (safe / "keys").iterdir():
        f.unlink()
    (safe / "keys").rmdir()
    packs_before = {p.name: p.read_bytes() for p in (safe / "packs").iterdir()}
    with Safe.open(safe) as s:
        with pytest.raises(IntegrityError, match="encrypted records, yet the safe's header says it is not"):
            s.writer()
        with pytest.raises(IntegrityError, match="is encrypted, in a safe that is not"):
            s.get(key)
    with pytest.raises(NeedsPassword):      # the index's copy of the header says encrypted
        repair(safe)
    import shutil
    shutil.rmtree(safe / "index")
    with pytest.raises(IntegrityError, match="repair refuses"):
        repair(safe)
    assert {p.name: p.read_bytes() for p in (safe / "packs").iterdir()} == packs_before
    assert not (safe / "index.rebuild").exists()


def test_verify_notes_key_slots_that_others_may_read(tmp_path):
    from pointsafe.cas import verify
    safe = tmp_path / "safe"
    _enc_safe(safe)
    with Safe.open(safe, password=PW) as s:
        assert not any("group or others" in n for n in verify(s).notes)
        (slot,) = (safe / "keys").iterdir()
        slot.chmod(0o644)
        notes = [n for n in verify(s).notes if "group or others" in n]
        assert notes and f"keys/{slot.name}" in notes[0]


def test_repair_puts_back_the_header_that_authenticates(tmp_path):
    import shutil

    from pointsafe.cas import repair
    safe = tmp_path / "safe"
    key = _enc_safe(safe)
    original = (safe / "header").read_bytes()

    def cheaper(fields):
        fields["compression"] = "none"
    # header changed, header.copy intact, index gone: the copy is the authentic one
    _rewrite_header(safe, cheaper, names=("header",))
    shutil.rmtree(safe / "index")
    with pytest.raises(IntegrityError):
        Safe.open(safe, password=PW)
    rep = repair(safe, password=PW)
    assert "rewrote header with the header that authenticates" in rep.header
    assert (safe / "header").read_bytes() == (safe / "header.copy").read_bytes() == original
    # both files changed alike: the index's copy is the authentic one
    _rewrite_header(safe, cheaper)
    rep = repair(safe, password=PW)
    assert "header and header.copy" in rep.header
    assert (safe / "header").read_bytes() == original
    with Safe.open(safe, password=PW) as s:
        assert s.config.compression == "zstd:1" and s.get(key).startswith(b"some file")
    # both files and the index's copy changed: refused, nothing rewritten
    _rewrite_header(safe, cheaper)
    changed = (safe / "header").read_bytes()
    shutil.rmtree(safe / "index")
    with pytest.raises(IntegrityError, match="every copy of the safe's header fails"):
        repair(safe, password=PW)
    assert (safe / "header").read_bytes() == changed


def test_verify_reports_a_header_copy_changed_without_the_key(tmp_path):
    from pointsafe.cas import verify
    safe = tmp_path / "safe"
    _enc_safe(safe)

    def cheaper(fields):
        fields["chunk_avg"] = 4096
    _rewrite_header(safe, cheaper, names=("header.copy",))
    with Safe.open(safe, password=PW) as s:
        rep = verify(s)
    assert [e["message"] for e in rep.errors] == [
        f"{safe}: the safe header.copy was changed without the key (its authentication fails); "
        "'pointsafe repair' puts back an authentic copy"]
