"""The web login: one password per safe, sessions in signed cookies, CSRF tokens.

The password is kept as an Argon2id hash (argon2-cffi's PasswordHasher, its default cost) in
the safe's ``config`` table under ``state.web_password`` (the ``state.`` keys are hidden from
``pointsafe config``, as the report's ``state.report_last`` is). It travels with the safe
(repair carries the ops tables over) and never leaves the index as plain text.

A session is a random id kept in this process's memory; the cookie holds that id signed with
a key drawn at start (itsdangerous), so a tampered cookie is refused, a server restart ends
every session, logging out ends one at once (a copy of the cookie no longer works), and
changing the password ends all of them (a session remembers the hash it was opened under).
Each session has its own CSRF token, which every POST form must carry.
"""

from __future__ import annotations

import hmac
import json
import secrets
import threading
import time
from dataclasses import dataclass

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from itsdangerous import BadSignature, TimestampSigner

from pointsafe.cas import UsageError

PASSWORD_KEY = "state.web_password"
COOKIE = "pointsafe_session"
SESSION_SECONDS = 12 * 3600
MIN_PASSWORD = 8

_hasher = PasswordHasher()


def _table(index):
    """The ``config`` table as ops keeps it: on an encrypted safe its rows are keyed hashes and
    its values sealed (ops/config.py); a raw row there would make every reader of the settings
    fail."""
    from pointsafe.ops.db import ensure_tables
    return ensure_tables(index)["config"]   # opened before the transaction (LMDB)


def password_hash(index) -> str | None:
    """The stored Argon2id hash of the web password, or None when none is set."""
    table = _table(index)
    with index.read() as t:
        v = table.get(t, table.row(PASSWORD_KEY))
    if v is None:
        return None
    return v.decode() if table.crypto is None else json.loads(v)[1]


def set_password(index, password: str) -> None:
    """Store ``password`` (hashed with Argon2id) as the safe's web password, as ``pointsafe
    config`` stores a setting (sealed on an encrypted safe); UsageError when it is shorter than
    MIN_PASSWORD characters."""
    from pointsafe.ops.config import put
    if len(password) < MIN_PASSWORD:
        raise UsageError(f"the web password must have at least {MIN_PASSWORD} characters")
    h = _hasher.hash(password)
    table = _table(index)
    with index.write() as t:
        if table.crypto is not None:
            t.delete(PASSWORD_KEY.encode(), db=table.db)   # a raw row an earlier version left there
        put(table, t, PASSWORD_KEY, h)


def check_password(stored: str | None, password: str) -> bool:
    """True when ``password`` matches the stored hash (always False when none is stored)."""
    if not stored or not password:
        return False
    try:
        return _hasher.verify(stored, password)
    except (VerificationError, InvalidHashError):
        return False


@dataclass
class Session:
    """One logged-in browser: its id, CSRF token, start time and the hash it logged in under."""

    sid: str
    csrf: str
    created: float
    pw_hash: str


class Sessions:
    """The logged-in sessions of this server process, and the signer of their cookies."""

    def __init__(self, lifetime: float = SESSION_SECONDS) -> None:
        self._signer = TimestampSigner(secrets.token_bytes(32), salt="pointsafe-web-session")
        self._login_signer = TimestampSigner(secrets.token_bytes(32), salt="pointsafe-web-login")
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()
        self.lifetime = lifetime

    def open(self, pw_hash: str) -> tuple[str, Session]:
        """A new session; returns (cookie value, session)."""
        s = Session(secrets.token_urlsafe(32), secrets.token_urlsafe(32), time.time(), pw_hash)
        with self._lock:
            self._sessions[s.sid] = s
        return self._signer.sign(s.sid).decode(), s

    def find(self, cookie: str | None, pw_hash: str | None) -> Session | None:
        """The live session a cookie names: signed by this process, not expired, not logged
        out, opened under the current password hash; else None."""
        if not cookie or not pw_hash:
            return None
        try:
            sid = self._signer.unsign(cookie, max_age=int(self.lifetime)).decode()
        except (BadSignature, UnicodeDecodeError):
            return None
        with self._lock:
            s = self._sessions.get(sid)
        if s is None or not hmac.compare_digest(s.pw_hash, pw_hash):
            return None
        return s

    def close(self, sid: str) -> None:
        """End session ``sid`` (log out)."""
        with self._lock:
            self._sessions.pop(sid, None)

    def login_token(self) -> str:
        """A signed, short-lived token for the login form (a CSRF token before any session)."""
        return self._login_signer.sign(secrets.token_urlsafe(16)).decode()

    def check_login_token(self, token: str) -> bool:
        """True for a login token this process signed in the last hour."""
        try:
            self._login_signer.unsign(token, max_age=3600)
            return True
        except BadSignature:
            return False


def csrf_ok(session: Session, token: str | None) -> bool:
    """True when a form's token is the session's CSRF token."""
    return bool(token) and hmac.compare_digest(session.csrf.encode(), str(token).encode())
