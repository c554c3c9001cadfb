"""What the server does for an agent, without HTTP: the answers of every API route.

Every method takes the authenticated :class:`~.agents.Agent` and raises :class:`Refused` (an
HTTP status and one line) for what it will not do. Objects are verified in full before the
first is stored: a request that is refused stores nothing. Writes go through the one
``cas.Writer`` (``self.lock``), held while agents' backups are under way (see Service).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pointsafe.cas import (IntegrityError, Kind, Point, Prepared, Safe, SafeLocked, Writer, decode_list, decode_node, encode_node,
                           parse_utc, prepare)
from pointsafe.cas.index import ObjectEntry
from pointsafe.cas.pack import prepare_compressed, stored_body
from pointsafe.cas.agent_rows import IdMap
from pointsafe.cas.tree import decode_tree, tree_pages

from . import agents, protocol
from .agents import Agent

# The fields of a point record an agent may send (everything else is the server's or refused).
POINT_FIELDS = ("name", "kind", "source", "host", "started", "finished", "size", "root_meta", "stats", "labels",
                "warnings", "snapshot", "block_size", "source_stat", "consistency", "change_source", "qemu_bitmap",
                "source_format", "walk")
MAX_WARNINGS = 1000
MAX_EXCLUDES = 10_000   # of a point's ``walk``


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _time(v: Any) -> bool:
    if not isinstance(v, str) or len(v) > 64:
        return False
    try:
        parse_utc(v)
    except ValueError:
        return False
    return True


def _hex(v: Any) -> bool:
    try:
        bytes.fromhex(v)
    except (TypeError, ValueError):
        return False
    return True


def _root_meta(v: Any) -> bool:
    if not isinstance(v, dict) or set(v) - {"mode", "uid", "gid", "mtime_ns", "atime_ns", "xattrs"}:
        return False
    xattrs = v.get("xattrs", [])
    return (all(_int(x) for k, x in v.items() if k != "xattrs") and isinstance(xattrs, list)
            and all(isinstance(p, list) and len(p) == 2 and all(_hex(h) for h in p) for p in xattrs))


def _warnings(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(w, dict) and set(w) == {"path", "message"}
                                       and all(isinstance(x, str) for x in w.values()) for w in v)


def _snapshot(v: Any) -> bool:
    """The ``snapshot`` record a local backup writes (ingest.backup ``_Freeze.record``)."""
    if v == "none":
        return True
    if not isinstance(v, dict) or not {"method", "taken_at", "held_s"} <= set(v) <= {"method", "taken_at", "held_s",
                                                                                   "path", "subvol"}:
        return False
    held = v["held_s"]
    path = v.get("path", "")
    return (v["method"] in ("btrfs", "lvm", "reflink") and _time(v["taken_at"]) and _subvol(v.get("subvol", {}))
            and isinstance(held, (int, float)) and not isinstance(held, bool) and math.isfinite(held) and held >= 0
            and isinstance(path, str) and len(path) <= 4096)


def _scalar(v: Any) -> bool:
    """A value of a database integration's record: a number, a boolean, null or a short string."""
    if isinstance(v, str):
        return len(v) <= 4096
    return v is None or isinstance(v, (bool, int)) or (isinstance(v, float) and math.isfinite(v))


def _consistency(v: Any) -> bool:
    """What the database integrations recorded (``consistency``: name -> {key: value}, the
    values scalars or lists of them, e.g. PostgreSQL's WAL file names), bounded in size."""
    return (isinstance(v, dict) and len(v) <= 64
            and all(isinstance(name, str) and len(name) <= 4096 and isinstance(info, dict) and len(info) <= 64
                    and all(isinstance(k, str) and len(k) <= 64
                            and (_scalar(x) or (isinstance(x, list) and len(x) <= 100_000 and all(map(_scalar, x))))
                            for k, x in info.items())
                    for name, info in v.items()))


