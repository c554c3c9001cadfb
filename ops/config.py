"""Per-safe settings kept in the safe's index (the header file is immutable).

Settings, their defaults, and what they mean:

=====================  ==========  ==========================================================
``quota.soft``         ``20%``     raise an alert when the safe's filesystem has less free space
``quota.hard``         ``10%``     refuse to start or continue a backup below this free space
``interval.default``   ``36h``     a source whose newest point is older than this is stale
``interval.NAME``      (default)   the same for the source NAME (``off`` never alerts)
``smtp.host``          (none)      the mail server of ``pointsafe report``
``smtp.port``          ``25``      (465 with ``smtp.security ssl``)
``smtp.security``      ``none``    ``none``, ``starttls`` or ``ssl``
``smtp.user``          (none)      log in with this user and ``smtp.password``
``smtp.password``      (none)
``smtp.from``          pointsafe@HOST
``smtp.to``            (none)      comma-separated recipients
=====================  ==========  ==========================================================

Quotas are a percentage of the filesystem (``15%``), an amount of free space (``5G``), or
``off``. The default interval, 36 hours, suits daily backups: a missed run is reported half
a day after it should have happened, a late one is not.
"""

from __future__ import annotations

import json
import os
import re
import socket

from pointsafe.cas import UsageError

from .clock import parse_duration
from .db import OpsTable, ensure_tables

DEFAULTS = {
    "quota.soft": "20%",
    "quota.hard": "10%",
    "interval.default": "36h",
    "smtp.port": "",
    "smtp.security": "none",
    "cbt.full_every": "30d",
}
_SIMPLE = ("quota.soft", "quota.hard", "interval.default", "smtp.host", "smtp.port", "smtp.security",
           "smtp.user", "smtp.password", "smtp.from", "smtp.to", "cbt.full_every")
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?", re.I)


def check_key(name: str) -> str:
    """``name`` without surrounding blanks, if it is a known setting (or interval.NAME); else UsageError."""
    name = name.strip()
    if name not in _SIMPLE and not (name.startswith("interval.") and len(name) > len("interval.")):
        raise UsageError(f"unknown setting {name!r}: known are {', '.join(_SIMPLE)} and interval.NAME")
    return name


def check(name: str, value: str) -> str:
    """Validate a setting; returns its normalised value or raises UsageError (one line)."""
    name = check_key(name)
    value = value.strip()
    if name.startswith("quota."):
        parse_quota(value, name)
    elif name.startswith("interval.") or name == "cbt.full_every":
        if value.lower() != "off":
            parse_duration(value)
    elif name == "smtp.port":
        if not value.isdigit() or not 0 < int(value) < 65536:
            raise UsageError(f"bad smtp.port {value!r}: use a TCP port number")
    elif name == "smtp.security":
        if value.lower() not in ("none", "starttls", "ssl"):
            raise UsageError(f"bad smtp.security {value!r}: use none, starttls or ssl")
        value = value.lower()
    return value


def parse_quota(value: str, name: str = "quota") -> tuple[str, float] | None:
    """``("percent", 15.0)``, ``("bytes", 5 GiB)`` or None for ``off``."""
    v = value.strip().lower()
    if v in ("off", "none", "0", "0%"):
        return None
    if v.endswith("%"):
        try:
            pct = float(v[:-1])
        except ValueError:
            pct = -1
        if not 0 <= pct < 100:
            raise UsageError(f"bad {name} {value!r}: use a percentage below 100 (e.g. 15%), a size (5G) or off")
        return ("percent", pct)
    m = _SIZE.fullmatch(v)
    if not m:
        raise UsageError(f"bad {name} {value!r}: use a percentage (15%), a size of free space (5G) or off")
    mult = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[m.group(2).lower()]
    return ("bytes", float(m.group(1)) * mult)


def load(index) -> dict[str, str]:
    """The settings stored in the safe (no defaults)."""
    table = ensure_tables(index)["config"]
    with index.read() as t:
        if table.crypto is None:
            return {k.decode(): v.decode() for k, v in table.items(t)}
        return dict(json.loads(v) for _, v in table.items(t))


def put(table: OpsTable, txn, name: str, value: str) -> None:
    """Store setting ``name`` = ``value`` (unchecked) in the write transaction ``txn`` of the
    ``config`` table: the text under the name, or on an encrypted safe ``[name, value]`` sealed
    under the name's hash."""
    data = value.encode() if table.crypto is None else json.dumps([name, value]).encode()
    table.put(txn, table.row(name), data)


DEFAULT_ENV = {"quota.soft": "POINTSAFE_DEFAULT_QUOTA_SOFT", "quota.hard": "POINTSAFE_DEFAULT_QUOTA_HARD"}


def defaults() -> dict[str, str]:
    """:data:`DEFAULTS`, with the quota defaults taken from $POINTSAFE_DEFAULT_QUOTA_SOFT and
    $POINTSAFE_DEFAULT_QUOTA_HARD when set (e.g. ``off`` or ``5%``): for machines whose disk is
    fuller than 20% by design, such as a test machine; a safe's own setting still wins.
    UsageError (one line) for a value that is not a quota."""
    out = dict(DEFAULTS)
    for name, var in DEFAULT_ENV.items():
        v = os.environ.get(var)
        if v is not None and v.strip():
            parse_quota(v.strip(), var)
            out[name] = v.strip()
    return out


def effective(stored: dict[str, str]) -> dict[str, str]:
    """Stored settings over the defaults."""
    out = defaults()
    out["smtp.from"] = f"pointsafe@{socket.getfqdn()}"
    out.update(stored)
    if not out.get("smtp.port"):
        out["smtp.port"] = "465" if out.get("smtp.security") == "ssl" else "25"
    return out


def interval_for(settings: dict[str, str], name: str) -> float | None:
    """Seconds a source may go without a new point, or None (``off``)."""
    v = settings.get(f"interval.{name}", settings.get("interval.default", DEFAULTS["interval.default"]))
    return None if v.strip().lower() == "off" else parse_duration(v)


def full_read_due(settings: dict[str, str], last_full: str | None, now_iso: str) -> bool:
    """Whether a changed-block backup should read its source whole instead: ``cbt.full_every``
    (a duration, or ``off``) has passed since ``last_full`` (ISO time of the last full read of
    that source; None: never, so due)."""
    v = settings.get("cbt.full_every", DEFAULTS["cbt.full_every"]).strip().lower()
    if v == "off":
        return False
    if last_full is None:
        return True
    from datetime import datetime
    t0 = datetime.fromisoformat(last_full.replace("Z", "+00:00"))
    t1 = datetime.fromisoformat(now_iso.replace("Z", "+00:00"))
    return (t1 - t0).total_seconds() >= parse_duration(v)


def set_value(index, name: str, value: str) -> str:
    """Store setting ``name`` as ``value`` once checked (UsageError when invalid); returns the value stored."""
    value = check(name, value)
    table = ensure_tables(index)["config"]
    with index.write() as t:
        put(table, t, name.strip(), value)
    return value


def unset(index, name: str) -> bool:
    """Remove setting ``name`` (back to its default); True if it was set."""
    table = ensure_tables(index)["config"]
    with index.write() as t:
        return table.delete(t, table.row(name.strip()))
