"""The safe: open/create, read objects, and the single writer.

Readers (any number, in any process) look objects up in short LMDB read transactions and
read their records from the pack files with ``pread``. The one writer (guarded by an
``flock`` on ``<safe>/lock``) appends records to a pack, and commits them in batches:
pack bytes are fsynced *before* the LMDB transaction that references them commits, so a
crash at any instant leaves an index that only names bytes that are on disk.

Reference counts are hierarchical (docs/FORMAT.md, "Reference counts"): an object's count is
the number of live indexed nodes that list it as a child, plus one per point that names it.
Writing a *new* node increments its children; reusing an existing node changes nothing
below it. When a count drops to zero the object is marked dead and its children are released
in turn; ``gc`` later removes dead objects and reclaims their bytes.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import socket
import threading
import time
import uuid
from collections import OrderedDict
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterable

import lmdb

from .errors import (DiskFull, IntegrityError, NotASafe, ObjectMissing, QuotaExceeded, SafeError, SafeLocked,
                     UsageError)
from .header import (COPY_NAME, HEADER_NAME, PRIVATE_DIR_MODE, PRIVATE_FILE_MODE, SafeConfig, encode_header,
                     parse_compression, read_header, write_header_bytes)
from .index import FLAG_DEAD, FLAG_PINNED, Index, ObjectEntry, PackEntry, pack_from_dbkey
from .keys import Kind, object_key
from .nodes import encode_node, node_children
from .pack import (PACK_HEADER, Prepared, decode_record, pack_id_from_name, pack_name, prepare,
                   write_pack_header)

PACKS_DIR = "packs"
INDEX_DIR = "index"
LOCK_NAME = "lock"
BATCH_BYTES = 32 * 1024 * 1024
INIT_MIN_FREE = 1 << 20   # free bytes a new safe needs (LMDB's files, header, first pack)
SPACE_CHECK_EVERY = 4 * 1024 * 1024  # a writer's space guard runs at most once per this many bytes

# Optional process-wide disk-space guard for writers, installed by the caller (the CLI installs
# the safe's hard quota for backups; cas never imports the code that sets it). Called as
# ``guard(safe_dir, bytes_about_to_write)`` before a writer appends, on its first record and
# then every SPACE_CHECK_EVERY bytes; it raises QuotaExceeded to stop the writer.
_space_check: Callable[[Path, int], None] | None = None


def set_space_check(guard: Callable[[Path, int], None] | None) -> None:
    """Install (or, with None, remove) the disk-space guard of writers created afterwards."""
    global _space_check
    _space_check = guard


def utc_now_iso() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _undo_init(p: Path, created: bool) -> None:
    """Remove what a failed ``Safe.init`` made inside ``p`` (which was new or empty)."""
    for name in (HEADER_NAME + ".tmp", HEADER_NAME, COPY_NAME + ".tmp", COPY_NAME, LOCK_NAME):
        try:
            (p / name).unlink()
        except OSError:
            pass
    shutil.rmtree(p / INDEX_DIR, ignore_errors=True)
    shutil.rmtree(p / PACKS_DIR, ignore_errors=True)
    if created:
        try:
            p.rmdir()
        except OSError:
            pass


def private_open(path: Path, flags: int = os.O_WRONLY | os.O_CREAT | os.O_EXCL) -> int:
    """``os.open`` a file of the safe with mode 0600 whatever the umask (a new pack, a lock);
    returns the descriptor. Every file a writer creates inside a safe is made this way."""
    fd = os.open(path, flags | os.O_CLOEXEC, PRIVATE_FILE_MODE)
    if flags & os.O_CREAT:
        try:
            os.fchmod(fd, PRIVATE_FILE_MODE)
        except OSError:
            os.close(fd)
            raise
    return fd


def _readonly_fs(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def _may_write(index_dir: Path) -> bool:
    """True when this process may write the index (its directory and both LMDB files)."""
    names = [index_dir, index_dir / "data.mdb", index_dir / "lock.mdb"]
    return all(os.access(n, os.W_OK) for n in names if n == index_dir or n.exists())


def _open_error(p: Path, e: lmdb.Error, write: bool) -> SafeError:
    text = str(e)
    if "already open in this process" in text:
        # py-lmdb allows one environment per path and process: a program error, not damage.
        return SafeError(f"{p}: the safe is already open in this process; reuse that Safe "
                         "or close it first")
    if "Permission denied" in text:
        return SafeError(f"{p}: permission denied (cannot open the safe's index"
                         f"{' for writing' if write else ''})")
    if "Read-only file system" in text:
        return SafeError(f"{p}: the safe is on a read-only filesystem; this command needs to write to it")
    return NotASafe(f"{p}: cannot open the safe's index ({e}); try 'pointsafe repair'")


def _disk_error(e: OSError, what: str) -> SafeError:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFull(f"disk full while {what}: the last batch was not committed; "
                        "free some space (or run 'pointsafe gc') and try again")
    return SafeError(f"I/O error while {what}: {e.strerror or e}")


def take_lock(safe_dir: Path, command: str = ""):
    """Take the safe's exclusive writer lock (flock) or raise SafeLocked naming the holder."""
    path = safe_dir / LOCK_NAME
    try:
        f = open(path, "a+")
    except OSError as e:
        raise SafeError(f"{safe_dir}: cannot open the lock file: {e.strerror}") from None
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise SafeLocked(f"the safe is busy: {holder} holds its writer lock; wait for it to finish") from None
    try:
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()} ({command or 'pointsafe'}, since {utc_now_iso()})\n")
        f.flush()
    except OSError:
        pass  # the note is for people; a full disk must not stop the lock
    return f


