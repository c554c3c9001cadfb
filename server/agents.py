"""Agents: who may back up into the served safe, and the hashes of their tokens.

An agent record is JSON in the index table ``agents`` (row: the agent's name, UTF-8), sealed
with the safe's index key when the safe is encrypted (``Safe.seal_value``)::

    {"name", "id" (32 hex digits, drawn at 'agent add': its points and objects are tied to it,
     not to the name), "sources" (absolute paths the agent may back up; [] for any),
     "can_restore" (bool), "created", "rotated" (ISO UTC), "token_sha256" (hex)}

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
from dataclasses import dataclass, field

from pointsafe.cas import Safe, UsageError, utc_now_iso

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

    def to_record(self, with_hash: bool = True) -> dict:
        """The record as JSON-able dict (without the token hash unless ``with_hash``)."""
        rec = {"name": self.name, "id": self.id, "sources": list(self.sources), "can_restore": self.can_restore,
               "created": self.created, "rotated": self.rotated}
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


def add(safe: Safe, name: str, sources: list[str], can_restore: bool) -> tuple[Agent, str]:
    """Add agent ``name``; returns (its record, its token). UsageError when it exists."""
    check_name(name)
    if get(safe, name) is not None:
        raise UsageError(f"agent {name!r} exists already ('pointsafe agent rotate {name}' gives it a new token)")
    token = _new_token()
    now = utc_now_iso()
    a = Agent(name, secrets.token_hex(16), _sources(sources), can_restore, now, now, token_hash(token))
    _put(safe, a)
    return a, token


def rotate(safe: Safe, name: str) -> tuple[Agent, str]:
    """Give agent ``name`` a new token (the old one stops working at once); UsageError when
    there is no such agent."""
    a = need(safe, name)
    token = _new_token()
    a = Agent(a.name, a.id, a.sources, a.can_restore, a.created, utc_now_iso(), token_hash(token))
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
                 rec.get("created", ""), rec.get("rotated", ""), rec.get("token_sha256", ""))


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
