"""The safe's rows about its agents' objects (issue 17): each agent's ids of the objects it
uploaded, and its count of bytes stored. They live in the safe's index beside the objects, and
what removes objects (gc) must keep them true in the same transaction, so they are the safe's
(cas), used by the server (server/agents.py, server/service.py) and by gc.

Each agent's ids: the plain ids it knows its objects by, and the safe's ids of the same objects.

An agent names an object by its plain BLAKE3 (``protocol.agent_id``); the safe by its own key
(keyed BLAKE3 when encrypted, the same plain BLAKE3 when not). The table ``agent_objects``
holds, for every object an agent uploaded, two rows::

    F-row  safe.object_key(POINT, b"psagent-f\\0" + agent.id + plain)  -> safe id   (sealed)
    R-row  safe.object_key(POINT, b"psagent-r\\0" + agent.id + safe id) -> plain     (sealed)

Rows are keyed hashes, so that the index, read without the key, cannot confirm that some known
content is in the safe (the reason object ids are keyed); the leading bytes make the hashed
input decode as a node of about 10^9 children, which no point node is, so a row can never equal
an object's key. An F-row is also the agent's right to the object: what it did not upload and
cannot reach from its own points has no row, and reads as missing. A row of an object gc
removed since is stale: :meth:`IdMap.safe_ids` checks the safe too.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from .index import ObjectEntry
from .keys import Kind

if TYPE_CHECKING:
    from .store import Safe

TABLE = "agent_objects"         # the F- and R-rows above
USAGE_TABLE = "agent_usage"    # agent id (hex) -> JSON {"bytes", "objects", "recounted"} (sealed)
_F = b"psagent-f\0"
_R = b"psagent-r\0"


class IdMap:
    """The id rows of one agent (``agent_id``: its record's id, hex) in the safe's index."""

    def __init__(self, safe: Safe, agent_id: str):
        self.safe = safe
        self.aid = bytes.fromhex(agent_id)
        self.db = safe.index.table(TABLE)
        self.tname = TABLE.encode()

    def _frow(self, plain: bytes) -> bytes:
        return self.safe.object_key(Kind.POINT, _F + self.aid + plain)

    def _rrow(self, sid: bytes) -> bytes:
        return self.safe.object_key(Kind.POINT, _R + self.aid + sid)

    def safe_ids(self, plains: list[bytes], present_only: bool = True) -> list[bytes | None]:
        """The safe id of each plain id this agent uploaded (None for the others, and with
        ``present_only`` for objects no longer in the safe)."""
        out: list[bytes | None] = []
        objects = self.safe.index.db["objects"]
        with self.safe.index.read() as t:
            for p in plains:
                row = self._frow(p)
                v = t.get(row, db=self.db)
                sid = self.safe.open_value(self.tname, row, v) if v is not None else None
                if sid is not None and present_only and t.get(sid, db=objects) is None:
                    sid = None
                out.append(sid)
        return out

    def plain_ids(self, sids: list[bytes]) -> list[bytes | None]:
        """The plain id of each safe id, for this agent (None where it has none)."""
        out: list[bytes | None] = []
        with self.safe.index.read() as t:
            for s in sids:
                row = self._rrow(s)
                v = t.get(row, db=self.db)
                out.append(self.safe.open_value(self.tname, row, v) if v is not None else None)
        return out

    def rows(self, plain: bytes, sid: bytes) -> tuple[tuple[bytes, bytes], tuple[bytes, bytes]]:
        """The F-row and R-row (key, sealed value) of the pair (plain, safe id): computed
        before they are written, outside the server's lock (two keyed hashes and two seals)."""
        f, r = self._frow(plain), self._rrow(sid)
        return (f, self.safe.seal_value(self.tname, f, sid)), (r, self.safe.seal_value(self.tname, r, plain))

    def holds(self, txn: Any, frow: bytes, sid: bytes) -> bool:
        """True when this agent has the F-row ``frow`` (of the plain id of ``sid``) and the
        safe holds ``sid``: a row names one safe id only (that of the content the plain id
        hashes), so no need to open it."""
        return txn.get(frow, db=self.db) is not None and txn.get(sid, db=self.safe.index.db["objects"]) is not None

    def writer(self, rows: list[tuple[bytes, bytes]]) -> Callable[[Any], None]:
        """A function ``txn -> None`` that writes ``rows`` (of :meth:`rows`) in a write
        transaction (``Writer.flush(extra=...)``: in the one that commits the objects)."""
        def put(txn: Any) -> None:
            for k, v in rows:
                txn.put(k, v, db=self.db)
        return put


@dataclass(frozen=True)
class Usage:
    """What an agent stores: ``bytes`` (stored, i.e. compressed and sealed, bytes of its
    objects) in ``objects`` objects; ``recounted``: when last counted in full (ISO UTC, or "")."""

    bytes: int = 0
    objects: int = 0
    recounted: str = ""


def usage_value(safe: Safe, row: bytes, stored: bytes | None) -> Usage:
    if stored is None:
        return Usage()
    rec = json.loads(safe.open_value(USAGE_TABLE.encode(), row, stored))
    return Usage(int(rec.get("bytes", 0)), int(rec.get("objects", 0)), rec.get("recounted") or "")


def usage_put(safe: Safe, txn: Any, db: Any, row: bytes, u: Usage) -> None:
    value = json.dumps({"bytes": u.bytes, "objects": u.objects, "recounted": u.recounted}, sort_keys=True).encode()
    txn.put(row, safe.seal_value(USAGE_TABLE.encode(), row, value), db=db)


def dropped_objects(safe: Safe) -> Callable[[Any, list[tuple[bytes, ObjectEntry]]], None] | None:
    """For gc (``cas.relocate.drop_dead``'s ``on_drop``): a function ``(txn, removed) -> None``
    that, in the transaction removing the objects ``removed`` ((safe id, entry) pairs), takes
    them off the count of bytes stored of every agent that uploaded them and deletes those
    agents' id rows of them (F- and R-row), so that counts and quotas follow gc and the rows of
    objects gone do not pile up. None when the safe has no agents. Cost: a keyed hash and a
    lookup per removed object and agent (agents removed since included: their rows go too)."""
    db = safe.index.existing(USAGE_TABLE)
    ids_db = safe.index.existing(TABLE)
    if ids_db is None:
        return None
    if db is None:
        db = safe.index.table(USAGE_TABLE)
    with safe.index.read() as t:   # every agent that ever stored something has a count
        maps = [IdMap(safe, bytes(k).decode()) for k, _ in t.cursor(db=db)]
    tname = TABLE.encode()

    def drop(txn: Any, removed: list[tuple[bytes, ObjectEntry]]) -> None:
        for m in maps:
            nbytes = nobjects = 0
            for sid, e in removed:
                r = m._rrow(sid)   # noqa: SLF001 - the agent's R-row of sid
                v = txn.get(r, db=ids_db)
                if v is None:
                    continue
                plain = safe.open_value(tname, r, v)
                txn.delete(r, db=ids_db)
                txn.delete(m._frow(plain), db=ids_db)   # noqa: SLF001
                nbytes += e.stored_len
                nobjects += 1
            if nobjects:
                row = m.aid.hex().encode()
                u = usage_value(safe, row, txn.get(row, db=db))
                usage_put(safe, txn, db, row, replace(u, bytes=max(0, u.bytes - nbytes),
                                                       objects=max(0, u.objects - nobjects)))
    return drop
