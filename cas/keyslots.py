"""Key slots: the master key of an encrypted safe, wrapped under passwords (docs/FORMAT.md,
"Key slots").

Each slot is ``SAFE/keys/NNNNNNNN.json`` (mode 0600, directory 0700). Its key-encryption key
is Argon2id(password, salt, t, m_kib, p) (argon2-cffi's ``hash_secret_raw``); the master key is
wrapped with AES-256-GCM under it, bound to the safe id and slot id. Adding a password or
changing one rewrites one slot and never the data; ``repair`` never touches ``keys/``.
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import blake3
from argon2.low_level import Type, hash_secret_raw
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .crypto import MASTER_KEY_SIZE
from .errors import SafeError, UsageError, WrongPassword
from .header import PRIVATE_DIR_MODE, read_header, write_private
from .packstore import fsync_dir
from .timefmt import utc_now_iso

KEYS_DIR = "keys"
SLOT_VERSION = 1
DEFAULT_M_KIB = 65536
DEFAULT_T = 3
DEFAULT_P = 2
MIN_M_KIB = 8192
MIN_T = 1
MAX_M_KIB = 4 * 1024 * 1024     # a slot asking for more is not ours (a tampered slot must not
MAX_T = 64                      # make unlocking take all memory or forever)
EXPORT_CONTEXT = "pointsafe 2026-12 key export check"


@dataclass(frozen=True)
class KeySlot:
    """What a key slot tells about itself (nothing of it is secret)."""

    slot: str
    created: str
    label: str
    kdf: str
    m_kib: int
    t: int
    p: int

    def as_dict(self) -> dict[str, Any]:
        """The slot's public fields as JSON-ready data."""
        return {"slot": self.slot, "created": self.created, "label": self.label, "kdf": self.kdf,
                "m_kib": self.m_kib, "t": self.t, "p": self.p}


def keys_dir(safe_dir: str | os.PathLike[str]) -> Path:
    """The directory of the safe's key slots."""
    return Path(safe_dir) / KEYS_DIR


def _kdf_params() -> tuple[int, int, int]:
    """Argon2id parameters for a new slot: defaults, or POINTSAFE_KDF_MEMORY_KIB /
    POINTSAFE_KDF_TIME (floors 8192 KiB and 1)."""
    def env_int(name: str, default: int, floor: int) -> int:
        text = os.environ.get(name, "").strip()
        if not text:
            return default
        try:
            return max(floor, int(text))
        except ValueError:
            raise UsageError(f"{name}={text!r} is not a number") from None
    return (env_int("POINTSAFE_KDF_MEMORY_KIB", DEFAULT_M_KIB, MIN_M_KIB),
            env_int("POINTSAFE_KDF_TIME", DEFAULT_T, MIN_T), DEFAULT_P)


def _kek(password: bytes | str, salt: bytes, t: int, m_kib: int, p: int) -> bytes:
    if isinstance(password, str):
        password = password.encode()     # a caller's text: its UTF-8 bytes
    return hash_secret_raw(password, salt, time_cost=t, memory_cost=m_kib, parallelism=p,
                           hash_len=32, type=Type.ID)


def _aad(safe_id: str, slot: str) -> bytes:
    return b"pointsafe-slot" + safe_id.encode("ascii") + slot.encode("ascii")


def _safe_id(safe_dir: Path) -> str:
    return read_header(safe_dir).safe_id


def _write_slot(safe_dir: Path, doc: dict[str, Any]) -> None:
    """Write one slot file atomically (``.tmp``, fsync, rename, directory fsync), mode 0600."""
    d = keys_dir(safe_dir)
    if not d.is_dir():
        d.mkdir(mode=PRIVATE_DIR_MODE)
        os.chmod(d, PRIVATE_DIR_MODE)
        fsync_dir(safe_dir)
    data = json.dumps(doc, sort_keys=True, indent=1).encode() + b"\n"
    write_private(d / f"{doc['slot']}.json", data)     # NNNNNNNN.json.tmp, fsync, rename
    fsync_dir(d)


def _slot_doc(safe_id: str, slot: str, master: bytes, password: bytes, label: str, created: str) -> dict[str, Any]:
    m_kib, t, p = _kdf_params()
    salt = os.urandom(16)
    nonce = os.urandom(12)
    wrapped = AESGCM(_kek(password, salt, t, m_kib, p)).encrypt(nonce, master, _aad(safe_id, slot))
    return {"version": SLOT_VERSION, "slot": slot, "created": created, "label": label, "kdf": "argon2id",
            "m_kib": m_kib, "t": t, "p": p, "salt": salt.hex(), "nonce": nonce.hex(), "wrapped": wrapped.hex()}


def _read_docs(safe_dir: Path) -> list[dict[str, Any]]:
    """Every well-formed slot document, by slot id (malformed files are left out)."""
    d = keys_dir(safe_dir)
    try:
        names = sorted(n for n in os.listdir(d) if n.endswith(".json") and len(n) == 13)
    except FileNotFoundError:
        return []
    except OSError as e:
        raise SafeError(f"{safe_dir}: cannot read the key slots: {e.strerror}") from None
    out = []
    for n in names:
        try:
            doc = json.loads((d / n).read_bytes())
            if (isinstance(doc, dict) and doc.get("slot") == n[:8] and doc.get("kdf") == "argon2id"
                    and all(isinstance(doc.get(f), int) for f in ("m_kib", "t", "p"))):
                out.append(doc)
        except (OSError, ValueError):
            continue
    return out


def _public(doc: dict[str, Any]) -> KeySlot:
    return KeySlot(doc["slot"], str(doc.get("created", "")), str(doc.get("label", "")), doc["kdf"],
                   doc["m_kib"], doc["t"], doc["p"])


