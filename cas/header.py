"""The safe's header file: magic, format version and configuration.

Layout of ``<safe>/header`` (see docs/FORMAT.md)::

    0   8  magic  b"PNTSAFE\\x00"
    8   4  format version, u32 little-endian
    12  4  length N of the JSON configuration, u32 LE
    16  N  configuration, UTF-8 JSON
    16+N 4 CRC-32 of bytes 0 .. 16+N

The header is written once at ``init`` (atomically: temp file, fsync, rename) and never
changed afterwards, so readers need no lock to read it.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import NotASafe, UnsupportedVersion, UsageError

MAGIC = b"PNTSAFE\x00"
FORMAT_VERSION = 2  # 2: paged directories (docs/FORMAT.md)
HEADER_NAME = "header"
_FIXED = struct.Struct("<8sII")


@dataclass(frozen=True)
class SafeConfig:
    safe_id: str
    created: str
    compression: str = "zstd:1"        # "none" or "zstd:LEVEL" (1..22)
    block_size: int = 64 * 1024        # fixed block size for volumes
    chunk_min: int = 16 * 1024         # content-defined chunking of files
    chunk_avg: int = 64 * 1024
    chunk_max: int = 256 * 1024
    list_fanout: int = 256             # entries per Merkle list node
    pack_size: int = 64 * 1024 * 1024  # a pack is closed once it passes this size
    quota: dict = field(default_factory=dict)

    @property
    def zstd_level(self) -> int | None:
        """The zstd level, or None when compression is off."""
        if self.compression == "none":
            return None
        return int(self.compression.split(":", 1)[1])


def parse_compression(text: str) -> str:
    """Normalise a user's --compression value ("none", "zstd", "zstd:5", "5")."""
    t = text.strip().lower()
    if t in ("none", "off", "0"):
        return "none"
    if t == "zstd":
        return "zstd:1"
    level = t.split(":", 1)[1] if t.startswith("zstd:") else t
    try:
        n = int(level)
    except ValueError:
        raise UsageError(f"bad compression {text!r}: use 'none' or a zstd level 1-22 (e.g. 'zstd:3')") from None
    if not 1 <= n <= 22:
        raise UsageError(f"bad compression {text!r}: zstd levels run from 1 to 22")
    return f"zstd:{n}"


def encode_header(config: SafeConfig) -> bytes:
    body = json.dumps(asdict(config), sort_keys=True).encode()
    head = _FIXED.pack(MAGIC, FORMAT_VERSION, len(body)) + body
    return head + struct.pack("<I", zlib.crc32(head))


def write_header(safe_dir: Path, config: SafeConfig) -> None:
    data = encode_header(config)
    tmp = safe_dir / (HEADER_NAME + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, safe_dir / HEADER_NAME)


def _foreign_hint(path: Path) -> str:
    """Name what a directory looks like when it is not a safe."""
    try:
        names = set(os.listdir(path))
    except OSError:
        return ""
    if not names:
        return " (it is empty: create a safe with 'pointsafe init')"
    if {"config", "keys", "data", "snapshots"} <= names:
        return " (it looks like a restic repository)"
    if "README" in names:
        try:
            if b"Borg Backup repository" in (path / "README").read_bytes()[:200]:
                return " (it looks like a BorgBackup repository)"
        except OSError:
            pass
    return ""


def read_header(safe_dir: Path) -> SafeConfig:
    """Read and check ``<safe_dir>/header``; raise NotASafe / UnsupportedVersion otherwise."""
    if not safe_dir.exists():
        raise NotASafe(f"{safe_dir}: no such safe (create one with 'pointsafe init {safe_dir}')")
    if not safe_dir.is_dir():
        raise NotASafe(f"{safe_dir}: not a pointsafe safe (it is not a directory)")
    try:
        data = (safe_dir / HEADER_NAME).read_bytes()
    except FileNotFoundError:
        raise NotASafe(f"{safe_dir}: not a pointsafe safe{_foreign_hint(safe_dir)}") from None
    except OSError as e:
        raise NotASafe(f"{safe_dir}: cannot read the safe header: {e.strerror}") from None
    if len(data) < _FIXED.size and MAGIC.startswith(data[:8]):
        raise NotASafe(f"{safe_dir}: the safe header is truncated ({len(data)} bytes)")
    if len(data) < _FIXED.size or data[:8] != MAGIC:
        raise NotASafe(f"{safe_dir}: not a pointsafe safe (bad magic in {HEADER_NAME})")
    _, version, n = _FIXED.unpack_from(data)
    if version > FORMAT_VERSION:
        raise UnsupportedVersion(
            f"{safe_dir}: safe format version {version} is newer than this pointsafe supports "
            f"({FORMAT_VERSION}); upgrade pointsafe"
        )
    end = _FIXED.size + n
    if len(data) < end + 4:
        raise NotASafe(f"{safe_dir}: the safe header is truncated ({len(data)} bytes)")
    (crc,) = struct.unpack_from("<I", data, end)
    if zlib.crc32(data[:end]) != crc:
        raise NotASafe(f"{safe_dir}: the safe header is corrupt (checksum mismatch)")
    try:
        fields = json.loads(data[_FIXED.size:end])
        known = {k: v for k, v in fields.items() if k in SafeConfig.__dataclass_fields__}
        return SafeConfig(**known)
    except (ValueError, TypeError) as e:
        raise NotASafe(f"{safe_dir}: the safe header is corrupt ({e})") from None
