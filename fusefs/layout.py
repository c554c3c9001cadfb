"""What the top of a whole-safe mount looks like, computed from the point list alone.

Mounting without a POINT shows::

    /2026-11-25T14:36:24Z/        one folder per point, named by its start time in UTC
    /2026-11-25T14:36:24Z.2/      (a second point started in the same second gets a suffix)
    /www/                         one folder per point name (``backup --name``) ...
    /www/2026-11-25T14:36:24Z/    ... holding that name's points, under the same folder names
    /www/latest -> 2026-11-25T14:36:24Z     the newest point of that name
    /latest -> 2026-11-25T14:36:24Z         the newest point of the whole safe

Time names sort in time order. A folder name, once shown by a mount, stays the same for the
life of that mount (forgetting the first of two points of one second does not rename the
second). A point name that would clash with a time name or with ``latest`` gets ``.points``
appended; ``/`` in a name becomes ``_``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pointsafe.cas import Point, format_utc_seconds, latest, oldest_first

LATEST = b"latest"


def time_name(record: Point) -> str:
    """``2026-11-25T14:36:24.123456Z`` -> ``2026-11-25T14:36:24Z`` (the start time in UTC, to
    the second; ``0000-00-00T00:00:00Z`` when the point has none)."""
    started = record.started_at
    return format_utc_seconds(started) if started is not None else "0000-00-00T00:00:00Z"


def newest(points: list[Point]) -> Point:
    """The newest of ``points`` (the one order of points); ``points`` is not empty."""
    best = latest(points)
    assert best is not None
    return best


def _clean(name: str) -> bytes:
    b = name.replace("/", "_").encode("utf-8", "surrogateescape")
    return b"_" if b in (b"", b".", b"..") else b


# Names that already say "disk image": a volume named ``disk.img`` or ``vm.qcow2`` shows as
# that file (its bytes are the source's, whatever format it is in), not as ``disk.img.img``.
IMAGE_SUFFIXES = (b".img", b".raw", b".iso", b".qcow", b".qcow2", b".vmdk", b".vdi", b".vhd", b".vhdx", b".dd")


def image_name(record: Point) -> bytes:
    """The file name of a volume point's image inside its folder (the only name there): the
    point's name, with ``.img`` added unless it already ends in a disk-image suffix. A point
    that holds a qcow2 image's guest view (``source_format``) holds raw blocks: ``vm.qcow2``
    shows as ``vm.img``."""
    name = _clean(record.name or "volume")
    stem, dot, suffix = name.rpartition(b".")
    if record.extra.get("source_format") == "qcow2":
        return (stem if stem and (dot + suffix).lower() in (b".qcow2", b".qcow") else name) + b".img"
    if stem and (dot + suffix).lower() in IMAGE_SUFFIXES:
        return name
    return name + b".img"


@dataclass
class Layout:
    """Folder names of every point and the per-name groups, oldest point first."""

    folders: list[tuple[bytes, Point]] = field(default_factory=list)       # (folder name, point)
    groups: dict[bytes, list[tuple[bytes, Point]]] = field(default_factory=dict)
    by_id: dict[str, bytes] = field(default_factory=dict)

    @classmethod
    def build(cls, points: list[Point], keep: dict[str, bytes] | None = None) -> "Layout":
        """The layout of ``points``; ``keep`` (point id -> folder name) are names already shown
        by this mount, which stay the same even when forgetting a point would free a plainer one."""
        lay = cls()
        keep = keep or {}
        ordered = oldest_first(points)
        names: dict[str, bytes] = {p.id: keep[p.id] for p in ordered if p.id in keep}
        taken = set(names.values())
        for p in ordered:
            if p.id in names:
                continue
            base = time_name(p).encode()
            name, n = base, 1
            while name in taken:
                n += 1
                name = base + b".%d" % n
            names[p.id] = name
            taken.add(name)
        for p in ordered:
            lay.folders.append((names[p.id], p))
            lay.by_id[p.id] = names[p.id]
        reserved = taken | {LATEST}
        for name, p in lay.folders:
            g = _clean(p.name or "unnamed")
            if g in reserved:
                g += b".points"
            lay.groups.setdefault(g, []).append((name, p))
        return lay

    def latest_name(self, group: bytes | None = None) -> bytes | None:
        """The folder name of the newest point (of ``group``, or of the whole safe); None if none."""
        items = self.folders if group is None else self.groups.get(group, [])
        if not items:
            return None
        best = newest([p for _, p in items])
        return self.by_id[best.id]
