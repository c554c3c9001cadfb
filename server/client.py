"""The agent's side: talking to ``pointsafe serve``, and backing up and restoring through it.

The agent does the work a local backup does -- walk, chunk, hash, compress (ingest's pipeline
and walker, unchanged) -- with a :class:`RemoteWriter` in place of the safe's writer: objects
are queued and, every UPLOAD_BYTES, the server is asked which of them it lacks and only those
are uploaded. Ids are the agent's plain BLAKE3 ids (docs/SERVER.md, "Ids"). A point is
committed in one request once everything it names is uploaded.

Restoring streams: ingest's restorer reads the point's objects from the server as it writes
(server/remote_restore.py), each checked against its id, so that a restore through the server
writes exactly what a local one writes.
"""

from __future__ import annotations

import http.client
import json
import os
import queue
import socket
import ssl
import stat
import struct
import threading
import time
import urllib.parse
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from pointsafe.cas import (Kind, ObjectMissing, Point, SafeError, UsageError, encode_node, latest, object_key, prepare,
                           utc_now_iso)

from pointsafe.cas.tree import DIR, decode_tree, tree_pages
from pointsafe.fusefs.cache import ByteLRU

from . import protocol

RETRIES = 8          # attempts of a request the server answered 503 (busy) or that lost its connection
RETRY_WAIT = 0.5     # seconds before the first retry, doubled each time ...
RETRY_MAX_WAIT = 8   # ... up to this: about 30 s in all


class ServerError(SafeError):
    """The server refused a request or could not be reached (the one line says which)."""

    def __init__(self, message: str, status: int = 0):
        super().__init__(message)
        self.status = status


def read_token(token_file: str | None) -> str:
    """The agent token: the first line of ``token_file``, else $POINTSAFE_TOKEN; UsageError when
    neither gives one (a token is never taken from the command line, where ps shows it)."""
    if token_file:
        try:
            with open(token_file, encoding="utf-8") as f:
                token = f.readline().strip()
        except OSError as e:
            raise UsageError(f"cannot read --token-file {token_file}: {e.strerror}") from None
        if not token:
            raise UsageError(f"--token-file {token_file} is empty")
        return token
    token = os.environ.get("POINTSAFE_TOKEN", "").strip()
    if not token:
        raise UsageError("no agent token: set POINTSAFE_TOKEN or give --token-file FILE "
                         "('pointsafe agent add' on the server prints one)")
    return token


