"""The safe: open/create, read objects, and the single writer.

Readers (any number, in any process) look objects up in short LMDB read transactions and
read their records through the safe's pack store (cas/packstore.py: local pack files read
with ``pread``). The one writer (guarded by an ``flock`` on ``<safe>/lock``) appends records
through the one pack writer (cas/packwriter.py) and commits them in batches: pack bytes are
durable *before* the LMDB transaction that references them commits, so a crash at any instant
leaves an index that only names bytes that are on disk. Count changes go through
cas/refcount.py.

Reference counts are hierarchical (docs/FORMAT.md, "Reference counts and the dead flag"): an
object's count is the number of live indexed nodes that list it as a child, plus one per point that names it.
Writing a *new* node increments its children; reusing an existing node changes nothing
below it. When a count drops to zero the object is marked dead and its children are released
in turn; ``gc`` later removes dead objects and reclaims their bytes.
"""

from __future__ import annotations

import errno
import fcntl
import hmac
import json
import os
import shutil
import socket
import time
import uuid
from dataclasses import replace
from pathlib import Path
from types import TracebackType
from typing import IO, TYPE_CHECKING, Any, Callable, Iterable, TextIO

import lmdb

from . import counters, keyslots
from .counters import SafeCounters
from .crypto import CIPHERS, MASTER_KEY_SIZE, Crypto, default_cipher
from .errors import (DiskFull, IntegrityError, NeedsPassword, NotASafe, ObjectMissing, QuotaExceeded, SafeError,
                     SafeLocked, UsageError, WrongPassword)
from .header import (COPY_NAME, HEADER_NAME, PRIVATE_DIR_MODE, PRIVATE_FILE_MODE, SafeConfig, canonical_config,
                     config_fields, encode_header, header_fields, parse_compression, read_header_data,
                     write_header_bytes)
from .index import FLAG_PINNED, Index, ObjectEntry, PackEntry, pack_from_dbkey
from .keys import Kind, object_key
from .nodes import encode_node, node_children
from .pack import (CIPHER_NONE, PACK_HEADER, REC_HEADER_SIZE, Prepared, decode_record, pack_name,
                   parse_record_header, prepare)
from .packstore import LocalPackStore, PackStore, fsync_dir as _fsync_dir
from .packwriter import PackWriter, disk_error as _disk_error, recover
from .point import Point, oldest_first
from .refcount import RefChange
from .timefmt import utc_now_iso

if TYPE_CHECKING:
    from .index import Txn
    from .s3safe import Bucket, Journal, Writing

__all__ = ["Safe", "Writer", "take_lock", "release_lock", "utc_now_iso"]

PACKS_DIR = "packs"
INDEX_DIR = "index"
LOCK_NAME = "lock"
BATCH_BYTES = 32 * 1024 * 1024
INIT_MIN_FREE = 1 << 20   # free bytes a new safe needs (LMDB's files, header, first pack)
SPACE_CHECK_EVERY = 4 * 1024 * 1024  # a writer's space guard runs at most once per this many bytes

SpaceCheck = Callable[[Path, int], None]
Password = bytes | Callable[[], bytes]
POINTS_TABLE = b"points"


def _undo_init(p: Path, created: bool) -> None:
    """Remove what a failed ``Safe.init`` made inside ``p`` (which was new or empty)."""
    for name in (HEADER_NAME + ".tmp", HEADER_NAME, COPY_NAME + ".tmp", COPY_NAME, LOCK_NAME):
        try:
            (p / name).unlink()
        except OSError:
            pass
    shutil.rmtree(p / keyslots.KEYS_DIR, ignore_errors=True)
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
    """True when ``path`` is on a filesystem mounted read-only (False when it cannot tell)."""
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


def take_lock(safe_dir: Path, command: str = "") -> TextIO:
    """Take the safe's exclusive writer lock (flock) or raise SafeLocked naming the holder.

    Never waits. Returns the open lock file, which holds the lock until ``release_lock``
    closes it (or the process dies); SafeError when the lock file cannot be opened."""
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


