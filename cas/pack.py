"""Pack files: append-only sequences of self-describing, checksummed object records.

Pack file layout (see docs/FORMAT.md)::

    pack header, 16 bytes:  magic b"PSPACK\\x00\\x01" | pack id u64 LE
    record*                 one per object, back to back

Record layout, a 64-byte header then the stored bytes::

    0   4  magic b"PSR\\x01"
    4   1  kind
    5   1  codec (0 = raw, 1 = zstd)
    6   1  cipher (0 = none, 1 = aes-256-gcm, 2 = chacha20-poly1305; cas/crypto.py)
    7   1  reserved, zero
    8  32  key = blake3(kind || raw bytes) (keyed with the id key in an encrypted safe)
    40  4  raw length, u32 LE
    44  4  stored length, u32 LE
    48 12  blake3(stored bytes)[:12]
    60  4  CRC-32 of bytes 0..60

Because each record names its key and kind, the LMDB index can be rebuilt from the packs alone.
In an encrypted safe the stored bytes are ``salt || AEAD(compressed-or-raw bytes)`` with bytes
0..48 of the header as associated data (cas/crypto.py); the check covers the stored bytes as
written, so framing is checked without the key.
"""

from __future__ import annotations

import struct
import threading
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, BinaryIO, Iterator

import blake3
import zstandard

from .crypto import OVERHEAD
from .errors import IntegrityError
from .keys import object_key

if TYPE_CHECKING:
    from .crypto import Crypto

PACK_MAGIC = b"PSPACK\x00\x01"
PACK_HEADER = struct.Struct("<8sQ")
REC_MAGIC = b"PSR\x01"
REC_HEADER = struct.Struct("<4sBBH32sII12sI")
REC_HEADER_SIZE = REC_HEADER.size  # 64
REC_AAD = struct.Struct("<4sBBH32sII")   # bytes 0..48: an encrypted record's associated data
AAD_SIZE = REC_AAD.size                  # 48
CIPHER_NONE = 0
KNOWN_CIPHERS = (0, 1, 2)                # byte 6 (bytes 6..8 read as u16: byte 7 must be 0)
CODEC_RAW = 0
CODEC_ZSTD = 1


def pack_name(pack_id: int) -> str:
    """The file name of pack ``pack_id``: 16 lowercase hex digits and ``.pack``."""
    return f"{pack_id:016x}.pack"


def pack_id_from_name(name: str) -> int | None:
    """The pack id a file name spells (as :func:`pack_name` makes it), or None for any other name."""
    if len(name) == 21 and name.endswith(".pack"):
        try:
            return int(name[:16], 16)
        except ValueError:
            return None
    return None


@dataclass(frozen=True, slots=True)
class Prepared:
    """An object ready to be appended: key computed, bytes compressed (or not)."""

    key: bytes
    kind: int
    codec: int
    raw_len: int
    stored: bytes | bytearray     # sealed (salt, ciphertext, tag) when ``cipher`` is not 0

    header: bytes = b""
    cipher: int = CIPHER_NONE

    def __post_init__(self) -> None:
        # The 64-byte record header is built here, in the (worker) thread that prepares the
        # object, so that the single writing thread only appends bytes.
        if not self.header:
            check = blake3.blake3(self.stored).digest()[:12]
            head = REC_HEADER.pack(REC_MAGIC, self.kind, self.codec, self.cipher, self.key,
                                   self.raw_len, len(self.stored), check, 0)
            object.__setattr__(self, "header", head[:60] + struct.pack("<I", zlib.crc32(head[:60])))

    def record(self) -> bytes:
        """The whole record (header and stored bytes): one copy; ``Writer.put_prepared``
        appends the two parts instead when it can."""
        return self.header + self.stored

    @property
    def record_len(self) -> int:
        """Bytes of the record in the pack: 64 of header plus the stored bytes."""
        return REC_HEADER_SIZE + len(self.stored)


_local = threading.local()


def _compressor(level: int) -> zstandard.ZstdCompressor:
    """One compressor per thread and level: a shared one serialises threads (measured
    on 2 threads: x1.04 with one shared compressor, x1.98 with one per thread)."""
    cache = getattr(_local, "c", None)
    if cache is None:
        cache = _local.c = {}
    c = cache.get(level)
    if c is None:
        c = cache[level] = zstandard.ZstdCompressor(level=level)
    return c


