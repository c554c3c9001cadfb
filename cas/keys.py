"""Object kinds and keys.

A key is ``blake3(kind_byte || raw_bytes)``: the kind is part of the hashed input, so the same
bytes stored as a data chunk and as a tree node get different keys (separate key domains).
"""

from __future__ import annotations

import enum

import blake3

KEY_SIZE = 32


class Kind(enum.IntEnum):
    """An object's kind: part of its key (the first byte hashed) and of its record header."""

    CHUNK = 1       # file or volume data, no children
    LIST = 2        # a Merkle list node of a blob
    TREE = 3        # a directory
    POINT = 4       # a recovery point record (children: its root)
    TOMBSTONE = 5   # marks a point as forgotten, so that repair does not resurrect it

    @property
    def has_children(self) -> bool:
        """True for node kinds (everything but CHUNK), whose bytes start with the node envelope."""
        return self is not Kind.CHUNK


def object_key(kind: int, data: bytes | memoryview) -> bytes:
    """The 32-byte key of ``data`` stored as ``kind``."""
    h = blake3.blake3(bytes((kind,)))
    h.update(data)
    return h.digest()


def short(key: bytes, n: int = 12) -> str:
    """The first ``n`` hex digits of ``key``, for messages."""
    return key.hex()[:n]
