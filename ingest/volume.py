"""Reading a block device or disk image as fixed-size blocks.

Blocks are aligned to the volume (block i covers [i*B, (i+1)*B)), so an overwrite in place
changes exactly the blocks it touches; zero blocks and the holes of a sparse image are recorded
as holes, never stored. A region that cannot be read (I/O error) is retried block by block;
blocks that still fail are recorded as holes *and* named in a warning with their offsets.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Callable

from pointsafe.cas import Entry
from pointsafe.cas.tree import REG

from .chunking import READ_SIZE, data_extents
from .pipeline import Pipeline


def volume_size(fd: int) -> int:
    """The size in bytes of an open file or block device (fstat for files, seek to the end for
    devices); OSError from the kernel as is.
    """
    st = os.fstat(fd)
    if stat.S_ISREG(st.st_mode):
        return st.st_size
    return os.lseek(fd, 0, os.SEEK_END)


def read_volume(path: str, pipe: Pipeline, block: int, warn: Callable[[bytes, str], None],
                progress: Callable[[int], None] | None = None, name: str | None = None) -> int:
    """Feed the volume at ``path`` into ``pipe`` as one blob named ``name`` (default: the
    base name of ``path``; a snapshot or clone is read under the source's name); return its size."""
    progress = progress or (lambda n: None)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = volume_size(fd)
        st0 = os.fstat(fd)
        is_file = stat.S_ISREG(st0.st_mode)
        pipe.file(Entry(name=os.fsencode(name if name is not None else os.path.basename(path)), type=REG))
        pos = 0
        bad: list[tuple[int, int]] = []
        extents = data_extents(fd, size) if is_file else iter([(0, size)])
        for start, length in extents:
            a = start - start % block
            end = min(size, -(-(start + length) // block) * block)
            a = max(a, pos)
            if a >= end:
                continue
            if a > pos:
                pipe.hole(a - pos)
            off = a
            while off < end:
                n = min(READ_SIZE, end - off)
                try:
                    buf = os.pread(fd, n, off)
                except OSError:
                    buf = None
                if buf is None or len(buf) < n:
                    buf = _read_blocks(fd, off, n, block, bad)
                mv = memoryview(buf)
                for i in range(0, len(mv), block):
                    pipe.data(mv[i:i + block])
                progress(len(buf))
                off += n
            pos = end
        if pos < size:
            pipe.hole(size - pos)
        pipe.end()
        if is_file:
            # An image written to while it was read (a running VM, a mounted loop device) gives
            # a point that may not be consistent: say so (re-reading a whole volume is no cure).
            st1 = os.fstat(fd)
            if (st1.st_size, st1.st_mtime_ns, st1.st_ctime_ns) != (st0.st_size, st0.st_mtime_ns, st0.st_ctime_ns):
                warn(os.fsencode(path), "the image changed while it was read; the point may be inconsistent "
                                        "(back up a snapshot, or stop its writer in a --pre-hook)")
        if bad:
            spans = ", ".join(f"{o}+{n}" for o, n in bad[:10]) + (" ..." if len(bad) > 10 else "")
            warn(os.fsencode(path), f"{len(bad)} unreadable regions recorded as zeros (offset+length): {spans}")
        return size
    finally:
        os.close(fd)


def _read_blocks(fd: int, off: int, n: int, block: int, bad: list) -> bytes:
    parts = []
    for o in range(off, off + n, block):
        want = min(block, off + n - o)
        try:
            b = os.pread(fd, want, o)
        except OSError:
            b = b""
        if len(b) < want:
            bad.append((o + len(b), want - len(b)))
            b = b + bytes(want - len(b))
        parts.append(b)
    return b"".join(parts)


class _Raw:
    """An open raw volume (file or device): ``size``, ``pread``, ``read_all``."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self.size = volume_size(self.fd)

    def pread(self, n: int, off: int) -> bytes:
        return os.pread(self.fd, n, off)

    def read_all(self, pipe: Pipeline, block: int, warn: Callable[[bytes, str], None],
                 progress: Callable[[int], None] | None, name: str) -> int:
        return read_volume(self.path, pipe, block, warn, progress, name=name)


class _Guest:
    """A qcow2 image read as the guest sees it (ingest/qcow2.Export)."""

    def __init__(self, ex) -> None:
        self.ex = ex
        self.size = ex.size
        self.pread = ex.pread

    def read_all(self, pipe: Pipeline, block: int, warn: Callable[[bytes, str], None],
                 progress: Callable[[int], None] | None, name: str) -> int:
        from .qcow2 import read_export
        return read_export(self.ex, pipe, block, progress, name)


@contextmanager
def open_volume(path: str, fmt: str | None = None) -> Iterator[_Raw | _Guest]:
    """The volume at ``path`` opened for reading: its ``size``, ``pread(n, offset)`` and
    ``read_all(pipe, block, warn, progress, name)``. ``fmt`` "qcow2": the disk the guest sees,
    through a read-only NBD export (ingest/qcow2); None: the bytes of the file or device."""
    if fmt == "qcow2":
        from .qcow2 import Export
        with Export(path) as ex:
            yield _Guest(ex)
        return
    raw = _Raw(path)
    try:
        yield raw
    finally:
        os.close(raw.fd)


def feed(pread: Callable[[int, int], bytes], pipe: Pipeline, block: int, a: int, b: int,
         progress: Callable[[int], None]) -> None:
    """Read [a, b) with ``pread(n, off)`` in large requests and hand it to ``pipe`` in blocks."""
    off = a
    while off < b:
        n = min(READ_SIZE, b - off)
        buf = pread(n, off)
        if len(buf) < n:
            buf += bytes(n - len(buf))
        mv = memoryview(buf)
        for i in range(0, len(mv), block):
            pipe.data(mv[i:i + block])
        progress(n)
        off += n