def release_lock(f) -> None:
    try:
        f.seek(0)
        f.truncate()
    except OSError:
        pass
    try:
        f.close()
    except OSError:
        pass  # a full disk cannot flush the holder note; the lock goes with the descriptor


class PackFiles:
    """A small LRU of read-only pack file descriptors shared by reader threads."""

    def __init__(self, packs_dir: Path, limit: int = 64):
        self.dir = packs_dir
        self.limit = limit
        self.fds: OrderedDict[int, int] = OrderedDict()
        self.lock = threading.Lock()

    def pread(self, pack_id: int, length: int, offset: int) -> bytes:
        with self.lock:
            fd = self.fds.get(pack_id)
            if fd is not None:
                self.fds.move_to_end(pack_id)
        if fd is None:
            fd = os.open(self.dir / pack_name(pack_id), os.O_RDONLY | os.O_CLOEXEC)
            with self.lock:
                old = self.fds.get(pack_id)
                if old is not None:
                    os.close(fd)
                    fd = old
                else:
                    self.fds[pack_id] = fd
                    while len(self.fds) > self.limit:
                        _, victim = self.fds.popitem(last=False)
                        os.close(victim)
        return os.pread(fd, length, offset)

    def forget(self, pack_id: int) -> None:
        with self.lock:
            fd = self.fds.pop(pack_id, None)
        if fd is not None:
            os.close(fd)

    def close(self) -> None:
        with self.lock:
            for fd in self.fds.values():
                os.close(fd)
            self.fds.clear()


