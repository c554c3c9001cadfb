"""A whole safe in a bucket: its header, key slots, packs, index segments, points and writer lock
live in the bucket; the machine keeps a cache directory that looks like a local safe without
packs (docs/FORMAT.md, "The bucket layout", "The local cache").

Why a cache directory that looks like a safe: every room (the CLI's password handling, the task
recorder, the mount process) finds a safe by its directory. :func:`resolve` turns
``s3://BUCKET/PREFIX`` into that directory (fetching the header and key slots first), and
``Safe.open`` of a directory holding a ``remote`` file attaches the bucket: packs through
:class:`~.s3store.S3PackStore`, the index brought up to date from the segments, and every
write transaction journalled into a new segment before it commits locally (cas/segments.py).
"""

from __future__ import annotations

import json
import os
import shutil
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from . import segments
from .errors import IntegrityError, NotASafe, SafeError, SafeLocked, UsageError
from .header import (COPY_NAME, HEADER_NAME, PRIVATE_DIR_MODE, decode_header, write_private)
from .keyslots import KEYS_DIR
from .s3store import S3Client, S3PackStore, parse_url, status_of

if TYPE_CHECKING:
    from .crypto import Crypto
    from .index import Index, Txn
    from .s3lock import S3Lock
    from .store import Safe

REMOTE_NAME = "remote"     # the cache directory's marker: which bucket it caches
BLOCKS_DIR = "blocks"
LOCK_FILE = "lock"          # the local writer lock, as in a local safe (store.LOCK_NAME)
BLOCK_CACHE_BYTES = 1 << 30


def is_s3_url(text: str | os.PathLike[str]) -> bool:
    """True when ``text`` names a bucket safe (``s3://…``)."""
    return str(text).startswith("s3://")


def cache_base() -> Path:
    """Where the caches of bucket safes live: $POINTSAFE_CACHE_DIR, else
    $XDG_CACHE_HOME/pointsafe, else ~/.cache/pointsafe."""
    env = os.environ.get("POINTSAFE_CACHE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "pointsafe"


@dataclass(frozen=True)
class Options:
    """How this process reaches a bucket: the endpoint (None: boto3's own AWS_ENDPOINT_URL,
    profiles...) and whether a store without conditional creation is accepted anyway."""

    endpoint: str | None = None
    unsafe_no_locking: bool = False


_options: dict[str, Options] = {}     # cache directory (realpath) -> what resolve() was told


_clients: dict[tuple[object, ...], S3Client] = {}
_CLIENT_ENV = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_PROFILE", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
               "AWS_DEFAULT_REGION", "POINTSAFE_S3_RETRY_SECONDS")


def _client(endpoint: str | None) -> S3Client:
    """One client per endpoint, settings and process (making one costs about 0.3 s; a forked
    mount process makes its own rather than share the parent's connections)."""
    k = (os.getpid(), endpoint, *(os.environ.get(n) for n in _CLIENT_ENV))
    c = _clients.get(k)
    if c is None:
        c = _clients[k] = S3Client(endpoint=endpoint)
    return c


