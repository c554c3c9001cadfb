"""Reading a modified file around its written extents only, making the same chunks a full read
makes (issue 12).

Why this is exact: FastCDC is memoryless -- where a chunk ends depends only on the bytes from
its start up to its end (and on where the data region ends, for the last one; checked here:
cutting from any boundary of a full cut gives the same boundaries after it). So, with the file
one data region (no holes) now and in the previous point:

- a previous chunk [off, end) is the chunk a full read makes when the full read has a boundary
  at ``off``, no written byte lies in [off, end] and ``end`` is not where the old region ended
  (unless the size is the same and nothing was written there either);
- from a boundary before a written extent the new bytes are cut as a full read cuts them, chunk
  by chunk, until a chunk ends on a previous boundary whose chunk can be kept: from there on
  both cuts agree again (resync).

The reader starts at offset 0, a boundary of both, and alternates between the two. What it
cuts is the written extents plus, around each, the rest of the chunk before it and the chunks
after it until the resync (about one average chunk on each side). Only the written extents are
read from the source: the bytes around them did not change (the send stream says so, as it says
which files did not change at all), so they are read from the previous point's chunks in the
safe. A 16 KiB write into a file of 64 KiB chunks costs 16 KiB of reads from the source, not
the ~128 KiB of the chunks around it.
"""

from __future__ import annotations

import bisect
import os
from typing import Callable, Iterable

from pyfastcdc import FastCDC

from pointsafe.cas.blob import BlobReader

from ..chunking import READ_SIZE
from ..pipeline import Pipeline


def merged(spans: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """(start, end) spans sorted and merged (touching spans merge)."""
    out: list[tuple[int, int]] = []
    for a, b in sorted(s for s in spans if s[1] > s[0]):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


class _Dirty:
    """Merged written spans, asked whether [a, b) meets one."""

    def __init__(self, spans: list[tuple[int, int]]):
        self.starts = [a for a, _ in spans]
        self.spans = spans

    def meets(self, a: int, b: int) -> bool:
        i = bisect.bisect_right(self.starts, a) - 1
        if i >= 0 and self.spans[i][1] > a:
            return True
        return i + 1 < len(self.spans) and self.spans[i + 1][0] < b

    def within(self, a: int, b: int) -> list[tuple[int, int]]:
        """The written spans clipped to [a, b), in order."""
        i = max(0, bisect.bisect_right(self.starts, a) - 1)
        out = []
        while i < len(self.spans) and self.spans[i][0] < b:
            lo, hi = max(a, self.spans[i][0]), min(b, self.spans[i][1])
            if lo < hi:
                out.append((lo, hi))
            i += 1
        return out

    def end_after(self, pos: int, near: int) -> int:
        """The end of the span holding ``pos`` or starting within ``near`` bytes after it;
        ``pos`` when there is none."""
        i = bisect.bisect_right(self.starts, pos + near) - 1
        if i >= 0 and self.spans[i][1] > pos:
            return self.spans[i][1]
        return pos


def read_around(fd: int, size: int, prev: BlobReader, written: list[tuple[int, int]], cdc: FastCDC,
                step: int, pipe: Pipeline, covered: Callable[[int], None]) -> int:
    """Feed the current file (``pipe.file`` was called; the caller calls ``end``) of ``size``
    bytes, open at ``fd``: the previous point's chunks of the file (``prev``, one data region of
    ``prev.size`` <= ``size`` bytes) where nothing was ``written`` ((offset, length) extents),
    the bytes around the extents read and cut. ``step``: bytes read at a time beyond what must
    be read. Returns the bytes read from ``fd`` less the bytes fed as data (negative when
    unchanged bytes around the extents came from ``prev``: the pipeline counts every byte fed as
    scanned); OSError from a read as is."""
    old = prev.size
    spans = [(o, o + n) for o, n in written]
    if size > old:
        spans.append((old, size))      # an append: no extent covers where the old region ended
    dirty = _Dirty(merged(spans))
    chunks = list(prev.extents(0, old))
    at = {off: i for i, (off, _, _) in enumerate(chunks)}

    def keep(i: int) -> bool:
        off, n, _ = chunks[i]
        end = off + n
        if end == old and size != old:
            return False
        return not dirty.meets(off, min(end + 1, size))

    scanned = fed = 0
    pos, i = 0, 0
    while pos < size:
        if i < len(chunks) and chunks[i][0] == pos and keep(i):
            _, n, _ = chunks[i]
            pipe.reuse_from(prev, pos, pos + n)
            covered(n)
            pos += n
            i += 1
            continue
        # cut new bytes from ``pos`` (a boundary of both cuts) until a resync or the end
        base, buf = pos, b""
        near = chunks[i][1] if i < len(chunks) else 0
        resync = None
        while resync is None:
            top = base + len(buf)
            # what is written is read in one go (at most READ_SIZE), past it ``step`` at a time
            want = min(dirty.end_after(top, near) - top, READ_SIZE) + step
            near = 0
            n = min(want, size - top)
            written = dirty.within(top, top + n)
            more = _read(fd, prev, written, top, top + n)
            scanned += sum(b - a for a, b in written)
            buf += more
            eof = base + len(buf) >= size or not more
            cut = list(cdc.cut_buf(memoryview(buf)))
            exact = cut if eof else cut[:-1]
            used = 0
            for c in exact:
                piece = buf[c.offset:c.offset + c.length]
                pipe.data(memoryview(piece))
                covered(len(piece))
                fed += len(piece)
                used = c.offset + c.length
                q = base + used
                j = at.get(q)
                if q < size and j is not None and keep(j):
                    resync = (q, j)
                    break
            if resync is None and eof:
                resync = (base + used, len(chunks))
                if base + used < size:          # the file ended early (it cannot, in a snapshot)
                    raise OSError(5, "file shorter than its size")
            elif resync is None:
                buf = buf[used:]
                base += used
        pos, i = resync
    return scanned - fed


def _read(fd: int, prev: BlobReader, written: list[tuple[int, int]], a: int, b: int) -> bytes:
    """Bytes [a, b) of the file: the ``written`` spans in it from ``fd``, the rest (unchanged)
    from the previous point's blob ``prev``; OSError when either gives fewer bytes than asked
    (the file is shorter than its size: it cannot be, in a snapshot)."""
    parts, pos = [], a
    for lo, hi in written + [(b, b)]:
        if lo > pos:
            parts.append(prev.read(pos, lo - pos))
        if hi > lo:
            parts.append(_pread(fd, hi - lo, lo))
        pos = max(pos, hi)
    out = b"".join(parts)
    if len(out) != b - a:
        raise OSError(5, "file shorter than its size")
    return out


def _pread(fd: int, n: int, off: int) -> bytes:
    out = b""
    while n > 0:
        got = os.pread(fd, n, off)
        if not got:
            break
        out += got
        off += len(got)
        n -= len(got)
    return out