class Safe:
    """An open safe. Reading is thread-safe; writing goes through :meth:`writer`."""

    def __init__(self, path: Path, config: SafeConfig, index: Index):
        self.path = path
        self.config = config
        self.index = index
        self.packs_dir = path / PACKS_DIR
        self._files = PackFiles(self.packs_dir)
        # Count of objects read from packs, for tests and benchmarks ("lazy" checks).
        self.objects_read = 0

    # -- lifecycle ----------------------------------------------------------------------

    @classmethod
    def init(cls, path: str | os.PathLike, compression: str = "zstd:1",
             block_size: int = 64 * 1024, pack_size: int = 64 * 1024 * 1024, **extra) -> "Safe":
        """Create a new safe at ``path`` (a missing or empty directory)."""
        p = Path(path)
        if p.exists():
            if not p.is_dir():
                raise UsageError(f"{p}: exists and is not a directory")
            if any(p.iterdir()):
                raise UsageError(f"{p}: directory is not empty; a safe needs a new or empty directory")
        if block_size < 4096 or block_size > 4 * 1024 * 1024 or block_size & (block_size - 1):
            raise UsageError(f"bad block size {block_size}: use a power of two from 4 KiB to 4 MiB")
        config = SafeConfig(safe_id=uuid.uuid4().hex, created=utc_now_iso(),
                            compression=parse_compression(compression), block_size=block_size,
                            pack_size=pack_size, **extra)
        created = not p.exists()
        try:
            p.mkdir(parents=True, exist_ok=True)
            # LMDB maps its lock file: on a full disk, touching the mapping kills the process
            # with SIGBUS instead of raising, so refuse before creating anything.
            st = os.statvfs(p)
            if st.f_bavail * st.f_frsize < INIT_MIN_FREE:
                raise DiskFull(f"disk full: cannot create a safe at {p} "
                               f"({st.f_bavail * st.f_frsize} bytes free, it needs at least 1 MiB)")
            os.chmod(p, PRIVATE_DIR_MODE)
            (p / PACKS_DIR).mkdir(mode=PRIVATE_DIR_MODE)
            os.chmod(p / PACKS_DIR, PRIVATE_DIR_MODE)
            index = Index(p / INDEX_DIR, create=True)
            os.close(private_open(p / LOCK_NAME))
            header = encode_header(config)
            with index.write() as txn:
                txn.put(b"header", header, db=index.db["meta"])   # a third copy, for repair
            write_header_bytes(p, header)
            _fsync_dir(p)
        except (OSError, lmdb.Error, DiskFull) as e:
            _undo_init(p, created)   # so that the user can simply run init again
            if isinstance(e, DiskFull):
                raise
            if isinstance(e, lmdb.Error):
                e = OSError(errno.ENOSPC if "space" in str(e).lower() else errno.EIO, str(e))
            raise _disk_error(e, f"creating the safe at {p}") from None
        return cls(p, config, index)

    @classmethod
    def open(cls, path: str | os.PathLike, write: bool | None = None) -> "Safe":
        """Open the safe at ``path``.

        ``write=None`` (the default) opens the index for writing when this process may write it
        and read-only otherwise (a read-only filesystem, a user without write permission), so
        that readers always can read; ``write=False`` always opens it read-only (no LMDB write
        transaction is ever begun, and writing raises SafeError); ``write=True`` fails with
        "permission denied" or "read-only filesystem" when the index cannot be written.
        Raises NotASafe when ``path`` is not a safe or its index is missing or unreadable.
        """
        p = Path(path)
        config = read_header(p)
        index_dir = p / INDEX_DIR
        try:
            present = (index_dir / "data.mdb").exists()
        except PermissionError:
            raise SafeError(f"{p}: permission denied (cannot read the safe's index)") from None
        if not present:
            raise NotASafe(f"{p}: the safe's index is missing; rebuild it from the packs with 'pointsafe repair'")
        ro_fs = _readonly_fs(index_dir)
        if write and ro_fs:
            raise SafeError(f"{p}: the safe is on a read-only filesystem; this command needs to write to it")
        if write is None:
            write = not ro_fs and _may_write(index_dir)
        if not write and not os.access(index_dir / "data.mdb", os.R_OK):
            raise SafeError(f"{p}: permission denied (cannot read the safe's index)")
        try:
            # No writer can exist on a read-only filesystem, so LMDB's lock file (which it
            # could not write there) is not needed.
            index = Index(index_dir, readonly=not write, lock=not ro_fs)
        except lmdb.Error as e:
            raise _open_error(p, e, write) from None
        return cls(p, config, index)

    @property
    def readonly(self) -> bool:
        """True when the safe was opened read-only (see :meth:`open`)."""
        return self.index.readonly

    def close(self) -> None:
        self._files.close()
        self.index.close()

    def __enter__(self) -> "Safe":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def writer(self, command: str = "") -> "Writer":
        """Take the writer lock (or raise SafeLocked) and return the writer."""
        return Writer(self, command)

    def pack_path(self, pack_id: int) -> Path:
        return self.packs_dir / pack_name(pack_id)

    @property
    def zstd_level(self) -> int | None:
        return self.config.zstd_level

    # -- reading ------------------------------------------------------------------------

    def entry(self, key: bytes, txn=None) -> ObjectEntry | None:
        if txn is not None:
            return self.index.get_object(txn, key)
        with self.index.read() as t:
            return self.index.get_object(t, key)

    def has(self, key: bytes) -> bool:
        with self.index.read() as t:
            return t.get(key, db=self.index.db["objects"]) is not None

    def get(self, key: bytes, rehash: bool = False) -> bytes:
        """The raw bytes of object ``key``.

        Raises ObjectMissing when the index does not hold it and IntegrityError (naming pack
        and offset) when its stored bytes are damaged. A pack rewritten by a concurrent gc
        is handled by looking the object up again.
        """
        for attempt in range(4):
            e = self.entry(key)
            if e is None:
                raise ObjectMissing(f"object {key.hex()[:12]} is not in the safe")
            try:
                return self.read_entry(key, e, rehash=rehash)
            except FileNotFoundError:
                self._files.forget(e.pack)
                err: SafeError = IntegrityError(f"object {key.hex()[:12]}: pack {pack_name(e.pack)} is missing", e.pack, e.offset)
            except IntegrityError as ie:
                self._files.forget(e.pack)
                err = ie
            # The object may have moved (gc/defrag); retry only if the index now says so.
            e2 = self.entry(key)
            if e2 is None or (e2.pack, e2.offset) == (e.pack, e.offset):
                raise err
            time.sleep(0.001 * attempt)
        raise err

    def read_entry(self, key: bytes, e: ObjectEntry, rehash: bool = False) -> bytes:
        buf = self._files.pread(e.pack, e.record_len, e.offset)
        self.objects_read += 1
        _, raw = decode_record(buf, e.pack, e.offset, rehash=rehash, expect_key=key)
        return raw

    def children(self, key: bytes) -> list[bytes]:
        e = self.entry(key)
        if e is None:
            raise ObjectMissing(f"object {key.hex()[:12]} is not in the safe")
        if e.kind == Kind.CHUNK:
            return []
        return node_children(self.get(key))

    # -- points -------------------------------------------------------------------------

    def points(self) -> list[dict]:
        """Every committed point, oldest first."""
        with self.index.read() as t:
            out = [json.loads(v) for _, v in t.cursor(db=self.index.db["points"])]
        out.sort(key=lambda p: (p.get("started", ""), p["id"]))
        return out

    def point(self, point_id: str) -> dict | None:
        try:
            k = bytes.fromhex(point_id)
        except ValueError:
            return None
        with self.index.read() as t:
            v = t.get(k, db=self.index.db["points"])
        return json.loads(v) if v is not None else None

    # -- statistics ---------------------------------------------------------------------

    def pack_entries(self) -> dict[int, PackEntry]:
        with self.index.read() as t:
            return {pack_from_dbkey(k): PackEntry.decode(v) for k, v in t.cursor(db=self.index.db["packs"])}