def _decompressor() -> zstandard.ZstdDecompressor:
    d = getattr(_local, "d", None)
    if d is None:
        d = _local.d = zstandard.ZstdDecompressor()
    return d


def prepare(kind: int, data: bytes | memoryview, level: int | None, key: bytes | None = None,
            crypto: Crypto | None = None) -> Prepared:
    """Hash and compress ``data`` (and, with ``crypto``, the safe's, seal it); safe to call from
    many threads at once.

    The object is stored raw when compression is off or does not make it smaller. ``key``, when
    given, must be the key of ``data`` in this safe (``crypto.object_key`` in an encrypted one).
    """
    if key is None:
        key = object_key(kind, data) if crypto is None else crypto.object_key(kind, data)
    codec = CODEC_RAW
    body: bytes | memoryview = data
    if level is not None and len(data) > 64:
        comp = _compressor(level).compress(data)
        if len(comp) < len(data):
            codec, body = CODEC_ZSTD, comp
    return _sealed(kind, key, codec, len(data), body, crypto)


def prepare_compressed(kind: int, compressed: bytes | memoryview, raw_len: int, key: bytes,
                       crypto: Crypto | None = None) -> Prepared:
    """An object whose bytes arrive already zstd-compressed: ``compressed`` is one zstd frame
    that decodes to ``raw_len`` bytes whose key in this safe is ``key`` (the caller decoded and
    hashed them: nothing here checks it), stored as it is (sealed with ``crypto``), without
    compressing again. The record is the one :func:`prepare` would write with that frame;
    ValueError when the frame is not smaller than the raw bytes (store those raw instead, as
    prepare would). Safe to call from many threads at once."""
    if len(compressed) >= raw_len:
        raise ValueError(f"a compressed body of {len(compressed)} bytes for {raw_len} raw bytes: store them raw")
    return _sealed(kind, key, CODEC_ZSTD, raw_len, compressed, crypto)


def _sealed(kind: int, key: bytes, codec: int, raw_len: int, body: bytes | memoryview,
            crypto: Crypto | None) -> Prepared:
    """The Prepared record of ``body`` (raw or compressed as ``codec`` says), sealed with
    ``crypto`` when the safe is encrypted."""
    if crypto is None:
        return Prepared(key, kind, codec, raw_len, body if isinstance(body, bytes) else bytes(body))
    cid = crypto.cipher_id
    aad = REC_AAD.pack(REC_MAGIC, kind, codec, cid, key, raw_len, len(body) + OVERHEAD)
    return Prepared(key, kind, codec, raw_len, crypto.seal_record(aad, body), cipher=cid)


@dataclass(frozen=True, slots=True)
class RecordHeader:
    """The parsed 64-byte header of a pack record (its CRC already checked)."""

    kind: int
    codec: int
    key: bytes
    raw_len: int
    stored_len: int
    check: bytes
    cipher: int = CIPHER_NONE

    @property
    def total(self) -> int:
        """Bytes of the whole record: header and stored bytes."""
        return REC_HEADER_SIZE + self.stored_len


def parse_record_header(buf: bytes | memoryview, pack: int, offset: int) -> RecordHeader:
    """The record header at the start of ``buf``; IntegrityError (naming pack and offset) when
    it is short, has the wrong magic, fails its CRC or names an unknown codec. The stored
    bytes are not checked here (``check_record``)."""
    if len(buf) < REC_HEADER_SIZE:
        raise IntegrityError(f"pack {pack_name(pack)} offset {offset}: truncated record header", pack, offset)
    magic, kind, codec, cipher, key, raw_len, stored_len, check, crc = REC_HEADER.unpack_from(buf)
    if magic != REC_MAGIC:
        raise IntegrityError(f"pack {pack_name(pack)} offset {offset}: bad record magic", pack, offset)
    if zlib.crc32(bytes(buf[:60])) != crc:
        raise IntegrityError(f"pack {pack_name(pack)} offset {offset}: record header checksum mismatch", pack, offset)
    if codec not in (CODEC_RAW, CODEC_ZSTD):
        raise IntegrityError(f"pack {pack_name(pack)} offset {offset}: unknown codec {codec}", pack, offset)
    if cipher not in KNOWN_CIPHERS:
        raise IntegrityError(f"pack {pack_name(pack)} offset {offset}: unknown cipher {cipher}", pack, offset)
    return RecordHeader(kind, codec, key, raw_len, stored_len, check, cipher)


