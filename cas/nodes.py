"""The node envelope shared by every object kind that references other objects.

A node's raw bytes are::

    u32 LE  n, the number of distinct children
    n × 32  the children's keys
    ...     the kind-specific payload

so that the safe can find any node's children (for reference counting, GC and audits) without
understanding its payload. Payloads refer to a child by its index in this list.
"""

from __future__ import annotations

import struct

from .keys import KEY_SIZE

_U32 = struct.Struct("<I")


def encode_node(children: list[bytes], payload: bytes) -> bytes:
    """The raw bytes of a node: u32 LE child count, the 32-byte child keys, then ``payload``.
    ``children`` should be distinct (a node counts each child once)."""
    return b"".join((_U32.pack(len(children)), *children, payload))


def decode_node(raw: bytes) -> tuple[list[bytes], memoryview]:
    """Split a node into (children, payload); the payload is a view of ``raw``, not a copy.
    ValueError (or struct.error) when ``raw`` is too short for the children it claims."""
    (n,) = _U32.unpack_from(raw)
    end = 4 + n * KEY_SIZE
    if end > len(raw):
        raise ValueError(f"node claims {n} children but holds {len(raw)} bytes")
    mv = memoryview(raw)
    return [bytes(mv[4 + i * KEY_SIZE: 4 + (i + 1) * KEY_SIZE]) for i in range(n)], mv[end:]


def node_children(raw: bytes) -> list[bytes]:
    """The child keys of a node's raw bytes (errors as :func:`decode_node`)."""
    return decode_node(raw)[0]


class ChildTable:
    """Collects a node's distinct children and hands out their indexes."""

    __slots__ = ("keys", "_pos")

    def __init__(self) -> None:
        self.keys: list[bytes] = []
        self._pos: dict[bytes, int] = {}

    def index(self, key: bytes) -> int:
        """The index of ``key`` among the children, adding it when it is new."""
        i = self._pos.get(key)
        if i is None:
            i = self._pos[key] = len(self.keys)
            self.keys.append(key)
        return i