def release_lock(f: IO[Any]) -> None:
    """Clear the holder note and close ``f`` (from ``take_lock``, or any file that holds the
    flock), which drops the lock. Never raises OSError."""
    try:
        f.seek(0)
        f.truncate()
    except OSError:
        pass
    try:
        f.close()
    except OSError:
        pass  # a full disk cannot flush the holder note; the lock goes with the descriptor


def _encrypted_config(config: SafeConfig, cipher: str, crypto: Crypto) -> SafeConfig:
    """``config`` with its ``encryption`` field, ``auth`` computed with the header key."""
    enc = {"cipher": cipher, "kdf": "argon2id"}
    auth = crypto.header_auth(canonical_config(config_fields(replace(config, encryption=enc))))
    return replace(config, encryption={**enc, "auth": auth})


def header_authentic(data: bytes, config: SafeConfig, crypto: Crypto) -> bool:
    """True when the ``auth`` of encrypted header bytes ``data`` holds under ``crypto``."""
    assert config.encryption is not None
    want = crypto.header_auth(canonical_config(header_fields(data)))
    return hmac.compare_digest(want, str(config.encryption.get("auth", "")))


def _check_auth(p: Path, data: bytes, config: SafeConfig, crypto: Crypto, by_key: bool) -> None:
    """IntegrityError (or WrongPassword for a key given by hand) when the header's ``auth``
    does not hold under the unlocked key."""
    if not header_authentic(data, config, crypto):
        if by_key:
            raise WrongPassword(f"the key given does not open {p} (or its header was changed without the key)")
        raise IntegrityError(f"{p}: the safe's header was changed without the key (its authentication "
                             "fails); 'pointsafe repair' restores it from its copies")


def unlock_crypto(p: Path, config: SafeConfig, data: bytes, password: Password | None,
                  master_key: bytes | None) -> tuple[Crypto, bytes]:
    """The Crypto and master key of the encrypted safe at ``p`` (header checked); NeedsPassword
    without a password or key, WrongPassword when no slot opens."""
    cipher = config.cipher
    assert cipher is not None
    by_key = master_key is not None
    if master_key is None:
        if password is None:
            raise NeedsPassword(f"{p} is encrypted: give its password (POINTSAFE_PASSWORD, --password-file, "
                                "--password-command)")
        pw = password() if callable(password) else password
        master_key = keyslots.unlock(p, pw, config.safe_id)
    elif len(master_key) != MASTER_KEY_SIZE:
        raise UsageError("a master key is 32 bytes")
    crypto = Crypto(master_key, cipher)
    _check_auth(p, data, config, crypto, by_key)
    return crypto, master_key


def _refuse_downgrade(p: Path) -> None:
    """IntegrityError when a header that says "plain" sits in a safe that has key slots: a
    header changed without the key (writers would store plaintext)."""
    try:
        has_keys = (p / keyslots.KEYS_DIR).is_dir()
    except OSError:
        has_keys = False
    if has_keys:
        raise IntegrityError(f"{p}: the safe's header says it is not encrypted, yet the safe has key slots "
                             f"({keyslots.KEYS_DIR}/): the header was changed without the key; refusing to use it")