class _Where:
    """"pack NAME offset N", formatted only when an error message needs it (hot path)."""

    __slots__ = ("pack", "offset")

    def __init__(self, pack: int, offset: int):
        self.pack, self.offset = pack, offset

    def __format__(self, spec: str) -> str:
        return f"pack {pack_name(self.pack)} offset {self.offset}"


def check_record(buf: bytes | memoryview, pack: int, offset: int,
                 expect_key: bytes | None = None, checksum: bool = True) -> tuple[RecordHeader, memoryview]:
    """Check a record's framing, key and stored-bytes checksum (unless ``checksum`` is False:
    the caller authenticates the bytes itself) without decompressing it; return its header and
    its stored bytes. Raises IntegrityError naming pack and offset."""
    h = parse_record_header(buf, pack, offset)
    where = _Where(pack, offset)
    if expect_key is not None and h.key != expect_key:
        raise IntegrityError(f"{where}: record holds object {h.key.hex()[:12]}, "
                             f"index expected {expect_key.hex()[:12]}", pack, offset)
    stored = memoryview(buf)[REC_HEADER_SIZE:REC_HEADER_SIZE + h.stored_len]
    if len(stored) != h.stored_len:
        raise IntegrityError(f"{where}: record truncated ({len(stored)} of {h.stored_len} bytes)", pack, offset)
    if checksum and blake3.blake3(stored).digest()[:12] != h.check:
        raise IntegrityError(f"{where}: object {h.key.hex()[:12]} is damaged (checksum mismatch)", pack, offset)
    return h, stored


def _unseal(buf: bytes | memoryview, h: RecordHeader, stored: memoryview, pack: int, offset: int,
            crypto: Crypto | None) -> bytes | memoryview:
    """The stored bytes as written before sealing: opened with the safe's keys when the record
    is encrypted; IntegrityError when the record's encryption is not the safe's (a plain
    record in an encrypted safe would be a forgery nobody can authenticate)."""
    if h.cipher != CIPHER_NONE:
        if crypto is None:
            raise IntegrityError(f"{_Where(pack, offset)}: object {h.key.hex()[:12]} is encrypted, "
                                 "in a safe that is not", pack, offset)
        return crypto.open_record(memoryview(buf)[:AAD_SIZE], stored, pack, offset, h.cipher)
    if crypto is not None:
        raise IntegrityError(f"{_Where(pack, offset)}: object {h.key.hex()[:12]} is not encrypted, "
                             "in an encrypted safe (written without the key)", pack, offset)
    return stored


def stored_body(buf: bytes | memoryview, pack: int, offset: int, expect_key: bytes | None = None,
                crypto: Crypto | None = None) -> tuple[RecordHeader, bytes | memoryview]:
    """A record's header and its body as compressed (``h.codec``), checked (checksum, or the
    tag of an encrypted safe) and opened, not decompressed: what the safe server sends an agent,
    which decompresses and checks the content against its id itself. Raises IntegrityError as
    :func:`decode_record_view`."""
    h, stored = check_record(buf, pack, offset, expect_key, crypto is None)
    return h, _unseal(buf, h, stored, pack, offset, crypto)


