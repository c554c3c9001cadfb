#!/usr/bin/env python3
"""Deterministic benchmark data set: large files of mixed entropy, tens of thousands of small
files in a nested tree, and an ext4 image with files inside.

    python scripts/bench/data.py DIR [--size 2G] [--seed 1]      # generate (or reuse) DIR
    python scripts/bench/data.py DIR --mutate 0.01                # 1% as scattered 64 KiB writes
    python scripts/bench/data.py DIR --undo                       # put the original bytes back

The same seed and size give the same bytes (file contents, names, sizes and mtimes; the ext4
image gets a fixed UUID and hash seed, its own timestamps may differ). Composition of SIZE:

- ``large/``  ≈ 72%: nine files (≈ SIZE/4 down to SIZE/29) of segments of 256 KiB–8 MiB:
  random (incompressible) 35%, text-like 40% (zstd level 1 ratio ≈ 2.1), zero runs 10%,
  database-like 8 KiB pages (text then zero padding) 15%.
- ``small/``  ≈ 13%: files of 64 B–64 KiB (log-uniform, mean ≈ 9 KiB; ≈ 30,000 at 2 GiB) in a
  tree 3–4 levels deep: text 75%, random 20%, copies of an earlier file 4%, empty 1%.
- ``disk.img`` ≈ 15%: an ext4 image (``mkfs.ext4 -d``) about 65% full: medium files of mixed
  content plus a few hundred small text files.

Nothing in the data set repeats by accident (every segment is drawn fresh from the seed), so
deduplication finds only the intended zero runs, pages and copies.

Two files sit next to DIR (never inside it, so they are not backed up): ``DIR.manifest.json``
(parameters, file list, where the image's file data lies) and, after ``--mutate``, ``DIR.undo``
(the overwritten bytes). ``--mutate`` overwrites FRACTION of the data set's bytes as 64 KiB
writes at 4 KiB-aligned offsets (the way databases and filesystems write) scattered over the
large files and over the data blocks of files inside the image (raw writes into the image at
offsets ``debugfs`` reports, so the filesystem stays consistent). ``--undo`` restores the
bytes and mtimes, so one generated set serves many runs.

Library use (the other benchmarks import this): ``ensure(dest, size, seed)`` returns the
manifest of a ready, unmutated set; ``mutate(dest, fraction)`` and ``undo(dest)``.
"""

from __future__ import annotations

import argparse
import array
import bisect
import json
import math
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import blake3

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import human_bytes, log, parse_size  # noqa: E402

VERSION = 2                  # bump when the generator's output changes
DEFAULT_SIZE = 2 << 30
DEFAULT_SEED = 1
WRITE_SIZE = 64 << 10        # one mutation write
ALIGN = 4096
MTIME = 1_700_000_000        # fixed mtimes (2023-11-14) so metadata is deterministic too
IMAGE_UUID = "5eed5eed-0000-4000-8000-00000000b0b0"

SHARE_LARGE, SHARE_SMALL = 0.72, 0.13          # the image gets the rest
LARGE_WEIGHTS = [8, 4, 4, 2, 2, 1, 1, 1, 1]
SEGMENT_KINDS = [("random", 35), ("text", 40), ("zeros", 10), ("pages", 15)]
PAGE = 8192


# --------------------------------------------------------------------------- content streams