def list_slots(safe_dir: str | os.PathLike[str]) -> list[KeySlot]:
    """The safe's key slots, by slot id ([] for a plain safe)."""
    return [_public(d) for d in _read_docs(Path(safe_dir))]


def _try(doc: dict[str, Any], safe_id: str, password: bytes) -> bytes | None:
    """The master key when ``password`` opens slot ``doc``, else None."""
    try:
        if not (MIN_M_KIB <= doc["m_kib"] <= MAX_M_KIB and MIN_T <= doc["t"] <= MAX_T and 1 <= doc["p"] <= 64):
            return None
        salt, nonce, wrapped = (bytes.fromhex(doc[f]) for f in ("salt", "nonce", "wrapped"))
        kek = _kek(password, salt, doc["t"], doc["m_kib"], doc["p"])
        master = AESGCM(kek).decrypt(nonce, wrapped, _aad(safe_id, doc["slot"]))
    except (InvalidTag, ValueError, KeyError, TypeError):
        return None
    return master if len(master) == MASTER_KEY_SIZE else None


def unlock(safe_dir: str | os.PathLike[str], password: bytes, safe_id: str | None = None) -> bytes:
    """The master key, from the first slot ``password`` opens; WrongPassword when none does,
    SafeError when the safe has no key slot. Costs one Argon2id per slot tried."""
    p = Path(safe_dir)
    sid = safe_id or _safe_id(p)
    docs = _read_docs(p)
    if not docs:
        raise SafeError(f"{p}: the safe is encrypted but has no key slot left in {KEYS_DIR}/ "
                        "('pointsafe key import' restores access from an exported key)")
    for doc in docs:
        master = _try(doc, sid, password)
        if master is not None:
            return master
    raise WrongPassword(f"wrong password (no key slot of {p} opens with it)")


def slot_opens(safe_dir: str | os.PathLike[str], slot: str, password: bytes) -> bool:
    """True when ``password`` opens key slot ``slot`` (UsageError for an unknown slot)."""
    p = Path(safe_dir)
    return _try(_find(p, slot), _safe_id(p), password) is not None


def _find(safe_dir: Path, slot: str) -> dict[str, Any]:
    for doc in _read_docs(safe_dir):
        if doc["slot"] == slot:
            return doc
    raise UsageError(f"no key slot {slot!r} in {safe_dir} (see 'pointsafe key list')")


def add_slot(safe_dir: str | os.PathLike[str], master: bytes, password: bytes, label: str = "",
             safe_id: str | None = None) -> KeySlot:
    """Wrap ``master`` under ``password`` in a new slot (KDF parameters from the environment,
    see module docs); the data is not touched. Returns the new slot."""
    p = Path(safe_dir)
    sid = safe_id or _safe_id(p)
    taken = {d["slot"] for d in _read_docs(p)}
    slot = secrets.token_hex(4)
    while slot in taken:
        slot = secrets.token_hex(4)
    doc = _slot_doc(sid, slot, master, password, label, utc_now_iso())
    _write_slot(p, doc)
    return _public(doc)


def remove_slot(safe_dir: str | os.PathLike[str], slot: str) -> None:
    """Delete key slot ``slot``; UsageError when it is unknown or the last slot (the data
    would be lost for good)."""
    p = Path(safe_dir)
    _find(p, slot)
    if len(_read_docs(p)) <= 1:
        raise UsageError(f"slot {slot} is the safe's last key slot: removing it would lock every "
                         "backup away for good (add another password first)")
    os.unlink(keys_dir(p) / f"{slot}.json")
    fsync_dir(keys_dir(p))


def change_password(safe_dir: str | os.PathLike[str], master: bytes, slot: str, new_password: bytes) -> KeySlot:
    """Rewrite slot ``slot`` to open with ``new_password`` only (new salt, nonce and KDF
    parameters; same id, label and creation time); atomic. Returns the rewritten slot."""
    p = Path(safe_dir)
    old = _find(p, slot)
    doc = _slot_doc(_safe_id(p), slot, master, new_password, str(old.get("label", "")),
                    str(old.get("created", "")) or utc_now_iso())
    _write_slot(p, doc)
    return _public(doc)


def _check_digits(master: bytes) -> str:
    return blake3.blake3(master, derive_key_context=EXPORT_CONTEXT).hexdigest()[:8]


def export_key(master: bytes, safe_id: str) -> str:
    """A printable text block holding the master key (for a paper backup): whoever holds it
    reads every backup of the safe."""
    h = master.hex()
    groups = " ".join(h[i:i + 8] for i in range(0, len(h), 8))
    return ("pointsafe master key: it opens every backup of this safe; keep it secret\n"
            f"safe: {safe_id}\n"
            f"key: {groups}\n"
            f"check: {_check_digits(master)}\n")


def import_key(text: str) -> bytes:
    """The master key of :func:`export_key`'s text (spaces and case do not matter); UsageError
    when no key line is found or its check digits do not match (a typo)."""
    key_hex = check = None
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip().lower() == "key":
            key_hex = "".join(value.split()).lower()
        elif name.strip().lower() == "check":
            check = value.strip().lower()
    try:
        master = bytes.fromhex(key_hex or "")
    except ValueError:
        master = b""
    if len(master) != MASTER_KEY_SIZE:
        raise UsageError("not an exported pointsafe key (no 'key:' line of 64 hex digits)")
    if check is not None and check != _check_digits(master):
        raise UsageError("the exported key's check digits do not match (a typo in the key?)")
    return master


def exported_safe_id(text: str) -> str | None:
    """The safe id named by :func:`export_key`'s text, or None."""
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip().lower() == "safe":
            return value.strip() or None
    return None
