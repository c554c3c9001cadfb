"""Changes of a qcow2 image from its persistent dirty bitmaps (``--changed-blocks qemu:BITMAP``),
rotated so that a backup killed at any step loses no change.

pointsafe keeps one family of bitmaps per BITMAP name in the image, ``BITMAP.<generation>-<tag>``
(``tag``: 8 random hex digits, so that a bitmap of another safe or of a copy of the image with
the same generation number never passes for the one a point expects). A point records the
bitmap it started (``qemu_bitmap``, docs/FORMAT.md): it was added, empty, *before* the point's
read began, so it holds every write since. A backup:

1. lists the family; checks the previous point's bitmap is there and consistent (else: a full
   read with a warning);
2. adds the next generation (before reading: writes from now on are tracked in it);
3. reads the ranges dirty in the previous point's bitmap and in every newer one that killed
   backups left (their union covers every write since the previous point's read began);
4. commits the point (naming the new bitmap);
5. only then removes the other bitmaps of the family.

Killed before 4: the previous point's bitmap is still there, and the next backup reads its
ranges and the new ones. Killed between 4 and 5: the older bitmaps are left over and removed by
the next backup, which reads from the bitmap the committed point names.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from pointsafe.cas import Point

from ..qcow2 import add_bitmap, bitmaps, clear_stale, dirty_ranges, remove_bitmap

PREFIX = "qemu:"


def bitmap_base(changed_blocks: str | None) -> str | None:
    """BITMAP of ``--changed-blocks qemu:BITMAP`` (None for a ranges file)."""
    if changed_blocks and changed_blocks.startswith(PREFIX):
        return changed_blocks[len(PREFIX):]
    return None


def check_base(base: str) -> str | None:
    """Why ``base`` cannot name a bitmap family, or None."""
    if not base or len(base) > 200 or not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.+-]*", base):
        return f"bad bitmap name {base!r} in qemu:BITMAP (letters, digits, _ . + -)"
    return None


def _family(base: str, listed: list[dict]) -> dict[str, tuple[int, dict]]:
    pat = re.compile(re.escape(base) + r"\.(\d+)-[0-9a-f]{8}")
    out = {}
    for b in listed:
        m = pat.fullmatch(str(b.get("name", "")))
        if m:
            out[b["name"]] = (int(m.group(1)), b)
    return out


@dataclass
class Rotation:
    """One backup's use of the family ``base`` of ``image``: ``started`` the bitmap added for
    the next backup (its ``generation``), ``read_from`` the bitmaps whose dirty ranges give the
    changes since the previous point (empty with ``fallback``: read whole), ``old`` the
    bitmaps to remove once the point is committed."""
    image: str
    base: str
    started: str = ""
    generation: int = 0
    read_from: list[str] = field(default_factory=list)
    old: list[str] = field(default_factory=list)
    fallback: str | None = None

    def record(self) -> dict:
        """The point's ``qemu_bitmap`` field."""
        return {"base": self.base, "name": self.started, "generation": self.generation}

    def ranges(self) -> list[tuple[int, int]]:
        """The union of the dirty ranges of ``read_from`` (unsorted, may overlap)."""
        out: list[tuple[int, int]] = []
        for name in self.read_from:
            out += dirty_ranges(self.image, name)
        return out

    def finish(self) -> list[str]:
        """After the commit: remove the older bitmaps of the family; returns what could not
        be removed (the next backup removes it)."""
        left = []
        for name in self.old:
            try:
                remove_bitmap(self.image, name)
            except Exception as e:
                left.append(f"{name}: {e}")
        return left


def start(image: str, base: str, prev: Point | None, unusable: str | None) -> Rotation:
    """Steps 1-2 of the module's docstring for a backup of ``image`` whose previous point is
    ``prev``; ``unusable``: a reason the previous point cannot be the base whatever the bitmaps
    say (another size or block size), or None."""
    clear_stale()     # a qemu-nbd left by a killed backup would hold the image's lock
    fam = _family(base, bitmaps(image))
    rot = Rotation(image, base, old=sorted(fam))
    rec = (prev.extra.get("qemu_bitmap") if prev is not None else None) or {}
    expect = rec.get("name")
    if prev is None:
        rot.fallback = "no previous point of that name"
    elif unusable:
        rot.fallback = unusable
    elif rec.get("base") != base or not expect:
        rot.fallback = f"the previous point was not made with dirty bitmap {base}"
    elif expect not in fam:
        rot.fallback = f"dirty bitmap {expect}, which the previous point expects, is missing from the image"
    elif fam[expect][0] != rec.get("generation"):
        rot.fallback = f"dirty bitmap {expect} does not match the previous point's generation"
    else:
        g = fam[expect][0]
        rot.read_from = [n for n, (gen, _) in sorted(fam.items(), key=lambda kv: kv[1][0]) if gen >= g]
        bad = [n for n in rot.read_from if "in-use" in (fam[n][1].get("flags") or [])]
        off = [n for n in rot.read_from if "auto" not in (fam[n][1].get("flags") or [])]
        if bad:
            rot.fallback = (f"dirty bitmap {bad[0]} is inconsistent (marked in use: the QEMU that had the "
                            f"image open stopped without saving it)")
        elif off:
            rot.fallback = f"dirty bitmap {off[0]} is disabled (it may have missed writes)"
    if rot.fallback:
        rot.read_from = []
    last = int(rec.get("generation") or 0) if rec.get("base") == base else 0
    rot.generation = max([gen for gen, _ in fam.values()] + [last]) + 1
    rot.started = f"{base}.{rot.generation}-{os.urandom(4).hex()}"
    add_bitmap(image, rot.started)
    return rot
