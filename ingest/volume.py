"""Reading a block device or disk image as fixed-size blocks.

Blocks are aligned to the volume (block i covers [i*B, (i+1)*B)), so an overwrite in place
changes exactly the blocks it touches; zero blocks and the holes of a sparse image are recorded
as holes, never stored. A region that cannot be read (I/O error) is retried block by block;
blocks that still fail are recorded as holes *and* named in a warning with their offsets.
"""

from __future__ import annotations

import os
import stat
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
