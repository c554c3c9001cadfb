"""The recovery point as a typed, frozen value: what every room reads instead of a dict.

A point is stored as a JSON record (docs/FORMAT.md, "POINT payload"): the payload that its id
hashes, and the same object with ``"id"`` added in the ``points`` table. :class:`Point` is that
record, typed: :meth:`Point.from_record` reads one (tolerant: a missing field takes its
default, a field of the wrong type or a field this version does not know is kept in
``extra``) and :meth:`Point.to_record` gives back exactly the stored object, so that
``json.dumps(p.to_record(), sort_keys=True)`` is byte for byte the stored JSON.

Times stay the stored text (``started``, ``finished``: ISO UTC, see :mod:`.timefmt`): the
record round-trips unchanged whatever precision an older writer used; ``started_at``,
``finished_at`` and ``taken_ns`` parse them.

The one order of points is :attr:`Point.order_key`, (start time, id): :func:`newest_first`,
:func:`oldest_first` and :func:`latest` use it, and so does everything that says "latest".
The one way to see a tree point's top directory is :meth:`Point.root_entry`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from .keys import KEY_SIZE
from .timefmt import parse_utc, parse_utc_ns
from .tree import DIR, Entry

PointKind = Literal["tree", "volume"]
KINDS: tuple[str, ...] = ("tree", "volume")


_SCALARS = frozenset((str, int, float, bool, type(None)))


class Frozen(Mapping[str, Any]):
    """A read-only, hashable JSON object (nested objects are Frozen, arrays tuples)."""

    __slots__ = ("_d",)

    def __init__(self, items: Mapping[str, Any] | Iterable[tuple[str, Any]] = ()) -> None:
        d = items if type(items) is dict else dict(items)
        self._d: dict[str, Any] = {k: v if type(v) in _SCALARS else freeze(v) for k, v in d.items()}

    def __getitem__(self, key: str) -> Any:
        """The frozen value of ``key``; KeyError when absent."""
        return self._d[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._d)

    def __len__(self) -> int:
        return len(self._d)

    def __eq__(self, other: object) -> bool:
        """Equal to another Frozen of the same items, or to a mapping of the same JSON value
        (arrays compare equal as lists or tuples)."""
        if isinstance(other, Frozen):
            return self._d == other._d
        if isinstance(other, Mapping):
            return bool(self.thaw() == thaw(freeze(other)))
        return NotImplemented

    def __hash__(self) -> int:
        return hash(frozenset(self._d.items()))

    def __repr__(self) -> str:
        return f"Frozen({self._d!r})"

    def thaw(self) -> dict[str, Any]:
        """A plain, mutable dict copy (nested objects dicts, arrays lists): JSON as stored."""
        return {k: thaw(v) for k, v in self._d.items()}


EMPTY = Frozen()


def freeze(value: Any) -> Any:
    """A JSON value made immutable: objects become :class:`Frozen`, arrays tuples."""
    t = type(value)
    if t in _SCALARS or t is Frozen:
        return value
    if t is dict:
        return Frozen(value)
    if t is list or t is tuple:
        return tuple([freeze(v) for v in value])
    if isinstance(value, Mapping):
        return Frozen(value)
    return value


def thaw(value: Any) -> Any:
    """The inverse of :func:`freeze`: plain dicts and lists, ready for ``json.dumps``."""
    if isinstance(value, Frozen):
        return value.thaw()
    if isinstance(value, tuple):
        return [thaw(v) for v in value]
    return value


# -- field readers: (accepted, typed value) -------------------------------------------------

def _str(v: Any) -> tuple[bool, Any]:
    return isinstance(v, str), v


def _opt_str(v: Any) -> tuple[bool, Any]:
    return v is None or isinstance(v, str), v


def _int(v: Any) -> tuple[bool, Any]:
    return isinstance(v, int) and not isinstance(v, bool), v


def _root(v: Any) -> tuple[bool, Any]:
    if v is None:
        return True, None
    if isinstance(v, str) and len(v) == 2 * KEY_SIZE:
        try:
            return True, bytes.fromhex(v)
        except ValueError:
            pass
    return False, None


def _obj(v: Any) -> tuple[bool, Any]:
    return type(v) is dict or isinstance(v, Mapping), freeze(v)


def _opt_obj(v: Any) -> tuple[bool, Any]:
    return v is None or type(v) is dict or isinstance(v, Mapping), freeze(v)


def _opt_snapshot(v: Any) -> tuple[bool, Any]:
    return v == "none" or _opt_obj(v)[0], freeze(v)


def _array(v: Any) -> tuple[bool, Any]:
    return isinstance(v, (list, tuple)), freeze(v)


_FIELDS: dict[str, Callable[[Any], tuple[bool, Any]]] = {
    "id": _str, "name": _str, "kind": _str, "source": _str, "host": _str,
    "started": _str, "finished": _opt_str, "root": _root, "size": _int,
    "root_meta": _opt_obj, "snapshot": _opt_snapshot, "consistency": _opt_obj,
    "stats": _obj, "warnings": _array, "labels": _obj,
}


def _meta_int(m: Mapping[str, Any], key: str, default: int) -> int:
    v = m.get(key)
    return v if isinstance(v, int) and not isinstance(v, bool) else default


def _xattrs(pairs: Any) -> list[tuple[bytes, bytes]]:
    out = []
    for pair in pairs if isinstance(pairs, tuple) else ():
        try:
            n, v = pair
            out.append((bytes.fromhex(n), bytes.fromhex(v)))
        except (TypeError, ValueError):
            continue   # a damaged pair: shown without it rather than not at all
    return out


@dataclass(frozen=True, slots=True)
class Point:
    """One committed recovery point (docs/FORMAT.md "POINT payload"), immutable.

    ``kind`` is ``"tree"`` or ``"volume"`` (other text: a kind this version cannot read);
    ``started``/``finished`` are the stored ISO UTC text (``finished`` None when absent);
    ``root`` is the root key (None for an empty point); ``size`` the logical bytes;
    ``root_meta`` (tree points) the top directory's stored attributes, read through
    :meth:`root_entry`; ``stats``, ``labels``, ``consistency``, ``snapshot`` read-only JSON
    objects; ``warnings`` a tuple of ``{path, message}`` objects; ``extra`` every other field
    of the record, kept so that it round-trips.
    """

    id: str = ""
    name: str = ""
    kind: str = ""
    source: str = ""
    host: str = ""
    started: str = ""
    finished: str | None = None
    root: bytes | None = None
    size: int = 0
    root_meta: Frozen | None = None
    snapshot: Frozen | str | None = None    # {method, taken_at, held_s[, path]}, "none" (read live), None (older points)
    consistency: Frozen | None = None
    stats: Frozen = EMPTY
    warnings: tuple[Frozen, ...] = ()
    labels: Frozen = EMPTY
    extra: Frozen = EMPTY
    # The known keys the record held (None: built in code, every field that is not None).
    _keys: frozenset[str] | None = field(default=None, repr=False, compare=False)

    # -- the stored record ------------------------------------------------------------------

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> Point:
        """The point of a stored record (a dict as in the ``points`` table). Never fails on
        an older or unusual record: missing fields take their defaults, and a field of an
        unexpected type or unknown name is kept, unchanged, in ``extra``."""
        kw: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        for k, v in record.items():
            reader = _FIELDS.get(k)
            ok, val = reader(v) if reader is not None else (False, None)
            if ok:
                kw[k] = val
            else:
                extra[k] = v
        return cls(**kw, extra=Frozen(extra), _keys=frozenset(kw))

    @classmethod
    def from_json(cls, raw: bytes | str) -> Point:
        """The point of a ``points`` table value (UTF-8 JSON)."""
        return cls.from_record(json.loads(raw))

    def to_record(self) -> dict[str, Any]:
        """The record as stored: the same keys and values :meth:`from_record` was given
        (a fresh dict; ``json.dumps(..., sort_keys=True)`` gives the stored bytes)."""
        out: dict[str, Any] = {}
        for k in _FIELDS:
            v = getattr(self, k)
            if self._keys is not None:
                if k not in self._keys:
                    continue
            elif v is None and k != "root" or (k == "id" and not v):
                continue
            out[k] = v.hex() if k == "root" and v is not None else thaw(v)
        out.update(self.extra.thaw())
        return out

    def payload(self) -> bytes:
        """The POINT object's payload: the record without ``id``, sorted-key JSON (its
        BLAKE3 key is the point's id)."""
        rec = self.to_record()
        rec.pop("id", None)
        return json.dumps(rec, sort_keys=True).encode()

    # A point is a value, not a mapping: ``p["id"]`` is a TypeError (use the attributes, or
    # ``to_record()`` for the stored JSON).
    __iter__ = None

    # -- times and order --------------------------------------------------------------------

    @property
    def started_at(self) -> datetime | None:
        """``started`` as an aware UTC datetime; None when absent or not a time."""
        return _parse(self.started)

    @property
    def finished_at(self) -> datetime | None:
        """``finished`` as an aware UTC datetime; None when absent or not a time."""
        return _parse(self.finished)

    @property
    def taken(self) -> str | None:
        """When the point's data was complete, as stored: ``finished``, else ``started``."""
        return self.finished or self.started or None

    @property
    def taken_ns(self) -> int:
        """:attr:`taken` in ns since the epoch (0 when unknown): the times a mount shows."""
        return parse_utc_ns(self.taken)

    @property
    def order_key(self) -> tuple[int, str]:
        """The one order of points: start time (0 when unknown), then id. Larger is newer."""
        return parse_utc_ns(self.started), self.id

    # -- the top directory ------------------------------------------------------------------

    def root_entry(self, name: bytes = b"") -> Entry:
        """The top directory of a tree point as an Entry, the same for ``ls``, ``diff``,
        ``restore`` and the mount. Stored ``root_meta`` fields win; a missing one defaults to:
        mode 0o755, uid/gid 0, mtime the point's :attr:`taken` time, atime and ctime the
        mtime, 2 links. Mode is permission bits only."""
        m: Mapping[str, Any] = self.root_meta or EMPTY
        mt = _meta_int(m, "mtime_ns", self.taken_ns)
        return Entry(name, DIR, _meta_int(m, "mode", 0o755) & 0o7777, _meta_int(m, "uid", 0),
                     _meta_int(m, "gid", 0), mt, _meta_int(m, "atime_ns", mt), _meta_int(m, "ctime_ns", mt),
                     nlink=_meta_int(m, "nlink", 2), ref=self.root, xattrs=_xattrs(m.get("xattrs")))


def _parse(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        return parse_utc(text)
    except (ValueError, TypeError):
        return None


def oldest_first(points: Iterable[Point]) -> list[Point]:
    """``points`` in the one order (:attr:`Point.order_key`), oldest first."""
    return sorted(points, key=lambda p: p.order_key)


def newest_first(points: Iterable[Point]) -> list[Point]:
    """``points`` in the one order (:attr:`Point.order_key`), newest first."""
    return sorted(points, key=lambda p: p.order_key, reverse=True)


def latest(points: Iterable[Point]) -> Point | None:
    """The newest of ``points`` (:attr:`Point.order_key`), None when there are none."""
    return max(points, key=lambda p: p.order_key, default=None)


def latest_per(points: Iterable[Point], group: Callable[[Point], str]) -> dict[str, Point]:
    """The newest point of each group (``group(p)``, e.g. its name), in the one order."""
    best: dict[str, Point] = {}
    for p in points:
        g = group(p)
        cur = best.get(g)
        if cur is None or p.order_key > cur.order_key:
            best[g] = p
    return best


__all__ = [
    "KINDS",
    "Frozen",
    "Point",
    "PointKind",
    "freeze",
    "latest",
    "latest_per",
    "newest_first",
    "oldest_first",
    "thaw",
]
