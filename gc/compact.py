"""Pack compaction: rewrite the packs whose dead share passes a threshold.

Plan: read the ``packs`` table (one small entry per pack) and pick every pack that still
holds live bytes and whose dead bytes are at least ``threshold`` of its records. Execute: copy
each picked pack's live records, in pack order and byte for byte, into new packs
(cas/relocate.py), then delete the old pack once the commit that repoints its objects is
durable. Cost follows the packs rewritten.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pointsafe.cas import IntegrityError, Safe, Writer
from pointsafe.cas.index import PackEntry
from pointsafe.cas.relocate import Relocator, live_records


@dataclass(frozen=True)
class PackCandidate:
    """A pack that compaction may rewrite, with its live and dead record bytes."""
    pack: int
    live_bytes: int
    dead_bytes: int

    @property
    def dead_share(self) -> float:
        """Dead bytes over all bytes (0..1); 1.0 for a pack with none at all."""
        total = self.live_bytes + self.dead_bytes
        return self.dead_bytes / total if total else 1.0


@dataclass
class CompactResult:
    """What a compaction did: the packs rewritten, objects and bytes moved, warnings."""
    rewritten: list[int] = field(default_factory=list)
    objects_moved: int = 0
    bytes_moved: int = 0
    warnings: list[str] = field(default_factory=list)


def plan_compaction(safe: Safe, threshold: float, below: int | None = None) -> list[PackCandidate]:
    """Packs with live bytes whose dead share is >= ``threshold`` (0..1); ``below``: only
    packs with a smaller id (e.g. not the ones this run just wrote)."""
    entries = safe.pack_entries()
    if below is not None:
        entries = {pid: pe for pid, pe in entries.items() if pid < below}
    return candidates(entries, threshold)


def candidates(entries: dict[int, PackEntry], threshold: float) -> list[PackCandidate]:
    """The packs of ``entries`` (id -> entry, as they are or as a plan expects them to be)
    that still index objects and whose dead share is >= ``threshold``, in id order."""
    out = []
    for pid, pe in sorted(entries.items()):
        c = PackCandidate(pid, max(pe.live_bytes, 0), max(pe.dead_bytes, 0))
        if pe.objects > 0 and c.dead_bytes and c.dead_share >= threshold:
            out.append(c)
    return out


def compact(w: Writer, rel: Relocator, packs: list[int]) -> CompactResult:
    """Move the live records of ``packs`` through ``rel`` and release each pack once all of
    its records are handed over; a damaged or missing pack is left as it is, with a warning.
    The caller closes ``rel`` (its commit deletes the released packs)."""
    res = CompactResult()
    before_o, before_b = rel.objects_moved, rel.bytes_moved
    for pid in packs:
        try:
            for key, e, rec in live_records(w, pid):
                rel.move(key, e, rec)
        except IntegrityError as err:
            res.warnings.append(f"pack {pid:016x} left as it is: {err} (run 'pointsafe verify')")
            continue
        except FileNotFoundError:
            res.warnings.append(f"pack {pid:016x} is missing (run 'pointsafe verify')")
            continue
        rel.release_pack(pid)
        res.rewritten.append(pid)
    res.objects_moved = rel.objects_moved - before_o
    res.bytes_moved = rel.bytes_moved - before_b
    return res
