"""Rebuild the LMDB index from the pack files alone.

Every intact record becomes an object (the first copy of a key wins; later copies count as
dead bytes). Reference counts are recomputed from the nodes' children; points are the POINT
objects that no TOMBSTONE names. The new index is built beside the old one and swapped in
by rename, so a crash during repair leaves the old index (or none) and repair can rerun.

A damaged pack header or record header is damage, not the end of the pack: the walk
(``pack.scan_pack``) resumes at the next intact record and the unreadable region is reported;
only a torn tail is truncated. A damaged or missing ``header`` is rebuilt from ``header.copy``,
from the copy in the old index's ``meta`` table, or with default settings (docs/FORMAT.md,
"Repair").
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import struct
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import lmdb

from .crypto import Crypto
from . import keyslots
from .errors import (DiskFull, IntegrityError, NeedsPassword, NotASafe, SafeError, UnsupportedVersion,
                     WrongPassword)
from .keyslots import KEYS_DIR
from .header import (
    PRIVATE_FILE_MODE,
    HeaderCopy,
    HeaderState,
    SafeConfig,
    decode_header,
    encode_header,
    inspect_header,
    missing_header_error,
    write_header_bytes,
)
from .index import (FLAG_DEAD, FLAG_PINNED, MAX_TABLES, Index, data_file_problem, ObjectEntry, PackEntry, read_meta,
                    room_tables)
from .keys import Kind
from .nodes import decode_node, node_children
from .pack import (
    PACK_HEADER,
    CIPHER_NONE,
    PACK_MAGIC,
    decode_record,
    pack_name,
    scan_pack,
)
from .packstore import LocalPackStore, PackStore
from .store import INDEX_DIR, PACKS_DIR, Password, release_lock, take_lock, unlock_crypto, utc_now_iso

if TYPE_CHECKING:
    from .index import Txn


@dataclass
class RepairReport:
    """What ``repair`` did: packs and objects indexed, points kept, damage met, tails cut."""

    packs: int = 0
    objects: int = 0
    points: int = 0
    damaged: list[dict[str, Any]] = field(default_factory=list)   # what could not be read: pack, offset, bytes
    missing_children: int = 0
    truncated: list[dict[str, Any]] = field(default_factory=list)  # torn tails cut off: pack, offset, bytes
    header: str | None = None                            # what was done to the header files

    @property
    def unreadable_bytes(self) -> int:
        """Bytes of the packs that repair could not read as intact records."""
        n: int = sum(d.get("bytes", 0) for d in self.damaged)
        return n

    def as_dict(self) -> dict[str, Any]:
        """The report as JSON-ready data."""
        return {"packs": self.packs, "objects": self.objects, "points": self.points,
                "damaged": self.damaged, "missing_children": self.missing_children,
                "truncated": self.truncated, "header": self.header,
                "unreadable_bytes": self.unreadable_bytes}


def repair(path: str | os.PathLike[str], password: Password | None = None,
           master_key: bytes | None = None) -> RepairReport:
    """Rebuild the safe's index from its packs (and its header files when damaged or missing).

    Nothing readable is ever cut off: a damaged pack header or record header in the middle of a
    pack is reported (pack, offset range, bytes) and the walk resumes at the next intact record;
    only a torn tail after the last intact record is truncated. Raises NotASafe /
    UnsupportedVersion / SafeLocked when it cannot start. Takes the writer lock itself (the
    caller must not hold it). Cost: reads every pack once, plus every node once more.

    An encrypted safe is repaired only with its key (``password`` or ``master_key``, as
    ``Safe.open`` takes them), unlocked before anything is written: NeedsPassword without one,
    WrongPassword when it does not open; ``keys/`` is never touched. A header that can only be
    rebuilt with default settings is refused in a safe that has key slots.
    """
    safe_dir = Path(path)
    if (safe_dir / "remote").is_file():     # a bucket safe's cache (cas/s3safe.py, REMOTE_NAME)
        return _repair_bucket(safe_dir, password, master_key)
    state = inspect_header(safe_dir)
    if state.good is None:
        err = missing_header_error(safe_dir, state)
        if isinstance(err, UnsupportedVersion) or not _is_dir(safe_dir / PACKS_DIR):
            raise err
    crypto, authentic = _crypto_for(safe_dir, state, password, master_key)
    lockf = take_lock(safe_dir, "repair")
    try:
        try:
            os.fchmod(lockf.fileno(), PRIVATE_FILE_MODE)   # take_lock may have created it
        except OSError:
            pass
        rep = RepairReport()
        header = _repair_header(safe_dir, state, rep) if authentic is None else \
            _authentic_header(safe_dir, state, rep, authentic)
        _repair(safe_dir, rep, header, crypto)
        return rep
    finally:
        release_lock(lockf)


def _repair_bucket(safe_dir: Path, password: Password | None, master_key: bytes | None) -> RepairReport:
    """Repair of a bucket safe (cache directory ``safe_dir``): rebuild the cache's index from the
    bucket's packs alone (ranged GETs; the segments are not read), holding the local and the
    bucket's writer lock, then publish it as a checkpoint segment, so that every machine
    catching up gets the rebuilt state. Packs in the bucket are never rewritten: damage is
    reported and left out of the index, the rest is kept (docs/FORMAT.md, "Repair of a bucket
    safe"). The header and key slots are the bucket's (``s3safe.resolve`` fetched them)."""
    from . import s3safe
    from .segments import SEG_META
    b = s3safe.remote_of(safe_dir)
    assert b is not None
    state = inspect_header(safe_dir)
    if state.good is None or state.good.data is None:
        raise missing_header_error(safe_dir, state)
    crypto, authentic = _crypto_for(safe_dir, state, password, master_key)
    header = authentic if authentic is not None else state.good.data
    lockf = take_lock(safe_dir, "repair")
    try:
        b.check_conditional_create()
        lock = b.lock("repair")
        lock.acquire()
        try:
            lock.start_renewing()
            old = read_meta(safe_dir / INDEX_DIR, SEG_META)
            after = struct.unpack("<Q", old)[0] if old is not None and len(old) == 8 else 0
            rep = RepairReport()
            store = s3safe.pack_store(b, safe_dir)
            try:
                _repair(safe_dir, rep, header, crypto, store)
            finally:
                store.close()
            s3safe.publish_checkpoint(b, safe_dir / INDEX_DIR, crypto, lock, after)
            return rep
        finally:
            lock.release()
    finally:
        release_lock(lockf)


def _crypto_for(safe_dir: Path, state: HeaderState, password: Password | None,
                master_key: bytes | None) -> tuple[Crypto | None, bytes | None]:
    """The unlocked keys of the safe being repaired and the header bytes that authenticate
    under them ((None, None) for a plain safe); nothing is written.

    The candidates are the header files that decode and the index's copy, in the order repair
    prefers them; the first whose ``auth`` holds wins, so a header changed without the key is
    replaced by an authentic copy."""
    kept = read_meta(safe_dir / INDEX_DIR, b"header")
    order = [state.good] if state.good is not None else []
    order += [hc for hc in (state.main, state.copy) if hc is not state.good and hc.config is not None]
    cands: list[tuple[bytes, SafeConfig]] = [(hc.data, hc.config) for hc in order
                                             if hc.data is not None and hc.config is not None]
    if kept is not None and all(kept != d for d, _ in cands):
        try:
            cands.append((kept, decode_header(kept, str(safe_dir))))
        except SafeError:
            pass
    encrypted = [(d, c) for d, c in cands if c.encryption is not None]
    has_keys = _is_dir(safe_dir / KEYS_DIR)
    if not encrypted:
        if has_keys and cands:
            raise IntegrityError(f"{safe_dir}: the safe's header says it is not encrypted, yet the safe has "
                                 f"key slots ({KEYS_DIR}/): the header was changed without the key; "
                                 "repair refuses to rebuild it as a plain safe")
        if has_keys:
            raise NotASafe(f"{safe_dir}: the header of this encrypted safe is lost (both files and the "
                           "index's copy): repair cannot rebuild it")
        return None, None
    if master_key is None and password is None:
        raise NeedsPassword(f"{safe_dir} is encrypted: repair needs its password (POINTSAFE_PASSWORD, "
                            "--password-file, --password-command) to rebuild the index from its packs")
    master = master_key if master_key is not None else _unlock_any(safe_dir, encrypted, password)
    for data, config in encrypted:
        try:
            return unlock_crypto(safe_dir, config, data, None, master)[0], data
        except (IntegrityError, WrongPassword):
            continue
    raise IntegrityError(f"{safe_dir}: every copy of the safe's header fails its authentication (changed "
                         "without the key, or the key is not this safe's): repair refuses")


def _unlock_any(safe_dir: Path, encrypted: list[tuple[bytes, SafeConfig]], password: Password | None) -> bytes:
    """The master key from the key slots, trying the safe id of each candidate header (a
    changed one must not lock the user out); WrongPassword when none opens."""
    pw = password() if callable(password) else password
    assert pw is not None
    err: SafeError | None = None
    for sid in dict.fromkeys(c.safe_id for _, c in encrypted):
        try:
            return keyslots.unlock(safe_dir, pw, sid)
        except WrongPassword as e:
            err = e
    assert err is not None
    raise err


def _decodes(data: bytes, safe_dir: Path) -> bool:
    try:
        decode_header(data, str(safe_dir))
    except SafeError:
        return False
    return True


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:
        return False


def _agreed(safe_dir: Path, state: HeaderState, good: HeaderCopy) -> HeaderCopy:
    """Of two good header files that differ (one copied from another safe, say), the one the
    copy in the old index's ``meta`` table agrees with; ``good`` when neither or both do."""
    if state.main.config is None or state.copy.config is None or state.main.data == state.copy.data:
        return good
    kept = read_meta(safe_dir / INDEX_DIR, b"header")
    for hc in (state.main, state.copy):
        if kept is not None and hc.data == kept:
            return hc
    return good


def _authentic_header(safe_dir: Path, state: HeaderState, rep: RepairReport, data: bytes) -> bytes:
    """Make both header files the authenticated header ``data`` of an encrypted safe."""
    bad = [hc.name for hc in (state.main, state.copy) if hc.data != data]
    if bad:
        write_header_bytes(safe_dir, data)
        rep.header = f"rewrote {' and '.join(bad)} with the header that authenticates under the key"
    return data


def _repair_header(safe_dir: Path, state: HeaderState, rep: RepairReport) -> bytes:
    """Make ``header`` and ``header.copy`` good and identical; return their bytes.

    From the good file when one is; else from the copy kept in the index's ``meta`` table;
    else (a version-2 safe, or every copy lost) default settings and a new safe id.
    """
    good = state.good
    if good is not None:
        assert good.data is not None    # a copy that decodes was read
        if state.intact:
            kept = read_meta(safe_dir / INDEX_DIR, b"header")
            if kept is None or kept == good.data or not _decodes(kept, safe_dir):
                return good.data
            # Both files good and alike but not this safe's (another safe's copied over):
            # the header never changes after init, so the index's copy is the safe's own.
            write_header_bytes(safe_dir, kept)
            rep.header = "rewrote header and header.copy from the copy kept in the index (they held another header)"
            return kept
    if good is not None:
        good = _agreed(safe_dir, state, good)
        data = good.data
        bad = [hc.name for hc in (state.main, state.copy) if hc.data != data or hc.config is None]
        rep.header = f"rewrote {' and '.join(bad)} from {good.name}"
    else:
        data = read_meta(safe_dir / INDEX_DIR, b"header")
        try:
            if data is None:
                raise NotASafe("no copy in the index")
            decode_header(data, str(safe_dir))
            rep.header = "rebuilt header and header.copy from the copy kept in the index"
        except SafeError:
            config = SafeConfig(safe_id=uuid.uuid4().hex, created=utc_now_iso())
            data = encode_header(config)
            rep.header = ("rebuilt header and header.copy with default settings and a new safe id "
                          f"({config.safe_id}): no good copy was left")
    assert data is not None
    write_header_bytes(safe_dir, data)
    return data


def _scan_one(store: PackStore, pid: int, idx: Index, txn: Txn, rep: RepairReport,
              crypto: Crypto | None, mend: bool = True) -> PackEntry | None:
    """Index the intact records of one pack; report its damage; cut only a torn tail (and
    mend a damaged pack header) when ``mend`` (not in a bucket: its packs stay as they are)."""
    name = pack_name(pid)
    size = store.size(pid) or 0
    if size < PACK_HEADER.size:
        rep.damaged.append({"pack": name, "offset": 0, "end": size, "bytes": size,
                            "message": f"pack {name} is shorter than a pack header; left out"})
        return None
    with store.open_reader(pid) as f:
        pe, end, torn_at, head_damaged = _index_records(f, pid, size, idx, txn, rep, crypto)
    pe.committed_len = end
    if torn_at is not None and torn_at < size and not mend:
        rep.damaged.append({"pack": name, "offset": torn_at, "end": size, "bytes": size - torn_at,
                            "message": f"pack {name} offset {torn_at}: a torn tail of {size - torn_at} bytes "
                                       "(left in the bucket, not indexed)"})
    elif torn_at is not None and torn_at < size:
        store.truncate(pid, torn_at)   # a torn tail: an unfinished last record, never committed
        rep.truncated.append({"pack": name, "offset": torn_at, "bytes": size - torn_at})
    if head_damaged and pe.objects and mend:
        store.replace_header(pid, PACK_HEADER.pack(PACK_MAGIC, pid))   # it follows from the id
    return pe


def _index_records(f: BinaryIO, pid: int, size: int, idx: Index, txn: Txn,
                   rep: RepairReport, crypto: Crypto | None) -> tuple[PackEntry, int, int | None, bool]:
    """Index the intact records found walking ``f``; returns the pack's entry, the end of its
    last record, where a torn tail starts (or None) and whether the pack header is damaged."""
    name = pack_name(pid)
    pe = PackEntry(0, 0, 0, time.time_ns(), 0, 1)
    end = PACK_HEADER.size
    torn_at = None
    head_damaged = False
    for item in scan_pack(f, pid, size, read_data=True, crypto=crypto):
        h = item.header
        if item.torn:
            torn_at = item.offset
            break
        if h is None:
            head_damaged = head_damaged or item.offset == 0
            rep.damaged.append({"pack": name, "offset": item.offset, "end": item.offset + item.length,
                                "bytes": item.length, "message": str(item.error)})
            pe.dead_bytes += item.length
            end = max(end, item.offset + item.length)
            continue
        end = item.offset + h.total
        if crypto is None and h.cipher != CIPHER_NONE:
            # Not damage: the header lost its encryption field (and keys/ went too). Indexing
            # nothing would let gc compact every record away.
            raise IntegrityError(f"pack {pack_name(pid)} offset {item.offset} holds an encrypted record, yet the "
                                 "safe's header says it is not encrypted: the header was changed; repair "
                                 "refuses (restore the header and keys/ from a copy of the safe)", pid, item.offset)
        if item.error is not None:
            rep.damaged.append({"pack": name, "offset": item.offset, "end": end, "bytes": h.total,
                                "object": h.key.hex(), "message": str(item.error)})
            pe.dead_bytes += h.total
            continue
        if idx.get_object(txn, h.key) is not None:
            pe.dead_bytes += h.total
            continue
        flags = FLAG_PINNED if h.kind == Kind.TOMBSTONE else 0
        txn.put(h.key, ObjectEntry(pid, item.offset, h.stored_len, h.raw_len, h.kind, h.codec,
                                   flags, 0).encode(), db=idx.db["objects"])
        pe.live_bytes += h.total
        pe.objects += 1
        rep.objects += 1
    return pe, end, torn_at, head_damaged


def _repair(safe_dir: Path, rep: RepairReport, header: bytes, crypto: Crypto | None,
            bucket: PackStore | None = None) -> None:
    new_dir = safe_dir / (INDEX_DIR + ".rebuild")
    shutil.rmtree(new_dir, ignore_errors=True)
    try:
        _rebuild(safe_dir, new_dir, rep, header, crypto, bucket)
    except IntegrityError:
        shutil.rmtree(new_dir, ignore_errors=True)
        raise
    except (lmdb.Error, OSError) as e:
        shutil.rmtree(new_dir, ignore_errors=True)
        if not _no_space(e):
            raise
        raise DiskFull("disk full: repair needs room for a new index next to the old one "
                       "(about the size of the old index); free some space and run "
                       "'pointsafe repair' again (the old index is left as it was)") from None
    old = safe_dir / INDEX_DIR
    trash = safe_dir / (INDEX_DIR + ".old")
    shutil.rmtree(trash, ignore_errors=True)
    if old.exists():
        os.rename(old, trash)
    os.rename(new_dir, old)
    shutil.rmtree(trash, ignore_errors=True)


def _no_space(e: Exception) -> bool:
    if isinstance(e, OSError):
        return e.errno == errno.ENOSPC
    return "No space left on device" in str(e)


def _rebuild(safe_dir: Path, new_dir: Path, rep: RepairReport, header: bytes, crypto: Crypto | None,
             bucket: PackStore | None = None) -> None:
    """Build the new index in ``new_dir`` from the packs (invariant 13) and sync it."""
    idx = Index(new_dir, create=True, lock=False)
    try:
        _fill(safe_dir, idx, rep, header, crypto, bucket)
    finally:
        idx.close()


def _fill(safe_dir: Path, idx: Index, rep: RepairReport, header: bytes, crypto: Crypto | None,
          bucket: PackStore | None = None) -> None:
    local: PackStore = bucket if bucket is not None else LocalPackStore(safe_dir / PACKS_DIR)
    store = _Packs(local, crypto)
    ids = sorted(local.pack_ids())
    with idx.write() as txn:
        for pid in ids:
            pe = _scan_one(local, pid, idx, txn, rep, crypto, mend=bucket is None)
            if pe is None:
                continue
            rep.packs += 1
            idx.put_pack(txn, pid, pe)
        # Pack ids are never reused: past every pack file, and past what the old index had
        # handed out (gc may have deleted the newest packs).
        idx.put_meta_int(txn, "next_pack", max((ids[-1] + 1) if ids else 1, _old_next_pack(safe_dir / INDEX_DIR)))
        txn.put(b"header", header, db=idx.db["meta"])
        _count(store, idx, txn, rep)
    _keep_tables(safe_dir / INDEX_DIR, idx)
    idx.env.sync(True)


def _count(store: _Packs, idx: Index, txn: Txn, rep: RepairReport) -> None:
    """Tombstones, reference counts and points of the rebuilt index."""
    forgotten = set()
    objects = idx.db["objects"]
    nodes = []
    for key, val in txn.cursor(db=objects):
        e = ObjectEntry.decode(val)
        if e.kind != Kind.CHUNK:
            nodes.append((key, e))
    missing: dict[bytes, int] = {}      # node -> how many of its children are not indexed
    absent: dict[bytes, list[bytes]] = {}   # a child that is not indexed -> the nodes naming it
    for key, e in nodes:
        raw = _read(store, key, e)
        if e.kind == Kind.TOMBSTONE:
            pk = bytes(decode_node(raw)[1])
            forgotten.add(pk)
            txn.put(pk, key, db=idx.db["tombstones"])
        for c in node_children(raw):
            ce = idx.get_object(txn, c)
            if ce is None:
                missing[key] = missing.get(key, 0) + 1
                absent.setdefault(c, []).append(key)
                continue
            ce.refcount += 1
            txn.put(c, ce.encode(), db=objects)
    for key, e in nodes:
        if e.kind == Kind.POINT and key not in forgotten:
            rec = json.loads(bytes(decode_node(_read(store, key, e))[1]))
            rec["id"] = key.hex()
            value = json.dumps(rec, sort_keys=True).encode()
            if store.crypto is not None:
                value = store.crypto.seal_value(b"points", key, value)
            txn.put(key, value, db=idx.db["points"])
            pe_ = idx.get_object(txn, key)
            assert pe_ is not None      # key was read from ``objects`` in this transaction
            pe_.refcount += 1
            txn.put(key, pe_.encode(), db=objects)
            rep.points += 1
    _kill_unreferenced(store, idx, txn, [key for key, _ in nodes], missing)
    rep.missing_children = sum(missing.values())
    _record_lost(idx, txn, absent, missing)
    for key, val in txn.cursor(db=objects):
        e = ObjectEntry.decode(val)
        if e.refcount == 0 and not e.flags & FLAG_PINNED:
            txn.put(key, b"", db=idx.db["zero"])


def _record_lost(idx: Index, txn: Txn, absent: dict[bytes, list[bytes]], missing: dict[bytes, int]) -> None:
    """Remember every lost object that live nodes still name, with how many do (their count
    once it is stored again; cas/refcount.py), and when objects were lost (``meta.lost_at``:
    the next backup of every source reads it whole, so that it stores them again)."""
    lost = 0
    for child, parents in absent.items():
        n = sum(1 for p in parents if p in missing)   # parents that stayed live
        if n:
            txn.put(child, struct.pack("<I", n), db=idx.db["missing"])
            lost += 1
    if lost:
        txn.put(b"lost_at", utc_now_iso().encode(), db=idx.db["meta"])


def _kill_unreferenced(store: _Packs, idx: Index, txn: Txn, node_keys: list[bytes],
                       missing: dict[bytes, int]) -> None:
    """Mark dead every node no point reaches, cascading, as forget and gc would have.

    A dead node's record may outlive gc in a pack that was not compacted while its children
    were collected; counted as live, it would reference missing objects (and a backup reusing
    it would link them). Dead nodes count no children (FORMAT.md, "Reference counts"), so
    their missing children are no damage: they are taken out of ``missing``.
    """
    packs: dict[int, PackEntry] = {}
    stack = list(node_keys)
    while stack:
        key = stack.pop()
        e = idx.get_object(txn, key)
        if e is None or e.refcount or e.flags & (FLAG_DEAD | FLAG_PINNED):
            continue
        e.flags |= FLAG_DEAD
        txn.put(key, e.encode(), db=idx.db["objects"])
        pe = packs.get(e.pack) or idx.get_pack(txn, e.pack)
        if pe is not None:
            pe.live_bytes -= e.record_len
            pe.dead_bytes += e.record_len
            packs[e.pack] = pe
        missing.pop(key, None)
        if e.kind == Kind.CHUNK:
            continue
        for c in node_children(_read(store, key, e)):
            ce = idx.get_object(txn, c)
            if ce is None:
                continue
            ce.refcount -= 1
            txn.put(c, ce.encode(), db=idx.db["objects"])
            if ce.refcount == 0:
                stack.append(c)
    for pid, pe in packs.items():
        idx.put_pack(txn, pid, pe)


class _Packs:
    """The pack store of the safe being repaired, with its keys (None: a plain safe)."""

    def __init__(self, store: PackStore, crypto: Crypto | None):
        self.store = store
        self.crypto = crypto


def _read(store: _Packs, key: bytes, e: ObjectEntry) -> bytes:
    buf = store.store.read(e.pack, e.offset, e.record_len)
    return decode_record(buf, e.pack, e.offset, rehash=False, expect_key=key, crypto=store.crypto)[1]


def _old_next_pack(old_dir: Path) -> int:
    """``meta.next_pack`` of the old index, or 1 when it is missing or unreadable."""
    v = read_meta(old_dir, b"next_pack")
    return struct.unpack("<Q", v)[0] if v is not None and len(v) == 8 else 1


def _keep_tables(old_dir: Path, new: Index) -> None:
    """Copy every other room's table (``index.room_tables``: whatever is not cas's own) from
    the old index, if it opens; a damaged one is left behind."""
    import lmdb
    if not (old_dir / "data.mdb").exists() or data_file_problem(old_dir) is not None:
        return
    try:
        env = lmdb.open(str(old_dir), readonly=True, max_dbs=MAX_TABLES, lock=False, subdir=True)
    except lmdb.Error:
        return
    try:
        with env.begin() as rt:
            for name in room_tables(env, rt):
                try:
                    db = env.open_db(name.encode(), txn=rt, create=False)
                except lmdb.Error:
                    continue
                dst = new.table(name)
                with new.write() as wt:
                    for k, v in rt.cursor(db=db):
                        wt.put(k, v, db=dst)
    except lmdb.Error:
        pass
    finally:
        env.close()
