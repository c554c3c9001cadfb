"""The writer lock of a safe in a bucket, enforced by the store (docs/FORMAT.md, "The bucket layout").

Created with ``If-None-Match: *``, renewed with ``If-Match: <etag>``, released with a conditional
delete, taken over only after its ``expires`` has passed, or when it names a process of this host
that is gone (by a compare-and-swap on the etag read). Expiry compares the taker's clock with the
holder's: the TTL must exceed the clock skew.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import uuid
from typing import Any

from .errors import SafeError, SafeLocked
from .s3store import S3Client, status_of

DEFAULT_TTL = 300.0   # seconds; POINTSAFE_S3_LOCK_TTL overrides (tests use a few seconds)


class StoreUnsafe(SafeError):
    """the object store does not honour conditional creation (If-None-Match: *)"""


def lock_ttl() -> float:
    """The lock's time to live in seconds (POINTSAFE_S3_LOCK_TTL, default 300)."""
    return float(os.environ.get("POINTSAFE_S3_LOCK_TTL", DEFAULT_TTL))


def check_conditional_create(s3: S3Client, bucket: str, prefix: str) -> None:
    """Create one probe object twice, create-only; both succeeding raises :class:`StoreUnsafe`."""
    from botocore.exceptions import ClientError
    key = f"{prefix + '/' if prefix else ''}probe/{uuid.uuid4().hex}"
    s3.call("put_object", Bucket=bucket, Key=key, Body=b"1", IfNoneMatch="*")
    try:
        s3.call("put_object", Bucket=bucket, Key=key, Body=b"2", IfNoneMatch="*")
    except ClientError as e:
        if status_of(e) == 412:
            return
        raise SafeError(f"the object store at {s3.endpoint} failed a probe write: {e}") from None
    finally:
        s3.call("delete_object", Bucket=bucket, Key=key)
    raise StoreUnsafe(f"the object store at {s3.endpoint} ignores conditional creation (If-None-Match: *), "
                      "so it cannot keep two writers apart; use a store that honours it, or --unsafe-no-locking")


def _holder_gone(info: dict[str, Any]) -> bool:
    """True when the lock names a process of this host that no longer runs (a writer killed, or
    one that failed while the store was down and could not delete the lock): its lock may be taken
    over before it expires. A holder on another host is gone only once its lock has expired."""
    if info.get("host") != socket.gethostname():
        return False
    try:
        pid = int(info.get("pid", 0))
    except (TypeError, ValueError):
        return False
    if pid <= 0 or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False    # it runs, as another user
    return False


class S3Lock:
    """The ``lock`` object of a safe in a bucket; ``acquire``, then ``renew``/``start_renewing``, ``release``."""

    def __init__(self, s3: S3Client, bucket: str, prefix: str, ttl: float | None = None, command: str = ""):
        self.s3 = s3
        self.bucket = bucket
        self.key = f"{prefix + '/' if prefix else ''}lock"
        self.ttl = lock_ttl() if ttl is None else ttl
        self.token = uuid.uuid4().hex
        self.command = command or " ".join(os.path.basename(a) for a in sys.argv[:2])
        self.etag: str | None = None
        self.since = int(time.time())
        self._stop = threading.Event()
        self.lost = False
        self.valid_until = 0.0    # time.monotonic() until which the lock is ours
        self._thread: threading.Thread | None = None

    def _body(self) -> bytes:
        now = time.time()
        return json.dumps({"holder": self.command, "host": socket.gethostname(), "pid": os.getpid(),
                           "since": self.since, "expires": now + self.ttl, "token": self.token}).encode() + b"\n"

    def _read(self) -> tuple[dict[str, Any], str] | None:
        from botocore.exceptions import ClientError
        try:
            r = self.s3.call("get_object", Bucket=self.bucket, Key=self.key)
        except ClientError as e:
            if status_of(e) == 404:
                return None
            raise
        try:
            info = json.loads(r["Body"].read())
        except ValueError:
            info = {}
        return (info if isinstance(info, dict) else {}), str(r["ETag"])

    def acquire(self) -> None:
        """Take the lock, or raise SafeLocked ("the safe is busy") while another holds it."""
        from botocore.exceptions import ClientError
        for _ in range(3):
            sent = time.monotonic()
            try:
                r = self.s3.call("put_object", Bucket=self.bucket, Key=self.key, Body=self._body(), IfNoneMatch="*")
                self._held(str(r["ETag"]), sent)
                return
            except ClientError as e:
                if status_of(e) != 412:
                    raise
            seen = self._read()
            if seen is None:
                continue        # released between the two calls: try to create it again
            info, etag = seen
            if info.get("token") == self.token:   # our own create, whose answer was lost and retried
                self._held(etag, sent)
                return
            if float(info.get("expires", 0)) > time.time() and not _holder_gone(info):
                raise SafeLocked(f"the safe is busy: {info.get('holder', '?')} (pid {info.get('pid', '?')} on "
                                 f"{info.get('host', '?')}) holds its writer lock; wait for it to finish")
            try:   # expired: take it over, unless another taker was faster
                sent = time.monotonic()
                r = self.s3.call("put_object", Bucket=self.bucket, Key=self.key, Body=self._body(), IfMatch=etag)
                self._held(str(r["ETag"]), sent)
                return
            except ClientError as e:
                if status_of(e) not in (412, 404):
                    raise
                raise SafeLocked("the safe is busy: another writer took over its expired writer lock first") from None
        raise SafeLocked("the safe is busy: its writer lock keeps changing hands")

    def renew(self) -> None:
        """Push the expiry out by the TTL; SafeLocked when the lock is no longer ours."""
        from botocore.exceptions import ClientError
        sent = time.monotonic()
        try:
            r = self.s3.call("put_object", Bucket=self.bucket, Key=self.key, Body=self._body(), IfMatch=self.etag)
        except ClientError as e:
            if status_of(e) in (412, 404):
                self.lost = True
                raise SafeLocked("the writer lock was taken over by another writer (it had expired)") from None
            raise
        self._held(str(r["ETag"]), sent)

    def _held(self, etag: str, sent: float) -> None:
        self.etag = etag
        self.valid_until = sent + self.ttl

    def held(self) -> bool:
        """True while the lock is surely ours: renewed less than a TTL ago (minus a margin for
        clock drift) and not taken over. A writer checks it before each commit."""
        return not self.lost and time.monotonic() < self.valid_until - min(5.0, self.ttl / 10)

    def start_renewing(self) -> None:
        """Renew every third of the TTL in a daemon thread until ``release``."""
        def loop() -> None:
            while not self._stop.wait(self.ttl / 3):
                try:
                    self.renew()
                except SafeLocked:
                    return          # taken over: ``held`` is False from now on
                except SafeError:
                    continue        # the store did not answer: try again, while the lock lasts
        self._thread = threading.Thread(target=loop, name="s3-lock-renew", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Delete the lock if it is still ours (a conditional delete)."""
        from botocore.exceptions import ClientError
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.etag is None:
            return
        try:
            self.s3.call("delete_object", Bucket=self.bucket, Key=self.key, IfMatch=self.etag)
        except ClientError as e:
            if status_of(e) not in (412, 404):
                raise
        self.etag = None