class Safe:
    """An open safe. Reading is thread-safe; writing goes through :meth:`writer`.

    An encrypted safe carries its unlocked :class:`~.crypto.Crypto` (``crypto``); every id,
    record and point value goes through it. A plain safe's ``crypto`` is None.
    """

    def __init__(self, path: Path, config: SafeConfig, index: Index, crypto: Crypto | None = None,
                 master_key: bytes | None = None):
        self.path = path
        self.config = config
        self.index = index
        self.crypto = crypto
        self._master = master_key
        self.packs_dir = path / PACKS_DIR
        self.store: PackStore = LocalPackStore(self.packs_dir)
        # A bucket safe (cas/s3safe.py): the bucket, and the journal of the index's writes.
        self.remote: Bucket | None = None
        self.journal: Journal | None = None
        # Count of objects read from packs, for tests and benchmarks ("lazy" checks).
        self.objects_read = 0

    # -- lifecycle ----------------------------------------------------------------------

    @classmethod
    def init(cls, path: str | os.PathLike[str], compression: str = "zstd:1",
             block_size: int = 64 * 1024, pack_size: int = 64 * 1024 * 1024, encryption: str = "none",
             password: bytes | None = None, unsafe_no_locking: bool = False, s3_endpoint: str | None = None,
             **extra: Any) -> "Safe":
        """Create a new safe at ``path`` (a missing or empty directory) and return it open for
        writing; ``extra`` are further SafeConfig fields.

        ``encryption`` is "none", "auto" (``crypto.default_cipher()``), "aes-256-gcm" or
        "chacha20-poly1305"; an encrypted safe gets a random master key in one key slot opened by
        ``password`` (KDF parameters: cas/keyslots.py).

        ``path`` may be ``s3://BUCKET/PREFIX``: a bucket safe (cas/s3safe.py), reached through
        ``s3_endpoint`` (else boto3's own settings), refused on a store that ignores conditional
        creation unless ``unsafe_no_locking``; its cache directory is made afresh.

        Raises UsageError for a path that is not a new or empty directory or a bad setting,
        DiskFull when the disk has less than 1 MiB free, SafeError on other I/O errors; a
        failed init removes what it made, so it can simply run again."""
        bucket = None
        safe_id = uuid.uuid4().hex
        if str(path).startswith("s3://"):
            from . import s3safe
            bucket, path = s3safe.new_cache(str(path), s3_endpoint, unsafe_no_locking, safe_id)
        p = Path(path)
        cipher = default_cipher() if encryption == "auto" else encryption
        if cipher not in ("none", *CIPHERS):
            raise UsageError(f"unknown encryption {encryption!r}: use auto, {', '.join(CIPHERS)} or none")
        if cipher != "none" and not password:
            raise UsageError("an encrypted safe needs a password (it may not be empty)")
        if p.exists():
            if not p.is_dir():
                raise UsageError(f"{p}: exists and is not a directory")
            if any(p.iterdir()):
                raise UsageError(f"{p}: directory is not empty; a safe needs a new or empty directory")
        if block_size < 4096 or block_size > 4 * 1024 * 1024 or block_size & (block_size - 1):
            raise UsageError(f"bad block size {block_size}: use a power of two from 4 KiB to 4 MiB")
        config = SafeConfig(safe_id=safe_id, created=utc_now_iso(),
                            compression=parse_compression(compression), block_size=block_size,
                            pack_size=pack_size, **extra)
        crypto = master = None
        if cipher != "none":
            master = os.urandom(MASTER_KEY_SIZE)
            crypto = Crypto(master, cipher)
            config = _encrypted_config(config, cipher, crypto)
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
            if bucket is None:   # a bucket safe's packs are in the bucket
                (p / PACKS_DIR).mkdir(mode=PRIVATE_DIR_MODE)
                os.chmod(p / PACKS_DIR, PRIVATE_DIR_MODE)
            index = Index(p / INDEX_DIR, create=True)
            os.close(private_open(p / LOCK_NAME))
            if master is not None:
                assert password is not None
                keyslots.add_slot(p, master, password, label="init", safe_id=config.safe_id)
            header = encode_header(config)
            with index.write() as txn:
                txn.put(b"header", header, db=index.db["meta"])   # a third copy, for repair
            write_header_bytes(p, header)
            _fsync_dir(p)
            if bucket is not None:
                from .s3safe import publish_init
                publish_init(bucket, p, header)
        except (OSError, lmdb.Error, SafeError) as e:
            _undo_init(p, created)   # so that the user can simply run init again
            if isinstance(e, SafeError):
                raise
            if isinstance(e, lmdb.Error):
                e = OSError(errno.ENOSPC if "space" in str(e).lower() else errno.EIO, str(e))
            raise _disk_error(e, f"creating the safe at {p}") from None
        safe = cls(p, config, index, crypto, master)
        if bucket is not None:
            from .s3safe import attach
            attach(safe, bucket)
            return safe
        from .release import keep_reserve   # (release imports this module)
        keep_reserve(safe)                  # room for gc's commits if the disk ever fills
        return safe

    @classmethod
    def open(cls, path: str | os.PathLike[str], write: bool | None = None, password: Password | None = None,
             master_key: bytes | None = None) -> "Safe":
        """Open the safe at ``path``.

        An encrypted safe is unlocked first, with ``master_key`` when given (``key import``,
        recovery) or else with ``password`` (bytes, or a callable returning them, called only when
        the safe is encrypted); a plain safe ignores both. NeedsPassword when the safe is encrypted
        and neither is given, WrongPassword when no key slot opens with the password (nothing is
        written), IntegrityError when the header fails its authentication or a plain-looking
        header sits beside key slots.

        ``write=None`` (the default) opens the index for writing when this process may write it
        and read-only otherwise (a read-only filesystem, a user without write permission), so
        that readers always can read; ``write=False`` always opens it read-only (no LMDB write
        transaction is ever begun, and writing raises SafeError); ``write=True`` fails with
        "permission denied" or "read-only filesystem" when the index cannot be written.
        Raises NotASafe when ``path`` is not a safe or its index is missing or unreadable.
        """
        from . import s3safe
        if s3safe.is_s3_url(path):
            path = s3safe.resolve(str(path))
        p = Path(path)
        config, data = read_header_data(p)
        crypto = None
        if config.encryption is None:
            _refuse_downgrade(p)
        else:
            crypto, master_key = unlock_crypto(p, config, data, password, master_key)
        index_dir = p / INDEX_DIR
        bucket = s3safe.remote_of(p)
        if bucket is not None:
            s3safe.refresh_cache(bucket, index_dir, data, crypto)
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
        safe = cls(p, config, index, crypto, master_key if crypto is not None else None)
        if bucket is not None:
            s3safe.attach(safe, bucket)
        return safe

    @property
    def encrypted(self) -> bool:
        """True for an encrypted safe (its ``crypto`` holds the unlocked keys)."""
        return self.crypto is not None

    @property
    def master_key(self) -> bytes:
        """The unlocked master key of an encrypted safe (for ``key add``/``passwd``/``export``);
        UsageError on a plain safe."""
        if self._master is None:
            raise UsageError(f"{self.path} is not encrypted: it has no key")
        return self._master

    def object_key(self, kind: int, data: bytes | memoryview) -> bytes:
        """The key of ``data`` stored as ``kind`` in this safe (keyed BLAKE3 when encrypted)."""
        return object_key(kind, data) if self.crypto is None else self.crypto.object_key(kind, data)

    def seal_value(self, table: bytes, row: bytes, value: bytes) -> bytes:
        """``value`` as stored in index table ``table`` under ``row``: sealed (bound to table and
        row) in an encrypted safe, as it is in a plain one."""
        return value if self.crypto is None else self.crypto.seal_value(table, row, value)

    def open_value(self, table: bytes, row: bytes, stored: bytes | memoryview) -> bytes:
        """The value :meth:`seal_value` stored; IntegrityError when a sealed value was changed."""
        if self.crypto is None:
            return bytes(stored)
        return self.crypto.open_value(table, row, stored)

    def point_from_value(self, key: bytes, stored: bytes | memoryview) -> Point:
        """The Point of a ``points`` table row (its key and stored value)."""
        return Point.from_json(self.open_value(POINTS_TABLE, bytes(key), stored))

    @property
    def readonly(self) -> bool:
        """True when the safe was opened read-only (see :meth:`open`)."""
        return self.index.readonly

    def close(self) -> None:
        """Close the index and the cached pack descriptors."""
        self.store.close()
        self.index.close()

    def __enter__(self) -> "Safe":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def refresh(self) -> int:
        """A bucket safe: apply the segments other machines wrote since this cache was brought
        up to date (cas/s3safe.py); returns how many. 0 for a local safe or a read-only index."""
        if self.remote is None or self.index.readonly:
            return 0
        from .s3safe import catch_up
        return catch_up(self.remote, self.index, self.crypto)

    def writer(self, command: str = "", space_check: SpaceCheck | None = None) -> "Writer":
        """Take the writer lock (or raise SafeLocked) and return the writer; ``space_check``
        guards the free space while it writes (see ``Writer``)."""
        return Writer(self, command, space_check)

    def pack_path(self, pack_id: int) -> Path:
        """The file of pack ``pack_id`` (local packs)."""
        return self.packs_dir / pack_name(pack_id)

    def counters(self) -> SafeCounters:
        """The safe's totals (objects, bytes, packs), read in O(1) (cas/counters.py)."""
        return counters.read(self.index)

    @property
    def zstd_level(self) -> int | None:
        """The safe's zstd level, or None when it stores objects uncompressed."""
        return self.config.zstd_level

    # -- reading ------------------------------------------------------------------------

    def entry(self, key: bytes, txn: Txn | None = None) -> ObjectEntry | None:
        """The index entry of ``key`` (in ``txn``, else in a new read snapshot), or None."""
        if txn is not None:
            return self.index.get_object(txn, key)
        with self.index.read() as t:
            return self.index.get_object(t, key)

    def kind(self, key: bytes) -> int:
        """The object kind of ``key`` (what a BlobReader's ``kind_of`` asks); ObjectMissing
        when the index does not hold it."""
        oe = self.entry(key)
        if oe is None:
            raise ObjectMissing(f"object {key.hex()[:12]} is not in the safe")
        return oe.kind

    def has(self, key: bytes) -> bool:
        """True when the index holds ``key`` (committed; dead objects too, until gc)."""
        with self.index.read() as t:
            return t.get(key, db=self.index.db["objects"]) is not None

    def get(self, key: bytes, rehash: bool = False) -> bytes:
        """The raw bytes of object ``key``.

        Raises ObjectMissing when the index does not hold it and IntegrityError (naming pack
        and offset) when its stored bytes are damaged. A pack rewritten by a concurrent gc
        is handled by looking the object up again. Needs no lock; any thread. Cost: one index
        lookup, one pread and a checksum (and a decompression for a compressed object).
        """
        for attempt in range(4):
            e = self.entry(key)
            if e is None:
                raise ObjectMissing(f"object {key.hex()[:12]} is not in the safe")
            try:
                return self.read_entry(key, e, rehash=rehash)
            except FileNotFoundError:
                self.store.forget(e.pack)
                self.refresh()      # a bucket safe: another machine's gc may have moved it
                err: SafeError = IntegrityError(f"object {key.hex()[:12]}: pack {pack_name(e.pack)} is missing", e.pack, e.offset)
            except IntegrityError as ie:
                self.store.forget(e.pack)
                err = ie
            # The object may have moved (gc/defrag); retry only if the index now says so.
            e2 = self.entry(key)
            if e2 is None or (e2.pack, e2.offset) == (e.pack, e.offset):
                raise err
            time.sleep(0.001 * attempt)
        raise err

    def read_entry(self, key: bytes, e: ObjectEntry, rehash: bool = False) -> bytes:
        """The raw bytes of the record ``e`` locates, checked against its checksum (and with
        ``rehash`` against ``key``). IntegrityError when they do not match; OSError
        (FileNotFoundError for a pack gc removed) from the pack store. No retry: see ``get``."""
        buf = self.store.read(e.pack, e.offset, e.record_len)
        self.objects_read += 1
        _, raw = decode_record(buf, e.pack, e.offset, rehash=rehash, expect_key=key, crypto=self.crypto)
        return raw

    def children(self, key: bytes) -> list[bytes]:
        """The distinct children of object ``key`` ([] for a chunk); ObjectMissing when it is
        not in the safe, IntegrityError when its bytes are damaged."""
        e = self.entry(key)
        if e is None:
            raise ObjectMissing(f"object {key.hex()[:12]} is not in the safe")
        if e.kind == Kind.CHUNK:
            return []
        return node_children(self.get(key))

    # -- points -------------------------------------------------------------------------

    def points(self) -> list[Point]:
        """Every committed point, oldest first (the one order, ``Point.order_key``); one
        snapshot, O(points)."""
        with self.index.read() as t:
            out = [self.point_from_value(k, v) for k, v in t.cursor(db=self.index.db["points"])]
        return oldest_first(out)

    def point(self, point_id: str) -> Point | None:
        """The committed point whose id is ``point_id`` (full hex), or None."""
        try:
            k = bytes.fromhex(point_id)
        except ValueError:
            return None
        with self.index.read() as t:
            v = t.get(k, db=self.index.db["points"])
        return self.point_from_value(k, v) if v is not None else None

    # -- statistics ---------------------------------------------------------------------

    def pack_entries(self) -> dict[int, PackEntry]:
        """Every pack entry by pack id, from one snapshot (O(packs))."""
        with self.index.read() as t:
            return {pack_from_dbkey(k): PackEntry.decode(v) for k, v in t.cursor(db=self.index.db["packs"])}

    def lost_packs(self) -> list[int]:
        """Packs the index names, with objects in them, that the pack store does not hold
        (deleted or lost by hand; ``repair`` takes them out of the index). O(packs)."""
        present = set(self.store.pack_ids())
        return sorted(pid for pid, pe in self.pack_entries().items() if pe.objects > 0 and pid not in present)


