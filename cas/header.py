"""The safe's header file: magic, format version and configuration.

Layout of ``<safe>/header`` (see docs/FORMAT.md)::

    0   8  magic  b"PNTSAFE\\x00"
    8   4  format version, u32 little-endian
    12  4  length N of the JSON configuration, u32 LE
    16  N  configuration, UTF-8 JSON
    16+N 4 CRC-32 of bytes 0 .. 16+N

The header is written once at ``init`` (atomically: temp file, fsync, rename), together with
a byte-identical second copy ``<safe>/header.copy`` (since format version 3), and never
changed afterwards, so readers need no lock to read it. A reader uses the copy when the header
is damaged or missing; ``repair`` rewrites whichever is damaged (docs/FORMAT.md, "The header").
"""

from __future__ import annotations

import json
import os
import stat
import struct
import sys
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .crypto import CIPHERS
from .errors import NotASafe, SafeError, UnsupportedVersion, UsageError

MAGIC = b"PNTSAFE\x00"
FORMAT_VERSION = 4  # 2: paged directories; 3: header.copy, private modes; 4: encryption (docs/FORMAT.md)
PLAIN_VERSION = 3   # plain safes keep being written as version 3, so that older readers read them
HEADER_NAME = "header"
COPY_NAME = "header.copy"
PRIVATE_FILE_MODE = 0o600   # every file of a safe (header, packs, index, lock)
PRIVATE_DIR_MODE = 0o700    # every directory of a safe
_FIXED = struct.Struct("<8sII")


@dataclass(frozen=True)
class SafeConfig:
    """A safe's settings, fixed at ``init`` and stored in its header (immutable)."""

    safe_id: str
    created: str
    compression: str = "zstd:1"        # "none" or "zstd:LEVEL" (1..22)
    block_size: int = 64 * 1024        # fixed block size for volumes
    chunk_min: int = 16 * 1024         # content-defined chunking of files
    chunk_avg: int = 64 * 1024
    chunk_max: int = 256 * 1024
    list_fanout: int = 256             # entries per Merkle list node
    pack_size: int = 64 * 1024 * 1024  # a pack is closed once it passes this size
    quota: dict[str, Any] = field(default_factory=dict)   # ops' settings, JSON values
    # {"cipher", "kdf", "auth"} of an encrypted safe (version 4); None: a plain safe
    encryption: dict[str, str] | None = None

    @property
    def cipher(self) -> str | None:
        """The AEAD of an encrypted safe ("aes-256-gcm", "chacha20-poly1305"), None if plain."""
        return None if self.encryption is None else self.encryption.get("cipher")

    @property
    def zstd_level(self) -> int | None:
        """The zstd level, or None when compression is off."""
        if self.compression == "none":
            return None
        return int(self.compression.split(":", 1)[1])


def parse_compression(text: str) -> str:
    """Normalise a user's --compression value ("none", "zstd", "zstd:5", "5") to "none" or
    "zstd:LEVEL"; UsageError (one line) for anything else or a level outside 1..22."""
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


def config_fields(config: SafeConfig) -> dict[str, Any]:
    """The JSON object a header holds for ``config`` (a plain safe's has no ``encryption``)."""
    fields = asdict(config)
    if fields.get("encryption") is None:
        fields.pop("encryption", None)
    return fields


def canonical_config(fields: dict[str, Any]) -> bytes:
    """The bytes ``encryption.auth`` authenticates: the header's whole JSON object without
    ``encryption.auth``, keys sorted, no spaces, ASCII (docs/FORMAT.md, "The header")."""
    f = dict(fields)
    enc = f.get("encryption")
    if isinstance(enc, dict):
        f["encryption"] = {k: v for k, v in enc.items() if k != "auth"}
    return json.dumps(f, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def encode_header(config: SafeConfig) -> bytes:
    """The header file's bytes for ``config``: version 4 for an encrypted safe, 3 for a
    plain one (readable by pointsafe before encryption)."""
    body = json.dumps(config_fields(config), sort_keys=True).encode()
    version = FORMAT_VERSION if config.encryption is not None else PLAIN_VERSION
    head = _FIXED.pack(MAGIC, version, len(body)) + body
    return head + struct.pack("<I", zlib.crc32(head))


def header_fields(data: bytes) -> dict[str, Any]:
    """The whole JSON object of header bytes that :func:`decode_header` accepted (unknown
    fields too: the header's authentication covers them)."""
    n = _FIXED.unpack_from(data)[2]
    fields: dict[str, Any] = json.loads(data[_FIXED.size:_FIXED.size + n])
    return fields


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (``path.tmp``, fsync, rename), mode 0600 whatever
    the umask. The caller fsyncs the directory."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, PRIVATE_FILE_MODE)
    try:
        os.fchmod(fd, PRIVATE_FILE_MODE)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)


