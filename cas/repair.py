"""Rebuild the LMDB index from the pack files alone.

Every intact record becomes an object (the first copy of a key wins; later copies count as
dead bytes). Reference counts are recomputed from the nodes' children; points are the POINT
objects that no TOMBSTONE names. The new index is built beside the old one and swapped in
by rename, so a crash during repair leaves the old index (or none) and repair can rerun.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

from .header import read_header
from .index import FLAG_PINNED, Index, ObjectEntry, PackEntry
from .keys import Kind
from .nodes import node_children, decode_node
from .pack import decode_record, pack_id_from_name, pack_name, scan_pack
from .store import INDEX_DIR, PACKS_DIR, release_lock, take_lock

# Tables that the packs do not hold (task history, alerts, per-safe settings): a rebuilt index
# takes them over from the old one when it can still be read.
KEPT_TABLES = ("tasks", "tasks_running", "alerts", "alert_latches", "config")


@dataclass
class RepairReport:
    packs: int = 0
    objects: int = 0
    points: int = 0
    damaged: list[dict] = field(default_factory=list)
    missing_children: int = 0

    def as_dict(self) -> dict:
        return {"packs": self.packs, "objects": self.objects, "points": self.points,
                "damaged": self.damaged, "missing_children": self.missing_children}


def repair(path: str | os.PathLike) -> RepairReport:
    safe_dir = Path(path)
    read_header(safe_dir)
    lockf = take_lock(safe_dir, "repair")
    try:
        return _repair(safe_dir)
    finally:
        release_lock(lockf)


def _repair(safe_dir: Path) -> RepairReport:
    rep = RepairReport()
    packs_dir = safe_dir / PACKS_DIR
    new_dir = safe_dir / (INDEX_DIR + ".rebuild")
    shutil.rmtree(new_dir, ignore_errors=True)
    idx = Index(new_dir, create=True)
    ids = sorted(p for p in (pack_id_from_name(n) for n in os.listdir(packs_dir)) if p is not None)
    with idx.write() as txn:
        for pid in ids:
            rep.packs += 1
            pe = PackEntry(0, 0, 0, time.time_ns(), 0, 1)
            end = 16
            for item in scan_pack(packs_dir / pack_name(pid), pid, read_data=True):
                h = item.header
                if item.error is not None:
                    rep.damaged.append({"pack": pack_name(pid), "offset": item.offset, "message": str(item.error)})
                    if h is None or "past the end" in str(item.error):
                        break
                    pe.dead_bytes += h.total
                    end = item.offset + h.total
                    continue
                end = item.offset + h.total
                if idx.get_object(txn, h.key) is not None:
                    pe.dead_bytes += h.total
                    continue
                flags = FLAG_PINNED if h.kind == Kind.TOMBSTONE else 0
                txn.put(h.key, ObjectEntry(pid, item.offset, h.stored_len, h.raw_len, h.kind, h.codec,
                                           flags, 0).encode(), db=idx.db["objects"])
                pe.live_bytes += h.total
                pe.objects += 1
                rep.objects += 1
            pe.committed_len = end
            idx.put_pack(txn, pid, pe)
            if end < (packs_dir / pack_name(pid)).stat().st_size:
                os.truncate(packs_dir / pack_name(pid), end)   # a torn tail, never committed
        # Pack ids are never reused: past every pack file, and past what the old index had
        # handed out (gc may have deleted the newest packs).
        idx.put_meta_int(txn, "next_pack", max((ids[-1] + 1) if ids else 1, _old_next_pack(safe_dir / INDEX_DIR)))

        # Tombstones name forgotten points.
        forgotten = set()
        objects = idx.db["objects"]
        cur = txn.cursor(db=objects)
        nodes = []
        for key, val in cur:
            e = ObjectEntry.decode(val)
            if e.kind != Kind.CHUNK:
                nodes.append((key, e))
        for key, e in nodes:
            raw = _read(packs_dir, key, e)
            if e.kind == Kind.TOMBSTONE:
                pk = bytes(decode_node(raw)[1])
                forgotten.add(pk)
                txn.put(pk, key, db=idx.db["tombstones"])
            for c in node_children(raw):
                ce = idx.get_object(txn, c)
                if ce is None:
                    rep.missing_children += 1
                    continue
                ce.refcount += 1
                txn.put(c, ce.encode(), db=objects)
        for key, e in nodes:
            if e.kind == Kind.POINT and key not in forgotten:
                rec = json.loads(bytes(decode_node(_read(packs_dir, key, e))[1]))
                rec["id"] = key.hex()
                txn.put(key, json.dumps(rec, sort_keys=True).encode(), db=idx.db["points"])
                pe_ = idx.get_object(txn, key)
                pe_.refcount += 1
                txn.put(key, pe_.encode(), db=objects)
                rep.points += 1
        for key, val in txn.cursor(db=objects):
            e = ObjectEntry.decode(val)
            if e.refcount == 0 and not e.flags & FLAG_PINNED:
                txn.put(key, b"", db=idx.db["zero"])
    _keep_tables(safe_dir / INDEX_DIR, idx)
    idx.env.sync(True)
    idx.close()
    old = safe_dir / INDEX_DIR
    trash = safe_dir / (INDEX_DIR + ".old")
    shutil.rmtree(trash, ignore_errors=True)
    if old.exists():
        os.rename(old, trash)
    os.rename(new_dir, old)
    shutil.rmtree(trash, ignore_errors=True)
    return rep


def _read(packs_dir: Path, key: bytes, e: ObjectEntry) -> bytes:
    with open(packs_dir / pack_name(e.pack), "rb") as f:
        f.seek(e.offset)
        buf = f.read(e.record_len)
    return decode_record(buf, e.pack, e.offset, rehash=False, expect_key=key)[1]


def _old_next_pack(old_dir: Path) -> int:
    """``meta.next_pack`` of the old index, or 1 when it is missing or unreadable."""
    import lmdb
    if not (old_dir / "data.mdb").exists():
        return 1
    try:
        env = lmdb.open(str(old_dir), readonly=True, max_dbs=64, lock=False, subdir=True)
    except lmdb.Error:
        return 1
    try:
        with env.begin() as rt:
            v = rt.get(b"next_pack", db=env.open_db(b"meta", txn=rt, create=False))
            return struct.unpack("<Q", v)[0] if v is not None and len(v) == 8 else 1
    except lmdb.Error:
        return 1
    finally:
        env.close()


def _keep_tables(old_dir: Path, new: Index) -> None:
    """Copy KEPT_TABLES from the old index, if it opens; a damaged one is left behind."""
    import lmdb
    if not (old_dir / "data.mdb").exists():
        return
    try:
        env = lmdb.open(str(old_dir), readonly=True, max_dbs=64, lock=False, subdir=True)
    except lmdb.Error:
        return
    try:
        with env.begin() as rt:
            for name in KEPT_TABLES:
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