def _change_source(v: Any) -> bool:
    """Where a point's changes came from (ingest.backup ``change_source``): a volume's changed
    blocks, or a btrfs tree's send stream."""
    fb = v.get("fallback") if isinstance(v, dict) else None
    return (isinstance(v, dict) and set(v) == {"kind", "detail", "fallback"}
            and v["kind"] in ("full", "ranges-file", "qemu-bitmap", "btrfs-send")
            and isinstance(v["detail"], str) and len(v["detail"]) <= 4096
            and (fb is None or (isinstance(fb, str) and len(fb) <= 4096)))


def _walk(v: Any) -> bool:
    """How a tree point was walked (ingest.changes.btrfs_plan ``walk_record``): what the next
    btrfs incremental compares its own settings with."""
    return (isinstance(v, dict) and set(v) == {"excludes", "one_file_system"}
            and isinstance(v["one_file_system"], bool) and isinstance(v["excludes"], list)
            and len(v["excludes"]) <= MAX_EXCLUDES
            and all(isinstance(x, str) and len(x) <= 4096 for x in v["excludes"]))


def _qemu_bitmap(v: Any) -> bool:
    """The dirty bitmap a qcow2 point started (ingest.changes.qemu_bitmap ``Rotation.record``)."""
    return (isinstance(v, dict) and set(v) == {"base", "name", "generation"} and _int(v["generation"])
            and all(isinstance(v[k], str) and len(v[k]) <= 1024 for k in ("base", "name")))


def _subvol(v: Any) -> bool:
    """A btrfs snapshot's identity (``snapshot.subvol``): {uuid, parent_uuid, ctransid}, or
    absent (``{}``)."""
    if v == {}:
        return True
    return (isinstance(v, dict) and set(v) == {"uuid", "parent_uuid", "ctransid"} and _int(v["ctransid"])
            and all(isinstance(v[k], str) and len(v[k]) <= 64 for k in ("uuid", "parent_uuid")))


# What each field of an agent's point record must be (what the commands that read points expect):
# field -> (check, what it must be, for the error).
FIELD_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "host": (lambda v: isinstance(v, str) and len(v) <= 255, "a string of at most 255 characters"),
    "started": (_time, "an ISO 8601 UTC time"),
    "finished": (_time, "an ISO 8601 UTC time"),
    "size": (lambda v: _int(v) and v >= 0, "a number of bytes"),
    "block_size": (_int, "an integer"),
    "root_meta": (_root_meta, "an object of mode, uid, gid, mtime_ns, atime_ns (integers) and xattrs ([[hex, hex], ...])"),
    "stats": (lambda v: isinstance(v, dict) and all(isinstance(k, str) and _int(x) for k, x in v.items()),
              "an object of integers"),
    "labels": (lambda v: isinstance(v, dict) and all(isinstance(x, str) for x in v.values()), "an object of strings"),
    "warnings": (_warnings, "a list of {path, message} strings"),
    "snapshot": (_snapshot, "\"none\" or an object of method (btrfs, lvm or reflink), taken_at (an ISO 8601 "
                 "UTC time), held_s (seconds, at least 0) and optionally path (a string) and subvol ({uuid, "
                 "parent_uuid, ctransid})"),
    "consistency": (_consistency, "an object of {name: {key: value}} (numbers, strings, booleans, null or lists "
                    "of them)"),
    "change_source": (_change_source, "an object of kind (full, ranges-file, qemu-bitmap or btrfs-send), detail "
                      "(a string) and fallback (a string or null)"),
    "qemu_bitmap": (_qemu_bitmap, "an object of base and name (strings) and generation (an integer)"),
    "source_format": (lambda v: v == "qcow2", "\"qcow2\""),
    "walk": (_walk, "an object of excludes (a list of strings) and one_file_system (a boolean)"),
    "source_stat": (lambda v: isinstance(v, list) and len(v) <= 8 and all(_int(x) for x in v), "a list of integers"),
}


def snapshot_id(safe_id: str, agent_id: str) -> str:
    """What an agent names its retained snapshots with (as a local backup uses the safe's id):
    stable for this safe and agent, and revealing neither (a hash of both)."""
    return hashlib.sha256(f"pointsafe snapshots\0{safe_id}\0{agent_id}".encode()).hexdigest()[:32]