class Remote:
    """A server at ``url`` (http:// on loopback, https:// elsewhere; the system's CAs, or
    $SSL_CERT_FILE, verify it) and the agent's token. One kept-alive connection per thread."""

    retries = RETRIES    # attempts of a request (a mount makes fewer: a read must not hang half a minute)

    def __init__(self, url: str, token: str, timeout: float = 300):
        u = urllib.parse.urlsplit(url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise UsageError(f"bad --server {url!r}: use http://HOST:PORT or https://HOST:PORT")
        self.url, self.scheme, self.host = url.rstrip("/"), u.scheme, u.hostname
        self.port = u.port or (443 if u.scheme == "https" else 80)
        self.base = u.path.rstrip("/")
        self.token = token
        self.timeout = timeout
        self.local = threading.local()
        self.ctx = ssl.create_default_context() if u.scheme == "https" else None

    def _conn(self, fresh: bool = False) -> http.client.HTTPConnection:
        c = getattr(self.local, "conn", None)
        if c is None or fresh:
            if c is not None:
                c.close()
            if self.ctx is not None:
                c = http.client.HTTPSConnection(self.host, self.port, timeout=self.timeout, context=self.ctx)
            else:
                c = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            self.local.conn = c
        return c

    def call(self, method: str, path: str, body: bytes | None = None, content_type: str = "application/json",
             retry: bool = True) -> bytes:
        """The body of a 200 answer to ``method path``; ServerError (one line) otherwise. A
        request that could not be sent (the server is down or restarting) is sent again, up to
        RETRIES times over about 30 s; so is one the server answered 503 (busy) or 429 (slow down). A lost answer is
        retried only when ``retry`` (requests that can be repeated): a request that must not run
        twice (a commit) goes on a new connection and fails when its answer is lost."""
        headers = {"Authorization": f"Bearer {self.token}", "Content-Type": content_type}
        wait = RETRY_WAIT
        for attempt in range(self.retries):
            sent = False
            try:
                c = self._conn(fresh=attempt > 0 or not retry)
                c.request(method, self.base + path, body=body, headers=headers)
                sent = True
                r = c.getresponse()
                data = r.read()
            except ssl.SSLCertVerificationError as e:
                raise ServerError(f"TLS with {self.url} failed: certificate verify failed ({e.verify_message}); "
                                  "trust its CA with SSL_CERT_FILE=FILE") from None
            except ssl.SSLError as e:
                raise ServerError(f"TLS with {self.url} failed: {e.reason or e}") from None
            except (OSError, http.client.HTTPException) as e:
                if (sent and not retry) or attempt == self.retries - 1:
                    why = getattr(e, "strerror", None) or str(e) or type(e).__name__
                    lost = " (its answer was lost: check 'pointsafe points --server URL')" if sent and not retry else ""
                    raise ServerError(f"cannot reach the server {self.url}: {why}{lost}") from None
                time.sleep(wait)
                wait = min(wait * 2, RETRY_MAX_WAIT)
                continue
            if r.status == 200:
                return data
            if r.status in (429, 503) and attempt < self.retries - 1:
                time.sleep(wait)
                wait = min(wait * 2, RETRY_MAX_WAIT)
                continue
            raise ServerError(f"the server refused {method} {path}: {_error_of(data, r.status)}", r.status)
        raise ServerError(f"the server {self.url} stayed busy")   # not reached

    def json(self, method: str, path: str, body: Any = None, retry: bool = True) -> Any:
        """``call`` with a JSON body and a JSON answer."""
        data = None if body is None else json.dumps(body).encode()
        return json.loads(self.call(method, path, data, retry=retry))

    # -- the API ---------------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        """The safe's settings and this agent's rights (GET /api/v1/info)."""
        return self.json("GET", "/api/v1/info")

    def missing(self, ids: list[bytes]) -> set[bytes]:
        """Which of ``ids`` the server lacks (for this agent)."""
        out: set[bytes] = set()
        for i in range(0, len(ids), protocol.MAX_IDS):
            r = self.json("POST", "/api/v1/objects/missing", {"ids": [k.hex() for k in ids[i:i + protocol.MAX_IDS]]})
            out.update(bytes.fromhex(h) for h in r["missing"])
        return out

    def upload(self, body: bytes) -> dict[str, int]:
        """Upload an object stream (POST /api/v1/objects): stored all or none; the answer
        counts the objects received."""
        return json.loads(self.call("POST", "/api/v1/objects", body, "application/octet-stream"))

    def fetch(self, ids: list[bytes]) -> list[protocol.Record]:
        """The objects ``ids`` names, each checked against its id; ObjectMissing for one the
        server does not give this agent."""
        out: list[protocol.Record] = []
        todo = list(ids)
        while todo:
            batch = todo[:protocol.MAX_IDS]
            try:
                data = self.call("POST", "/api/v1/objects/fetch", json.dumps({"ids": [k.hex() for k in batch]}).encode())
            except ServerError as e:
                if e.status == 404:
                    raise ObjectMissing(str(e)) from None
                raise
            recs = protocol.decode(data)
            if not recs:
                raise ServerError("the server answered a fetch with no object")
            for r, want in zip(recs, batch):
                if r.id != want or protocol.agent_id(r.kind, r.raw) != want:
                    raise ServerError(f"the server sent object {r.id.hex()[:12]} with content that does not match its id")
            out += recs
            todo = todo[len(recs):]
        return out

    def points(self) -> list[Point]:
        """This agent's points, oldest first; their ``root`` is the agent's id of the root."""
        return [Point.from_record(r) for r in self.json("GET", "/api/v1/points")["points"]]

    def commit(self, record: dict[str, Any]) -> Point:
        """Commit a point (never retried after a lost connection: it may have been committed)."""
        return Point.from_record(self.json("POST", "/api/v1/points", record, retry=False))


def _error_of(data: bytes, status: int) -> str:
    try:
        msg = json.loads(data).get("error")
    except (ValueError, AttributeError):
        msg = None
    return f"{msg} (HTTP {status})" if msg else f"HTTP {status}"


@dataclass(frozen=True)
class RemoteConfig:
    """The chunking settings of the served safe (what ingest's walker and pipeline read)."""

    chunk_min: int
    chunk_avg: int
    chunk_max: int
    list_fanout: int
    block_size: int
    zstd_level: int | None


class RemoteSafe:
    """What the tree walker reads of a safe -- ``config`` and ``get`` (the previous point's
    trees, for change detection) -- from the server.

    Trees are fetched in batches: each tree ``get`` returns queues its subdirectories' trees
    (or its pages), and one fetcher thread asks for everything queued in one request (up to
    MAX_IDS), so that change detection of a wide tree costs a request per batch of directories,
    not one per directory. At most AHEAD trees are held or in flight; ``close`` stops the
    fetcher. The trees last read are kept (RECENT_BYTES): a walk guided by a btrfs send stream
    reads a kept directory's tree again to count what it holds."""

    AHEAD = 1024
    RECENT_BYTES = 8 << 20

    def __init__(self, remote: Remote, info: dict[str, Any]):
        self.remote = remote
        self.config = RemoteConfig(info["chunk_min"], info["chunk_avg"], info["chunk_max"], info["list_fanout"],
                                   info["block_size"], info.get("zstd_level"))
        self.cond = threading.Condition()
        self.ahead: dict[bytes, Future] = {}      # tree id -> its raw bytes (fetched or on the way)
        self.wanted: list[tuple[bytes, Future]] = []   # of ``ahead``: what the fetcher has not asked for yet
        self.closed = False
        self.thread: threading.Thread | None = None
        self.requests = 0                         # fetch requests made (for tests and benchmarks)
        self.recent: ByteLRU[bytes] = ByteLRU(self.RECENT_BYTES, sizeof=lambda v: len(v) + 64)

    def get(self, key: bytes) -> bytes:
        """The raw bytes of object ``key`` (the agent's id); ObjectMissing when it has none."""
        raw = self.recent.peek(key)
        if raw is not None:         # its subtrees were queued when it was read
            return raw
        with self.cond:
            fut = self.ahead.pop(key, None)
        raw = None
        if fut is not None:
            try:
                raw = fut.result()
            except Exception:  # noqa: BLE001 - asked again alone below, which raises what is wrong
                raw = None
        if raw is None:
            with self.cond:
                self.requests += 1
            raw = self.remote.fetch([key])[0].raw
        self.recent.put(key, raw)
        self._queue(_subtrees(raw))
        return raw

    def kind(self, key: bytes) -> int:
        """The kind of object ``key`` (as ``Safe.kind``: what a blob reader asks of a blob's
        root). A chunk the agent may not read (no ``--can-restore``) is still a chunk: only
        chunks are refused that way. What it fetched is kept for the ``get`` that follows (a
        reader asks a root's kind, then reads it)."""
        try:
            rec = self.remote.fetch([key])[0]
        except ServerError as e:
            if e.status == 403:
                return Kind.CHUNK
            raise
        if rec.kind != Kind.CHUNK:
            self.recent.put(key, rec.raw)
        return rec.kind

    def _queue(self, keys: list[bytes]) -> None:
        with self.cond:
            if self.closed:
                return
            for k in keys:
                if len(self.ahead) >= self.AHEAD:
                    break
                if k not in self.ahead:
                    f: Future[bytes] = Future()
                    self.ahead[k] = f
                    self.wanted.append((k, f))
            if self.wanted:
                if self.thread is None:
                    self.thread = threading.Thread(target=self._fetcher, name="pointsafe-fetch-trees", daemon=True)
                    self.thread.start()
                self.cond.notify()

    def _fetcher(self) -> None:
        while True:
            with self.cond:
                while not self.wanted and not self.closed:
                    self.cond.wait()
                if self.closed:
                    return
                batch, self.wanted = self.wanted[:protocol.MAX_IDS], self.wanted[protocol.MAX_IDS:]
                self.requests += 1
            try:
                raws: list[bytes] | BaseException = [r.raw for r in self.remote.fetch([k for k, _ in batch])]
            except BaseException as e:  # noqa: BLE001 - each get asks again alone and raises it there
                raws = e
            for i, (_, f) in enumerate(batch):
                try:
                    f.set_exception(raws) if isinstance(raws, BaseException) else f.set_result(raws[i])
                except InvalidStateError:   # cancelled by close
                    pass

    def close(self) -> None:
        """Stop the fetcher thread and drop what it holds."""
        with self.cond:
            self.closed = True
            for f in self.ahead.values():
                f.cancel()
            self.ahead.clear()
            self.wanted.clear()
            self.cond.notify_all()


def _subtrees(raw: bytes) -> list[bytes]:
    """The trees a walk reads after tree ``raw``: its pages, or its subdirectories' trees
    (nothing for what is not a tree)."""
    try:
        pages = tree_pages(raw)
        if pages is not None:
            return [k for k, _, _ in pages]
        return [e.ref for e in decode_tree(raw) if e.type == DIR and e.ref is not None]
    except (ValueError, struct.error, IndexError, KeyError):
        return []


class RemoteWriter:
    """The writer the pipeline fills (the methods of cas.Writer it calls), uploading to the
    server. Objects are queued in order (children before the nodes naming them) and, every
    UPLOAD_BYTES, handed to one uploader thread, which asks which are missing and uploads those
    while the pipeline goes on (at most UPLOADS_AHEAD batches wait; one thread keeps the order).
    Use from one thread (the pipeline's assembler); ``known`` may be called from any. ``finish``
    sends the rest and waits; an upload's error is raised by the next call that queues."""

    UPLOADS_AHEAD = 2

    def __init__(self, remote: Remote, level: int | None):
        self.remote = remote
        self.level = level
        self.crypto = None
        self.sent: set[bytes] = set()             # ids queued or uploaded by this run
        self.queue: list[tuple[int, bytes, int, int, bytes | bytearray]] = []
        self.queued_bytes = 0
        self.bytes_written = 0                    # body bytes uploaded
        self.objects_written = 0                  # objects uploaded (the server lacked them)
        self.objects_offered = 0                  # objects asked about
        self.error: BaseException | None = None
        self.batches: queue.Queue = queue.Queue(maxsize=self.UPLOADS_AHEAD)
        self.thread = threading.Thread(target=self._uploader, name="pointsafe-upload", daemon=True)
        self.thread.start()

    def known(self, key: bytes) -> bool:
        """True when ``key`` was queued or uploaded by this run (the server is asked at flush)."""
        return key in self.sent

    def put_prepared(self, p: Any, children: Any = (), checked: bool = False, record: bytes | None = None) -> bool:
        """Queue a prepared chunk (cas.Prepared, plain); True when this run had not queued it."""
        if p.key in self.sent:
            return False
        self._queue(p.kind, p.key, p.codec, p.raw_len, p.stored)
        return True

    def put_node(self, kind: int, children: list[bytes], payload: bytes) -> bytes:
        """Queue a node naming ``children`` (agent ids); returns its id."""
        return self.put(kind, encode_node(children, payload))

    def put(self, kind: int, data: bytes) -> bytes:
        """Queue the object ``data`` of ``kind`` (a chunk, or a whole node encoding); returns its id."""
        key = object_key(kind, data)
        if key not in self.sent:
            p = prepare(kind, data, self.level)
            self._queue(kind, key, p.codec, p.raw_len, p.stored)
        return key

    def _queue(self, kind: int, key: bytes, codec: int, raw_len: int, body: bytes | bytearray) -> None:
        self.sent.add(key)
        self.queue.append((kind, key, codec, raw_len, body))
        self.queued_bytes += len(body)
        if self.queued_bytes >= protocol.UPLOAD_BYTES or len(self.queue) >= protocol.MAX_IDS:
            self.flush()

    def flush(self) -> None:
        """Hand the queued objects to the uploader (raises an earlier upload's error)."""
        if self.error is not None:
            raise self.error
        if not self.queue:
            return
        q, self.queue, self.queued_bytes = self.queue, [], 0
        while True:
            try:
                self.batches.put(q, timeout=0.2)
                return
            except queue.Full:
                if self.error is not None:
                    raise self.error from None

    def sync(self) -> None:
        """Send what is queued and wait until the server has it (so that it can be fetched back,
        as grafting a database's files does); raises an upload's error."""
        self.flush()
        self.batches.join()
        if self.error is not None:
            raise self.error

    def finish(self) -> None:
        """Send what is queued and wait until every upload answered; raises an upload's error."""
        self.flush()
        self.batches.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error

    def cancel(self) -> None:
        """Stop the uploader after an error elsewhere (what was not sent is dropped)."""
        self.error = self.error or ServerError("cancelled")
        try:
            while True:
                self.batches.get_nowait()
        except queue.Empty:
            pass
        self.batches.put(None)
        self.thread.join(timeout=60)

    def _uploader(self) -> None:
        while True:
            q = self.batches.get()
            try:
                if q is None:
                    return
                if self.error is None:
                    self._send(q)
            except BaseException as e:  # handed to the pipeline's thread by the next flush
                self.error = e
            finally:
                self.batches.task_done()

    def _send(self, q: list[tuple[int, bytes, int, int, bytes | bytearray]]) -> None:
        """Ask which of ``q`` the server lacks and upload those (in order)."""
        self.objects_offered += len(q)
        lacking = self.remote.missing([k for _, k, _, _, _ in q])
        parts: list[bytes | bytearray | memoryview] = []
        size = 0
        for kind, key, codec, raw_len, body in q:
            if key in lacking:
                parts += protocol.encode(kind, key, codec, raw_len, body)
                size += protocol.REC.size + len(body)
                self.objects_written += 1
        if parts:
            self.remote.upload(b"".join(parts))
            self.bytes_written += size


# -- backup ----------------------------------------------------------------------------------

def _may_back_up(sources: list[str], path: str) -> bool:
    return not sources or any(path == s or path.startswith(s.rstrip("/") + "/") for s in sources)


def _source_kind(source: str, volume: bool) -> tuple[Path, os.stat_result, str]:
    """(resolved path, stat, "tree" or "volume") of a source; UsageError for what cannot be one."""
    if not source:
        raise UsageError("the source is empty: name a directory, block device or disk image "
                         "(use '.' for the current directory)")
    path = Path(source).resolve()
    try:
        st = os.stat(path)
    except OSError as e:
        raise UsageError(f"{source}: cannot access: {e.strerror}") from None
    if stat.S_ISBLK(st.st_mode) or (volume and stat.S_ISREG(st.st_mode)):
        return path, st, "volume"
    if volume:
        raise UsageError(f"{source}: --volume needs a block device or a disk image file")
    if stat.S_ISDIR(st.st_mode):
        return path, st, "tree"
    raise UsageError(f"{source}: is neither a directory nor a block device (a disk image needs --volume)")


def snapshot_id(remote: Remote, info: dict[str, Any]) -> str:
    """The id the agent's snapshots are named with (as a local backup names its own with the
    safe's id): the server's ``snapshot_id`` for this agent (a hash of the safe's id and the
    agent's, stable across backups), or for an older server a hash of its URL and the agent."""
    sid = info.get("snapshot_id")
    if isinstance(sid, str) and len(sid) >= 16 and all(c in "0123456789abcdef" for c in sid):
        return sid
    import hashlib
    return hashlib.sha256(f"pointsafe agent\0{remote.url}\0{info.get('agent')}".encode()).hexdigest()[:32]


def remote_backup(remote: Remote, source: str, opts: Any = None,
                  progress: Callable[..., None] | None = None) -> tuple[Point, list[dict], dict[str, int], list[str]]:
    """Back up ``source`` (a directory; a block device, or a disk image with ``opts.volume``)
    into a point on the server, a point in time exactly as a local backup's (``opts``: ingest's
    BackupOptions; its snapshot, hooks and freeze run on this machine, see ingest.backup), with
    change detection against the agent's previous point of the same name; returns (the point,
    its warnings, upload counters, notes). UsageError before anything is sent for a bad source
    or one the agent may not back up; SnapshotError when a snapshot asked for by name cannot be
    taken. Nothing is committed unless everything was uploaded."""
    from pointsafe.ingest.backup import (BackupOptions, Warnings, check_changed_blocks, hooks_around,
                                         plan_point_in_time, point_in_time, settle_warnings, source_name)
    opts = opts if opts is not None else BackupOptions()
    name = source_name(source, opts.name)
    problem = protocol.point_name_problem(name)
    if problem is not None:
        raise UsageError(problem)
    warn = Warnings()
    notes: list[str] = []
    env = {"POINTSAFE_SOURCE": os.path.abspath(source), "POINTSAFE_NAME": name, "POINTSAFE_SERVER": remote.url}
    started = utc_now_iso()
    with hooks_around(opts, env, warn.list):
        # the pre-hook runs before the source is checked: it may create it (a snapshot, a mount)
        path, st, kind = _source_kind(source, opts.volume)
        opts = check_changed_blocks(opts, source, path, kind)
        info = remote.info()
        if not _may_back_up(info.get("sources") or [], str(path)):
            raise UsageError(f"agent {info['agent']} may not back up {path} (its sources: {', '.join(info['sources'])})")
        prev = latest(p for p in remote.points() if p.name == name and p.kind == kind)
        provider = plan_point_in_time(opts, path, st, kind, name, snapshot_id(remote, info),
                                      None if prev is None else prev.snapshot, notes)
        with point_in_time(opts, provider, path, warn, env, notes) as freeze:
            if freeze.active and kind != "tree":
                raise UsageError(f"{source}: --mysql/--postgres/--sqlite apply to a directory tree")
            after_commit: list[Callable[[], None]] = []
            record, w, grafted = _send_source(remote, info, path, st, kind, prev, opts, freeze, warn, progress,
                                              after_commit)
            settle_warnings(warn.list, freeze.active, path, grafted)
            record.update(name=name, started=started, warnings=warn.list)
            point = remote.commit(record)
            for done in after_commit:
                done()
            freeze.keep(path)
    notes.extend(_quota_notes(remote, info))
    return point, warn.list, {"objects_offered": w.objects_offered, "objects_uploaded": w.objects_written,
                              "bytes_uploaded": w.bytes_written}, notes


def _quota_notes(remote: Remote, info: dict[str, Any]) -> list[str]:
    """What the agent's terminal says after a backup that left it over its soft quota (the
    server has raised the alert; the backup itself succeeded). One more info request, made
    only when the agent has a soft quota."""
    soft = info.get("quota_soft")
    if not isinstance(soft, int):
        return []
    stored = remote.info().get("stored_bytes")
    if not isinstance(stored, int) or stored <= soft:
        return []
    from pointsafe.ops.quota import human_bytes
    return [f"this agent stores {human_bytes(stored)} on the server, over its soft quota of {human_bytes(soft)}; "
            "the server's administrator has been alerted"]


def _send_source(remote: Remote, info: dict[str, Any], path: Path, st: os.stat_result, kind: str, prev: Point | None,
                 opts: Any, freeze: Any, warn: Callable[[bytes | str, str], None],
                 progress: Callable[..., None] | None,
                 after_commit: list[Callable[[], None]]) -> tuple[dict[str, Any], RemoteWriter, set[str]]:
    """Read the source (the snapshot ``freeze`` took, or the live ``path``) and upload what the
    server lacks; returns (the point record but for name, started and warnings; the writer and
    its counters; the files the database integrations grafted in). The freeze is thawed, and the
    integrations told, once the source is read; what must wait for the commit (a QEMU bitmap's
    rotation) is put in ``after_commit``."""
    from pointsafe.ingest.backup import (_progress_of, _source_stat, _tree_change_source, estimate,
                                         graft_consistent_copies, back_up_volume, walk_tree)
    from pointsafe.ingest.changes.btrfs_plan import walk_record
    from pointsafe.ingest.db import walk_excludes
    from pointsafe.ingest.pipeline import Pipeline
    rsafe = RemoteSafe(remote, info)
    cfg = rsafe.config
    advance, set_total = _progress_of(progress)
    set_total(*estimate(prev, path, st, kind, cfg.block_size))
    w = RemoteWriter(remote, cfg.zstd_level)
    pipe = Pipeline(w, cfg.list_fanout, workers=opts.workers)  # type: ignore[arg-type]  # RemoteWriter: the Writer methods the pipeline calls
    record: dict[str, Any] = {"kind": kind, "source": str(path), "host": socket.gethostname(),
                              "labels": dict(opts.labels or {})}
    read_path = freeze.read_path(path)
    active = freeze.active
    grafted: set[str] = set()
    try:
        if kind == "tree":
            wo = freeze.walk_options(path, opts, list(opts.excludes or []) + walk_excludes(active), set())
            walked = walk_record(wo.excludes, wo.one_file_system)
            guide = None
            if freeze.taken is not None and freeze.taken.method == "btrfs":
                # as locally: the send stream between the previous point's retained snapshot
                # (on this machine) and the new one says what to walk; that point's trees are
                # read from the server
                record["change_source"], guide = _tree_change_source(rsafe, prev, path, read_path, walked,  # type: ignore[arg-type]  # RemoteSafe: get
                                                                     freeze.taken, opts, bool(active), warn)
                if guide is not None and not info.get("can_restore"):
                    # reading a file only around its written extents takes the bytes between
                    # from the previous point's chunks, which this agent may not read: such
                    # files are read whole (the others still are not read at all)
                    guide.whole.update(rel for rel, written in guide.extents.items() if written)
            root, record["root_meta"] = walk_tree(rsafe, pipe, read_path, prev.root if prev else None, wo,  # type: ignore[arg-type]  # RemoteSafe: config and get
                                                  warn, advance, guide=guide, full_read=opts.full_read)
            record["walk"] = walked
            record["size"] = pipe.stats.size
            for c in active:
                c.files_read()
            freeze.thaw("ok")
            root, grafted = graft_consistent_copies(rsafe, w, root, active, path, w.sync)  # type: ignore[arg-type]  # RemoteSafe, RemoteWriter: what grafting calls
        else:
            sig = _source_stat(st, freeze.taken)
            root, record["size"] = back_up_volume(rsafe, w, pipe, read_path, path, st, sig, prev, opts, warn,  # type: ignore[arg-type]  # RemoteSafe, RemoteWriter: what reading a volume calls
                                                  advance, record, after_commit, settle=w.sync)
            record["block_size"] = cfg.block_size
            if stat.S_ISREG(st.st_mode):
                record["source_stat"] = sig
        w.finish()
    except BaseException:
        pipe.cancel()
        w.cancel()
        raise
    finally:
        rsafe.close()
    freeze.thaw("ok")   # without a snapshot the freeze lasted the whole read (with one: done already)
    stats = pipe.stats.as_dict()
    stats.update(bytes_stored=w.bytes_written, objects_new=w.objects_written)
    record.update(root=root.hex() if root else None, stats=stats, snapshot=freeze.record(), finished=utc_now_iso())
    if active:
        record["consistency"] = {c.name: c.info() for c in active}
    return record, w, grafted


# -- restore ---------------------------------------------------------------------------------

def resolve(remote: Remote, ref: str) -> Point:
    """The agent's point ``ref``: an id or a unique prefix of one, or NAME / NAME@latest;
    UsageError when it names none of the agent's points (another agent's reads as unknown)."""
    pts = remote.points()
    name, _, at = ref.partition("@")
    if at in ("", "latest") and any(p.name == name for p in pts):
        got = latest(p for p in pts if p.name == name)
        if got is not None:
            return got
    hits = [p for p in pts if p.id.startswith(ref.lower())] if len(ref) >= 4 else []
    if len(hits) == 1:
        return hits[0]
    if len(hits) > 1:
        raise UsageError(f"point {ref!r} is ambiguous: {len(hits)} points start with it")
    raise UsageError(f"no point {ref!r} of this agent ('pointsafe points --server URL' lists them)")


def remote_restore(remote: Remote, point: Point, target: str, subpath: str | None = None, force: bool = False,
                   progress: Callable[[int], None] | None = None) -> Any:
    """Restore the agent's ``point`` to ``target`` (as ``pointsafe restore`` does locally, with
    ingest's restorer), streaming: objects are fetched as the restorer needs them, each checked
    against its id, and written straight into the target (server/remote_restore.py). Returns
    ingest's RestoreStats."""
    from .remote_restore import RemoteRestorer, RemoteSource
    if not target:
        raise UsageError("the target is empty: name a directory (use '.' for the current directory)")
    info = remote.info()
    if not info.get("can_restore"):    # refused before anything is written (not a warning per file)
        raise ServerError(f"agent {info.get('agent')} may not read file contents (it was added without "
                          "--can-restore): nothing restored", 403)
    r = RemoteRestorer(RemoteSource(remote), force=force, progress=progress)
    if point.kind == "volume":
        if subpath:
            raise UsageError("--path applies to tree points; this point is a volume")
        return r.restore_volume(point, Path(target))
    return r.restore_tree(point, Path(target), subpath)
