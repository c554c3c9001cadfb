"""Agents: who may back up into the served safe, and the hashes of their tokens.

An agent record is JSON in the index table ``agents`` (row: the agent's name, UTF-8), sealed
with the safe's index key when the safe is encrypted (``Safe.seal_value``)::

    {"name", "id" (32 hex digits, drawn at 'agent add': its points and objects are tied to it,
     not to the name), "sources" (absolute paths the agent may back up; [] for any),
     "can_restore" (bool), "created", "rotated" (ISO UTC), "token_sha256" (hex),
     "quota_soft", "quota_hard" (bytes stored, or null: off), "admin" (bool: an admin token,
     which may call the admin routes and nothing else)}

What an agent stores is counted in the table ``agent_usage`` (row: the agent's id, hex;
value: sealed JSON ``{"bytes", "objects", "recounted"}``): see :func:`usage_adder`.

A token is 256 random bits; only its SHA-256 is stored (a slow password hash buys nothing
for a random secret of that size, and every request checks one), and it is printed once.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from pointsafe.cas import Safe, UsageError, utc_now_iso
from pointsafe.cas.index import ObjectEntry

from pointsafe.cas.agent_rows import TABLE as IDS_TABLE
from pointsafe.cas.agent_rows import USAGE_TABLE, IdMap, Usage
from pointsafe.cas.agent_rows import usage_put as _usage_put
from pointsafe.cas.agent_rows import usage_value as _usage_value

TABLE = "agents"
SEEN_TABLE = "agents_seen"     # agent id (hex) -> ISO UTC time of its last request (sealed)
TOKEN_PREFIX = "psa_"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass(frozen=True)
class Agent:
    """One agent's record (see the module docstring); ``to_record`` is its JSON."""

    name: str
    id: str
    sources: list[str] = field(default_factory=list)
    can_restore: bool = False
    created: str = ""
    rotated: str = ""
    token_sha256: str = ""
    quota_soft: int | None = None   # bytes stored beyond which an alert is raised (None: off)
    quota_hard: int | None = None   # bytes stored beyond which uploads are refused (None: off)
    admin: bool = False             # an admin token: the admin routes only, no backup or points

    def to_record(self, with_hash: bool = True) -> dict:
        """The record as JSON-able dict (without the token hash unless ``with_hash``)."""
        rec = {"name": self.name, "id": self.id, "sources": list(self.sources), "can_restore": self.can_restore,
               "created": self.created, "rotated": self.rotated, "quota_soft": self.quota_soft,
               "quota_hard": self.quota_hard, "admin": self.admin}
        if with_hash:
            rec["token_sha256"] = self.token_sha256
        return rec

    def may_back_up(self, source: str) -> bool:
        """True when ``source`` (an absolute path on the agent) is one of its sources or below one."""
        if not self.sources:
            return True
        return any(source == s or source.startswith(s.rstrip("/") + "/") for s in self.sources)


def token_hash(token: str) -> str:
    """The stored form of a token: its SHA-256, hex."""
    return hashlib.sha256(token.encode("utf-8", "replace")).hexdigest()


def check_name(name: str) -> str:
    """``name`` when it is a valid agent name (1-64 of letters, digits, '.', '_', '-', not
    starting with a punctuation mark); UsageError otherwise."""
    if not _NAME.fullmatch(name):
        raise UsageError(f"bad agent name {name!r}: use 1 to 64 letters, digits, '.', '_' or '-', "
                         "starting with a letter or digit")
    return name


def _sources(paths: list[str]) -> list[str]:
    out = []
    for p in paths:
        if not p.startswith("/"):
            raise UsageError(f"bad --sources path {p!r}: give absolute paths (as they are on the agent)")
        out.append(os.path.normpath(p))
    return out


def _put(safe: Safe, a: Agent) -> None:
    db = safe.index.table(TABLE)
    row = a.name.encode()
    with safe.index.write() as t:
        t.put(row, safe.seal_value(TABLE.encode(), row, json.dumps(a.to_record(), sort_keys=True).encode()), db=db)


def _new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def parse_quota(value: str, option: str) -> int | None:
    """The bytes a ``--quota-soft``/``--quota-hard`` value means (``10G``, ``500M``, ``off``:
    None); UsageError (one line) for anything else, a percentage too (of what?)."""
    from pointsafe.ops.config import parse_quota as parse
    wrong = f"bad {option} {value!r}: an agent's quota is an amount of bytes stored (e.g. 50G) or off"
    try:
        q = parse(value, option)
    except UsageError:
        raise UsageError(wrong) from None    # not the disk quota's words (they offer percentages)
    if q is not None and q[0] != "bytes":
        raise UsageError(wrong)
    return None if q is None else int(q[1])


