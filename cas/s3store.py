"""Packs in a bucket of an S3-compatible object store (docs/FORMAT.md, "The bucket layout").

An object store cannot append, so ``appendable`` is False: a sink buffers its pack in memory
and uploads it sealed on ``commit`` with ``If-None-Match: *`` (a pack is never overwritten).
Reads are ranged GETs through an optional bounded cache of fixed-size blocks on local disk
(sealed packs never change, so a cached block stays right until the pack is deleted).
Transient failures (timeouts, 5xx, connection resets) are retried by botocore and then by
:func:`S3Client.call` with back-off for a bounded time; a store that stays down raises
:class:`StoreUnavailable`, one line. botocore is imported lazily (and boto3 not at all): command
start-up time matters.
"""

from __future__ import annotations

import hashlib
import io
import os
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator, TypeVar

from .errors import SafeError
from .header import PRIVATE_DIR_MODE, PRIVATE_FILE_MODE   # the cache holds the safe's packs: private
from .pack import pack_id_from_name, pack_name

T = TypeVar("T")
BLOCK = 4 << 20   # cache block: ranged GETs fetch whole aligned blocks
PART = 8 << 20    # multipart part of a pack being uploaded (S3 wants at least 5 MiB but the last)
UPLOAD_THREADS = 2
READ_AHEAD = 6    # blocks a sequential reader keeps fetching ahead, in the background
READ_THREADS = 4  # GETs in flight at once for the read-ahead
HOT_BYTES = 32 << 20   # the last blocks used, kept in memory too (a restore reads each block many times)


class StoreUnavailable(SafeError):
    """the object store did not answer"""


class PackExists(SafeError):
    """a pack of that id is already in the bucket (packs are never overwritten)"""


def parse_url(url: str) -> tuple[str, str]:
    """``s3://BUCKET/PREFIX`` -> (bucket, prefix without slashes at either end)."""
    if not url.startswith("s3://"):
        raise SafeError(f"not an s3:// address: {url!r}")
    bucket, _, prefix = url[5:].partition("/")
    if len(bucket) < 3:
        raise SafeError(f"bad bucket name in {url!r} (at least 3 characters)")
    return bucket, prefix.strip("/")


def status_of(e: BaseException) -> int | None:
    """The HTTP status of a botocore ClientError, or None."""
    resp = getattr(e, "response", None)
    if isinstance(resp, dict):
        code = resp.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return int(code) if code is not None else None
    return None


def _transient(e: BaseException) -> bool:
    from botocore.exceptions import ClientError, ConnectionError as BotoConnectionError, HTTPClientError
    if isinstance(e, ClientError):
        st = status_of(e)
        return st is not None and (st >= 500 or st == 429)
    return isinstance(e, (BotoConnectionError, HTTPClientError, ConnectionError, TimeoutError))


def _refusal(e: BaseException, endpoint: str, bucket: str | None) -> SafeError | None:
    """The one-line error of a failure no retry can cure (a missing bucket, credentials the
    store refuses or none at all), or None for the caller to handle (404 of a key, 412...)."""
    from botocore.exceptions import ClientError, NoCredentialsError
    if isinstance(e, NoCredentialsError):
        return SafeError(f"no credentials for the object store at {endpoint}: set AWS_ACCESS_KEY_ID and "
                         "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE")
    if not isinstance(e, ClientError):
        return None
    code = str(e.response.get("Error", {}).get("Code", ""))
    if code == "NoSuchBucket":
        return SafeError(f"the bucket {bucket!r} does not exist at {endpoint}")
    if status_of(e) == 403 or code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied"):
        return SafeError(f"the object store at {endpoint} refused the credentials ({code or 'access denied'}): "
                         "check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE")
    return None


