"""The wire format both sides share: object records in a byte stream, and the request bounds.

An object stream (upload bodies, fetch answers) is a sequence of records::

    u8   kind        (cas Kind: 1 chunk, 2 list, 3 tree)
    32   id          the object's id in the agent's id space: plain BLAKE3 of kind || raw bytes
    u8   codec       0 raw, 1 zstd
    u32  raw_len     LE, bytes of the object once decoded
    u32  body_len    LE, bytes that follow
    ...  body

Nodes (lists, trees) carry their children as agent ids in the node envelope (cas/nodes.py).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import zstandard

from pointsafe.cas import Kind, object_key

REC = struct.Struct("<B32sBII")
CODEC_RAW = 0
CODEC_ZSTD = 1
KINDS = (Kind.CHUNK, Kind.LIST, Kind.TREE)   # what an agent may upload or fetch (points: commit only)

MAX_BODY = 64 * 1024 * 1024        # bytes of one request body (an upload of objects)
MAX_JSON = 4 * 1024 * 1024         # bytes of a JSON body (ids, a point record)
MAX_OBJECT = 32 * 1024 * 1024      # raw bytes of one object (the largest chunk or node)
MAX_IDS = 4096                     # ids in one missing or fetch request
UPLOAD_BYTES = 16 * 1024 * 1024    # the agent uploads in bodies of about this size


class BadStream(ValueError):
    """An object stream that is truncated or malformed (its message says where)."""


@dataclass(frozen=True)
class Record:
    """One object of a stream: kind, agent id, its raw bytes once decoded and, when it came
    zstd-compressed (``codec``), the frame as sent (``body``: stored as it is, not compressed
    again)."""

    kind: int
    id: bytes
    raw: bytes
    codec: int = CODEC_RAW
    body: bytes | memoryview | None = None


def encode(kind: int, oid: bytes, codec: int, raw_len: int,
           body: bytes | bytearray | memoryview) -> list[bytes | bytearray | memoryview]:
    """The pieces of one record (header, body), to be joined into a stream."""
    return [REC.pack(kind, oid, codec, raw_len, len(body)), body]


def decode(buf: bytes | memoryview, max_object: int = MAX_OBJECT) -> list[Record]:
    """Every record of ``buf``, decompressed; BadStream when it is truncated, names an unknown
    kind or codec, claims more than ``max_object`` bytes, or a body does not decode to its
    raw_len (a zstd body: exactly one frame, nothing after it). Ids are not checked here (see :func:`check_ids`)."""
    mv = memoryview(buf)
    out: list[Record] = []
    pos = 0
    dec = zstandard.ZstdDecompressor()
    while pos < len(mv):
        if pos + REC.size > len(mv):
            raise BadStream(f"truncated record header at byte {pos}")
        kind, oid, codec, raw_len, body_len = REC.unpack_from(mv, pos)
        pos += REC.size
        if kind not in KINDS:
            raise BadStream(f"record at byte {pos - REC.size}: kind {kind} is not an object an agent may send")
        if raw_len > max_object or body_len > max_object:
            raise BadStream(f"record at byte {pos - REC.size}: {max(raw_len, body_len)} bytes, more than the "
                            f"limit of {max_object}")
        if pos + body_len > len(mv):
            raise BadStream(f"truncated record body at byte {pos}: {body_len} bytes claimed, {len(mv) - pos} left")
        body = mv[pos:pos + body_len]
        pos += body_len
        raw = _decoded(dec, codec, body, raw_len, pos)
        out.append(Record(kind, bytes(oid), raw, codec, body if codec == CODEC_ZSTD else None))
    return out


def _decoded(dec: zstandard.ZstdDecompressor, codec: int, body: memoryview, raw_len: int, pos: int) -> bytes:
    if codec == CODEC_RAW:
        raw = bytes(body)
    elif codec == CODEC_ZSTD:
        try:
            # one frame and nothing after it: the frame is what gets stored
            raw = dec.decompress(body, max_output_size=raw_len, allow_extra_data=False)
        except zstandard.ZstdError as e:
            raise BadStream(f"record ending at byte {pos}: does not decompress ({e})") from None
    else:
        raise BadStream(f"record ending at byte {pos}: unknown codec {codec}")
    if len(raw) != raw_len:
        raise BadStream(f"record ending at byte {pos}: {len(raw)} bytes once decoded, {raw_len} claimed")
    return raw


def agent_id(kind: int, raw: bytes | memoryview) -> bytes:
    """An object's id in the agent's id space: plain (unkeyed) BLAKE3 of kind || raw."""
    return object_key(kind, raw)


def parse_ids(value: object, what: str = "ids") -> list[bytes]:
    """A JSON list of hex ids as bytes; ValueError (one line) when it is not a list of at
    most MAX_IDS 64-digit hex strings."""
    if not isinstance(value, list):
        raise ValueError(f"'{what}' must be a list of hex ids")
    if len(value) > MAX_IDS:
        raise ValueError(f"'{what}' holds {len(value)} ids, more than {MAX_IDS} in one request")
    out = []
    for v in value:
        if not isinstance(v, str) or len(v) != 64:
            raise ValueError(f"'{what}' must hold 64-digit hex ids, not {str(v)[:80]!r}")
        try:
            out.append(bytes.fromhex(v))
        except ValueError:
            raise ValueError(f"'{what}' must hold 64-digit hex ids, not {v[:80]!r}") from None
    return out


def point_name_problem(name: object) -> str | None:
    """Why ``name`` cannot name a point (None when it can): 1 to 255 printable characters,
    without '@' or '/' (the agent checks before it reads, the server again at the commit)."""
    if not isinstance(name, str) or not name.strip() or "/" in name or "@" in name or len(name) > 255 \
            or any(ord(c) < 32 or 127 <= ord(c) < 160 for c in name):
        return (f"bad point name {str(name)[:80]!r}: it must be 1 to 255 printable characters "
                "without '@' or '/'")
    return None