def _check_cipher(safe: Safe) -> None:
    """IntegrityError when the newest pack's first record is encrypted and the safe is not (or
    the other way round): a header that lost its encryption field, with keys/ gone too, must not
    make a writer add plaintext to an encrypted safe. One index lookup and one 64-byte read."""
    idx = safe.index
    with idx.read() as t:
        cur = t.cursor(db=idx.db["packs"])
        if not cur.last():
            return
        pid, pe = pack_from_dbkey(cur.key()), PackEntry.decode(cur.value())
    if pe.committed_len < PACK_HEADER.size + REC_HEADER_SIZE:
        return
    try:
        h = parse_record_header(safe.store.read(pid, PACK_HEADER.size, REC_HEADER_SIZE), pid, PACK_HEADER.size)
    except (OSError, IntegrityError):
        return      # damage is verify's and repair's to report
    if (h.cipher != CIPHER_NONE) != (safe.crypto is not None):
        what = "encrypted records, yet the safe's header says it is not encrypted" if h.cipher else \
            "plain records, yet the safe is encrypted"
        raise IntegrityError(f"{safe.path}: pack {pack_name(pid)} holds {what}: the safe was changed "
                             "without the key; refusing to write to it", pid, PACK_HEADER.size)


class Writer:
    """The one writer of a safe. Not thread-safe: call it from one thread.

    Use as a context manager; leaving the block normally commits, leaving it by an exception
    abandons the uncommitted batch (its bytes are truncated away by the next writer).

    Args:
        safe: the open safe.
        command: named in the lock file for people ("backup", "gc", ...).
        space_check: called as ``space_check(safe_dir, bytes_about_to_write)`` before the
            first record and then every SPACE_CHECK_EVERY bytes; it raises QuotaExceeded to
            stop the writer (ops' hard quota). Nothing more is then written or committed.
    """

    def __init__(self, safe: Safe, command: str = "", space_check: SpaceCheck | None = None):
        self.safe = safe
        self.index = safe.index
        self.level = safe.config.zstd_level
        self.crypto = safe.crypto
        self._lockf: IO[Any] | None = take_lock(safe.path, command)
        self._remote: Writing | None = None
        if safe.remote is not None:
            from .s3safe import Writing
            try:
                self._remote = Writing(safe, command)
            except BaseException:
                self._release_lock()
                raise
        self.pending: dict[bytes, ObjectEntry] = {}
        self.deltas: dict[bytes, int] = {}
        self.pending_points: list[tuple[bytes, dict[str, Any]]] = []
        self.pending_bytes = 0
        self.bytes_written = 0      # record bytes appended, this writer
        self.objects_written = 0
        self._closed = False
        self.space_check = space_check
        self._unchecked = SPACE_CHECK_EVERY  # so that the first record is checked
        self.packs = PackWriter(safe.store, safe.index, safe.config.pack_size)
        try:
            recover(safe.store, safe.index)
            _check_cipher(safe)
            counters.ensure(safe.index)
        except BaseException:
            self._release_lock()
            raise

    def _release_lock(self) -> None:
        if self._remote is not None:
            remote, self._remote = self._remote, None
            try:
                remote.close()
            except SafeError:
                pass    # a lock that cannot be released expires by itself
        if self._lockf is not None:
            release_lock(self._lockf)
            self._lockf = None

    # -- writing ------------------------------------------------------------------------

    def lookup(self, key: bytes) -> ObjectEntry | None:
        """The entry of ``key`` in this batch or the index (any thread)."""
        e = self.pending.get(key)
        if e is not None:
            return e
        with self.index.read() as t:
            return self.index.get_object(t, key)

    def known(self, key: bytes) -> bool:
        """True when ``key`` is stored (committed or in this batch)."""
        return key in self.pending or self.safe.has(key)

    def put(self, kind: int, data: bytes, children: Iterable[bytes] = (), key: bytes | None = None) -> bytes:
        """Store ``data`` as ``kind`` (once); return its key.

        For node kinds, pass the node's *distinct* children: a new node increments each of
        them. ``data`` must already be the full node encoding (see ``nodes.encode_node``).
        A stored object is reused as it is (a dead one comes back to life when a reference
        to it commits). The object is committed with the batch (``flush``, which runs by
        itself every BATCH_BYTES). Raises SafeError (DiskFull) on a write error and
        QuotaExceeded from the space check; the writer is then closed and the batch dropped.
        """
        if key is None:
            key = self.safe.object_key(kind, data)
        if self.lookup(key) is not None:
            return key
        self.put_prepared(prepare(kind, data, self.level, key=key, crypto=self.crypto), children, checked=True)
        return key

    def put_node(self, kind: int, children: list[bytes], payload: bytes) -> bytes:
        """Store a node (envelope of ``children``, then ``payload``); return its key."""
        return self.put(kind, encode_node(children, payload), children)

    def put_prepared(self, p: Prepared, children: Iterable[bytes] = (), checked: bool = False,
                     record: bytes | None = None) -> bool:
        """Append a prepared object unless it is already stored; True when it was new.

        ``record`` is ``p.record()`` when the caller already built it (in a worker thread,
        see cas/parallel.py), so that this thread does not checksum the bytes again;
        ``checked=True`` says the caller already looked the key up. ``children`` are counted
        once each at the commit. Raises as :meth:`put`. The hot path of every backup: it copies
        nothing and reads the index only when ``checked`` is False.
        """
        if not checked and self.lookup(p.key) is not None:
            return False
        if self._closed:
            raise SafeError("the writer is closed")
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
        if self.packs.full:
            self.flush(seal=True)
        try:
            if record is not None:
                pid, off = self.packs.append(record)
            else:  # header (built by prepare) and body: no concatenation copy
                pid, off = self.packs.append(p.header, p.stored)
        except SafeError:
            self._fail()
            raise
        self.pending[p.key] = ObjectEntry(pid, off, len(p.stored), p.raw_len, p.kind, p.codec,
                                          FLAG_PINNED if p.kind == Kind.TOMBSTONE else 0, 0)
        self.pending_bytes += rec_len
        self.bytes_written += rec_len
        self.objects_written += 1
        for c in children:
            self.deltas[c] = self.deltas.get(c, 0) + 1
        if self.pending_bytes >= BATCH_BYTES:
            self.flush()
        return True

    def incref(self, key: bytes, n: int = 1) -> None:
        """Count ``n`` more references to ``key`` at the next commit (the commit refuses a key
        that is neither indexed nor in the batch)."""
        self.deltas[key] = self.deltas.get(key, 0) + n

    def add_point(self, record: dict[str, Any] | Point, root: bytes | None) -> Point:
        """Commit a point naming ``root`` (the record's own ``root`` and ``id`` are replaced);
        returns the committed Point. The stored JSON is the record's, as given. Commits the
        whole batch (``flush``) before it returns."""
        rec = record.to_record() if isinstance(record, Point) else dict(record)
        rec.pop("id", None)     # the payload never holds its own key (docs/FORMAT.md)
        rec["root"] = root.hex() if root else None
        payload = json.dumps(rec, sort_keys=True).encode()
        key = self.put_node(Kind.POINT, [root] if root else [], payload)
        self.incref(key)
        rec["id"] = key.hex()
        self.pending_points.append((key, rec))
        self.flush()
        return Point.from_record(rec)

    def refs(self, txn: Txn) -> RefChange:
        """Count changes inside a write transaction of this writer (cas/refcount.py); the
        caller calls its ``finish()`` before the transaction commits."""
        return RefChange(self.index, txn, self.safe.read_entry)

    def flush(self, seal: bool = False, extra: Callable[[Txn], None] | None = None) -> None:
        """Make the batch durable: the pack bytes, then one index transaction with the new
        objects, the count changes, the points and ``extra(txn)``. ``seal`` closes the open
        pack for good. On failure (SafeError, DiskFull) nothing of the batch is committed and
        the writer is closed; SafeError too when it was already closed."""
        if self._closed:
            raise SafeError("the writer is closed")

        def apply(txn: Txn, pe: PackEntry | None) -> None:
            self._commit(txn, pe)
            if extra is not None:
                extra(txn)
        try:
            self.packs.commit(apply, seal=seal)
        except SafeError:
            self._fail()
            raise
        self.pending.clear()
        self.deltas.clear()
        self.pending_points.clear()
        self.pending_bytes = 0

    def _commit(self, txn: Txn, pe: PackEntry | None) -> None:
        idx = self.index
        rc = self.refs(txn)
        if pe is not None:
            pe.live_bytes += sum(e.record_len for e in self.pending.values())
            pe.objects += len(self.pending)
        deltas = self.deltas
        lost = idx.db["missing"]
        relinking = txn.stat(lost)["entries"] > 0   # objects repair found lost (rare)
        for key, e in self.pending.items():
            e.refcount = deltas.pop(key, 0)
            if relinking:
                e.refcount += rc.found(key)   # stored again: the nodes that name it count again
            idx.put_object(txn, key, e)
            rc.added(e)
        rc.count_up(deltas.items())
        rc.finish()
        for key, rec in self.pending_points:
            txn.put(key, self.safe.seal_value(POINTS_TABLE, key, json.dumps(rec, sort_keys=True).encode()),
                    db=idx.db["points"])

    # -- releasing ----------------------------------------------------------------------

    def release(self, txn: Txn, keys: Iterable[bytes]) -> int:
        """Drop one reference from each of ``keys`` inside ``txn``, cascading at zero.

        ``txn`` is a write transaction begun by the holder of this writer (which holds the lock).
        Returns the number of objects that died. Cost follows what dies, not the safe's size.
        """
        rc = self.refs(txn)
        died = rc.release(keys)
        rc.finish()
        return died

    # -- end ----------------------------------------------------------------------------

    def _fail(self) -> None:
        """Abandon the batch after an error; the next writer truncates the tail."""
        self.pending.clear()
        self.deltas.clear()
        self.pending_points.clear()
        self.packs.abandon()
        self._closed = True
        self._release_lock()

    def close(self) -> None:
        """Commit what is pending and release the lock (also when the commit fails: its error
        is raised). Closing twice does nothing."""
        if self._closed:
            return
        try:
            self.flush()
        finally:
            self.packs.close()
            self._closed = True
            self._release_lock()

    def abort(self) -> None:
        """Abandon what is not committed and release the lock; never raises for the batch."""
        if self._closed:
            return
        self._fail()

    def __enter__(self) -> "Writer":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        """Commit and close when the block ended normally; abandon the batch on an exception."""
        if exc_type is None:
            self.close()
        else:
            self.abort()