class S3Client:
    """A botocore S3 client with a bounded retry on top of botocore's own."""

    def __init__(self, endpoint: str | None = None, region: str | None = None,
                 retry_seconds: float | None = None, timeout: float = 10.0):
        try:   # botocore's own session, not boto3's: half the start-up (no s3transfer, no resources)
            import botocore.session
            from botocore.config import Config
        except ImportError:
            raise SafeError("a safe in an S3 bucket needs boto3, which is not installed: "
                            "pip install 'pointsafe[s3]'") from None
        session = botocore.session.get_session()
        region = region or session.get_config_variable("region") or "us-east-1"
        endpoint = endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        # Over plain http SigV4 signs every body with its SHA-256, which the store checks: a CRC32
        # on top (botocore's default) only costs CPU. Over https the CRC32 is the body's check.
        checksums = "when_required" if (endpoint or "").startswith("http:") else "when_supported"
        cfg = Config(retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=timeout,
                     read_timeout=timeout, s3={"addressing_style": "path"} if endpoint else {},
                     request_checksum_calculation=checksums, max_pool_connections=16)
        self.endpoint = endpoint or "AWS S3"
        self.client: Any = session.create_client("s3", endpoint_url=endpoint, region_name=region, config=cfg)
        if retry_seconds is None:
            retry_seconds = float(os.environ.get("POINTSAFE_S3_RETRY_SECONDS", "60"))
        self.retry_seconds = retry_seconds

    def call(self, op: str, **kw: Any) -> Any:
        """``client.<op>(**kw)``, retried with back-off while the failure is transient."""
        fn: Callable[..., Any] = getattr(self.client, op)
        deadline = time.monotonic() + self.retry_seconds
        delay = 0.2
        while True:
            try:
                return fn(**kw)
            except Exception as e:
                if not _transient(e):
                    refused = _refusal(e, self.endpoint, kw.get("Bucket"))
                    if refused is not None:
                        raise refused from None
                    raise
                if time.monotonic() + delay > deadline:
                    raise StoreUnavailable(f"the object store at {self.endpoint} did not answer for "
                                           f"{self.retry_seconds:g} s ({op}: {e})") from None
                time.sleep(delay)
                delay = min(delay * 2, 2.0)


class _S3Sink:
    """A pack being written: buffered in memory and uploaded sealed by ``commit``. A pack that
    grows past PART bytes goes up as a multipart upload whose parts are sent in the background
    while the writer goes on appending (the upload overlaps the backup); ``commit`` sends the
    rest and completes it, create-only. Until then no reader sees anything of it."""

    def __init__(self, store: "S3PackStore", pack_id: int):
        self.store = store
        self.pack_id = pack_id
        self.buf = bytearray()
        self.sealed = False
        self.sent = 0                   # bytes of buf handed to parts
        self.upload_id: str | None = None
        self.parts: list[Future[str]] = []

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.sealed:
            raise SafeError(f"pack {pack_name(self.pack_id)} is sealed in the bucket")
        self.buf += data
        while len(self.buf) - self.sent > PART:     # bytes stay for the last part, which commit sends
            self._send_part(PART)

    def _send_part(self, n: int) -> None:
        if self.upload_id is None:
            self.upload_id = self.store.start_upload(self.pack_id)
        with memoryview(self.buf) as view:      # one copy of the part, not two
            body = bytes(view[self.sent:self.sent + n])
        self.sent += n
        self.parts.append(self.store.pool().submit(self.store.upload_part, self.pack_id, self.upload_id,
                                                   len(self.parts) + 1, body))

    def commit(self) -> None:
        if self.sealed:
            return
        if self.upload_id is None:
            self.store.put_pack(self.pack_id, bytes(self.buf))
        else:
            self._send_part(len(self.buf) - self.sent)
            etags = [f.result() for f in self.parts]
            self.store.complete_upload(self.pack_id, self.upload_id, etags, self.buf)
            self.upload_id = None
        self.sealed = True
        self.buf = bytearray()

    def close(self) -> None:
        self.buf = bytearray()

    def abandon(self) -> None:
        self.buf = bytearray()
        if self.upload_id is not None:
            for f in self.parts:
                f.cancel()
            self.store.abort_upload(self.pack_id, self.upload_id)
            self.upload_id = None


