"""Helpers for the retention/GC/defrag tests: histories of real backups, and reading points
back to prove their data is intact. Free of pytest so helper processes can import it."""

from __future__ import annotations

import random
from pathlib import Path

import blake3

from pointsafe.cas import BlobReader, NodeCache, Point, Safe, read_tree
from pointsafe.cas.tree import DIR, REG


def write_source(src: Path, rng: random.Random, files: int = 12, size: int = 256 * 1024) -> None:
    """A source tree of random (incompressible) files, some in a sub-directory."""
    (src / "sub").mkdir(parents=True, exist_ok=True)
    for i in range(files):
        d = src / "sub" if i % 3 == 0 else src
        (d / f"f{i:03d}").write_bytes(rng.randbytes(size))


def mutate(src: Path, rng: random.Random, fraction: float = 0.05, new_file: int = 0) -> None:
    """Overwrite ``fraction`` of the source's bytes in 16 KiB pieces; optionally add a file."""
    files = sorted(p for p in src.rglob("*") if p.is_file())
    total = sum(p.stat().st_size for p in files)
    for _ in range(max(1, int(total * fraction) // 16384)):
        p = rng.choice(files)
        n = p.stat().st_size
        off = rng.randrange(0, max(1, n - 16384))
        with open(p, "r+b") as f:
            f.seek(off)
            f.write(rng.randbytes(16384))
    if new_file:
        (src / f"new{rng.randrange(1 << 30):08x}").write_bytes(rng.randbytes(new_file))


def backup(safe: Safe, src: Path, name: str) -> Point:
    """One real backup (the ingest pipeline, in this process); returns its point."""
    from pointsafe.ingest.backup import BackupOptions, backup as run
    return run(safe, str(src), BackupOptions(name=name)).point


def source_digests(src: Path) -> dict[str, str]:
    return {str(p.relative_to(src)): blake3.blake3(p.read_bytes()).hexdigest()
            for p in sorted(src.rglob("*")) if p.is_file()}


def point_digests(safe: Safe, point: Point) -> dict[str, str]:
    """{relative path: blake3 of content} of every regular file of a tree point, read back
    through the safe (every chunk's checksum is checked on the way)."""
    assert point.root is not None, f"point {point.id[:12]} has no root"
    return tree_digests(safe, point.root)


def tree_digests(safe: Safe, root: bytes) -> dict[str, str]:
    """{relative path: blake3 of content} of every regular file under the tree ``root``,
    read back through the safe (every chunk's checksum is checked on the way)."""
    out: dict[str, str] = {}
    nodes = NodeCache(256)
    kind = lambda k: safe.entry(k).kind  # noqa: E731
    stack = [("", root)]
    while stack:
        prefix, key = stack.pop()
        for e in read_tree(safe.get, key):
            path = prefix + e.name.decode()
            if e.type == DIR and e.ref is not None:
                stack.append((path + "/", e.ref))
            elif e.type == REG:
                h = blake3.blake3()
                if e.ref is not None:
                    r = BlobReader(e.ref, e.size, safe.get, kind, nodes=nodes)
                    off = 0
                    while off < e.size:
                        piece = r.read(off, 1 << 20)
                        h.update(piece)
                        off += len(piece)
                out[path] = h.hexdigest()
    return out


def reachable(safe: Safe, keys) -> set[bytes]:
    seen: set[bytes] = set()
    stack = list(keys)
    while stack:
        k = stack.pop()
        if k in seen:
            continue
        seen.add(k)
        stack.extend(safe.children(k))
    return seen


def pack_bytes(safe_dir: Path) -> int:
    """The bytes of the safe's packs: its pack files, or the packs in its bucket."""
    from pointsafe.cas.s3safe import pack_store, remote_of
    bucket = remote_of(Path(safe_dir))
    if bucket is not None:
        store = pack_store(bucket, Path(safe_dir))
        return sum(store.size(pid) or 0 for pid in store.pack_ids())
    return sum(p.stat().st_size for p in (Path(safe_dir) / "packs").glob("*.pack"))
