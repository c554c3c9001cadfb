"""Helpers for the safe's tests: build points through the writer API, walk and check them.

Kept free of pytest so that helper processes (tests/_kill_writer.py) can import it too.
"""

from __future__ import annotations

import os
import random
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from pointsafe.cas import (BlobBuilder, Entry, Kind, Point, Safe, decode_tree, encode_tree, utc_now_iso)
from pointsafe.cas.index import ObjectEntry
from pointsafe.cas.pack import REC_HEADER_SIZE
from pointsafe.cas.tree import DIR, REG

TESTS = Path(__file__).resolve().parent


def random_bytes(rng: random.Random, n: int, compressible: bool) -> bytes:
    """``n`` bytes: random (incompressible) or text-like runs that zstd shrinks."""
    if not compressible:
        return rng.randbytes(n)
    words = [rng.randbytes(rng.randint(1, 8)).hex().encode() for _ in range(32)]
    out = bytearray()
    while len(out) < n:
        out += rng.choice(words) + b" "
    return bytes(out[:n])


def put_blob(w, data_parts: list[bytes | int], fanout: int) -> tuple[bytes | None, int]:
    """Store a blob made of parts (bytes are chunks, an int is a hole of that many zeros)."""
    b = BlobBuilder(w.put_node, fanout)
    for part in data_parts:
        if isinstance(part, int):
            b.add(None, part)
        elif part:
            b.add(w.put(Kind.CHUNK, part), len(part))
    return b.finish(), b.size


def blob_bytes(parts: list[bytes | int]) -> bytes:
    return b"".join(bytes(p) if isinstance(p, int) else p for p in parts)


def make_point(w, name: str, files: dict[bytes, list[bytes | int]], fanout: int = 4,
               subdir: dict[bytes, list[bytes | int]] | None = None) -> Point:
    """Commit a tree point holding ``files`` (and optionally a sub-directory ``sub``)."""
    entries = []
    total = 0
    for fname, parts in files.items():
        root, size = put_blob(w, parts, fanout)
        entries.append(Entry(fname, REG, 0o644, size=size, ref=root, mtime_ns=1))
        total += size
    if subdir is not None:
        sub_entries = []
        for fname, parts in subdir.items():
            root, size = put_blob(w, parts, fanout)
            sub_entries.append(Entry(fname, REG, 0o600, size=size, ref=root))
            total += size
        kids, payload = encode_tree(sub_entries)
        entries.append(Entry(b"sub", DIR, 0o755, ref=w.put_node(Kind.TREE, kids, payload)))
    kids, payload = encode_tree(entries)
    tree = w.put_node(Kind.TREE, kids, payload)
    now = utc_now_iso()
    return w.add_point({"name": name, "kind": "tree", "source": "/test", "host": "test",
                        "started": now, "finished": now, "size": total, "warnings": [],
                        "stats": {}}, tree)


def reachable(safe: Safe, key: bytes) -> Iterator[bytes]:
    """Every key reachable from ``key`` (itself included), depth first, with repeats removed."""
    seen = set()
    stack = [key]
    while stack:
        k = stack.pop()
        if k in seen:
            continue
        seen.add(k)
        yield k
        stack.extend(safe.children(k))


def check_object(safe: Safe, key: bytes) -> bytes:
    """Read ``key`` and prove the bytes are the object's own (re-hash against the key)."""
    e = safe.entry(key)
    assert e is not None, f"object {key.hex()[:12]} is not indexed"
    raw = safe.get(key)
    assert safe.object_key(e.kind, raw) == key, f"object {key.hex()[:12]} read back wrong bytes"
    return raw


def check_point(safe: Safe, point: Point) -> int:
    """Read every object a point reaches; return how many."""
    pk = bytes.fromhex(point.id)
    n = 0
    for k in reachable(safe, pk):
        check_object(safe, k)
        n += 1
    return n


def tree_files(safe: Safe, tree_key: bytes) -> dict[bytes, Entry]:
    return {e.name: e for e in decode_tree(safe.get(tree_key))}


def record_offset_of(safe: Safe, key: bytes) -> tuple[Path, ObjectEntry]:
    e = safe.entry(key)
    return safe.pack_path(e.pack), e


def flip_bit(path: Path, offset: int, bit: int = 0) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes((b[0] ^ (1 << bit),)))


def stored_offset(e: ObjectEntry, into: int = 0) -> int:
    """File offset of byte ``into`` of an object's stored bytes (past the record header)."""
    return e.offset + REC_HEADER_SIZE + into


def pack_bytes(safe_dir: Path) -> int:
    return sum(p.stat().st_size for p in (Path(safe_dir) / "packs").iterdir())


@contextmanager
def tmpfs(mountpoint: Path, size: str) -> Iterator[Path]:
    """A small tmpfs (root only), always unmounted."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mountpoint)], check=True)
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)


@contextmanager
def read_only_bind(src: Path, dst: Path) -> Iterator[Path]:
    """``src`` bind-mounted read-only at ``dst`` (root only), always unmounted."""
    dst.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "--bind", str(src), str(dst)], check=True, timeout=30)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(dst)], check=True, timeout=30)
        yield dst
    finally:
        subprocess.run(["umount", "-l", str(dst)], timeout=30, check=False)


def fill_disk(path: Path, leave: int = 0) -> None:
    """Write a file that takes the free space of ``path``'s filesystem, leaving ``leave`` bytes."""
    st = os.statvfs(path)
    free = st.f_bavail * st.f_frsize - leave
    if free > 0:
        with open(path / "filler", "wb") as f:
            try:
                f.write(b"\xff" * free)
            except OSError:
                pass