def decode_record_view(buf: bytes | memoryview, pack: int, offset: int, rehash: bool = True,
                       expect_key: bytes | None = None, crypto: Crypto | None = None,
                       checksum: bool | None = None) -> tuple[RecordHeader, bytes | memoryview]:
    """Check a whole record (header + stored bytes) and return its raw content, without
    copying it when the record is stored raw and plain: then it is a view of ``buf`` (which it
    keeps alive); a compressed or encrypted record comes back as new bytes. ``crypto`` is the
    safe's (None for a plain safe): an encrypted record is authenticated and decrypted.

    The stored-bytes checksum is checked unless ``checksum`` says otherwise; by default (None)
    it is skipped for an encrypted safe, whose tag authenticates the same bytes (one pass less
    on every read), and checked for a plain one.

    Raises IntegrityError, naming the pack and offset, when any check fails; never returns
    bytes that do not match their checksum or authentication tag (and, with ``rehash``, key).
    """
    h, stored = check_record(buf, pack, offset, expect_key, crypto is None if checksum is None else checksum)
    body = _unseal(buf, h, stored, pack, offset, crypto)
    raw: bytes | memoryview
    if h.codec == CODEC_ZSTD:
        try:
            raw = _decompressor().decompress(body, max_output_size=h.raw_len)
        except zstandard.ZstdError as e:
            raise IntegrityError(f"{_Where(pack, offset)}: object {h.key.hex()[:12]} does not decompress ({e})",
                                 pack, offset) from None
    else:
        raw = body
    if len(raw) != h.raw_len:
        raise IntegrityError(f"{_Where(pack, offset)}: object {h.key.hex()[:12]} has {len(raw)} bytes, "
                             f"expected {h.raw_len}", pack, offset)
    if rehash and (object_key(h.kind, raw) if crypto is None else crypto.object_key(h.kind, raw)) != h.key:
        raise IntegrityError(f"{_Where(pack, offset)}: object {h.key.hex()[:12]} does not match its key", pack, offset)
    return h, raw


def decode_record(buf: bytes | memoryview, pack: int, offset: int, rehash: bool = True,
                  expect_key: bytes | None = None, crypto: Crypto | None = None) -> tuple[RecordHeader, bytes]:
    """:func:`decode_record_view`, always returning bytes of their own (a copy of a raw record).

    Raises IntegrityError, naming the pack and offset, when any check fails; never returns
    bytes that do not match their checksum (and, with ``rehash``, their key).
    """
    h, raw = decode_record_view(buf, pack, offset, rehash, expect_key, crypto)
    return h, raw if isinstance(raw, bytes) else bytes(raw)


def write_pack_header(f: BinaryIO, pack_id: int) -> None:
    """Write the 16-byte pack header of ``pack_id`` at ``f``'s position (no flush, no sync)."""
    f.write(PACK_HEADER.pack(PACK_MAGIC, pack_id))


def check_pack_header(buf: bytes, pack_id: int) -> None:
    """Return when ``buf`` starts with the pack header of ``pack_id``; IntegrityError (offset 0)
    when it is short, has the wrong magic or names another pack."""
    if len(buf) < PACK_HEADER.size:
        raise IntegrityError(f"pack {pack_name(pack_id)}: truncated pack header", pack_id, 0)
    magic, pid = PACK_HEADER.unpack_from(buf)
    if magic != PACK_MAGIC:
        raise IntegrityError(f"pack {pack_name(pack_id)}: bad pack magic", pack_id, 0)
    if pid != pack_id:
        raise IntegrityError(f"pack {pack_name(pack_id)}: header names pack {pid:016x}", pack_id, 0)


@dataclass(frozen=True, slots=True)
class ScanItem:
    """One step of :func:`scan_pack`.

    A record: ``header`` is set; ``error`` tells why its stored bytes are unusable (or, with
    ``torn``, that it runs past the end of the pack). A damaged region: ``header`` is None and
    ``length`` bytes from ``offset`` could not be read as records (a damaged pack header is the
    region 0..16); the walk goes on after it. ``torn`` marks the end of the pack: from ``offset``
    on, an unfinished last record (a crashed writer's tail) that holds nothing readable.
    """

    offset: int
    header: RecordHeader | None     # None for a damaged region
    error: IntegrityError | None
    length: int = 0                 # bytes of a damaged region (header None)
    torn: bool = False


RESYNC_WINDOW = 1 << 20


def _valid_record_at(f: BinaryIO, off: int, size: int, pack_id: int) -> RecordHeader | None:
    """The header of an intact record at ``off`` (header CRC and stored-bytes check hold and
    it ends within ``size``), else None."""
    f.seek(off)
    hb = f.read(REC_HEADER_SIZE)
    try:
        h = parse_record_header(hb, pack_id, off)
    except IntegrityError:
        return None
    if off + h.total > size:
        return None
    try:
        check_record(hb + f.read(h.stored_len), pack_id, off)
    except IntegrityError:
        return None
    return h


