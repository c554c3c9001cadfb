"""The LMDB index: named tables and the fixed layouts of their values.

Tables (LMDB named databases; see docs/FORMAT.md):

``objects``  key (32 bytes) -> ObjectEntry (32 bytes)
``packs``    pack id (u64 big-endian, so that LMDB order is numeric) -> PackEntry (40 bytes)
``zero``     key -> b"" : every object whose refcount is 0 (dead or not yet linked)
``points``   point key (32 bytes) -> point record, UTF-8 JSON
``meta``     ascii name -> value (``next_pack`` u64 LE, ``header``: the header file's bytes, ...)
``tombstones`` point key -> key of its TOMBSTONE object
``release``  object key -> u32 LE queued count drops (cas/release.py)
``missing``  object key -> u32 LE: an object ``repair`` found referenced but lost, and how many
             live nodes reference it (its count once a backup stores it again)

Any other named table belongs to another room (ops keeps its task history, alerts and
settings here): cas never reads them, and ``repair`` carries every one of them over from the
old index without knowing their names (``room_tables``).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, cast

import lmdb

from .counters import CounterDelta
from .errors import NotASafe, SafeError
from .header import PRIVATE_DIR_MODE, PRIVATE_FILE_MODE
from .segments import JournalTxn, Publisher

if TYPE_CHECKING:
    from typing import TypeAlias

    # Index.read and Index.write begin their transactions with buffers=False, so every value
    # they read is ``bytes``.
    Txn: TypeAlias = lmdb.Transaction[bytes]
    Table: TypeAlias = lmdb._Database

TABLES = ("objects", "packs", "zero", "points", "meta", "tombstones", "release", "missing")   # cas's own
RESERVED = ("files",)   # cas's too: change detection, unused so far (docs/FORMAT.md)
MAX_TABLES = 64
MAP_SIZE = 1 << 40  # address space only; the file grows as needed

OBJ = struct.Struct("<QQIIBBHI")
PACK = struct.Struct("<QQQQII")
FLAG_DEAD = 1    # refcount reached 0 and its children's counts were dropped
FLAG_PINNED = 2  # held by the safe itself (tombstones)


@dataclass(slots=True)
class ObjectEntry:
    """One ``objects`` value: where an object's record lies, what it is, and its count."""

    pack: int
    offset: int
    stored_len: int
    raw_len: int
    kind: int
    codec: int
    flags: int
    refcount: int

    def encode(self) -> bytes:
        """The 32-byte table value (``OBJ`` layout)."""
        return OBJ.pack(self.pack, self.offset, self.stored_len, self.raw_len,
                        self.kind, self.codec, self.flags, self.refcount)

    @classmethod
    def decode(cls, b: bytes) -> "ObjectEntry":
        """The entry a 32-byte value holds; struct.error on any other length."""
        return cls(*OBJ.unpack(b))

    @property
    def record_len(self) -> int:
        """Bytes of its pack record: the 64-byte record header plus the stored bytes."""
        return 64 + self.stored_len

    @property
    def dead(self) -> bool:
        """True once its count reached 0 and its children's counts were dropped."""
        return bool(self.flags & FLAG_DEAD)


@dataclass(slots=True)
class PackEntry:
    """One ``packs`` value: a pack's committed length, byte totals and state."""

    committed_len: int  # bytes of the pack file covered by committed index transactions
    live_bytes: int     # record bytes of indexed objects with refcount > 0 or not yet dead
    dead_bytes: int     # record bytes of objects removed from the index or marked dead
    created_ns: int
    objects: int        # indexed objects in this pack
    sealed: int         # 1 once no writer will append to it again

    def encode(self) -> bytes:
        """The 40-byte table value (``PACK`` layout)."""
        return PACK.pack(self.committed_len, self.live_bytes, self.dead_bytes,
                         self.created_ns, self.objects, self.sealed)

    @classmethod
    def decode(cls, b: bytes) -> "PackEntry":
        """The entry a 40-byte value holds; struct.error on any other length."""
        return cls(*PACK.unpack(b))


def room_tables(env: lmdb.Environment, txn: Txn) -> list[str]:
    """Names of the named tables in ``env`` that belong to other rooms (not cas's own).

    ``txn`` is any transaction of ``env``; it walks the main table, so the cost is one step
    per named table."""
    own = set(TABLES) | set(RESERVED)
    names = []
    for k in txn.cursor().iternext(values=False):
        name = bytes(k).decode("utf-8", "replace")
        if name not in own:
            names.append(name)
    return names


def pack_dbkey(pack_id: int) -> bytes:
    """The ``packs`` key of ``pack_id``: u64 big-endian, so LMDB order is numeric order."""
    return struct.pack(">Q", pack_id)


