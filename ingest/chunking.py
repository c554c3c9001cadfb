"""Cutting a byte stream into chunks: content-defined for files, fixed blocks for volumes.

Files use FastCDC (pyfastcdc, compiled and GIL-free, 2.4 GB/s here against 1.4 GB/s for the
`fastcdc` package; measured in FACTS.md) so that an insertion moves only nearby boundaries.
Volumes use fixed blocks of the safe's block size so that an overwrite in place changes
exactly the blocks it touches. Both hand out memoryviews into the buffers they read; a buffer
is never reused, so the views stay valid while worker threads hash and compress them.
"""

from __future__ import annotations

import os
from typing import Iterator

from pyfastcdc import FastCDC

READ_SIZE = 4 * 1024 * 1024
_ZEROS = bytes(4 * 1024 * 1024)


def is_zero(mv: memoryview) -> bool:
    """True when every byte is zero (memcmp speed)."""
    n = len(mv)
    if n <= len(_ZEROS):
        return _ZEROS.startswith(mv)
    return all(_ZEROS.startswith(mv[i:i + len(_ZEROS)]) for i in range(0, n, len(_ZEROS)))


def data_extents(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """(offset, length) of the data regions of a file; holes between them are skipped.

    Falls back to one extent when the filesystem does not support SEEK_DATA.
    """
    off = 0
    while off < size:
        try:
            start = os.lseek(fd, off, os.SEEK_DATA)
        except OSError as e:
            if e.errno == 6:       # ENXIO: only a hole remains
                return
            yield off, size - off  # EINVAL etc.: no sparse support
            return
        if start >= size:
            return
        try:
            end = os.lseek(fd, start, os.SEEK_HOLE)
        except OSError:
            end = size
        end = min(end, size)
        yield start, end - start
        off = end


def read_exact(fd: int, offset: int, length: int) -> bytes:
    """pread until ``length`` bytes or EOF (a file that shrank while being read)."""
    buf = os.pread(fd, length, offset)
    if len(buf) == length or not buf:
        return buf
    parts = [buf]
    got = len(buf)
    while got < length:
        more = os.pread(fd, length - got, offset + got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def _read_into(fd: int, mv: memoryview, offset: int) -> int:
    """preadv into ``mv`` until it is full or EOF; the number of bytes read."""
    got = 0
    while got < len(mv):
        n = os.preadv(fd, [mv[got:]], offset + got)
        if n == 0:
            break
        got += n
    return got


class Cutter:
    """Cuts the data regions of one file descriptor into chunks.

    ``chunks(fd, size)`` yields ("data", memoryview) and ("hole", length) items in file order.
    """

    def __init__(self, fixed: int | None = None, min_size: int = 8192, avg_size: int = 32768,
                 max_size: int = 131072):
        self.fixed = fixed
        self.min_size = min_size
        self.cdc = None if fixed else FastCDC(avg_size, min_size=min_size, max_size=max_size)

    def content_defined(self) -> FastCDC:
        """The content-defined cutter; only for a Cutter made without ``fixed`` (the caller's
        duty: a fixed-block Cutter has none)."""
        assert self.cdc is not None, "a fixed-block Cutter has no content-defined cutter"
        return self.cdc

    def chunks(self, fd: int, size: int, sparse: bool = True) -> Iterator[tuple[str, object]]:
        """("data", memoryview) and ("hole", length) items covering ``size`` bytes of ``fd`` in
        file order (holes found with SEEK_DATA/SEEK_HOLE when ``sparse``; fixed blocks stay aligned
        to the file). Each read fills a buffer of its own that is never reused, so a memoryview
        stays valid after later items. Reads READ_SIZE at a time with preadv (the offset of
        ``fd`` is not used); OSError from a read as is.
        """
        pos = 0
        extents = data_extents(fd, size) if sparse else iter([(0, size)])
        for start, length in extents:
            if self.fixed:
                # Keep blocks aligned to the volume: extend the extent to block boundaries.
                b = self.fixed
                a = start - start % b
                start, length = a, min(size, -(-(start + length) // b) * b) - a
                if start < pos:
                    length -= pos - start
                    start = pos
                    if length <= 0:
                        continue
            if start > pos:
                yield "hole", start - pos
            yield from self._cut_region(fd, start, length)
            pos = start + length
        if pos < size:
            yield "hole", size - pos

    def _cut_region(self, fd: int, start: int, length: int):
        end = start + length
        off = start
        carry = b""
        while off < end or carry:
            want = min(READ_SIZE, end - off)
            # Read straight in behind the carried tail: no copy of the whole buffer.
            buf = bytearray(len(carry) + want)
            buf[:len(carry)] = carry
            got = _read_into(fd, memoryview(buf)[len(carry):], off) if want > 0 else 0
            off += got
            eof = got < want or off >= end
            mv = memoryview(buf)[:len(carry) + got]
            carry = b""
            if not len(mv):
                return
            if self.fixed:
                b = self.fixed
                n = len(mv) if eof else len(mv) - len(mv) % b
                for i in range(0, n, b):
                    yield "data", mv[i:min(i + b, n)]
                carry = bytes(mv[n:]) if not eof else b""
            else:
                last = None
                for c in self.content_defined().cut_buf(mv):
                    if last is not None:
                        yield "data", mv[last.offset:last.offset + last.length]
                    last = c
                if last is not None:
                    if eof:
                        yield "data", mv[last.offset:last.offset + last.length]
                    else:
                        carry = bytes(mv[last.offset:last.offset + last.length])
            if eof:
                if carry:
                    yield "data", memoryview(carry)
                return