class Writer:
    """The one writer of a safe. Not thread-safe: call it from one thread.

    Use as a context manager; leaving the block normally commits, leaving it by an exception
    abandons the uncommitted batch (its bytes are truncated away by the next writer).
    """

    def __init__(self, safe: Safe, command: str = ""):
        self.safe = safe
        self.index = safe.index
        self.level = safe.config.zstd_level
        self._lockf = self._take_lock(command)
        self.pending: dict[bytes, ObjectEntry] = {}
        self.deltas: dict[bytes, int] = {}
        self.revived: dict[bytes, list[bytes]] = {}
        self.pending_points: list[tuple[bytes, dict]] = []
        self.pending_bytes = 0
        self.bytes_written = 0      # record bytes appended, this writer
        self.objects_written = 0
        self._pack_id: int | None = None
        self._packf = None
        self._pack_pos = 0
        self._pack_new = False
        self._closed = False
        self.space_check = _space_check
        self._unchecked = SPACE_CHECK_EVERY  # so that the first record is checked
        try:
            self._recover()
        except BaseException:
            self._release_lock()
            raise

    # -- lock and recovery --------------------------------------------------------------

    def _take_lock(self, command: str):
        return take_lock(self.safe.path, command)

    def _release_lock(self) -> None:
        if self._lockf is not None:
            release_lock(self._lockf)
            self._lockf = None

    def _recover(self) -> None:
        """Undo what a crashed writer left behind: uncommitted pack tails and packs."""
        packs = self.safe.pack_entries()
        for name in os.listdir(self.safe.packs_dir):
            pid = pack_id_from_name(name)
            path = self.safe.packs_dir / name
            if pid is None:
                if name.endswith(".tmp"):
                    path.unlink(missing_ok=True)
                continue
            pe = packs.get(pid)
            if pe is None:
                path.unlink(missing_ok=True)   # never committed, or deleted from the index by gc
            elif path.stat().st_size > pe.committed_len:
                os.truncate(path, pe.committed_len)

    # -- writing ------------------------------------------------------------------------

    def lookup(self, key: bytes) -> ObjectEntry | None:
        """The entry of ``key`` in this batch or the index (any thread)."""
        e = self.pending.get(key)
        if e is not None:
            return e
        with self.index.read() as t:
            return self.index.get_object(t, key)

    def known(self, key: bytes) -> bool:
        return key in self.pending or self.safe.has(key)

    def put(self, kind: int, data: bytes, children: Iterable[bytes] = (), key: bytes | None = None) -> bytes:
        """Store ``data`` as ``kind`` (once); return its key.

        For node kinds, pass the node's *distinct* children: a new node increments each of
        them. ``data`` must already be the full node encoding (see ``nodes.encode_node``).
        """
        if key is None:
            key = object_key(kind, data)
        if self._existing(key, children):
            return key
        self.put_prepared(prepare(kind, data, self.level, key=key), children, checked=True)
        return key

    def put_node(self, kind: int, children: list[bytes], payload: bytes) -> bytes:
        return self.put(kind, encode_node(children, payload), children)

    def _existing(self, key: bytes, children: Iterable[bytes]) -> bool:
        if key in self.pending:
            return True
        e = self.lookup(key)
        if e is None:
            return False
        # A dead object is reused as it is: it comes back to life (and its children are
        # counted again) when a reference to it commits, see _commit.
        return True

    def put_prepared(self, p: Prepared, children: Iterable[bytes] = (), checked: bool = False,
                     record: bytes | None = None) -> bool:
        """Append a prepared object unless it is already stored; True when it was new.

        ``record`` is ``p.record()`` when the caller already built it (in a worker thread,
        see cas/parallel.py), so that this thread does not checksum the bytes again.
        """
        if not checked and self._existing(p.key, children):
            return False
        rec_len = p.record_len
        if self.space_check is not None:
            self._unchecked += rec_len
            if self._unchecked >= SPACE_CHECK_EVERY:
                self._unchecked = 0
                try:
                    self.space_check(self.safe.path, max(rec_len, SPACE_CHECK_EVERY))
                except QuotaExceeded:
                    self._fail()   # nothing more is written or committed: no partial point
                    raise
        if self._packf is None or self._pack_pos >= self.safe.config.pack_size:
            self._next_pack()
        try:
            if record is not None:
                self._packf.write(record)
            else:  # header (built by prepare) and body: no concatenation copy
                self._packf.write(p.header)
                self._packf.write(p.stored)
        except OSError as e:
            self._fail()
            raise _disk_error(e, f"writing pack {pack_name(self._pack_id)}") from None
        self.pending[p.key] = ObjectEntry(self._pack_id, self._pack_pos, len(p.stored), p.raw_len,
                                          p.kind, p.codec, FLAG_PINNED if p.kind == Kind.TOMBSTONE else 0, 0)
        self._pack_pos += rec_len
        self.pending_bytes += rec_len
        self.bytes_written += rec_len
        self.objects_written += 1
        for c in children:
            self.deltas[c] = self.deltas.get(c, 0) + 1
        if self.pending_bytes >= BATCH_BYTES:
            self.flush()
        return True

    def incref(self, key: bytes, n: int = 1) -> None:
        self.deltas[key] = self.deltas.get(key, 0) + n

    def add_point(self, record: dict, root: bytes | None) -> dict:
        """Commit a point naming ``root``; returns the record with its ``id``."""
        rec = dict(record)
        rec["root"] = root.hex() if root else None
        payload = json.dumps(rec, sort_keys=True).encode()
        key = self.put_node(Kind.POINT, [root] if root else [], payload)
        self.incref(key)
        rec["id"] = key.hex()
        self.pending_points.append((key, rec))
        self.flush()
        return rec

    def _next_pack(self) -> None:
        if self._packf is not None:
            self.flush(seal=True)
        with self.index.read() as t:
            pid = self.index.get_meta_int(t, "next_pack", 1)
            # Reopen the newest unsealed pack rather than leave many small ones.
            last = None
            cur = t.cursor(db=self.index.db["packs"])
            if cur.last():
                last = (pack_from_dbkey(cur.key()), PackEntry.decode(cur.value()))
        if (self._packf is None and last is not None and not last[1].sealed
                and last[1].committed_len < self.safe.config.pack_size):
            pid, pe = last
            path = self.safe.pack_path(pid)
            if path.exists() and path.stat().st_size == pe.committed_len:
                self._packf = open(path, "r+b", buffering=1 << 20)
                self._packf.seek(pe.committed_len)
                self._pack_id, self._pack_pos, self._pack_new = pid, pe.committed_len, False
                return
        path = self.safe.pack_path(pid)
        try:
            self._packf = open(path, "xb", buffering=1 << 20)
            write_pack_header(self._packf, pid)
        except OSError as e:
            self._fail()
            raise _disk_error(e, f"creating pack {pack_name(pid)}") from None
        self._pack_id, self._pack_pos, self._pack_new = pid, PACK_HEADER.size, True

    def flush(self, seal: bool = False, extra: Callable | None = None) -> None:
        """Make the batch durable: fsync the pack, then commit the index transaction."""
        if self._closed:
            raise SafeError("the writer is closed")
        if self._packf is not None:
            try:
                self._packf.flush()
                os.fsync(self._packf.fileno())
                if self._pack_new:
                    _fsync_dir(self.safe.packs_dir)
            except OSError as e:
                self._fail()
                raise _disk_error(e, f"writing pack {pack_name(self._pack_id)}") from None
        try:
            with self.index.write() as txn:
                self._commit(txn, seal)
                if extra is not None:
                    extra(txn)
        except lmdb.Error as e:
            self._fail()
            if "No space" in str(e) or "MDB_MAP_FULL" in str(e):
                raise DiskFull("disk full while committing the index: the last batch was not "
                               "committed; free some space and try again") from None
            raise SafeError(f"cannot commit the index: {e}") from None
        self._pack_new = False
        self.pending.clear()
        self.deltas.clear()
        self.revived.clear()
        self.pending_points.clear()
        self.pending_bytes = 0
        if seal and self._packf is not None:
            self._packf.close()
            self._packf = None
            self._pack_id = None

    def _commit(self, txn, seal: bool) -> None:
        idx = self.index
        if self._packf is not None:
            pe = idx.get_pack(txn, self._pack_id) or PackEntry(0, 0, 0, time.time_ns(), 0, 0)
            added = sum(e.record_len for e in self.pending.values())
            pe.committed_len = self._pack_pos
            pe.live_bytes += added
            pe.objects += len(self.pending)
            pe.sealed = 1 if seal else 0
            idx.put_pack(txn, self._pack_id, pe)
            if self._pack_new:
                idx.put_meta_int(txn, "next_pack", self._pack_id + 1)
        deltas = self.deltas
        for key, e in self.pending.items():
            e.refcount = deltas.pop(key, 0)
            idx.put_object(txn, key, e)
        touched_packs: dict[int, PackEntry] = {}
        revive: list[bytes] = []
        for key, d in deltas.items():
            e = idx.get_object(txn, key)
            if e is None:
                raise SafeError(f"internal error: reference to unknown object {key.hex()[:12]}")
            e.refcount += d
            if e.flags & FLAG_DEAD and e.refcount > 0:
                revive.extend(self._revive(key, e, touched_packs, txn))
            idx.put_object(txn, key, e)
        while revive:
            # Children of a dead object that came back to life: counted again, cascading.
            key = revive.pop()
            e = idx.get_object(txn, key)
            if e is None:
                raise SafeError(f"object {key.hex()[:12]} was collected while a dead parent was "
                                "reused; run 'pointsafe gc' to finish collecting, then retry")
            e.refcount += 1
            if e.flags & FLAG_DEAD:
                revive.extend(self._revive(key, e, touched_packs, txn))
            idx.put_object(txn, key, e)
        for pid, pe in touched_packs.items():
            idx.put_pack(txn, pid, pe)
        for key, rec in self.pending_points:
            txn.put(key, json.dumps(rec, sort_keys=True).encode(), db=idx.db["points"])

    def _revive(self, key: bytes, e: ObjectEntry, packs: dict[int, PackEntry], txn) -> list[bytes]:
        """Clear FLAG_DEAD on ``e`` (its count rose above 0); return its children to count."""
        e.flags &= ~FLAG_DEAD
        pe = packs.get(e.pack) or self.index.get_pack(txn, e.pack)
        pe.live_bytes += e.record_len
        pe.dead_bytes -= e.record_len
        packs[e.pack] = pe
        if e.kind == Kind.CHUNK:
            return []
        return node_children(self.safe.read_entry(key, e))

    # -- releasing ----------------------------------------------------------------------

    def release(self, txn, keys: Iterable[bytes]) -> int:
        """Drop one reference from each of ``keys`` inside ``txn``, cascading at zero.

        Returns the number of objects that died. Cost follows what dies, not the safe's size.
        """
        idx = self.index
        stack = list(keys)
        died = 0
        packs: dict[int, PackEntry] = {}
        while stack:
            key = stack.pop()
            e = idx.get_object(txn, key)
            if e is None:
                raise SafeError(f"internal error: release of unknown object {key.hex()[:12]}")
            if e.refcount > 0:
                e.refcount -= 1
            if e.refcount == 0 and not e.flags & (FLAG_DEAD | FLAG_PINNED):
                died += 1
                stack.extend(self._kill(txn, key, e, packs))
            idx.put_object(txn, key, e)
        for pid, pe in packs.items():
            idx.put_pack(txn, pid, pe)
        return died

    def _kill(self, txn, key: bytes, e: ObjectEntry, packs: dict[int, PackEntry]) -> list[bytes]:
        e.flags |= FLAG_DEAD
        pe = packs.get(e.pack) or self.index.get_pack(txn, e.pack)
        pe.live_bytes -= e.record_len
        pe.dead_bytes += e.record_len
        packs[e.pack] = pe
        if e.kind == Kind.CHUNK:
            return []
        return node_children(self.safe.read_entry(key, e))

    def forget_points(self, point_keys: list[bytes]) -> int:
        """Forget points: write their tombstones, drop them, release their references."""
        tombs = []
        for pk in point_keys:
            tombs.append(self.put_node(Kind.TOMBSTONE, [], pk))
        died = 0

        def apply(txn):
            nonlocal died
            for pk, tk in zip(point_keys, tombs):
                if txn.get(pk, db=self.index.db["points"]) is None:
                    raise SafeError(f"point {pk.hex()[:12]} is not in the safe")
                txn.delete(pk, db=self.index.db["points"])
                txn.put(pk, tk, db=self.index.db["tombstones"])
            died = self.release(txn, point_keys)

        self.flush(extra=apply)
        return died

    # -- end ----------------------------------------------------------------------------

    def _fail(self) -> None:
        """Abandon the batch after an I/O error; the next writer truncates the tail."""
        self.pending.clear()
        self.deltas.clear()
        self.revived.clear()
        self.pending_points.clear()
        if self._packf is not None:
            try:
                self._packf.close()
            except OSError:
                pass
            self._packf = None
        self._closed = True
        self._release_lock()

    def close(self) -> None:
        if self._closed:
            return
        try:
            self.flush()
        finally:
            if self._packf is not None:
                self._packf.close()
                self._packf = None
            self._closed = True
            self._release_lock()

    def abort(self) -> None:
        if self._closed:
            return
        self._fail()

    def __enter__(self) -> "Writer":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