class Refused(Exception):
    """A request the server does not carry out: ``status`` (HTTP) and a one-line message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class _Incoming:
    """A verified object of an upload, ready to store: its plain and safe ids, its safe-side
    children and raw bytes, the agent's zstd frame of those bytes (None when it sent them raw
    or they were rewritten), the agent's id rows, and the prepared record (None while the safe
    already holds it)."""

    plain: bytes
    key: bytes
    kind: int
    children: list[bytes]
    raw: bytes
    frame: bytes | memoryview | None
    rows: tuple[tuple[bytes, bytes], tuple[bytes, bytes]]    # its F- and R-row (IdMap.rows)
    prepared: Prepared | None = None


@dataclass
class _Batch:
    """The uploads appended to the writer since the last group commit: what their commit
    writes with the objects (id rows, the agents' counts), the bytes each agent adds, and,
    once committed, the outcome every upload of it answers with."""

    extras: list[Callable[[Any], None]] = field(default_factory=list)
    added: dict[str, int] = field(default_factory=dict)    # agent id -> bytes stored it adds
    done: bool = False
    error: BaseException | None = None

    def run(self, txn: Any) -> None:
        for e in self.extras:
            e(txn)


SESSION_IDLE = 300.0   # seconds after its last upload that an agent's backup counts as abandoned
RECOUNT_EVERY = 600.0  # seconds: before refusing an upload at an agent's hard quota, count again at most this often


class Service:
    """The served safe (open for writing), its writer and the lock that takes turns on it.

    The safe's writer lock is held from an agent's first upload to its commit (or SESSION_IDLE
    seconds without an upload), and while any other agent's backup is under way: what an agent
    uploaded is unreferenced until its point commits, and a gc must not reclaim it meanwhile. When
    no backup is under way the lock is released, so that gc, forget and local backups run on the
    server between them.

    Every upload's objects are committed before it is answered, in group commits: an upload
    appends its objects to the open :class:`_Batch` (``self.lock`` held for that), lets go of
    the lock, and takes it again to commit the batch unless another upload did already: one
    pack sync and one index transaction for every upload that appended meanwhile."""

    def __init__(self, safe: Safe, idle: float = SESSION_IDLE):
        self.safe = safe
        self.lock = threading.Lock()          # the writer: appending, committing, opening, closing
        self.batch = _Batch()
        self.w: Writer | None = None
        self.sessions: dict[str, float] = {}   # agent id -> last upload (monotonic), until its commit
        self.idle = idle
        self.recounted: dict[str, float] = {}   # agent id -> when its bytes stored were last counted again
        self.stopped = threading.Event()
        threading.Thread(target=self._reaper, name="pointsafe-serve-reaper", daemon=True).start()
        cfg = safe.config
        self.max_chunk = max(cfg.chunk_max, cfg.block_size)
        from pointsafe.ops import config, quota
        # the hard disk quota stops uploads as it stops a local backup (QuotaExceeded: 507)
        self.space_check = quota.guard(config.effective(config.load(safe.index)))

    # -- reading -------------------------------------------------------------------------

    def info(self, agent: Agent) -> dict[str, Any]:
        """What an agent needs to chunk as the safe does, what it may do, and its bytes stored
        and quotas (its own count only)."""
        cfg = self.safe.config
        return {"agent": agent.name, "can_restore": agent.can_restore, "sources": list(agent.sources),
                "chunk_min": cfg.chunk_min, "chunk_avg": cfg.chunk_avg, "chunk_max": cfg.chunk_max,
                "list_fanout": cfg.list_fanout, "block_size": cfg.block_size, "zstd_level": cfg.zstd_level,
                "max_body": protocol.MAX_BODY, "max_ids": protocol.MAX_IDS, "upload_bytes": protocol.UPLOAD_BYTES,
                "stored_bytes": agents.usage(self.safe, agent.id).bytes, "quota_soft": agent.quota_soft,
                "quota_hard": agent.quota_hard, "snapshot_id": snapshot_id(cfg.safe_id, agent.id),
                "cbt_full_every": self._setting("cbt.full_every")}

    def _setting(self, name: str) -> str:
        """The safe's setting ``name`` (ops/config.py; its default when unset)."""
        from pointsafe.ops import config
        return config.load(self.safe.index).get(name, config.DEFAULTS[name])

    def missing(self, agent: Agent, plains: list[bytes]) -> list[bytes]:
        """The ids of ``plains`` this agent has not uploaded (or whose objects gc removed since):
        another agent's objects read as missing too."""
        sids = IdMap(self.safe, agent.id).safe_ids(plains)
        return [p for p, s in zip(plains, sids) if s is None]

    def own_points(self, agent: Agent) -> list[Point]:
        """The agent's points, oldest first."""
        return [p for p in self.safe.points() if p.extra.get("agent_id") == agent.id]

    def points(self, agent: Agent) -> list[dict[str, Any]]:
        """The agent's points as it sees them: records whose ``root`` is its own id of the root."""
        own = self.own_points(agent)
        roots = IdMap(self.safe, agent.id).plain_ids([p.root for p in own if p.root is not None])
        by_sid = dict(zip([p.root for p in own if p.root is not None], roots))
        out = []
        for p in own:
            rec = p.to_record()
            plain = by_sid.get(p.root) if p.root is not None else None
            rec["root"] = plain.hex() if plain else None
            out.append(rec)
        return out

    def fetch(self, agent: Agent, plains: list[bytes]) -> bytes:
        """An object stream (protocol) of the objects ``plains`` names: chunks as stored (the
        agent's zstd frame, or raw; the agent decompresses and checks each against its id),
        nodes raw, with the agent's ids of their children. Refused 404 naming the first this
        agent does not own, 403 for a chunk when it may not restore. Stops before MAX_BODY
        bytes: the caller asks again for the rest."""
        ids = IdMap(self.safe, agent.id)
        sids = ids.safe_ids(plains)
        parts: list[bytes | bytearray | memoryview] = []
        size = 0
        for plain, sid in zip(plains, sids):
            e = self.safe.entry(sid) if sid is not None else None
            if sid is None or e is None:
                raise Refused(404, f"object {plain.hex()} is not in the safe")
            if e.kind == Kind.CHUNK and not agent.can_restore:
                raise Refused(403, f"agent {agent.name} may not read file contents (it was added without --can-restore)")
            if e.kind == Kind.CHUNK:
                codec, raw_len, body = self._stored(plain, sid, e)
            else:
                body = self._agent_node(ids, plain, self.safe.get(sid))
                codec, raw_len = protocol.CODEC_RAW, len(body)
            if parts and size + len(body) > protocol.MAX_BODY:
                break
            parts += protocol.encode(e.kind, plain, codec, raw_len, body)
            size += len(body) + protocol.REC.size
        return b"".join(parts)

    def _stored(self, plain: bytes, sid: bytes, e: ObjectEntry) -> tuple[int, int, bytes | memoryview]:
        """(codec, raw length, body) of a chunk as stored, opened but not decompressed; looked
        up again when a gc moved it meanwhile (as ``Safe.get`` does). Refused 404 when gc took it."""
        for _ in range(4):
            try:
                buf = self.safe.store.read(e.pack, e.offset, e.record_len)
                h, body = stored_body(buf, e.pack, e.offset, expect_key=sid, crypto=self.safe.crypto)
                return h.codec, h.raw_len, body
            except (FileNotFoundError, IntegrityError) as err:
                self.safe.store.forget(e.pack)
                moved = self.safe.entry(sid)
                if moved is None:
                    raise Refused(404, f"object {plain.hex()} is not in the safe") from None
                if (moved.pack, moved.offset) == (e.pack, e.offset):
                    if isinstance(err, IntegrityError):
                        raise
                    raise IntegrityError(f"object {sid.hex()[:12]}: pack {e.pack} is missing", e.pack, e.offset) from None
                e = moved
        raise IntegrityError(f"object {sid.hex()[:12]} keeps moving (a gc or defrag is rewriting its pack)")

    def _agent_node(self, ids: IdMap, plain: bytes, raw: bytes) -> bytes:
        children, payload = decode_node(raw)
        mine = ids.plain_ids(children)
        if any(c is None for c in mine):
            raise Refused(404, f"object {plain.hex()} is not in the safe")
        return encode_node([c for c in mine if c is not None], bytes(payload))

    # -- writing -------------------------------------------------------------------------

    def upload(self, agent: Agent, body: bytes) -> dict[str, int]:
        """Verify and store the objects of an upload body (protocol stream); all or nothing.
        Refused 400 for a malformed or truncated stream, 422 for an object whose content does
        not hash to its id or that names an object the agent has not uploaded."""
        try:
            recs = protocol.decode(body, protocol.MAX_OBJECT)
        except protocol.BadStream as e:
            raise Refused(400, f"malformed upload, nothing stored: {e}") from None
        ids = IdMap(self.safe, agent.id)
        incoming = self._verify(agent, ids, recs)
        self._presync()     # what others appended: the writer's own sync of the batch, if it makes one, is then short
        with self.lock:
            batch, stored, total = self._append(agent, incoming, ids)
        self._commit_batch(batch)
        self._quota_alerts(agent, total)
        return {"received": len(recs), **stored}

    def _verify(self, agent: Agent, ids: IdMap, recs: list[protocol.Record]) -> list[_Incoming]:
        """The upload's objects checked against their ids and ready to store: safe ids, the
        records of those the safe lacks, and the agent's id rows (all of it outside the lock)."""
        batch: dict[bytes, bytes] = {}     # plain -> safe id, of this upload's objects
        out = []
        crypto = self.safe.crypto
        for r in recs:
            if protocol.agent_id(r.kind, r.raw) != r.id:
                raise Refused(422, f"object {r.id.hex()}: its content does not hash to its id (forged or "
                                   "damaged); nothing stored")
            if r.kind == Kind.CHUNK:
                if len(r.raw) > self.max_chunk:
                    raise Refused(422, f"chunk {r.id.hex()}: {len(r.raw)} bytes, more than the safe's largest "
                                       f"chunk ({self.max_chunk}); nothing stored")
                children: list[bytes] = []
                raw = r.raw
            else:
                children, raw = self._safe_node(ids, batch, r)
            same = raw is r.raw or raw == r.raw     # a node of an encrypted safe is rewritten
            # a plain safe's id of unchanged bytes is the plain id just checked: no second hash
            sid = r.id if crypto is None and same else self.safe.object_key(r.kind, raw)
            batch[r.id] = sid
            out.append(_Incoming(r.id, sid, r.kind, children, raw, r.body if same else None, ids.rows(r.id, sid)))
        with self.safe.index.read() as t:      # what the safe holds already is not sealed again
            for inc in out:
                if self.safe.entry(inc.key, t) is None:
                    inc.prepared = self._prepare(inc)
        return out

    def _prepare(self, inc: _Incoming) -> Prepared:
        """The record of a verified object: the agent's zstd frame as it came (not compressed
        again), its raw bytes when it sent them raw (it found they do not compress at the safe's
        level), compressed here only when rewritten (a node's envelope in an encrypted safe)."""
        level, crypto = self.safe.config.zstd_level, self.safe.crypto
        if inc.frame is not None and level is not None and len(inc.frame) < len(inc.raw):
            return prepare_compressed(inc.kind, inc.frame, len(inc.raw), inc.key, crypto)
        rewritten = inc.kind != Kind.CHUNK and inc.frame is None
        return prepare(inc.kind, inc.raw, level if rewritten else None, key=inc.key, crypto=crypto)

    def _safe_node(self, ids: IdMap, batch: dict[bytes, bytes], r: protocol.Record) -> tuple[list[bytes], bytes]:
        """(safe-side children, safe-side raw bytes) of an uploaded node; Refused when it does
        not decode or names an object the agent does not own."""
        try:
            children, payload = decode_node(r.raw)
            if r.kind == Kind.TREE and tree_pages(r.raw) is None:
                decode_tree(r.raw)
            elif r.kind == Kind.LIST:
                decode_list(r.raw)
        except (ValueError, struct.error, IndexError, KeyError) as e:
            raise Refused(400, f"object {r.id.hex()}: not a valid {Kind(r.kind).name.lower()} node ({e}); "
                               "nothing stored") from None
        if len(set(children)) != len(children):
            raise Refused(400, f"object {r.id.hex()}: names a child twice; nothing stored")
        unknown = [c for c in children if c not in batch]
        found = dict(zip(unknown, ids.safe_ids(unknown))) if unknown else {}
        mapped = []
        for c in children:
            sid = batch.get(c) or found.get(c)
            if sid is None:
                raise Refused(422, f"object {r.id.hex()} names object {c.hex()}, which is not in the safe "
                                   "(upload it first); nothing stored")
            mapped.append(sid)
        return mapped, encode_node(mapped, bytes(payload))

    def _append(self, agent: Agent, incoming: list[_Incoming], ids: IdMap) -> tuple[_Batch, dict[str, int], int]:
        """Append the objects to the writer (self.lock held) and their id rows and the agent's
        count to the open batch; returns (the batch, counts, the agent's bytes stored once it
        commits). Refused 507 (nothing stored) beyond its hard quota."""
        b = self.batch
        idx = self.safe.index
        with idx.read() as t:
            # new to the agent (what 'missing' would name): counted toward its bytes stored, each once
            firsts = list({i.plain: i for i in incoming}.values())
            new = [i for i in firsts if not ids.holds(t, i.rows[0][0], i.key)]
            added = 0
            for i in new:
                e = None if i.prepared is not None else self.safe.entry(i.key, t)
                if e is None and i.prepared is None:    # gc removed it since _verify
                    i.prepared = self._prepare(i)
                added += e.stored_len if e is not None else len(i.prepared.stored)  # type: ignore[union-attr]
        # what its uploads in the open batch add counts too (it is committed with this one)
        total = self._check_hard_quota(agent, added + b.added.get(agent.id, 0))
        w = self._writer()
        self.sessions[agent.id] = time.monotonic()
        stored = 0
        try:
            pending, objects = w.pending, idx.db["objects"]
            with idx.read() as t:
                for inc in incoming:
                    if inc.key not in pending and t.get(inc.key, db=objects) is None:
                        # not prepared: the safe held it at _verify, and a gc has removed it since
                        w.put_prepared(inc.prepared or self._prepare(inc), inc.children, checked=True)
                        stored += 1
        except BaseException:
            self._abort_batch()
            raise
        b.extras.append(ids.writer([row for inc in incoming for row in inc.rows]))
        b.extras.append(agents.usage_adder(self.safe, agent.id, added, len(new)))
        b.added[agent.id] = b.added.get(agent.id, 0) + added
        return b, {"stored": stored, "counted_bytes": added}, total

    def _commit_batch(self, b: _Batch) -> None:
        """Return once batch ``b`` is committed (committing it, and whatever else was appended
        meanwhile, unless another upload did); raises what its commit raised."""
        if not b.done:
            self._presync()
            with self.lock:
                if not b.done:      # then it is the open batch (only a flush or an abort ends one)
                    self._flush_batch()
        if b.error is not None:
            raise b.error

    def _presync(self) -> None:
        """Write what the open pack file holds to disk without the lock, while other uploads go
        on appending: the commit's own sync (under the lock) then finds little left to write.
        Only a hint -- the commit syncs as always -- so a pack closed or not local meanwhile is
        no error. Under eight agents the sync under the lock was a third of the time it was held."""
        f = getattr(getattr(getattr(self.w, "packs", None), "sink", None), "f", None)
        try:
            os.fdatasync(f.fileno())   # type: ignore[union-attr]
        except (AttributeError, OSError, ValueError):
            pass

    def _flush_batch(self) -> None:
        """Commit the open batch (self.lock held): the objects appended, their rows and counts,
        in one index transaction; on failure every upload of it fails and the writer closes."""
        b, self.batch = self.batch, _Batch()
        try:
            if b.extras:
                assert self.w is not None   # appending opened it, and only flushing or aborting closes it
                self.w.flush(extra=b.run)
        except BaseException as e:
            b.error = e
            self._drop_writer(abort=True)
            raise
        finally:
            b.done = True       # last: an upload that finds its batch done without the lock may answer

    def _abort_batch(self) -> None:
        """Drop the writer and what it holds uncommitted (self.lock held): the uploads of the
        open batch fail, nothing of them stored."""
        b, self.batch = self.batch, _Batch()
        b.done = True
        b.error = Refused(503, "the server dropped this upload (another upload in the same commit failed); "
                               "nothing stored, send it again")
        w, self.w = self.w, None
        if w is not None:
            w.abort()

    def _check_hard_quota(self, agent: Agent, added: int) -> int:
        """The agent's bytes stored once ``added`` more are; Refused 507 when that crosses its
        hard quota (counted again first, at most every RECOUNT_EVERY seconds: gc may have
        removed what the count still holds)."""
        total = agents.usage(self.safe, agent.id).bytes + added
        hard = agent.quota_hard
        if hard is None or added == 0 or total <= hard:
            return total
        if time.monotonic() - self.recounted.get(agent.id, -RECOUNT_EVERY) >= RECOUNT_EVERY:
            self.recounted[agent.id] = time.monotonic()
            total = agents.recount(self.safe, [agent.id])[agent.id].bytes + added
            if total <= hard:
                return total
        from pointsafe.ops import alerts
        from pointsafe.ops.quota import human_bytes
        msg = (f"agent {agent.name} would store {human_bytes(total)}, over its hard quota of {human_bytes(hard)}; "
               "upload refused, nothing stored and no point made")
        alerts.agent_quota(self.safe.index, agent.id, "hard", msg)
        raise Refused(507, msg)

    def _quota_alerts(self, agent: Agent, total: int) -> None:
        """After a stored upload: the soft quota's alert when ``total`` is over it (the backup
        goes on), and the hard quota's cleared."""
        from pointsafe.ops import alerts
        from pointsafe.ops.quota import human_bytes
        soft = agent.quota_soft
        if soft is not None and total > soft:
            alerts.agent_quota(self.safe.index, agent.id, "soft",
                               f"agent {agent.name} stores {human_bytes(total)}, over its soft quota of "
                               f"{human_bytes(soft)} (hard quota: "
                               f"{human_bytes(agent.quota_hard) if agent.quota_hard is not None else 'off'})")
        else:
            alerts.agent_quota(self.safe.index, agent.id, None)

    # -- the writer, held while agents' backups are under way -----------------------------

    def _writer(self) -> Writer:
        """The writer (self.lock held): the open one, or a new one (Refused 503 when another
        process holds the safe's lock: a gc, a local backup)."""
        if self.w is None:
            try:
                self.w = self.safe.writer("serve", space_check=self.space_check)
            except SafeLocked as e:
                raise Refused(503, f"the safe is busy, try again: {e}") from None
        return self.w

    def _drop_writer(self, abort: bool = False) -> None:
        """Close the writer (self.lock held), committing the open batch first; with ``abort``,
        abandon what is not committed (the open batch's uploads fail)."""
        if abort:
            self._abort_batch()
            return
        if self.batch.extras:
            self._flush_batch()
        w, self.w = self.w, None
        if w is not None:
            w.close()

    def _end_session(self, agent_id: str) -> None:
        """The agent committed (self.lock held): with no backup under way, release the safe."""
        self.sessions.pop(agent_id, None)
        if not self.sessions:
            self._drop_writer()

    def reap(self, now: float | None = None) -> None:
        """Forget backups idle for more than ``idle`` seconds (an agent that went away), and
        release the safe once none is under way."""
        now = time.monotonic() if now is None else now
        with self.lock:
            for aid, last in list(self.sessions.items()):
                if now - last > self.idle:
                    del self.sessions[aid]
            if not self.sessions:
                self._drop_writer()

    def _reaper(self) -> None:
        while not self.stopped.wait(min(5.0, self.idle / 2)):
            try:
                self.reap()
            except Exception:  # noqa: BLE001 - a failed close was already reported to its request
                pass

    def close(self) -> None:
        """Stop the reaper and release the safe."""
        self.stopped.set()
        with self.lock:
            self.sessions.clear()
            self._drop_writer()

    # -- administration (admin tokens) --------------------------------------------------

    def admin_agents(self) -> list[dict[str, Any]]:
        """Every agent as ``agent list --json`` shows it."""
        return agents.listing(self.safe)

    def admin_forget(self, body: Any) -> dict[str, Any]:
        """Forget the points ``body["points"]`` names (ids, id prefixes, NAME@latest: what
        ``pointsafe forget POINT...`` takes); the report ``forget --json`` prints. Refused 400
        for a bad body, 404 for a point that names none, 503 while agents' backups hold the safe."""
        from pointsafe.cas import PointNotFound, UsageError
        from pointsafe.gc.forget import forget, plan_forget
        specs = body.get("points") if isinstance(body, dict) else None
        if (not isinstance(specs, list) or not specs or len(specs) > protocol.MAX_IDS
                or not all(isinstance(x, str) and 0 < len(x) <= 256 for x in specs)):
            raise Refused(400, f"give {{\"points\": [POINT, ...]}} (1 to {protocol.MAX_IDS} point ids or names)")
        with self.lock:
            if self.sessions:
                raise Refused(503, "agents' backups are under way (they hold the safe); try again")
            self._drop_writer()
            try:
                return forget(self.safe, plan_forget(self.safe, specs)).as_dict()
            except PointNotFound as e:
                raise Refused(404, str(e)) from None
            except UsageError as e:
                raise Refused(400, str(e)) from None
            except SafeLocked as e:
                raise Refused(503, f"the safe is busy, try again: {e}") from None

    def commit(self, agent: Agent, body: Any) -> dict[str, Any]:
        """Commit a point of the agent from its record (``body``: a JSON object with POINT_FIELDS
        and ``root``, the agent's id of the root); returns the point as :meth:`points` shows it.
        One index transaction: the point is there whole or not at all."""
        rec, root_plain = self._point_record(agent, body)
        sid = None
        if root_plain is not None:
            sid = IdMap(self.safe, agent.id).safe_ids([root_plain])[0]
            if sid is None:
                raise Refused(409, f"the point's root {root_plain.hex()} is not in the safe (upload it first); "
                                   "no point made")
        with self.lock:
            w = self._writer()
            try:
                if self.batch.extras:   # the point's commit would commit their objects without their rows
                    self._flush_batch()
                    w = self._writer()
                p = w.add_point(rec, sid)
            except BaseException:
                self._drop_writer(abort=True)
                raise
            self._end_session(agent.id)
        out = p.to_record()
        out["root"] = root_plain.hex() if root_plain is not None else None
        return out

    def _point_record(self, agent: Agent, body: Any) -> tuple[dict[str, Any], bytes | None]:
        if not isinstance(body, dict):
            raise Refused(400, "the point must be a JSON object")
        unknown = sorted(set(body) - set(POINT_FIELDS) - {"root"})
        if unknown:
            raise Refused(400, f"unknown point field {unknown[0]!r}; no point made")
        name, source = body.get("name"), body.get("source")
        problem = protocol.point_name_problem(name)
        if problem is not None:
            raise Refused(400, problem)
        if not isinstance(source, str) or not source.startswith("/") or os.path.normpath(source) != source:
            raise Refused(400, f"bad source {str(source)[:80]!r}: an absolute, normal path")
        if not agent.may_back_up(source):
            raise Refused(403, f"agent {agent.name} may not back up {source} (its sources: "
                               f"{', '.join(agent.sources)})")
        if body.get("kind") not in ("tree", "volume"):
            raise Refused(400, "a point's kind is 'tree' or 'volume'")
        if body.get("kind") == "volume" and body.get("block_size") != self.safe.config.block_size:
            raise Refused(400, f"a volume point's block_size must be the safe's ({self.safe.config.block_size})")
        root = body.get("root")
        try:
            root_plain = protocol.parse_ids([root], "root")[0] if root is not None else None
        except ValueError as e:
            raise Refused(400, str(e)) from None
        for k, (ok, what) in FIELD_CHECKS.items():
            if k in body and not ok(body[k]):
                raise Refused(400, f"point field {k!r} must be {what}; no point made")
        rec = {k: body[k] for k in POINT_FIELDS if k in body}
        rec["warnings"] = list(rec.get("warnings") or [])[:MAX_WARNINGS]
        rec["agent"], rec["agent_id"] = agent.name, agent.id
        json.dumps(rec)
        return rec, root_plain