def _check_quotas(a: Agent) -> Agent:
    if a.quota_soft is not None and a.quota_hard is not None and a.quota_soft > a.quota_hard:
        raise UsageError(f"agent {a.name}: the soft quota ({a.quota_soft} bytes) is above the hard one "
                         f"({a.quota_hard} bytes); give a soft quota below the hard one")
    return a


def add(safe: Safe, name: str, sources: list[str], can_restore: bool, quota_soft: int | None = None,
        quota_hard: int | None = None, admin: bool = False) -> tuple[Agent, str]:
    """Add agent ``name`` (with ``admin``: an admin token, which has no sources, rights to
    points or quotas); returns (its record, its token). UsageError when it exists, its soft
    quota is above its hard one, or an admin is given an agent's options."""
    check_name(name)
    if get(safe, name) is not None:
        raise UsageError(f"agent {name!r} exists already ('pointsafe agent rotate {name}' gives it a new token)")
    if admin and (sources or can_restore or quota_soft is not None or quota_hard is not None):
        raise UsageError("an admin token backs up nothing: give --admin without --sources, --can-restore or quotas")
    token = _new_token()
    now = utc_now_iso()
    a = _check_quotas(Agent(name, secrets.token_hex(16), _sources(sources), can_restore, now, now,
                            token_hash(token), quota_soft, quota_hard, admin))
    _put(safe, a)
    return a, token


def update(safe: Safe, name: str, changes: dict[str, Any]) -> Agent:
    """Change agent ``name``'s ``sources``, ``can_restore``, ``quota_soft`` or ``quota_hard``
    (the keys of ``changes``); returns the new record. Its token and id stay."""
    a = need(safe, name)
    if a.admin:
        raise UsageError(f"{name} is an admin token: it has no sources, rights or quotas to set")
    unknown = set(changes) - {"sources", "can_restore", "quota_soft", "quota_hard"}
    if unknown:
        raise ValueError(f"not a changeable field of an agent: {sorted(unknown)}")
    if "sources" in changes:
        changes = {**changes, "sources": _sources(changes["sources"])}
    a = _check_quotas(replace(a, **changes))
    _put(safe, a)
    return a


def rotate(safe: Safe, name: str) -> tuple[Agent, str]:
    """Give agent ``name`` a new token (the old one stops working at once); UsageError when
    there is no such agent."""
    a = need(safe, name)
    token = _new_token()
    a = replace(a, rotated=utc_now_iso(), token_sha256=token_hash(token))
    _put(safe, a)
    return a, token


def remove(safe: Safe, name: str) -> Agent:
    """Remove agent ``name`` (its token stops working; its points stay in the safe)."""
    a = need(safe, name)
    db = safe.index.table(TABLE)
    with safe.index.write() as t:
        t.delete(a.name.encode(), db=db)
    return a


def get(safe: Safe, name: str) -> Agent | None:
    """The agent called ``name``, or None."""
    db = safe.index.existing(TABLE)
    if db is None:
        return None
    row = name.encode()
    with safe.index.read() as t:
        v = t.get(row, db=db)
    return _agent(safe, row, v) if v is not None else None


def need(safe: Safe, name: str) -> Agent:
    """The agent called ``name``; UsageError when there is none."""
    a = get(safe, name)
    if a is None:
        raise UsageError(f"no agent {name!r} ('pointsafe agent list' shows them)")
    return a


def all_agents(safe: Safe) -> list[Agent]:
    """Every agent, by name."""
    db = safe.index.existing(TABLE)
    if db is None:
        return []
    with safe.index.read() as t:
        return [_agent(safe, bytes(k), v) for k, v in t.cursor(db=db)]


def by_token(safe: Safe, token: str) -> Agent | None:
    """The agent whose token is ``token``, or None (compared in constant time per agent)."""
    if not token.startswith(TOKEN_PREFIX):
        return None
    h = token_hash(token)
    found = None
    for a in all_agents(safe):
        if hmac.compare_digest(a.token_sha256, h):
            found = a
    return found


def _agent(safe: Safe, row: bytes, stored: bytes) -> Agent:
    rec = json.loads(safe.open_value(TABLE.encode(), row, stored))
    return Agent(rec["name"], rec["id"], list(rec.get("sources") or []), bool(rec.get("can_restore")),
                 rec.get("created", ""), rec.get("rotated", ""), rec.get("token_sha256", ""),
                 rec.get("quota_soft"), rec.get("quota_hard"), bool(rec.get("admin")))


def touch(safe: Safe, a: Agent) -> None:
    """Record now as the agent's last contact (``agents_seen``)."""
    db = safe.index.table(SEEN_TABLE)
    row = a.id.encode()
    with safe.index.write() as t:
        t.put(row, safe.seal_value(SEEN_TABLE.encode(), row, utc_now_iso().encode()), db=db)