def _resync(f: BinaryIO, start: int, size: int, pack_id: int) -> int | None:
    """The offset of the next intact record after ``start`` (scanning for the record magic),
    or None when there is none before ``size``."""
    pos = start + 1
    while pos + REC_HEADER_SIZE <= size:
        f.seek(pos)
        window = f.read(min(RESYNC_WINDOW + len(REC_MAGIC) - 1, size - pos))
        i = window.find(REC_MAGIC)
        while i >= 0:
            if _valid_record_at(f, pos + i, size, pack_id) is not None:
                return pos + i
            i = window.find(REC_MAGIC, i + 1)
        pos += RESYNC_WINDOW
    return None


def _zeros(f: BinaryIO, start: int, end: int) -> bool:
    """True when bytes ``start..end`` of ``f`` are all zero."""
    f.seek(start)
    while start < end:
        block = f.read(min(RESYNC_WINDOW, end - start))
        if not block or block.count(0) != len(block):
            return not block
        start += len(block)
    return True


def _damaged(pack_id: int, off: int, end: int, why: IntegrityError) -> ScanItem:
    msg = (f"pack {pack_name(pack_id)} bytes {off}..{end} ({end - off} bytes) cannot be read: "
           f"{why}")
    return ScanItem(off, None, IntegrityError(msg, pack_id, off), length=end - off)


def scan_pack(f: BinaryIO, pack_id: int, size: int, read_data: bool = True, rehash: bool = False,
              crypto: Crypto | None = None) -> Iterator[ScanItem]:
    """Walk the records of a pack in order, up to ``size`` bytes, reading it through ``f``
    (``PackStore.open_reader``) (docs/FORMAT.md, "Walking a pack").

    A record whose stored bytes fail their checks is yielded with its error and the walk goes
    on (its length is known from its checked header). A header that does not parse (or a
    damaged pack header) is yielded as a damaged region, and the walk resynchronises at the
    next intact record, found by scanning for the record magic; records start at 16 whatever
    the pack header holds. Only the end can be ``torn``: fewer than 64 bytes, or a checked
    header whose record runs past the end, after the last intact record. With ``read_data`` each
    record is decoded (with ``crypto``, the safe's, authenticated and decrypted).
    """
    f.seek(0)
    head = f.read(PACK_HEADER.size)
    try:
        check_pack_header(head, pack_id)
    except IntegrityError as e:
        if len(head) < PACK_HEADER.size:
            yield ScanItem(0, None, e, length=len(head), torn=True)
            return
        yield ScanItem(0, None, e, length=PACK_HEADER.size)
    off = PACK_HEADER.size
    while off < size:
        if size - off < REC_HEADER_SIZE:
            yield ScanItem(off, None, IntegrityError(
                f"pack {pack_name(pack_id)} offset {off}: truncated record header", pack_id, off),
                length=size - off, torn=True)
            return
        f.seek(off)
        hb = f.read(REC_HEADER_SIZE)
        try:
            h = parse_record_header(hb, pack_id, off)
        except IntegrityError as e:
            nxt = _resync(f, off, size, pack_id)
            if nxt is None and _zeros(f, off, size):
                # A crash can leave the tail's blocks allocated but never written.
                yield ScanItem(off, None, e, length=size - off, torn=True)
                return
            yield _damaged(pack_id, off, size if nxt is None else nxt, e)
            if nxt is None:
                return
            off = nxt
            continue
        if off + h.total > size:
            nxt = _resync(f, off, size, pack_id)
            if nxt is None:
                yield ScanItem(off, h, IntegrityError(
                    f"pack {pack_name(pack_id)} offset {off}: record runs past the end of the pack",
                    pack_id, off), length=size - off, torn=True)
                return
            # A checked header with a length that does not fit, yet intact records follow.
            yield _damaged(pack_id, off, nxt, IntegrityError(
                f"pack {pack_name(pack_id)} offset {off}: record runs past the end of the pack", pack_id, off))
            off = nxt
            continue
        err = None
        if read_data:
            body = f.read(h.stored_len)
            try:
                decode_record_view(hb + body, pack_id, off, rehash=rehash, crypto=crypto, checksum=True)
            except IntegrityError as e:
                err = e
        yield ScanItem(off, h, err)
        off += h.total