class BlockCache:
    """A bounded LRU of pack blocks as files ``DIR/<pack>.<block>`` (whole sealed blocks only),
    the most recently used of them also in memory (``hot``, at most ``hot_limit`` bytes): a
    restore reads a block in many small pieces, and each read of the file would be 4 MiB."""

    def __init__(self, root: Path, limit: int, hot_limit: int = HOT_BYTES):
        self.root = root
        self.limit = limit
        self.hot: OrderedDict[str, bytes] = OrderedDict()
        self.hot_limit = hot_limit
        self.hot_total = 0
        root.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
        os.chmod(root, PRIVATE_DIR_MODE)
        self.lock = threading.Lock()
        self.files: OrderedDict[str, int] = OrderedDict()
        self.total = 0
        for p in sorted(root.iterdir(), key=lambda p: p.stat().st_mtime):
            if p.name.endswith(".tmp"):
                p.unlink(missing_ok=True)
                continue
            self.files[p.name] = p.stat().st_size
            self.total += self.files[p.name]

    def has(self, name: str) -> bool:
        with self.lock:
            return name in self.files

    def get(self, name: str) -> bytes | None:
        with self.lock:
            if name not in self.files:
                return None
            self.files.move_to_end(name)
            data = self.hot.get(name)
            if data is not None:
                self.hot.move_to_end(name)
                return data
        try:
            data = (self.root / name).read_bytes()
        except FileNotFoundError:
            return None
        with self.lock:
            if name in self.files:
                self._keep_hot(name, data)
        return data

    def _keep_hot(self, name: str, data: bytes) -> None:
        """Hold ``data`` in memory (the caller holds the lock)."""
        self.hot_total += len(data) - len(self.hot.pop(name, b""))
        self.hot[name] = data
        while self.hot_total > self.hot_limit and len(self.hot) > 1:
            self.hot_total -= len(self.hot.popitem(last=False)[1])

    def put(self, name: str, data: bytes) -> None:
        tmp = self.root / f"{name}.{threading.get_ident()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, PRIVATE_FILE_MODE)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, self.root / name)
        with self.lock:
            self.total += len(data) - self.files.pop(name, 0)
            self.files[name] = len(data)
            self._keep_hot(name, data)
            while self.total > self.limit and len(self.files) > 1:
                victim, n = self.files.popitem(last=False)
                self.total -= n
                self.hot_total -= len(self.hot.pop(victim, b""))
                (self.root / victim).unlink(missing_ok=True)

    def forget(self, prefix: str) -> None:
        with self.lock:
            for name in [n for n in self.files if n.startswith(prefix)]:
                self.total -= self.files.pop(name)
                self.hot_total -= len(self.hot.pop(name, b""))
                (self.root / name).unlink(missing_ok=True)


class _RangeReader(io.RawIOBase):
    """A seekable raw reader of one pack through ``store.read``."""

    def __init__(self, store: "S3PackStore", pack_id: int, size: int):
        self.store, self.pack_id, self.size, self.pos = store, pack_id, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self.pos, 2: self.size}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def readinto(self, b: Any) -> int:
        data = self.store.read(self.pack_id, self.pos, len(b))
        b[:len(data)] = data
        self.pos += len(data)
        return len(data)


