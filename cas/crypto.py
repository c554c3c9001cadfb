"""Encryption at rest: the unlocked keys of an encrypted safe (docs/FORMAT.md, "Encryption").

A safe's 32-byte master key ``M`` (kept only wrapped, in key slots: cas/keyslots.py) gives
four keys, each ``blake3(M, derive_key_context=CTX)``: the data key (records), the id key
(object keys are keyed BLAKE3, so no id can be computed without the key), the header key
(authenticates the header's configuration) and the index key (sealed index values).

A record's stored bytes are ``salt(24) || AEAD(subkey, nonce=0^12, stored, aad=header[0:48])``
with ``subkey = blake3(salt, key=data_key)`` and a fresh random salt per record: a
(subkey, nonce) pair repeats only when two 192-bit salts collide. The AEAD is AES-256-GCM or
ChaCha20-Poly1305 from ``cryptography``; nothing here is hand-written cryptography.
"""

from __future__ import annotations

import os
import threading
from typing import Callable

import blake3
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from .errors import IntegrityError

CIPHERS = ("aes-256-gcm", "chacha20-poly1305")
CIPHER_NONE = 0
CIPHER_IDS = {"aes-256-gcm": 1, "chacha20-poly1305": 2}   # the record header's byte 6
CIPHER_NAMES = {v: k for k, v in CIPHER_IDS.items()}
SALT_SIZE = 24        # random per record / per sealed value

_SALT_BLOCK = SALT_SIZE * 4096   # 96 KiB of os.urandom at a time
_salts = threading.local()


def fresh_salt() -> bytes:
    """24 random bytes for one record or sealed value, from ``os.urandom`` drawn in blocks.

    One ``getrandom`` per record cost 164 µs a call here (16,262 calls: 2.7 s of a 7 s backup
    of 2 GiB); drawing 96 KiB at a time gives the same uniformly random salts (each used once)
    for a syscall per 4,096 records. A block belongs to one thread and one process (a forked
    child draws its own), so no two records ever share one."""
    loc = _salts
    pid = os.getpid()
    buf = getattr(loc, "buf", b"")
    pos = getattr(loc, "pos", 0)
    if pos + SALT_SIZE > len(buf) or getattr(loc, "pid", None) != pid:
        buf, pos = os.urandom(_SALT_BLOCK), 0
        loc.buf, loc.pid = buf, pid
    loc.pos = pos + SALT_SIZE
    return buf[pos:pos + SALT_SIZE]

TAG_SIZE = 16
OVERHEAD = SALT_SIZE + TAG_SIZE   # stored bytes an encrypted record adds
ZERO_NONCE = bytes(12)
MASTER_KEY_SIZE = 32
CONTEXTS = {
    "data": "pointsafe 2026-12 data key",
    "id": "pointsafe 2026-12 id key",
    "header": "pointsafe 2026-12 header key",
    "index": "pointsafe 2026-12 index key",
}

_KIND_BYTES = [bytes((i,)) for i in range(256)]
_Aead = AESGCM | ChaCha20Poly1305
_AEADS: dict[int, Callable[[bytes], _Aead]] = {1: AESGCM, 2: ChaCha20Poly1305}


def default_cipher() -> str:
    """``"aes-256-gcm"`` when the CPU has AES instructions (/proc/cpuinfo flag ``aes``), else
    ``"chacha20-poly1305"`` (faster in software)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")) and " aes" in f" {line.split(':', 1)[-1]}":
                    return "aes-256-gcm"
    except OSError:
        pass
    return "chacha20-poly1305"


def derive_key(master: bytes, purpose: str) -> bytes:
    """The 32-byte key for ``purpose`` ("data", "id", "header", "index") derived from the
    master key with BLAKE3's key derivation mode."""
    return blake3.blake3(master, derive_key_context=CONTEXTS[purpose]).digest()


