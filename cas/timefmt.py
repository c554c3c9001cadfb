"""The one UTC time codec: how every room writes, reads and compares stored times.

Stored times (point records, the header's ``created``, task records) are ISO 8601 UTC text with
microseconds and a ``Z``: ``2026-11-25T14:36:24.123456Z`` (:data:`FORMAT`). Written this way
they sort as text in time order; readers still parse them (:func:`parse_utc`) rather than
compare text, so that a record written with another precision or an offset orders correctly.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"
SECONDS_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)


def as_utc(dt: datetime) -> datetime:
    """``dt`` in UTC; a naive datetime is taken to be UTC already (never local time)."""
    if dt.tzinfo is None:
        return dt.replace(tzinfo=UTC)
    return dt.astimezone(UTC)


def format_utc(dt: datetime) -> str:
    """``dt`` as stored: ``2026-11-25T14:36:24.123456Z`` (UTC, microseconds, ``Z``)."""
    return as_utc(dt).strftime(FORMAT)


def format_utc_seconds(dt: datetime) -> str:
    """``dt`` to the second, for names people read: ``2026-11-25T14:36:24Z``."""
    return as_utc(dt).strftime(SECONDS_FORMAT)


def parse_utc(text: str) -> datetime:
    """An ISO 8601 time (``...Z``, ``+hh:mm``, or without zone meaning UTC) as an aware UTC
    datetime; ValueError when ``text`` is not one."""
    t = text.strip()
    if t.endswith(("Z", "z")):
        t = t[:-1] + "+00:00"
    return as_utc(datetime.fromisoformat(t))


def utc_now() -> datetime:
    """The current time, aware, in UTC."""
    return datetime.now(UTC)


def utc_now_iso() -> str:
    """The current time as stored (:func:`format_utc`)."""
    return format_utc(utc_now())


def to_ns(dt: datetime) -> int:
    """Nanoseconds since the Unix epoch, exact (no float rounding)."""
    return (as_utc(dt) - EPOCH) // _US * 1000


def from_ns(ns: int) -> datetime:
    """The aware UTC datetime of ``ns`` nanoseconds since the epoch (to the microsecond)."""
    return EPOCH + timedelta(microseconds=ns // 1000)


def parse_utc_ns(text: str | None, default: int = 0) -> int:
    """:func:`parse_utc` as nanoseconds since the epoch; ``default`` for None, "" or text
    that is not a time (a reader of a damaged record shows *a* time, never fails)."""
    if not text:
        return default
    try:
        return to_ns(parse_utc(text))
    except (ValueError, TypeError, OverflowError):
        return default


__all__ = [
    "EPOCH",
    "FORMAT",
    "SECONDS_FORMAT",
    "as_utc",
    "format_utc",
    "format_utc_seconds",
    "from_ns",
    "parse_utc",
    "parse_utc_ns",
    "to_ns",
    "utc_now",
    "utc_now_iso",
]