class Streams:
    """Random and text-like byte streams derived from the seed.

    Random bytes come from BLAKE3 in XOF mode (≈ 230 MB/s, faster than ``random.randbytes``);
    text is phrases of pseudo-words (Zipf-like frequencies, some numbers) picked by random
    16-bit indices, which compresses like prose (zstd level 1 ≈ 2.1).
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self._ctr = 0
        r = random.Random(f"pointsafe-bench:{seed}:words")
        syll = [a + b for a in "b c d f g h k l m n p r s t v w st tr ch sh z j".split()
                for b in "a e i o u ou ea ai y".split()]
        vocab: list[str] = []
        seen: set[str] = set()
        while len(vocab) < 16384:
            w = "".join(r.choice(syll) for _ in range(r.choice([1, 2, 2, 2, 3, 3, 4])))
            if w not in seen:
                seen.add(w)
                vocab.append(w)
        cum, acc = [], 0.0
        for i in range(len(vocab)):
            acc += 1 / (i + 1) ** 0.7
            cum.append(acc)
        phrases = []
        for _ in range(65536):
            words = r.choices(vocab, cum_weights=cum, k=r.randint(3, 10))
            if r.random() < 0.3:
                words.insert(r.randrange(len(words)), str(r.randrange(10 ** r.randint(1, 8))))
            phrases.append((" ".join(words) + r.choice([" ", ", ", ". ", ".\n", " ", " "])).encode())
        self._phrases = phrases

    def _key(self, label: str) -> bytes:
        return f"pointsafe-bench:{self.seed}:{label}".encode()

    def random(self, label: str, n: int) -> bytes:
        return blake3.blake3(self._key(label)).digest(length=n) if n else b""

    def text(self, label: str, n: int) -> bytes:
        out, total, i = [], 0, 0
        key = self._key(label)
        while total < n:
            k = (n - total) // 40 + 16
            idx = array.array("H")
            idx.frombytes(blake3.blake3(key + i.to_bytes(4, "little")).digest(length=2 * k))
            s = b"".join(map(self._phrases.__getitem__, idx))
            out.append(s)
            total += len(s)
            i += 1
        return b"".join(out)[:n]

    def pages(self, label: str, n: int) -> bytes:
        """Database-like: 8 KiB pages, each 1–7 KiB of text then zeros."""
        r = random.Random(self._key(label))
        fill = [r.randint(1024, 7 * 1024) for _ in range(-(-n // PAGE))]
        body = self.text(label, sum(fill))
        out, pos = bytearray(), 0
        for f in fill:
            out += body[pos:pos + f]
            out += bytes(PAGE - f)
            pos += f
        return bytes(out[:n])

    def segment(self, kind: str, label: str, n: int) -> bytes:
        if kind == "zeros":
            return bytes(n)
        return getattr(self, kind)(label, n)


def _mixed_segments(r: random.Random, size: int, max_seg: int) -> Iterator[tuple[str, int]]:
    kinds = [k for k, _ in SEGMENT_KINDS]
    weights = [w for _, w in SEGMENT_KINDS]
    pos = 0
    while pos < size:
        n = min(size - pos, r.randint(256 << 10, max(256 << 10, max_seg)) // ALIGN * ALIGN)
        yield r.choices(kinds, weights)[0], n
        pos += n


def _write_mixed(path: Path, size: int, streams: Streams, r: random.Random, max_seg: int) -> None:
    with open(path, "wb") as f:
        for i, (kind, n) in enumerate(_mixed_segments(r, size, max_seg)):
            # write in pieces of ≤ 8 MiB so memory stays small
            for j in range(0, n, 8 << 20):
                f.write(streams.segment(kind, f"{path.name}:{i}:{j}", min(8 << 20, n - j)))


# --------------------------------------------------------------------------- the generator

def manifest_path(dest: Path) -> Path:
    return Path(str(dest) + ".manifest.json")


def undo_path(dest: Path) -> Path:
    return Path(str(dest) + ".undo")


def load_manifest(dest: str | os.PathLike) -> dict[str, Any] | None:
    p = manifest_path(Path(dest))
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


def _save_manifest(dest: Path, m: dict[str, Any]) -> None:
    tmp = manifest_path(dest).with_suffix(".tmp")
    tmp.write_text(json.dumps(m, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, manifest_path(dest))


def generate(dest: str | os.PathLike, size: int = DEFAULT_SIZE, seed: int = DEFAULT_SEED,
             progress: Callable[[str], None] = log) -> dict[str, Any]:
    """(Re)create the data set in ``dest`` (removed first) and return its manifest."""
    dest = Path(dest).resolve()
    if dest.exists():
        shutil.rmtree(dest)
    manifest_path(dest).unlink(missing_ok=True)
    undo_path(dest).unlink(missing_ok=True)
    dest.mkdir(parents=True)
    streams = Streams(seed)
    r = random.Random(f"pointsafe-bench:{seed}:layout")
    m: dict[str, Any] = {"version": VERSION, "seed": seed, "size": size, "mutated": None}

    # large files
    large_budget = int(size * SHARE_LARGE)
    (dest / "large").mkdir()
    large = []
    max_seg = max(256 << 10, min(8 << 20, size // 256))
    for i, w in enumerate(LARGE_WEIGHTS):
        n = large_budget * w // sum(LARGE_WEIGHTS) // ALIGN * ALIGN
        p = dest / "large" / f"big-{i:02d}.bin"
        _write_mixed(p, n, streams, r, max_seg)
        large.append({"path": str(p.relative_to(dest)), "size": n})
        progress(f"data: {p.relative_to(dest)} {human_bytes(n)}")
    m["large"] = large

    # small files
    small_budget = int(size * SHARE_SMALL)
    m["small"] = _small_tree(dest / "small", small_budget, streams, r)
    progress(f"data: small/ {m['small']['files']} files, {human_bytes(m['small']['bytes'])}")

    # the ext4 image
    image_size = max(16 << 20, (size - large_budget - small_budget) // (1 << 20) * (1 << 20))
    m["image"] = _image(dest, image_size, streams, r)
    progress(f"data: disk.img {human_bytes(image_size)}, {len(m['image']['extents'])} data extents")

    _fix_times(dest)
    files = dirs = total = 0
    for root, ds, fs in os.walk(dest):
        dirs += len(ds)
        for name in fs:
            files += 1
            total += os.lstat(os.path.join(root, name)).st_size
    m.update(files=files, dirs=dirs + 1, total_bytes=total)
    _save_manifest(dest, m)
    progress(f"data: {dest}: {files} files, {dirs + 1} dirs, {human_bytes(total)}")
    return m


def _small_tree(top: Path, budget: int, streams: Streams, r: random.Random) -> dict[str, int]:
    lo, hi = math.log(64), math.log(64 << 10)
    text = _Chunked(lambda i: streams.text(f"small-text:{i}", 4 << 20))
    rand = _Chunked(lambda i: streams.random(f"small-rand:{i}", 4 << 20))
    written: list[Path] = []
    total = i = 0
    while total < budget:
        d = top / f"a{i // 1024:02d}" / f"b{(i // 64) % 16:02d}"
        if (i // 16) % 4 == 3:
            d = d / f"c{(i // 16) % 7}"
        d.mkdir(parents=True, exist_ok=True)
        roll = r.random()
        if roll < 0.01:
            data = b""
            ext = "empty"
        elif roll < 0.05 and written:
            src = written[r.randrange(len(written))]
            data = src.read_bytes()
            ext = src.suffix.lstrip(".")
        else:
            n = int(math.exp(r.uniform(lo, hi)))
            if roll < 0.80:
                data, ext = text.take(n), r.choice(["txt", "md", "json", "log", "py", "c"])
            else:
                data, ext = rand.take(n), r.choice(["bin", "gz", "jpg", "o"])
        p = d / f"f{i:06d}.{ext}"
        p.write_bytes(data)
        written.append(p)
        total += len(data)
        i += 1
    for k in range(3):                      # a few empty directories
        (top / f"empty-{k}").mkdir()
    return {"files": i, "bytes": total}


class _Chunked:
    """Hands out consecutive slices of an endless stream made of 4 MiB pieces."""

    def __init__(self, make: Callable[[int], bytes]) -> None:
        self.make, self.n, self.buf, self.pos = make, 0, b"", 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.buf):
            self.buf = self.buf[self.pos:] + self.make(self.n)
            self.n += 1
            self.pos = 0
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out


def _image(dest: Path, image_size: int, streams: Streams, r: random.Random) -> dict[str, Any]:
    stage = Path(str(dest) + ".stage")
    if stage.exists():
        shutil.rmtree(stage)
    (stage / "data").mkdir(parents=True)
    (stage / "docs").mkdir()
    data_budget = int(image_size * 0.60)
    max_file = max(1 << 20, image_size // 8)
    names, used, k = [], 0, 0
    while used < data_budget:
        n = min(data_budget - used, r.randint(256 << 10, max_file)) // ALIGN * ALIGN or ALIGN
        p = stage / "data" / f"file-{k:03d}.dat"
        _write_mixed(p, n, streams, r, max(256 << 10, max_file // 4))
        names.append("/data/" + p.name)
        used += n
        k += 1
    doc_budget = int(image_size * 0.05)
    docs = _Chunked(lambda i: streams.text(f"img-docs:{i}", 4 << 20))
    used = k = 0
    while used < doc_budget:
        n = int(math.exp(r.uniform(math.log(200), math.log(32 << 10))))
        (stage / "docs" / f"doc-{k:04d}.txt").write_bytes(docs.take(n))
        used += n
        k += 1
    _fix_times(stage)
    img = dest / "disk.img"
    env = dict(os.environ, E2FSPROGS_FAKE_TIME=str(MTIME))
    subprocess.run(["mkfs.ext4", "-q", "-F", "-b", "4096", "-U", IMAGE_UUID,
                    "-E", f"hash_seed={IMAGE_UUID},root_owner=0:0", "-d", str(stage), str(img),
                    f"{image_size // 1024}k"], check=True, env=env,
                   stdout=subprocess.DEVNULL)
    shutil.rmtree(stage)
    extents = []
    for name in names:
        extents += _extents(img, name)
    return {"path": "disk.img", "size": image_size, "data_files": len(names), "extents": extents}


def _extents(img: Path, name: str, block: int = 4096) -> list[list[int]]:
    """Byte ranges [offset, length] in the image that hold ``name``'s data (via debugfs)."""
    out = subprocess.run(["debugfs", "-R", f"blocks {name}", str(img)], check=True,
                         capture_output=True, text=True).stdout.split()
    blocks = [int(b) for b in out]
    runs: list[list[int]] = []
    for b in blocks:
        if runs and runs[-1][0] + runs[-1][1] == b:
            runs[-1][1] += 1
        else:
            runs.append([b, 1])
    return [[b * block, n * block] for b, n in runs]