class Crypto:
    """An unlocked safe's keys: ids, record sealing, sealed index values, header auth.

    One per open safe; thread-safe (it holds only immutable keys). Object ids and records of
    an encrypted safe are made and opened only through it.
    """

    __slots__ = ("cipher", "cipher_id", "_aead", "_data_key", "_id_key", "_header_key", "_index_key")

    def __init__(self, master: bytes, cipher: str):
        if len(master) != MASTER_KEY_SIZE:
            raise ValueError("a master key is 32 bytes")
        if cipher not in CIPHER_IDS:
            raise ValueError(f"unknown cipher {cipher!r}")
        self.cipher = cipher
        self.cipher_id = CIPHER_IDS[cipher]
        self._aead = _AEADS[self.cipher_id]
        self._data_key = derive_key(master, "data")
        self._id_key = derive_key(master, "id")
        self._header_key = derive_key(master, "header")
        self._index_key = derive_key(master, "index")

    # -- ids ----------------------------------------------------------------------------

    def object_key(self, kind: int, data: bytes | memoryview) -> bytes:
        """The 32-byte key of ``data`` stored as ``kind``: keyed BLAKE3 (id key) of
        ``kind_byte || data``."""
        h = blake3.blake3(_KIND_BYTES[kind], key=self._id_key)
        h.update(data)
        return h.digest()

    # -- records ------------------------------------------------------------------------

    def seal_record(self, header48: bytes, stored: bytes | memoryview) -> bytearray:
        """``salt || ciphertext || tag`` of a record's stored bytes (compressed or raw), bound
        to the first 48 bytes of its header (kind, codec, cipher, key, lengths) as associated
        data. A fresh random salt each call; one allocation of the result."""
        out = bytearray(SALT_SIZE + len(stored) + TAG_SIZE)
        salt = fresh_salt()
        out[:SALT_SIZE] = salt
        sub = blake3.blake3(salt, key=self._data_key).digest()
        self._aead(sub).encrypt_into(ZERO_NONCE, stored, header48, memoryview(out)[SALT_SIZE:])
        return out

    def open_record(self, header48: bytes | memoryview, sealed: bytes | memoryview, pack: int, offset: int,
                    cipher_id: int | None = None) -> bytes:
        """The plaintext of a record's sealed stored bytes; IntegrityError naming ``pack`` and
        ``offset`` when the tag does not hold (any changed byte of salt, ciphertext, tag or
        header[0:48], or another safe's key). ``cipher_id`` is the record's byte 6 (default:
        the safe's cipher)."""
        aead = _AEADS.get(self.cipher_id if cipher_id is None else cipher_id)
        if aead is None or len(sealed) < OVERHEAD:
            raise IntegrityError(f"pack {pack:016x}.pack offset {offset}: encrypted record is malformed",
                                 pack, offset)
        mv = memoryview(sealed)
        sub = blake3.blake3(mv[:SALT_SIZE], key=self._data_key).digest()
        try:
            return aead(sub).decrypt(ZERO_NONCE, mv[SALT_SIZE:], bytes(header48))
        except InvalidTag:
            raise IntegrityError(f"pack {pack:016x}.pack offset {offset}: record fails authentication "
                                 "(changed without the key, or not this safe's)", pack, offset) from None

    # -- index values -------------------------------------------------------------------

    def seal_value(self, table: bytes, row: bytes, value: bytes) -> bytes:
        """An index value sealed under the index key, bound to its table name and row key:
        ``nonce(24) || AEAD(blake3(nonce, key=index_key), 0^12, value, table || row)``."""
        nonce = fresh_salt()
        sub = blake3.blake3(nonce, key=self._index_key).digest()
        return nonce + self._aead(sub).encrypt(ZERO_NONCE, value, table + row)

    def open_value(self, table: bytes, row: bytes, sealed: bytes | memoryview) -> bytes:
        """The value :meth:`seal_value` sealed; IntegrityError when it was changed, moved to
        another row or table, or sealed by another safe."""
        mv = memoryview(sealed)
        if len(mv) < OVERHEAD:
            raise IntegrityError(f"index table {table.decode(errors='replace')}: sealed value of row "
                                 f"{row.hex()[:12]} is malformed")
        sub = blake3.blake3(mv[:SALT_SIZE], key=self._index_key).digest()
        try:
            return self._aead(sub).decrypt(ZERO_NONCE, mv[SALT_SIZE:], table + row)
        except InvalidTag:
            raise IntegrityError(f"index table {table.decode(errors='replace')}: value of row "
                                 f"{row.hex()[:12]} fails authentication (changed without the key)") from None

    # -- header -------------------------------------------------------------------------

    def header_auth(self, config_json_without_auth: bytes) -> str:
        """Hex keyed BLAKE3 (header key) of the canonical configuration JSON (``auth``
        removed; see cas/header.py ``canonical_config``)."""
        return blake3.blake3(config_json_without_auth, key=self._header_key).hexdigest()