class Bucket:
    """The objects of one safe under ``s3://BUCKET/PREFIX``, addressed by their names in
    docs/FORMAT.md (``header``, ``index/….seg``...)."""

    def __init__(self, url: str, options: Options = Options()):
        self.url = url.rstrip("/")
        self.name, prefix = parse_url(url)
        self.prefix = f"{prefix}/" if prefix else ""
        self.options = options
        self.s3 = _client(options.endpoint)

    def key(self, name: str) -> str:
        return self.prefix + name

    def get(self, name: str) -> bytes | None:
        """The bytes of object ``name``, or None when there is none."""
        from botocore.exceptions import ClientError
        try:
            r = self.s3.call("get_object", Bucket=self.name, Key=self.key(name))
        except ClientError as e:
            if status_of(e) == 404:
                return None
            raise SafeError(f"cannot read {self.url}/{name}: {e}") from None
        data: bytes = r["Body"].read()
        return data

    def put_new(self, name: str, body: bytes) -> bool:
        """Create object ``name`` (create-only); False when it exists already."""
        from botocore.exceptions import ClientError
        try:
            self.s3.call("put_object", Bucket=self.name, Key=self.key(name), Body=body, IfNoneMatch="*")
        except ClientError as e:
            if status_of(e) == 412:
                return False
            raise SafeError(f"cannot write {self.url}/{name}: {e}") from None
        return True

    def exists(self, name: str) -> bool:
        """True when object ``name`` is there (one HEAD)."""
        from botocore.exceptions import ClientError
        try:
            self.s3.call("head_object", Bucket=self.name, Key=self.key(name))
        except ClientError as e:
            if status_of(e) == 404:
                return False
            raise SafeError(f"cannot read {self.url}/{name}: {e}") from None
        return True

    def delete(self, name: str) -> None:
        """Delete object ``name`` (a missing one is fine)."""
        self.s3.call("delete_object", Bucket=self.name, Key=self.key(name))

    def names(self, folder: str, after: str | None = None) -> Iterator[str]:
        """The names under ``folder/`` in the store's (lexicographic) order, after ``after``."""
        token: str | None = None
        while True:
            kw: dict[str, Any] = {"Bucket": self.name, "Prefix": self.key(folder + "/")}
            if token:
                kw["ContinuationToken"] = token
            elif after:
                kw["StartAfter"] = self.key(after)
            r = self.s3.call("list_objects_v2", **kw)
            for obj in r.get("Contents", []):
                yield str(obj["Key"])[len(self.prefix):]
            if not r.get("IsTruncated"):
                return
            token = r.get("NextContinuationToken")

    def check_conditional_create(self) -> None:
        """StoreUnsafe when the store ignores If-None-Match (unless --unsafe-no-locking)."""
        if self.options.unsafe_no_locking:
            return
        from .s3lock import check_conditional_create
        check_conditional_create(self.s3, self.name, self.prefix.rstrip("/"))

    def lock(self, command: str) -> S3Lock:
        from .s3lock import S3Lock
        return S3Lock(self.s3, self.name, self.prefix.rstrip("/"), command=command)


def segment_name(n: int) -> str:
    return f"index/{n:016x}.seg"


def _segment_number(name: str) -> int | None:
    base = name.rsplit("/", 1)[-1]
    if len(base) != 20 or not base.endswith(".seg"):
        return None
    try:
        return int(base[:16], 16)
    except ValueError:
        return None


def _write_if_changed(path: Path, data: bytes) -> None:
    try:
        if path.read_bytes() == data:
            return
    except OSError:
        pass
    write_private(path, data)


def _private_dir(p: Path) -> None:
    """Make ``p`` (0700) and the folders above it that are missing (0700 too)."""
    if not p.parent.exists():
        _private_dir(p.parent)
    p.mkdir(mode=PRIVATE_DIR_MODE, exist_ok=True)
    os.chmod(p, PRIVATE_DIR_MODE)


def resolve(url: str, endpoint: str | None = None, unsafe_no_locking: bool = False) -> Path:
    """The cache directory of the bucket safe at ``url``, made or brought up to date with the
    bucket's header and key slots (the index is brought up to date when the safe is opened).
    NotASafe when the bucket holds no safe there; SafeError (one line) when the store cannot
    be reached, the bucket does not exist or the credentials are refused."""
    options = Options(endpoint, unsafe_no_locking)
    b = Bucket(url, options)
    data = b.get(HEADER_NAME) or b.get(COPY_NAME)
    if data is None:
        raise NotASafe(f"{b.url}: no safe there (no header in the bucket); make one with 'pointsafe init {b.url}'")
    config = decode_header(data, b.url)
    cache = cache_base() / config.safe_id
    _private_dir(cache)
    _write_if_changed(cache / REMOTE_NAME, json.dumps({"url": b.url, "endpoint": endpoint}).encode() + b"\n")
    _write_if_changed(cache / HEADER_NAME, data)
    _write_if_changed(cache / COPY_NAME, data)
    if not (cache / LOCK_FILE).exists():   # private, as every file of a safe (take_lock would not be)
        write_private(cache / LOCK_FILE, b"")
    if config.encryption is not None:
        _sync_keys(b, cache)
    _options[os.path.realpath(cache)] = options
    return cache


def _sync_keys(b: Bucket, cache: Path) -> None:
    """Make ``cache/keys/`` hold exactly the bucket's key slots."""
    kd = cache / KEYS_DIR
    _private_dir(kd)
    names = {n.rsplit("/", 1)[-1] for n in b.names(KEYS_DIR) if n.endswith(".json")}
    for name in names:
        data = b.get(f"{KEYS_DIR}/{name}")
        if data is not None:
            _write_if_changed(kd / name, data)
    for p in kd.iterdir():
        if p.name not in names:
            p.unlink(missing_ok=True)