def pack_from_dbkey(b: bytes) -> int:
    """The pack id an 8-byte ``packs`` key holds; struct.error on any other length."""
    n: int = struct.unpack(">Q", b)[0]
    return n


_LMDB_MAGIC = 0xBEEFC0DE


def read_meta(index_dir: Path, name: bytes) -> bytes | None:
    """The value of ``name`` in the ``meta`` table of the index at ``index_dir``, read without
    a lock and without opening it for writing (an old or damaged index, another process's);
    None when it is missing or unreadable."""
    if not (index_dir / "data.mdb").is_file() or data_file_problem(index_dir) is not None:
        return None
    try:
        env = lmdb.open(str(index_dir), readonly=True, max_dbs=MAX_TABLES, lock=False, subdir=True)
    except lmdb.Error:
        return None
    try:
        with env.begin() as rt:
            v = rt.get(name, db=env.open_db(b"meta", txn=rt, create=False))
            return None if v is None else bytes(v)
    except lmdb.Error:
        return None
    finally:
        env.close()


def data_file_problem(path: Path) -> str | None:
    """Why the LMDB file ``path/data.mdb`` cannot be an intact index, or None when it can (or
    is absent: LMDB reports that itself). Checked before LMDB maps the file: LMDB takes an
    empty file for a new environment (an index that silently lost every object) and dies of
    SIGBUS on a file shorter than its meta pages say."""
    try:
        with open(path / "data.mdb", "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(4096)
            psize = struct.unpack_from("<I", head, 40)[0] if len(head) >= 48 else 0
            f.seek(psize)
            second = f.read(160) if 4096 <= psize <= 65536 else b""
    except FileNotFoundError:
        return None
    except OSError as e:
        return f"data.mdb cannot be read: {e.strerror}"
    metas = []
    for page in (head, second):
        if len(page) >= 152 and struct.unpack_from("<I", page, 16)[0] == _LMDB_MAGIC:
            last_pg, txnid = struct.unpack_from("<QQ", page, 136)
            metas.append((txnid, last_pg))
    if not metas:
        return f"data.mdb has no valid meta page ({size} bytes)"
    need = (max(metas)[1] + 1) * psize
    if size < need:
        return f"data.mdb is truncated: {size} bytes, its pages reach {need}"
    return None


class Index:
    """The LMDB environment and its tables. Safe for many threads and processes.

    ``readonly`` opens the environment read-only: no write transaction is ever begun (so a
    safe on a read-only filesystem, or one the user may read but not write, can be read), and
    tables that do not exist yet are simply absent (see :meth:`existing`). ``lock=False``
    skips LMDB's lock file: only for a read-only filesystem, where no writer can exist, or for
    a new environment (``create``) that no other process opens (repair's rebuild, under the
    writer lock): LMDB maps its lock file, and on a full disk touching it kills with SIGBUS.
    ``create`` makes a new environment, directory 0700 and files 0600 whatever the umask.
    """

    def __init__(self, path: Path, readonly: bool = False, create: bool = False, lock: bool = True):
        self.path = path
        self.readonly = readonly and not create
        if not create:
            why = data_file_problem(path)
            if why is not None:
                raise NotASafe(f"{path}: the safe's index is damaged ({why}); "
                               "rebuild it from the packs with 'pointsafe repair'")
        if create:
            path.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
            os.chmod(path, PRIVATE_DIR_MODE)
        self.env = lmdb.open(str(path), map_size=MAP_SIZE, max_dbs=MAX_TABLES,
                             subdir=True, create=create, readonly=self.readonly,
                             max_readers=1024, metasync=True, sync=True, lock=lock or (not self.readonly and not create),
                             mode=PRIVATE_FILE_MODE)
        self.db: dict[str, Table] = {}
        # A bucket safe's cache (cas/s3safe.py) journals every write transaction: the rows it
        # changed become an index segment, uploaded before the local commit (cas/segments.py).
        self.publisher: Publisher | None = None
        if self.readonly:
            for name in TABLES:
                self.existing(name)
        else:
            with self.env.begin(write=True) as txn:
                for name in TABLES:
                    self.db[name] = self.env.open_db(name.encode(), txn=txn, create=True)
        if create:
            for f in path.iterdir():
                os.chmod(f, PRIVATE_FILE_MODE)

    def close(self) -> None:
        """Close the environment (every handle and transaction of it becomes unusable)."""
        self.env.close()

    def read(self) -> Txn:
        """A read transaction (values are ``bytes``): a consistent snapshot of every table.

        Any thread may begin one; it holds no lock, but keeps the pages of its snapshot from
        being reused until it ends, so end it soon (``with``)."""
        return self.env.begin(write=False, buffers=False)

    def write(self) -> Txn:
        """A write transaction (values are ``bytes``); SafeError when the index was opened
        read-only.

        Changes to cas's tables need the safe's writer lock (``Writer``); LMDB itself lets one
        write transaction run at a time and blocks the others until it ends."""
        if self.readonly:
            raise SafeError(f"{self.path.parent}: the safe is open read-only (a read-only filesystem "
                            "or no write permission); this needs to write to it")
        txn = self.env.begin(write=True)
        if self.publisher is None:
            return txn
        return cast("Txn", JournalTxn(txn, self, self.publisher))

    def table(self, name: str) -> Table:
        """The table ``name``, created when missing (SafeError on a read-only index)."""
        db = self.existing(name)
        if db is not None:
            return db
        with self.write() as txn:
            db = self.env.open_db(name.encode(), txn=txn, create=True)
        # Published once its transaction committed: another thread that took the handle
        # before would use it in a transaction that cannot see it (LMDB: EINVAL).
        self.db[name] = db
        return db

    def existing(self, name: str) -> Table | None:
        """The table ``name`` if it exists, else None. Unlike ``table`` it never writes, so
        read-only work (verify, status) still runs on a full disk or a read-only index."""
        db = self.db.get(name)
        if db is not None:
            return db
        try:
            if self.readonly:
                # A read-only environment opens handles in a read transaction that it keeps.
                db = self.env.open_db(name.encode(), create=False)
            else:
                # A write transaction (a handle opened in a read one dies with it) that changes
                # nothing, so its commit writes nothing.
                with self.env.begin(write=True) as txn:
                    db = self.env.open_db(name.encode(), txn=txn, create=False)
        except lmdb.NotFoundError:
            return None
        self.db[name] = db
        return db

    # small helpers -------------------------------------------------------------------

    def get_object(self, txn: Txn, key: bytes) -> ObjectEntry | None:
        """The ``objects`` entry of ``key`` in ``txn``, or None when it is not indexed."""
        v = txn.get(key, db=self.db["objects"])
        return ObjectEntry.decode(v) if v is not None else None

    def put_object(self, txn: Txn, key: bytes, e: ObjectEntry) -> None:
        """Write the entry of ``key`` and keep the ``zero`` table in step (an unpinned count
        of 0 is listed there). ``txn`` is a write transaction under the writer lock."""
        txn.put(key, e.encode(), db=self.db["objects"])
        if e.refcount == 0 and not e.flags & FLAG_PINNED:
            txn.put(key, b"", db=self.db["zero"])
        else:
            txn.delete(key, db=self.db["zero"])

    def get_pack(self, txn: Txn, pack_id: int) -> PackEntry | None:
        """The ``packs`` entry of ``pack_id`` in ``txn``, or None when it is not indexed."""
        v = txn.get(pack_dbkey(pack_id), db=self.db["packs"])
        return PackEntry.decode(v) if v is not None else None

    def put_pack(self, txn: Txn, pack_id: int, e: PackEntry) -> None:
        """Write a pack entry, keeping the pack totals (cas/counters.py) in step. ``txn`` is a
        write transaction under the writer lock."""
        k = pack_dbkey(pack_id)
        old = txn.get(k, db=self.db["packs"])
        txn.put(k, e.encode(), db=self.db["packs"])
        d = CounterDelta()
        d.pack(PackEntry.decode(old) if old is not None else None, e)
        d.apply(txn, self.db["meta"])

    def delete_pack(self, txn: Txn, pack_id: int) -> PackEntry | None:
        """Remove a pack entry (and its share of the totals); returns the entry it removed, or
        None when there was none. ``txn`` is a write transaction under the writer lock."""
        k = pack_dbkey(pack_id)
        old = txn.get(k, db=self.db["packs"])
        if old is None:
            return None
        txn.delete(k, db=self.db["packs"])
        pe = PackEntry.decode(old)
        d = CounterDelta()
        d.pack(pe, None)
        d.apply(txn, self.db["meta"])
        return pe

    def get_meta_int(self, txn: Txn, name: str, default: int = 0) -> int:
        """The u64 LE ``meta`` value ``name``, or ``default`` when it is absent."""
        v = txn.get(name.encode(), db=self.db["meta"])
        if v is None:
            return default
        n: int = struct.unpack("<Q", v)[0]
        return n

    def put_meta_int(self, txn: Txn, name: str, value: int) -> None:
        """Set the ``meta`` value ``name`` to ``value`` as u64 LE (a write transaction)."""
        txn.put(name.encode(), struct.pack("<Q", value), db=self.db["meta"])