def _fix_times(top: Path) -> None:
    for root, dirs, files in os.walk(top, topdown=False):
        for name in files + dirs:
            os.utime(os.path.join(root, name), ns=(MTIME * 10**9, MTIME * 10**9), follow_symlinks=False)
    os.utime(top, ns=(MTIME * 10**9, MTIME * 10**9))


def ensure(dest: str | os.PathLike, size: int = DEFAULT_SIZE, seed: int = DEFAULT_SEED,
           progress: Callable[[str], None] = log) -> dict[str, Any]:
    """The manifest of an unmutated data set in ``dest``: reused when it matches (undoing a
    previous mutation), generated otherwise."""
    dest = Path(dest).resolve()
    m = load_manifest(dest)
    if (m and m.get("version") == VERSION and m.get("size") == size and m.get("seed") == seed
            and dest.is_dir()):
        if m.get("mutated"):
            undo(dest)
            m = load_manifest(dest)
        progress(f"data: reusing {dest} ({human_bytes(m['total_bytes'])}, {m['files']} files)")
        return m
    return generate(dest, size, seed, progress)


# --------------------------------------------------------------------------- mutation

def mutate(dest: str | os.PathLike, fraction: float = 0.01, seed: int | None = None,
           write_size: int = WRITE_SIZE) -> dict[str, Any]:
    """Overwrite ``fraction`` of the data set's bytes as scattered ``write_size`` writes into
    the large files and into file data inside the image; save the old bytes for ``undo``.

    Returns a summary: writes, bytes, and how many went into the image.
    """
    dest = Path(dest).resolve()
    m = load_manifest(dest)
    if not m:
        raise SystemExit(f"data.py: {dest} has no manifest; generate it first")
    if m.get("mutated"):
        raise SystemExit(f"data.py: {dest} is already mutated; --undo first")
    seed = m["seed"] if seed is None else seed
    regions = [(f["path"], 0, f["size"]) for f in m["large"]]
    regions += [(m["image"]["path"], off, n) for off, n in m["image"]["extents"] if n >= write_size]
    cum, acc = [], 0
    for _, _, n in regions:
        acc += n
        cum.append(acc)
    count = max(1, round(m["total_bytes"] * fraction / write_size))
    r = random.Random(f"pointsafe-bench:{seed}:mutate:{fraction}")
    taken: dict[str, list[tuple[int, int]]] = {}
    writes = []
    while len(writes) < count:
        path, base, n = regions[bisect.bisect_right(cum, r.random() * acc)]
        off = base + r.randrange((n - write_size) // ALIGN + 1) * ALIGN
        spans = taken.setdefault(path, [])
        j = bisect.bisect_left(spans, (off, 0))
        if (j > 0 and spans[j - 1][1] > off) or (j < len(spans) and spans[j][0] < off + write_size):
            continue                                    # overlaps an earlier write: draw again
        spans.insert(j, (off, off + write_size))
        writes.append((path, off))
    writes.sort()
    mtimes = {p: os.stat(dest / p).st_mtime_ns for p in taken}
    with open(undo_path(dest), "wb") as u:
        for i, (path, off) in enumerate(writes):
            fd = os.open(dest / path, os.O_RDWR)
            try:
                u.write(os.pread(fd, write_size, off))
                os.pwrite(fd, blake3.blake3(f"mutate:{seed}:{fraction}:{i}".encode())
                          .digest(length=write_size), off)
            finally:
                os.close(fd)
        u.flush()
        os.fsync(u.fileno())
    summary = {"fraction": fraction, "writes": len(writes), "write_size": write_size,
               "bytes": len(writes) * write_size,
               "image_writes": sum(1 for p, _ in writes if p == m["image"]["path"]),
               "files": len(taken)}
    m["mutated"] = dict(summary, list=writes, mtimes=mtimes)
    _save_manifest(dest, m)
    os.sync()
    return summary


def undo(dest: str | os.PathLike) -> None:
    """Put back the bytes and mtimes that ``mutate`` overwrote."""
    dest = Path(dest).resolve()
    m = load_manifest(dest)
    if not m or not m.get("mutated"):
        return
    mut = m["mutated"]
    with open(undo_path(dest), "rb") as u:
        for path, off in mut["list"]:
            old = u.read(mut["write_size"])
            fd = os.open(dest / path, os.O_WRONLY)
            try:
                os.pwrite(fd, old, off)
            finally:
                os.close(fd)
    for path, ns in mut["mtimes"].items():
        os.utime(dest / path, ns=(ns, ns))
    m["mutated"] = None
    _save_manifest(dest, m)
    undo_path(dest).unlink()
    os.sync()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog="See the module docstring for the composition.")
    ap.add_argument("dir", help="where the data set lives (created; replaced if it does not match)")
    ap.add_argument("--size", default="2G", help="total size, e.g. 200M or 2G (default 2G)")
    ap.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed (default 1)")
    ap.add_argument("--force", action="store_true", help="regenerate even if DIR matches")
    ap.add_argument("--mutate", type=float, metavar="FRACTION",
                    help="overwrite FRACTION (e.g. 0.01) of the bytes as scattered 64 KiB writes")
    ap.add_argument("--undo", action="store_true", help="undo a previous --mutate")
    args = ap.parse_args(argv)
    if args.undo:
        undo(args.dir)
        log(f"data: {args.dir} restored")
        return 0
    if args.mutate is not None:
        s = mutate(args.dir, args.mutate)
        log(f"data: {s['writes']} writes of 64 KiB ({human_bytes(s['bytes'])}), "
            f"{s['image_writes']} inside the image")
        return 0
    size = parse_size(args.size)
    if args.force:
        generate(args.dir, size, args.seed)
    else:
        ensure(args.dir, size, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
