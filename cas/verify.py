"""Verify a safe: pack framing and checksums, index <-> pack agreement, points.

Memory stays bounded: packs are scanned one at a time and the index is consulted per record,
so a safe of millions of objects verifies in the memory of one pack's bookkeeping.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING, Any, BinaryIO

from .audit import audit
from .errors import IntegrityError, SafeError, SafeLocked
from .header import COPY_NAME, HEADER_NAME, header_version, inspect_header
from .index import FLAG_DEAD, PackEntry, pack_from_dbkey
from .keys import Kind
from .keyslots import KEYS_DIR
from .pack import pack_name, scan_pack
from .store import INDEX_DIR, LOCK_NAME, PACKS_DIR, Safe, header_authentic, release_lock, take_lock

if TYPE_CHECKING:
    from .index import Txn


@dataclass
class VerifyReport:
    """What ``verify`` found: what it checked, the errors (JSON-ready dicts) and the notes."""

    packs: int = 0
    objects: int = 0
    bytes_checked: int = 0
    points: int = 0
    errors: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    refcounts: dict[str, Any] | None = None   # the refcount audit's summary (cas/audit.py)

    @property
    def ok(self) -> bool:
        """True when no error was found (notes do not count)."""
        return not self.errors

    def error(self, message: str, pack: int | None = None, offset: int | None = None, **extra: Any) -> None:
        """Record an error: ``message``, the pack's name and the offset when given, and ``extra``."""
        d: dict[str, Any] = {"message": message}
        if pack is not None:
            d["pack"] = pack_name(pack)
        if offset is not None:
            d["offset"] = offset
        d.update(extra)
        self.errors.append(d)

    def as_dict(self) -> dict[str, Any]:
        """The report as JSON-ready data."""
        return {"ok": self.ok, "packs": self.packs, "objects": self.objects, "points": self.points,
                "bytes_checked": self.bytes_checked, "errors": self.errors, "notes": self.notes,
                "refcounts": self.refcounts}


def verify(safe: Safe, data: bool = False, progress: Callable[[int], None] | None = None,
           lock: bool = True) -> VerifyReport:
    """Check the header files, every pack record's framing and checksum (and, in an encrypted
    safe, its authentication tag: every record is opened with the safe's key; ``data``: also
    re-hash every object against its key), that the index and the packs agree, the reference counts and
    the sizes that trees and points declare for their blobs; note a safe that others can read.
    Holds the writer lock so that a concurrent gc cannot delete packs mid-check (on a safe
    opened read-only, a shared view of the lock when it can be had); ``lock=False`` when the
    caller holds it. Raises SafeLocked when another process holds it. Never writes the index.
    Cost: reads every committed pack byte once, plus the audit (cas/audit.py)."""
    r = VerifyReport()
    lockf = _take_lock(safe, r) if lock else None
    try:
        _check_header(safe, r)
        _check_modes(safe, r)
        _verify(safe, data, progress, r)
        _audit_into(safe, r)
        return r
    finally:
        if lockf is not None:
            release_lock(lockf)


def _take_lock(safe: Safe, r: VerifyReport) -> IO[Any] | None:
    """The writer lock; on a safe opened read-only, flock on the lock file opened for reading
    (flock needs no write permission), or no lock with a note."""
    try:
        return take_lock(safe.path, "verify")
    except SafeLocked:
        raise
    except SafeError:
        if not safe.readonly:
            raise
    try:
        f = open(safe.path / LOCK_NAME, "rb")  # noqa: SIM115 (held as the lock)
    except OSError:
        f = None
    if f is not None:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            return f
        except BlockingIOError:
            f.close()
            raise SafeLocked("the safe is busy: another process holds its writer lock; wait for it "
                             "to finish") from None
        except OSError:
            f.close()
    r.notes.append("the safe is read-only for this process and its writer lock cannot be taken: "
                   "a writer running meanwhile could make verify report errors that are not there")
    return None