class S3PackStore:
    """Packs as objects ``PREFIX/packs/<16 hex digits>.pack`` in a bucket."""

    appendable = False

    def __init__(self, client: S3Client, bucket: str, prefix: str, cache_dir: Path | None = None,
                 cache_bytes: int = 1 << 30):
        self.s3 = client
        self.bucket = bucket
        self.prefix = f"{prefix}/" if prefix else ""
        self.cache = BlockCache(cache_dir, cache_bytes) if cache_dir is not None else None
        self.listed: dict[int, int] = {}   # pack -> size, from the last listing (sealed packs never change)
        self._pool: ThreadPoolExecutor | None = None
        self._readers: ThreadPoolExecutor | None = None
        self._flight: dict[str, Future[bytes]] = {}   # cache block -> its read-ahead in flight
        self._pool_lock = threading.Lock()

    def key(self, pack_id: int) -> str:
        """The object key of pack ``pack_id``."""
        return f"{self.prefix}packs/{pack_name(pack_id)}"

    def put_pack(self, pack_id: int, body: bytes) -> None:
        """Upload a sealed pack, create-only. A 412 after a retried PUT whose first try did
        land (same MD5 etag) is success; any other existing object is :class:`PackExists`."""
        from botocore.exceptions import ClientError
        try:
            self.s3.call("put_object", Bucket=self.bucket, Key=self.key(pack_id), Body=body, IfNoneMatch="*")
        except ClientError as e:
            if status_of(e) != 412:
                raise SafeError(f"cannot upload pack {pack_name(pack_id)}: {e}") from None
            head = self._head(pack_id)
            if head is None or head.get("ETag", "").strip('"') != hashlib.md5(body).hexdigest():
                raise PackExists(f"pack {pack_name(pack_id)} is already in the bucket; packs are never "
                                 "overwritten") from None

    def pool(self) -> ThreadPoolExecutor:
        """The threads that upload parts of packs while the writer goes on."""
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=UPLOAD_THREADS, thread_name_prefix="s3-upload")
            return self._pool

    def start_upload(self, pack_id: int) -> str:
        """Begin the multipart upload of pack ``pack_id``; its upload id."""
        r = self.s3.call("create_multipart_upload", Bucket=self.bucket, Key=self.key(pack_id))
        return str(r["UploadId"])

    def upload_part(self, pack_id: int, upload_id: str, number: int, body: bytes) -> str:
        """Upload part ``number`` of a pack; its etag."""
        r = self.s3.call("upload_part", Bucket=self.bucket, Key=self.key(pack_id), UploadId=upload_id,
                         PartNumber=number, Body=body)
        return str(r["ETag"])

    def complete_upload(self, pack_id: int, upload_id: str, etags: list[str], body: bytes | bytearray) -> None:
        """Make the multipart upload the pack, create-only (``body``: the whole pack, to tell our
        own retried completion from another writer's pack)."""
        from botocore.exceptions import ClientError
        parts = [{"ETag": e, "PartNumber": i + 1} for i, e in enumerate(etags)]
        try:
            self.s3.call("complete_multipart_upload", Bucket=self.bucket, Key=self.key(pack_id), UploadId=upload_id,
                         MultipartUpload={"Parts": parts}, IfNoneMatch="*")
        except ClientError as e:
            if status_of(e) not in (404, 412):
                raise SafeError(f"cannot upload pack {pack_name(pack_id)}: {e}") from None
            n = self.size(pack_id)
            if n != len(body) or self._get(pack_id, 0, n - 1) != body:
                self.abort_upload(pack_id, upload_id)
                raise PackExists(f"pack {pack_name(pack_id)} is already in the bucket; packs are never "
                                 "overwritten") from None

    def abort_upload(self, pack_id: int, upload_id: str) -> None:
        """Drop an unfinished multipart upload (best effort: a store that is down keeps its parts,
        which no reader sees)."""
        try:
            self.s3.call("abort_multipart_upload", Bucket=self.bucket, Key=self.key(pack_id), UploadId=upload_id)
        except Exception:
            pass

    def create(self, pack_id: int) -> _S3Sink:
        """A new pack, uploaded whole by its sink's ``commit``."""
        return _S3Sink(self, pack_id)

    def reopen(self, pack_id: int, length: int) -> None:
        """Never: sealed packs are immutable."""
        return None

    def _get(self, pack_id: int, first: int, last: int) -> bytes:
        from botocore.exceptions import ClientError
        try:
            r = self.s3.call("get_object", Bucket=self.bucket, Key=self.key(pack_id), Range=f"bytes={first}-{last}")
        except ClientError as e:
            st = status_of(e)
            if st == 404:
                raise FileNotFoundError(self.key(pack_id)) from None
            if st == 416:
                return b""
            raise SafeError(f"cannot read pack {pack_name(pack_id)}: {e}") from None
        total = str(r.get("ContentRange", "")).rpartition("/")[2]   # "bytes FIRST-LAST/SIZE"
        if total.isdigit():
            self.listed[pack_id] = int(total)    # no read-ahead past the end (a sealed pack never changes)
        data: bytes = self._body(r)
        return data

    def _body(self, r: dict[str, Any]) -> bytes:
        try:
            data: bytes = r["Body"].read()
            return data
        except Exception as e:   # a reset in the middle of the body
            if not _transient(e):
                raise
            raise StoreUnavailable(f"the object store at {self.s3.endpoint} broke off a read: {e}") from None

    def read(self, pack_id: int, offset: int, length: int) -> bytes:
        """``length`` bytes from ``offset`` (fewer at the end); FileNotFoundError when gone."""
        if length <= 0:
            return b""
        if self.cache is None:
            return self._read_retrying(pack_id, offset, offset + length - 1)
        first, last = offset // BLOCK, (offset + length - 1) // BLOCK
        start = offset - first * BLOCK
        if first == last:
            return self._block(pack_id, first)[start:start + length]
        out = bytearray()
        for blk in range(first, last + 1):
            data = self._block(pack_id, blk)
            out += data
            if len(data) < BLOCK:
                break
        return bytes(memoryview(out)[start:start + length])

    def _block(self, pack_id: int, blk: int) -> bytes:
        """Block ``blk`` of a pack, from the cache, from a read-ahead in flight, or fetched. A
        sequential reader (restore, a mount's sequential reads: block 0, or the block after one
        already here) keeps the next READ_AHEAD blocks being fetched in the background, several
        GETs at once."""
        assert self.cache is not None
        name = f"{pack_name(pack_id)}.{blk}"
        data = self.cache.get(name)
        if data is None:
            with self._pool_lock:
                fut = self._flight.get(name)
            if fut is not None:
                try:
                    data = fut.result()
                except Exception:
                    data = None     # fetched here below, with this reader's own errors
            if data is None:
                data = self._read_retrying(pack_id, blk * BLOCK, (blk + 1) * BLOCK - 1)
                self.cache.put(name, data)
        if len(data) == BLOCK and (blk == 0 or self.cache.has(f"{pack_name(pack_id)}.{blk - 1}")):
            self._read_ahead(pack_id, blk)
        return data

    def _read_ahead(self, pack_id: int, blk: int) -> None:
        size = self.listed.get(pack_id)
        for b in range(blk + 1, blk + 1 + READ_AHEAD):
            if size is not None and b * BLOCK >= size:
                return
            name = f"{pack_name(pack_id)}.{b}"
            with self._pool_lock:
                if name in self._flight or (self.cache is not None and self.cache.has(name)):
                    continue
                if self._readers is None:
                    self._readers = ThreadPoolExecutor(max_workers=READ_THREADS, thread_name_prefix="s3-read")
                self._flight[name] = self._readers.submit(self._fetch_ahead, pack_id, b, name)

    def _fetch_ahead(self, pack_id: int, b: int, name: str) -> bytes:
        try:
            data = self._read_retrying(pack_id, b * BLOCK, (b + 1) * BLOCK - 1)
            if data and self.cache is not None:
                self.cache.put(name, data)
            return data
        finally:
            with self._pool_lock:
                self._flight.pop(name, None)

    def _read_retrying(self, pack_id: int, first: int, last: int) -> bytes:
        deadline = time.monotonic() + self.s3.retry_seconds
        while True:
            try:
                return self._get(pack_id, first, last)
            except StoreUnavailable:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def _head(self, pack_id: int) -> dict[str, Any] | None:
        from botocore.exceptions import ClientError
        try:
            head: dict[str, Any] = self.s3.call("head_object", Bucket=self.bucket, Key=self.key(pack_id))
            return head
        except ClientError as e:
            if status_of(e) == 404:
                return None
            raise SafeError(f"cannot look at pack {pack_name(pack_id)}: {e}") from None

    def size(self, pack_id: int) -> int | None:
        """The pack's size in bytes, or None when it is not in the bucket (from the last
        ``pack_ids`` listing when that saw it: a sealed pack never changes)."""
        if pack_id in self.listed:
            return self.listed[pack_id]
        head = self._head(pack_id)
        return None if head is None else int(head["ContentLength"])

    def open_reader(self, pack_id: int, buffer: int = 0) -> BinaryIO:
        """A seekable reader of the whole pack (ranged GETs); FileNotFoundError when gone."""
        n = self.size(pack_id)
        if n is None:
            raise FileNotFoundError(self.key(pack_id))
        return io.BufferedReader(_RangeReader(self, pack_id, n), buffer_size=buffer or BLOCK)

    def _rewrite(self, pack_id: int, body: bytes) -> None:
        self.s3.call("put_object", Bucket=self.bucket, Key=self.key(pack_id), Body=body)
        self.forget(pack_id)

    def replace_header(self, pack_id: int, header: bytes) -> None:
        """Repair only: upload the pack again with its first bytes replaced."""
        n = self.size(pack_id) or 0
        body = self._get(pack_id, 0, max(n - 1, 0)) if n else b""
        self._rewrite(pack_id, header + body[len(header):])

    def pack_ids(self) -> Iterator[int]:
        """Every pack in the bucket under the prefix."""
        token: str | None = None
        while True:
            kw: dict[str, Any] = {"Bucket": self.bucket, "Prefix": f"{self.prefix}packs/"}
            if token:
                kw["ContinuationToken"] = token
            r = self.s3.call("list_objects_v2", **kw)
            for obj in r.get("Contents", []):
                pid = pack_id_from_name(obj["Key"].rsplit("/", 1)[-1])
                if pid is not None:
                    self.listed[pid] = int(obj["Size"])
                    yield pid
            if not r.get("IsTruncated"):
                return
            token = r.get("NextContinuationToken")

    def truncate(self, pack_id: int, length: int) -> None:
        """Repair only: keep the first ``length`` bytes (an upload of the shorter pack)."""
        n = self.size(pack_id)
        if n is None or n <= length:
            return
        self._rewrite(pack_id, self._get(pack_id, 0, length - 1) if length else b"")

    def delete(self, pack_ids: list[int]) -> None:
        """Delete the packs (missing ones are fine); durable when this returns."""
        for pid in pack_ids:
            self.s3.call("delete_object", Bucket=self.bucket, Key=self.key(pid))
            self.forget(pid)

    def discard_temporaries(self) -> None:
        """Nothing: a single PUT is atomic, an interrupted one leaves no object."""

    def forget(self, pack_id: int) -> None:
        """Drop the cached blocks (and listed size) of ``pack_id``."""
        self.listed.pop(pack_id, None)
        if self.cache is not None:
            self.cache.forget(f"{pack_name(pack_id)}.")

    def close(self) -> None:
        """Stop the upload threads (the client's connections close with it)."""
        for pool in (self._pool, self._readers):
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
        self._pool = self._readers = None