def push_keys(cache: Path) -> None:
    """After ``key add/remove/passwd/import`` on a bucket safe's cache: make the bucket's key
    slots those of the cache (new and changed slots uploaded, removed ones deleted). Nothing for
    a local safe."""
    b = remote_of(cache)
    if b is None:
        return
    kd = cache / KEYS_DIR
    local = {p.name: p.read_bytes() for p in kd.iterdir() if p.name.endswith(".json")}
    remote = {n.rsplit("/", 1)[-1] for n in b.names(KEYS_DIR) if n.endswith(".json")}
    for name, data in sorted(local.items()):
        if name not in remote:
            b.put_new(f"{KEYS_DIR}/{name}", data)
        elif b.get(f"{KEYS_DIR}/{name}") != data:   # a changed password: the slot is rewritten
            b.s3.call("put_object", Bucket=b.name, Key=b.key(f"{KEYS_DIR}/{name}"), Body=data)
    for name in sorted(remote - set(local)):
        b.delete(f"{KEYS_DIR}/{name}")


def remote_of(cache: Path) -> Bucket | None:
    """The bucket a cache directory caches (None for a local safe)."""
    try:
        doc = json.loads((cache / REMOTE_NAME).read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise NotASafe(f"{cache}: its {REMOTE_NAME} file is unreadable ({e}); delete the cache directory") from None
    opts = _options.get(os.path.realpath(cache)) or Options(doc.get("endpoint"))
    return Bucket(str(doc["url"]), opts)


def new_cache(url: str, endpoint: str | None, unsafe_no_locking: bool, safe_id: str) -> tuple[Bucket, Path]:
    """For ``init``: the bucket (checked: reachable, conditional creation honoured, no safe
    there yet) and the new, empty cache directory of safe ``safe_id``."""
    options = Options(endpoint, unsafe_no_locking)
    b = Bucket(url, options)
    if b.get(HEADER_NAME) is not None:
        raise UsageError(f"{b.url}: there is a safe there already")
    b.check_conditional_create()
    for name in list(b.names(KEYS_DIR)):   # a failed init's slots: no safe uses them
        b.delete(name)
    cache = cache_base() / safe_id
    if cache.exists():
        shutil.rmtree(cache)
    _options[os.path.realpath(cache)] = options
    return b, cache


def publish_init(b: Bucket, cache: Path, header: bytes) -> None:
    """Upload what ``init`` made: the key slots, then ``header`` (create-only: its presence makes
    the safe, and of two racing inits one wins), then ``header.copy``; and write the cache's
    ``remote`` file. An init that fails before ``header`` leaves only unusable key slots (no
    safe), and can simply run again."""
    kd = cache / KEYS_DIR
    if kd.is_dir():
        for p in sorted(kd.iterdir()):
            if p.name.endswith(".json") and not b.put_new(f"{KEYS_DIR}/{p.name}", p.read_bytes()):
                raise SafeError(f"{b.url}: a key slot {p.name} is there already; another init ran at the same time")
    if not b.put_new(HEADER_NAME, header):
        raise UsageError(f"{b.url}: there is a safe there already (another init ran at the same time)")
    b.s3.call("put_object", Bucket=b.name, Key=b.key(COPY_NAME), Body=header)   # a half init's copy is replaced
    write_private(cache / REMOTE_NAME, json.dumps({"url": b.url, "endpoint": b.options.endpoint}).encode() + b"\n")


def pack_store(b: Bucket, cache: Path) -> S3PackStore:
    return S3PackStore(b.s3, b.name, b.prefix.rstrip("/"), cache_dir=cache / BLOCKS_DIR,
                       cache_bytes=BLOCK_CACHE_BYTES)


FETCH_THREADS = 8             # segments downloaded at once (botocore pools 10 connections)
FETCH_AHEAD = 32              # segments downloaded ahead of the one being decoded, at most
BATCH_BYTES = 64 << 20        # segment bytes applied in one LMDB transaction, at most


def _fetch_ahead(b: Bucket, names: list[str]) -> Iterator[bytes | None]:
    """The bytes of each of ``names`` in order (None: gone), FETCH_AHEAD downloaded ahead by
    FETCH_THREADS threads."""
    with ThreadPoolExecutor(FETCH_THREADS, thread_name_prefix="segments") as pool:
        pending: deque[Future[bytes | None]] = deque()
        it = iter(names)
        try:
            for name in islice(it, FETCH_AHEAD):
                pending.append(pool.submit(b.get, name))
            while pending:
                data = pending.popleft().result()
                for name in islice(it, 1):
                    pending.append(pool.submit(b.get, name))
                yield data
        finally:
            for f in pending:
                f.cancel()


def _apply_batch(b: Bucket, index: Index, batch: list[tuple[int, str, list[tuple[str, bytes, bytes | None]]]]) -> int:
    """Apply the decoded segments ``batch`` (consecutive numbers) in one LMDB transaction,
    skipping those another process applied meanwhile; returns how many it applied. Those
    before a gap are applied, then the gap is an IntegrityError."""
    gap: str | None = None
    with index.env.begin(write=True) as txn:
        cur = segments.applied(index, txn)
        todo: list[list[tuple[str, bytes, bytes | None]]] = []
        for n, name, changes in batch:
            if n <= cur:
                continue
            if segments.is_checkpoint(n, changes):   # the whole state: what came before is moot
                if todo:
                    segments.apply_many(index, txn, todo)
                segments.clear(index, txn)
                todo, cur = [changes], n
                continue
            if n != cur + 1:
                gap = (f"{b.url}: index segment {segment_name(cur + 1)} is missing "
                       f"(the next one is {name}); the bucket's index segments are incomplete")
                break
            todo.append(changes)
            cur = n
        if todo:
            segments.apply_many(index, txn, todo)
            index.put_meta_int(txn, segments.SEG_META.decode(), cur)
    if gap is not None:
        raise IntegrityError(gap)
    return len(todo)


def catch_up(b: Bucket, index: Index, crypto: Crypto | None) -> int:
    """Apply the bucket's segments after the last one this index applied, in order; returns how
    many were applied. They are downloaded in parallel and applied in few large raw
    (unjournalled) LMDB transactions, each also setting ``s3.segment`` (a new machine rebuilding
    the index of a 1 M-object safe would otherwise spend most of its time in LMDB); a segment
    applied meanwhile by another process is skipped. IntegrityError on a gap or a damaged
    segment, after applying the segments before it."""
    with index.read() as t:
        last = segments.applied(index, t)
    todo = [(n, name) for name in b.names("index", after=segment_name(last) if last else None)
            if (n := _segment_number(name)) is not None and n > last]
    if not todo and last and not b.exists(segment_name(last)):
        # The segment this cache applied last is gone and none follows: the bucket's segments
        # were lost and ``repair`` published a checkpoint numbered below it. Start afresh.
        with index.env.begin(write=True) as txn:
            segments.clear(index, txn)
            index.put_meta_int(txn, segments.SEG_META.decode(), 0)
        last = 0
        todo = [(n, name) for name in b.names("index") if (n := _segment_number(name)) is not None]
    n_done = 0
    batch: list[tuple[int, str, list[tuple[str, bytes, bytes | None]]]] = []
    size = 0
    try:
        for (n, name), data in zip(todo, _fetch_ahead(b, [name for _, name in todo])):
            if data is None:
                raise IntegrityError(f"{b.url}: index segment {name} vanished while it was read")
            batch.append((n, name, segments.decode(data, n, crypto, f"{b.url}/{name}")))
            size += len(data)
            if size >= BATCH_BYTES:
                n_done += _apply_batch(b, index, batch)
                batch, size = [], 0
    except Exception:
        if batch:      # the good segments before the one that failed (as the index's progress)
            _apply_batch(b, index, batch)
        raise
    if batch:
        n_done += _apply_batch(b, index, batch)
    return n_done


def fresh_index(index_dir: Path, header: bytes) -> None:
    """Make a new, empty cache index at ``index_dir`` holding only ``meta.header``."""
    from .index import Index
    shutil.rmtree(index_dir, ignore_errors=True)
    idx = Index(index_dir, create=True)
    try:
        with idx.env.begin(write=True) as txn:
            txn.put(b"header", header, db=idx.db["meta"])
    finally:
        idx.close()


def refresh_cache(b: Bucket, index_dir: Path, header: bytes, crypto: Crypto | None) -> None:
    """Bring the cache index at ``index_dir`` up to date with the bucket's segments; a missing
    or damaged one is rebuilt from scratch (docs/FORMAT.md, "The local cache")."""
    from .index import Index, data_file_problem
    if not (index_dir / "data.mdb").is_file() or data_file_problem(index_dir) is not None:
        fresh_index(index_dir, header)
    idx = Index(index_dir)
    try:
        catch_up(b, idx, crypto)
    finally:
        idx.close()


class Journal:
    """The publisher of one open bucket safe: uploads segment n+1 (create-only) with a write
    transaction's changes, then the point records it added (and deletes those it removed), and
    notes n+1 as applied in the same transaction. Writes need the writer (``writing``)."""

    def __init__(self, bucket: Bucket, index: Index, crypto: Crypto | None):
        self.bucket = bucket
        self.index = index
        self.crypto = crypto
        self.writing: S3Lock | None = None    # the bucket's lock, while a writer holds it

    def __call__(self, txn: Txn, changes: segments.Changes) -> None:
        if self.writing is None:
            raise SafeError("internal: a change to a bucket safe's index outside its writer")
        if not self.writing.held():
            raise SafeLocked(f"{self.bucket.url}: the writer lock expired or was taken over while this command "
                             "ran (the store did not answer in time); the last batch was not committed")
        n = segments.applied(self.index, txn) + 1
        body = segments.encode(n, changes, self.crypto)
        # A 412 after a retried PUT whose first try landed is our own segment: same bytes.
        if not self.bucket.put_new(segment_name(n), body) and self.bucket.get(segment_name(n)) != body:
            raise SafeError(f"{self.bucket.url}: index segment {n} was written by another writer meanwhile; "
                            "nothing was committed; run the command again")
        self.index.put_meta_int(txn, segments.SEG_META.decode(), n)
        # The commit is in the bucket now: the points/ copies are best effort (readers take
        # points from the segments), so that a store going away here fails nothing.
        try:
            for (table, key), value in changes.items():
                if table == "points":
                    if value is None:
                        self.bucket.delete(f"points/{key.hex()}")
                    else:
                        self.bucket.put_new(f"points/{key.hex()}", value)
        except SafeError:
            pass


def attach(safe: Safe, bucket: Bucket) -> None:
    """Make ``safe`` (opened on its cache directory) a bucket safe: packs from the bucket and,
    when its index is writable, every write journalled."""
    safe.store = pack_store(bucket, safe.path)
    safe.remote = bucket
    if not safe.index.readonly:
        j = Journal(bucket, safe.index, safe.crypto)
        safe.journal = j
        safe.index.publisher = j


class Writing:
    """What a writer of a bucket safe holds besides the local flock: the bucket's lock
    (renewed while it runs), after checking conditional creation and bringing the cache up to
    date. ``close`` releases it."""

    def __init__(self, safe: Safe, command: str):
        b = safe.remote
        assert b is not None and safe.journal is not None
        b.check_conditional_create()
        self.lock = b.lock(command or "pointsafe")
        self.lock.acquire()
        try:
            self.lock.start_renewing()
            catch_up(b, safe.index, safe.crypto)
        except BaseException:
            self.lock.release()
            raise
        self.journal = safe.journal
        self.journal.writing = self.lock

    def close(self) -> None:
        self.journal.writing = None
        self.lock.release()


def publish_checkpoint(b: Bucket, index_dir: Path, crypto: Crypto | None, lock: S3Lock, after: int) -> int:
    """For ``repair``: upload the rebuilt index at ``index_dir`` as a checkpoint segment (the
    whole of cas's journalled tables) numbered past every segment in the bucket and ``after``,
    note it as applied, then delete the older segments and make ``points/`` match (deletions
    last: a reader that still lists them applies the checkpoint after them). Returns its number."""
    from .index import Index
    last = max([after] + [n for name in b.names("index") if (n := _segment_number(name)) is not None])
    n = last + 1
    idx = Index(index_dir, lock=False)
    try:
        changes: segments.Changes = {}
        with idx.env.begin() as txn:
            for table in segments.JOURNALLED:
                for k, v in txn.cursor(db=idx.db[table]):
                    if table == "meta" and bytes(k) in segments.LOCAL_META:
                        continue
                    changes[(table, bytes(k))] = bytes(v)
        changes[("meta", segments.CHECKPOINT_META)] = str(n).encode()
        if not lock.held():
            raise SafeLocked(f"{b.url}: the writer lock expired while repair ran; nothing was published; "
                             "run 'pointsafe repair' again")
        if not b.put_new(segment_name(n), segments.encode(n, changes, crypto)):
            raise SafeError(f"{b.url}: index segment {n} was written by another writer meanwhile; run repair again")
        with idx.env.begin(write=True) as txn:
            txn.put(segments.CHECKPOINT_META, str(n).encode(), db=idx.db["meta"])
            idx.put_meta_int(txn, segments.SEG_META.decode(), n)
        points = {k.hex(): v for (t, k), v in changes.items() if t == "points" and v is not None}
    finally:
        idx.close()
    for name in list(b.names("index")):
        m = _segment_number(name)
        if m is not None and m < n:
            b.delete(name)
    have = {name.rsplit("/", 1)[-1] for name in b.names("points")}
    for hexkey, value in points.items():
        if hexkey not in have:
            b.put_new(f"points/{hexkey}", value)
    for hexkey in have - set(points):
        b.delete(f"points/{hexkey}")
    return n