def _check_header(safe: Safe, r: VerifyReport) -> None:
    """Both header files: present, good and identical (docs/FORMAT.md, "The header")."""
    state = inspect_header(safe.path)
    good = state.good
    if good is None:      # Safe.open read one; it has gone since
        r.error(f"{safe.path}: no usable header file")
        return
    assert good.data is not None    # a copy that decodes was read
    for hc in (state.main, state.copy):
        if safe.crypto is not None and hc.config is not None and hc.data is not None and (
                hc.config.encryption is None or not header_authentic(hc.data, hc.config, safe.crypto)):
            r.error(f"{safe.path}: the safe {hc.name} was changed without the key (its authentication "
                    "fails); 'pointsafe repair' puts back an authentic copy")
            continue
        if hc.config is not None and hc.data == good.data:
            continue
        if hc.data is None and hc.error is None:
            if hc.name == COPY_NAME and header_version(good.data) < 3:
                r.notes.append(f"{COPY_NAME} is missing (a version-2 safe; 'pointsafe repair' writes it)")
                continue
            r.error(f"{safe.path}: the safe {hc.name} is missing ('pointsafe repair' rewrites it)")
        elif hc.error is not None:
            r.error(f"{hc.error} ('pointsafe repair' rewrites it from {good.name})")
        else:
            r.error(f"{safe.path}: {hc.name} differs from {good.name} ('pointsafe repair' rewrites it)")
    with safe.index.read() as txn:
        kept = txn.get(b"header", db=safe.index.db["meta"])
    if kept is not None and kept != good.data:
        # Both files good and alike, yet not this safe's: copied from another safe, say.
        r.error(f"{safe.path}: the header files differ from the copy kept in the index (another "
                "safe's header?); 'pointsafe repair' restores the index's copy")


def _check_modes(safe: Safe, r: VerifyReport) -> None:
    """A note naming the safe's files and directories that group or others may read."""
    p = safe.path
    names = [p, p / PACKS_DIR, p / INDEX_DIR, p / HEADER_NAME, p / COPY_NAME, p / LOCK_NAME,
             p / INDEX_DIR / "data.mdb", p / INDEX_DIR / "lock.mdb"]
    keys = p / KEYS_DIR
    if keys.is_dir():
        names.append(keys)
        names.extend(sorted(keys.glob("*.json")))
    open_to_others = []
    for n in names:
        try:
            if os.stat(n).st_mode & 0o077:
                open_to_others.append(n)
        except OSError:
            pass
    packs = 0
    try:
        with os.scandir(p / PACKS_DIR) as it:
            for de in it:
                try:
                    packs += bool(de.stat(follow_symlinks=False).st_mode & 0o077)
                except OSError:
                    pass
    except OSError:
        pass
    if open_to_others or packs:
        what = ", ".join(str(n.relative_to(p)) if n != p else "the safe directory" for n in open_to_others)
        if packs:
            what += f"{', ' if what else ''}{packs} pack file(s)"
        r.notes.append(f"group or others may read this safe ({what}): anyone who can read it can "
                       f"restore every file in it; run 'chmod -R go= {p}'")