def last_seen(safe: Safe) -> dict[str, str]:
    """The last contact of every agent that made a request, by agent id."""
    db = safe.index.existing(SEEN_TABLE)
    if db is None:
        return {}
    with safe.index.read() as t:
        return {bytes(k).decode(): safe.open_value(SEEN_TABLE.encode(), bytes(k), v).decode()
                for k, v in t.cursor(db=db)}


def listing(safe: Safe, recount_first: bool = False) -> list[dict[str, Any]]:
    """Every agent as ``agent list --json`` shows it: its record (no token hash), ``points``
    (how many), ``newest`` (``{id, name, taken}`` of its newest point, or None),
    ``last_contact`` (or None), ``stored_bytes`` and ``stored_objects`` (counted again first
    with ``recount_first``)."""
    all_ = all_agents(safe)
    if not all_:
        return []
    seen = last_seen(safe)
    use = recount(safe, [a.id for a in all_]) if recount_first else all_usage(safe)
    mine: dict[str, list] = {}
    for p in safe.points():
        aid = p.extra.get("agent_id")
        if isinstance(aid, str):
            mine.setdefault(aid, []).append(p)
    out = []
    for a in all_:
        ps, u = mine.get(a.id, []), use.get(a.id, Usage())
        newest = {"id": ps[-1].id, "name": ps[-1].name, "taken": ps[-1].taken} if ps else None
        out.append({**a.to_record(with_hash=False), "points": len(ps), "newest": newest,
                    "last_contact": seen.get(a.id), "stored_bytes": u.bytes, "stored_objects": u.objects})
    return out


# -- bytes stored ---------------------------------------------------------------------------

def usage(safe: Safe, agent_id: str) -> Usage:
    """The agent's count of bytes stored (one index read)."""
    db = safe.index.existing(USAGE_TABLE)
    if db is None:
        return Usage()
    row = agent_id.encode()
    with safe.index.read() as t:
        return _usage_value(safe, row, t.get(row, db=db))


def all_usage(safe: Safe) -> dict[str, Usage]:
    """Every agent's count, by agent id."""
    db = safe.index.existing(USAGE_TABLE)
    if db is None:
        return {}
    with safe.index.read() as t:
        return {bytes(k).decode(): _usage_value(safe, bytes(k), v) for k, v in t.cursor(db=db)}


def usage_adder(safe: Safe, agent_id: str, nbytes: int, objects: int) -> Callable[[Any], None]:
    """A function ``txn -> None`` adding ``nbytes`` in ``objects`` objects to the agent's count,
    for the write transaction that stores those objects and the agent's id rows
    (``Writer.flush(extra=...)``): the count and what it counts commit together."""
    db = safe.index.table(USAGE_TABLE)
    row = agent_id.encode()

    def add_to(txn: Any) -> None:
        u = _usage_value(safe, row, txn.get(row, db=db))
        _usage_put(safe, txn, db, row, replace(u, bytes=u.bytes + nbytes, objects=u.objects + objects))
    return add_to


def recount(safe: Safe, agent_ids: list[str]) -> dict[str, Usage]:
    """Count again, in full, what each agent stores: the stored bytes of every object in the
    safe for which the agent has an id row (objects gc removed no longer count). Reads every
    object's entry once (O(objects x agents) lookups); stores and returns the new counts.
    Uploads that commit meanwhile are kept: each count becomes the recount plus what was
    added since the snapshot it read."""
    db = safe.index.table(USAGE_TABLE)
    ids_db = safe.index.table(IDS_TABLE)
    maps = {aid: IdMap(safe, aid) for aid in agent_ids}
    found = {aid: [0, 0] for aid in agent_ids}
    with safe.index.read() as t:
        before = {aid: _usage_value(safe, aid.encode(), t.get(aid.encode(), db=db)) for aid in agent_ids}
        for key, value in t.cursor(db=safe.index.db["objects"]):
            sid = bytes(key)
            stored = None
            for aid, m in maps.items():
                if t.get(m._rrow(sid), db=ids_db) is not None:   # noqa: SLF001 - the agent's R-row of sid
                    stored = ObjectEntry.decode(bytes(value)).stored_len if stored is None else stored
                    found[aid][0] += stored
                    found[aid][1] += 1
    now = utc_now_iso()
    out = {}
    with safe.index.write() as t:
        for aid in agent_ids:
            row = aid.encode()
            cur = _usage_value(safe, row, t.get(row, db=db))
            u = Usage(found[aid][0] + cur.bytes - before[aid].bytes, found[aid][1] + cur.objects - before[aid].objects,
                      now)
            _usage_put(safe, t, db, row, u)
            out[aid] = u
    return out