def write_header_bytes(safe_dir: Path, data: bytes) -> None:
    """Write the header file and its copy (both the same bytes), then fsync the directory."""
    for name in (HEADER_NAME, COPY_NAME):
        write_private(safe_dir / name, data)
    fd = os.open(safe_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_header(safe_dir: Path, config: SafeConfig) -> None:
    """Write ``config`` as the safe's header and header copy (mode 0600)."""
    write_header_bytes(safe_dir, encode_header(config))


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


def decode_header(data: bytes, where: str, name: str = HEADER_NAME) -> SafeConfig:
    """Check a header file's bytes (docs/FORMAT.md, "The header") and return its configuration.

    Raises NotASafe (bad magic, truncated, corrupt) or UnsupportedVersion (a well-formed header
    of a newer format). ``where`` starts the messages (the safe's path).
    """
    if len(data) < _FIXED.size and MAGIC.startswith(data[:8]):
        raise NotASafe(f"{where}: the safe {name} is truncated ({len(data)} bytes)")
    if len(data) < _FIXED.size or data[:8] != MAGIC:
        raise NotASafe(f"{where}: not a pointsafe safe (bad magic in {name})")
    _, version, n = _FIXED.unpack_from(data)
    if version > FORMAT_VERSION:
        raise UnsupportedVersion(
            f"{where}: safe format version {version} is newer than this pointsafe supports "
            f"({FORMAT_VERSION}); upgrade pointsafe"
        )
    end = _FIXED.size + n
    if len(data) < end + 4:
        raise NotASafe(f"{where}: the safe {name} is truncated ({len(data)} bytes)")
    (crc,) = struct.unpack_from("<I", data, end)
    if zlib.crc32(data[:end]) != crc:
        raise NotASafe(f"{where}: the safe {name} is corrupt (checksum mismatch)")
    try:
        fields = json.loads(data[_FIXED.size:end])
        known = {k: v for k, v in fields.items() if k in SafeConfig.__dataclass_fields__}
        config = SafeConfig(**known)
    except (ValueError, TypeError, AttributeError) as e:
        raise NotASafe(f"{where}: the safe {name} is corrupt ({e})") from None
    _check_encryption(config, version, where, name)
    return config


def _check_encryption(config: SafeConfig, version: int, where: str, name: str) -> None:
    """NotASafe when the ``encryption`` field is malformed or in a header older than 4."""
    enc = config.encryption
    if enc is None:
        return
    if version < 4 or not isinstance(enc, dict):
        raise NotASafe(f"{where}: the safe {name} is corrupt (an encryption field in a version-{version} header)")
    if enc.get("cipher") not in CIPHERS or enc.get("kdf") != "argon2id" or not isinstance(enc.get("auth"), str):
        raise NotASafe(f"{where}: the safe {name} names an unknown encryption "
                       f"({enc.get('cipher')!r}, {enc.get('kdf')!r}); upgrade pointsafe")


def header_version(data: bytes) -> int:
    """The format version field of header bytes that decode_header accepted."""
    version: int = _FIXED.unpack_from(data)[1]
    return version


def _looks_newer(data: bytes) -> bool:
    """True when ``data`` is a header of a newer version whose checksum still holds in the
    layout this version knows: a real newer header, not a flipped bit in the version field."""
    if len(data) < _FIXED.size or data[:8] != MAGIC:
        return False
    _, version, n = _FIXED.unpack_from(data)
    end = _FIXED.size + n
    if version <= FORMAT_VERSION or len(data) < end + 4:
        return False
    stored: int = struct.unpack_from("<I", data, end)[0]
    return zlib.crc32(data[:end]) == stored


@dataclass
class HeaderCopy:
    """One of the two header files as found on disk."""

    name: str
    data: bytes | None = None           # None when the file is missing or unreadable
    config: SafeConfig | None = None    # None when it does not decode
    error: SafeError | None = None      # why it does not decode (or cannot be read)


@dataclass
class HeaderState:
    """Both header files of a safe; see :func:`inspect_header`."""

    main: HeaderCopy
    copy: HeaderCopy

    @property
    def good(self) -> HeaderCopy | None:
        """The copy to use: ``header`` when it is good, else ``header.copy`` when that is."""
        if self.main.config is not None:
            return self.main
        if self.copy.config is not None and not isinstance(self.main.error, UnsupportedVersion):
            return self.copy
        return None

    @property
    def intact(self) -> bool:
        """Both files are present, good and identical."""
        return (self.main.config is not None and self.copy.config is not None
                and self.main.data == self.copy.data)


def _check_dir(safe_dir: Path) -> None:
    try:
        st = safe_dir.stat()
    except FileNotFoundError:
        raise NotASafe(f"{safe_dir}: no such safe (create one with 'pointsafe init {safe_dir}')") from None
    except PermissionError:
        raise SafeError(f"{safe_dir}: permission denied") from None
    except OSError as e:
        raise NotASafe(f"{safe_dir}: cannot open the safe: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise NotASafe(f"{safe_dir}: not a pointsafe safe (it is not a directory)")


def _load(safe_dir: Path, name: str) -> HeaderCopy:
    hc = HeaderCopy(name)
    try:
        hc.data = (safe_dir / name).read_bytes()
    except FileNotFoundError:
        return hc
    except PermissionError:
        hc.error = SafeError(f"{safe_dir}: permission denied (cannot read the safe {name})")
        return hc
    except OSError as e:
        hc.error = NotASafe(f"{safe_dir}: cannot read the safe {name}: {e.strerror}")
        return hc
    try:
        hc.config = decode_header(hc.data, str(safe_dir), name)
    except SafeError as e:
        hc.error = e
    if isinstance(hc.error, UnsupportedVersion) and not _looks_newer(hc.data):
        # A version field out of range and a checksum that fails: damage, not a newer
        # pointsafe's header (the other file may still hold the real one).
        hc.error = NotASafe(f"{safe_dir}: the safe {name} is corrupt (checksum mismatch)")
    return hc


def inspect_header(safe_dir: Path) -> HeaderState:
    """Read both header files; never raises for their content (only for the directory)."""
    _check_dir(safe_dir)
    return HeaderState(_load(safe_dir, HEADER_NAME), _load(safe_dir, COPY_NAME))


def missing_header_error(safe_dir: Path, state: HeaderState) -> SafeError:
    """The error to raise when no header file can be used."""
    for hc in (state.main, state.copy):
        if isinstance(hc.error, (UnsupportedVersion,)) or (
                hc.error is not None and str(hc.error).startswith(f"{safe_dir}: permission denied")):
            return hc.error
    if state.main.error is not None:
        return state.main.error
    if state.copy.error is not None:
        return state.copy.error
    return NotASafe(f"{safe_dir}: not a pointsafe safe{_foreign_hint(safe_dir)}")


def _repairable(safe_dir: Path, err: SafeError) -> bool:
    """True when ``repair`` can rebuild the header: the directory holds a safe's packs and the
    header is damaged or missing (not of a newer version, not unreadable for this user). The
    index may be gone too when the packs are there: repair rebuilds both."""
    if isinstance(err, UnsupportedVersion) or "permission denied" in str(err):
        return False
    try:
        packs = safe_dir / "packs"
        return packs.is_dir() and ((safe_dir / "index").is_dir() or any(packs.glob("*.pack")))
    except OSError:
        return False


_warned: set[str] = set()


def read_header(safe_dir: Path) -> SafeConfig:
    """The safe's configuration, from ``header`` or, when that is damaged or missing, from
    ``header.copy`` (saying so on stderr, once per process and safe). Raises NotASafe /
    UnsupportedVersion / SafeError (permission denied) when neither can be used."""
    return read_header_data(safe_dir)[0]


def read_header_data(safe_dir: Path) -> tuple[SafeConfig, bytes]:
    """:func:`read_header`, with the bytes of the header file used."""
    state = inspect_header(safe_dir)
    good = state.good
    if good is None:
        err = missing_header_error(safe_dir, state)
        if _repairable(safe_dir, err):
            if all(hc.data is None and hc.error is None for hc in (state.main, state.copy)):
                raise NotASafe(f"{safe_dir}: the safe's header is missing (and its copy); "
                               "'pointsafe repair' rebuilds it")
            raise NotASafe(f"{err}; if this is a safe, 'pointsafe repair' rebuilds the header")
        raise err
    if good is state.copy and str(safe_dir) not in _warned:
        _warned.add(str(safe_dir))
        why = state.main.error or f"{safe_dir}: the safe {HEADER_NAME} is missing"
        print(f"pointsafe: warning: {why}; using {COPY_NAME} ('pointsafe repair' rewrites the header)",
              file=sys.stderr)
    assert good.config is not None and good.data is not None
    return good.config, good.data