def _verify(safe: Safe, data: bool, progress: Callable[[int], None] | None, r: VerifyReport) -> None:
    """Check every indexed pack against the index, and every point's record object."""
    idx = safe.index
    with idx.read() as txn:
        packs = {pack_from_dbkey(k): PackEntry.decode(v) for k, v in txn.cursor(db=idx.db["packs"])}
        on_disk = set(safe.store.pack_ids())
        for pid in sorted(on_disk - set(packs)):
            r.notes.append(f"pack {pack_name(pid)} is not in the index (left by a crashed writer or gc; "
                           "the next writer removes it)")
        indexed_total = 0
        for pid in sorted(packs):
            pe = packs[pid]
            r.packs += 1
            size = safe.store.size(pid)
            if size is None:
                r.error(f"pack {pack_name(pid)} is missing ({pe.objects} objects lost)", pid)
                indexed_total += pe.objects
                continue
            if size < pe.committed_len:
                r.error(f"pack {pack_name(pid)} is truncated: {size} bytes on disk, "
                        f"{pe.committed_len} committed", pid, size)
            elif size > pe.committed_len:
                r.notes.append(f"pack {pack_name(pid)} has {size - pe.committed_len} uncommitted bytes "
                               "at its end (a crashed writer's; the next writer truncates them)")
            found = _verify_pack(safe, txn, pid, min(size, pe.committed_len), data, progress, r)
            if found != pe.objects:
                r.error(f"pack {pack_name(pid)}: the index names {pe.objects} objects in it, "
                        f"{found} were found at their recorded offsets", pid)
            indexed_total += pe.objects
        n_index = txn.stat(idx.db["objects"])["entries"]
        if n_index != indexed_total:
            r.error(f"the index holds {n_index} objects but its packs account for {indexed_total}")
        for k, v in txn.cursor(db=idx.db["points"]):
            r.points += 1
            try:
                safe.point_from_value(k, v)
            except (IntegrityError, ValueError) as err:
                r.error(f"point {k.hex()[:12]}: its record in the index cannot be read: {err}")
            e = idx.get_object(txn, k)
            if e is None or e.kind != Kind.POINT or e.flags & FLAG_DEAD:
                r.error(f"point {k.hex()[:12]}: its record object is missing from the index")


def _verify_pack(safe: Safe, txn: Txn, pid: int, limit: int, data: bool,
                 progress: Callable[[int], None] | None, r: VerifyReport) -> int:
    """Walk one pack up to ``limit``; report damage and disagreement with the index; return
    how many indexed objects were found at their recorded offsets."""
    with safe.store.open_reader(pid) as f:
        return _walk_pack(safe, txn, pid, f, limit, data, progress, r)


def _walk_pack(safe: Safe, txn: Txn, pid: int, f: BinaryIO, limit: int, data: bool,
               progress: Callable[[int], None] | None, r: VerifyReport) -> int:
    idx = safe.index
    found = 0
    for item in scan_pack(f, pid, limit, read_data=True, rehash=data, crypto=safe.crypto):
        h = item.header
        if h is None or item.torn:
            # A damaged region (the walk goes on after it) or, inside the committed length,
            # an unfinished record: both are damage here.
            r.error(str(item.error), pid, item.offset, bytes=item.length or (h.total if h else 0))
            continue
        e = idx.get_object(txn, h.key)
        here = e is not None and e.pack == pid and e.offset == item.offset
        if item.error is not None and (here or e is None):
            r.error(str(item.error), pid, item.offset, object=h.key.hex())
        if here:
            assert e is not None
            found += 1
            if (e.kind, e.codec, e.stored_len, e.raw_len) != (h.kind, h.codec, h.stored_len, h.raw_len):
                r.error(f"pack {pack_name(pid)} offset {item.offset}: index entry of object "
                        f"{h.key.hex()[:12]} disagrees with its record", pid, item.offset)
        r.objects += 1
        r.bytes_checked += h.total
        if progress:
            progress(h.total)
    return found


def _audit_into(safe: Safe, r: VerifyReport) -> None:
    """Add the reference-count and blob-size audit (recomputed from the points) to the report."""
    a = audit(safe)
    r.refcounts = a.as_dict()
    for m in a.errors:
        r.error(f"refcount audit: {m}")
    for m in a.sizes:
        r.error(f"blob size: {m}")
    more = a.mismatches - len(a.errors) - len(a.sizes)
    if more > 0:
        r.error(f"refcount audit: {more} more problems not listed")
    if a.orphans:
        with safe.index.read() as txn:
            lost = txn.get(b"lost_at", db=safe.index.db["meta"]) is not None
        why = ("left by an interrupted backup, or no longer reachable under objects that "
               "'pointsafe repair' found lost" if lost else "left by an interrupted backup")
        r.notes.append(f"{a.orphans} objects at count 0 {why} ('pointsafe gc' reclaims them)")
