"""Changed-block tracking for volumes (issue 12): build a volume point from the previous
point's blob and a list of changed byte ranges, reading only the blocks the ranges touch.

The blob made is exactly the one a full read would make (same chunk keys, same holes): the
previous point's fixed-size blocks are reused outside the ranges, and the blocks touching a
range (aligned out to the block size) are read and fed like a full read feeds them. An
unchanged stretch is one pipeline event; the assembler takes the previous blob's LIST nodes
inside it whole (``BlobBuilder.add_from``), so it costs a few node reads, not a walk of its
blocks, as long as the changes before it kept the number of leaf entries (writing data into a
hole or zeros next to one shifts every node after it: those are rebuilt, as a full read's are).
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

from pointsafe.cas import Entry, UsageError
from pointsafe.cas.blob import BlobReader
from pointsafe.cas.tree import REG

from .pipeline import Pipeline
from .volume import feed


# The end of the warning a full read gives when the change source missed writes (ops/recorder.py
# raises a critical alert on it).
MISSED_WRITES = "the change source missed writes"


def parse_ranges(path: Path) -> list[tuple[int, int]]:
    """The ranges of a --changed-blocks FILE: a JSON list of ``[offset, length]`` or lines of
    ``offset length``; UsageError (one line) when it is neither."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read the changed-blocks file {path}: {e}") from None
    out: list[tuple[int, int]] = []
    try:
        if text.lstrip().startswith("["):
            items = json.loads(text)
            if not isinstance(items, list):
                raise ValueError("not a list")
            pairs = [tuple(x) for x in items]
        else:
            pairs = [tuple(int(v) for v in ln.split()) for ln in text.splitlines() if ln.strip()
                     and not ln.lstrip().startswith("#")]
        for pr in pairs:
            if len(pr) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in pr):
                raise ValueError(f"bad range {list(pr)}")
            o, n = pr
            if o < 0 or n < 0:
                raise ValueError(f"negative range {list(pr)}")
            out.append((o, n))
    except (ValueError, TypeError) as e:
        raise UsageError(f"malformed changed-blocks file {path}: {e} (use a JSON list of [offset, length] "
                         f"or lines 'offset length')") from None
    return out


def aligned(ranges: list[tuple[int, int]], block: int, size: int) -> list[tuple[int, int]]:
    """``ranges`` aligned out to ``block``, clipped at ``size``, merged: sorted (start, end)."""
    spans = sorted((o - o % block, min(size, -(-(o + n) // block) * block)) for o, n in ranges if n > 0)
    out: list[tuple[int, int]] = []
    for a, b in spans:
        if a >= b:
            continue
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def covers(spans: list[tuple[int, int]], start: int, end: int) -> bool:
    """Whether the merged ``spans`` cover [start, end) entirely."""
    for a, b in spans:
        if a <= start < b:
            start = b
    return start >= end


def read_changed(pread: Callable[[int, int], bytes], size: int, pipe: Pipeline, block: int, prev: BlobReader,
                 spans: list[tuple[int, int]], name: str, progress: Callable[[int], None] | None = None) -> int:
    """Feed a volume of ``size`` bytes, read with ``pread(n, offset)``, into ``pipe`` as one
    blob: the blocks in ``spans`` (merged, block-aligned, from :func:`aligned`) read, the rest
    reused from ``prev`` (the previous point's blob, of the same size); returns the size."""
    progress = progress or (lambda n: None)
    pipe.file(Entry(name=os.fsencode(name), type=REG))
    pos = 0
    for a, b in spans + [(size, size)]:
        if a > pos:
            pipe.reuse_from(prev, pos, a)
            progress(a - pos)
        feed(pread, pipe, block, max(a, pos), b, progress)
        pos = max(pos, b)
    pipe.end()
    return size
