"""The ops tables in the safe's LMDB index, and short-lived access to them.

Tables (named LMDB databases beside the safe's own, see docs/FORMAT.md):

``tasks``          task id (u64 big-endian) -> task record, UTF-8 JSON
``tasks_running``  task id -> b"" for tasks still marked running (so that the abandoned-task
                   sweep reads a handful of keys, not the whole history)
``alerts``         alert id (u64 BE) -> alert record, UTF-8 JSON
``alert_latches``  condition key (ascii) -> alert id: a condition already alerted on; cleared
                   when the condition is seen clear, so that an acknowledged condition that
                   persists is not raised again and again
``config``         setting name (ascii) -> value (UTF-8 text); see ops/config.py
``task_facets``    facet name (``kind=backup``, ``src=www``...) -> {facet, n, count}, and the row
                   ``\x00meta`` -> {built, next}: the task history's index, ops/tasks.py
``task_index``     facet number n (u32 BE) + task id (u64 BE) -> b"": the tasks of each facet

On an encrypted safe (one with key slots) every value of these tables is sealed with the
safe's index key (``Crypto.seal_value(table, row, value)``: AEAD bound to the table name and
the row key, docs/FORMAT.md), and the rows of ``config`` and ``alert_latches``, whose keys are
names (``interval.NAME``, ``stale:NAME``), are keyed hashes of those names (the name itself is
inside the sealed value). Left plain, as they tell nothing about the data backed up: the row
keys of ``tasks``, ``tasks_running`` and ``alerts`` (sequence numbers: how many tasks and alerts
there were), the empty values of ``tasks_running``, the alert ids that ``alert_latches`` rows hold,
and every value's length. A plain safe keeps everything as above, in the clear. There is no
way to turn a plain safe into an encrypted one, so a table never mixes the two.

The key comes from the process that unlocked the safe: the CLI registers it with
:func:`use_crypto` when it unlocks (cli/password.py), and every :class:`OpsTable` of that
safe's index then seals and opens with it; an encrypted safe whose key was not registered is
refused rather than written in the clear.

Writes are single short LMDB write transactions. They do not take the safe's writer lock:
LMDB serialises writers across processes, so read-only commands (restore, verify) can record
their tasks while a backup runs.
"""

from __future__ import annotations

import json
import os
import struct
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from pointsafe.cas import SafeError
from pointsafe.cas.index import Index
from pointsafe.cas.point import Point
from pointsafe.cas.store import INDEX_DIR

OPS_TABLES = ("tasks", "tasks_running", "alerts", "alert_latches", "config")
HASHED_ROWS = ("config", "alert_latches", "task_facets")   # tables whose row keys are names (hashed when encrypted)
SEALED = ("tasks", "alerts", "config", "task_facets")      # tables whose values are sealed when encrypted
ROW_HASH_KIND = 0       # the kind byte of row-name hashes (0: no object kind, see cas/keys.py)
KEYS_DIR = "keys"

_crypto: dict[str, Any] = {}     # realpath of a safe's index folder -> its Crypto
INDEX_TABLES = ("task_facets", "task_index")   # made when first written (a read-only safe may lack them)


def is_encrypted(safe_dir: str | Path) -> bool:
    """Whether the safe at ``safe_dir`` is encrypted: it has key slots (``keys/``), or its header
    names an encryption (when every slot file was deleted). Reads only."""
    p = Path(safe_dir)
    if (p / KEYS_DIR).is_dir():
        return True
    from pointsafe.cas.header import inspect_header
    try:
        good = inspect_header(p).good
    except (SafeError, OSError):
        return False
    return good is not None and good.config is not None and good.config.encryption is not None


def use_crypto(safe_dir: str | Path, crypto: Any) -> None:
    """Seal and open the ops values of the safe at ``safe_dir`` with ``crypto`` (a
    ``pointsafe.cas.crypto.Crypto``) for the rest of this process."""
    _crypto[os.path.realpath(Path(safe_dir) / INDEX_DIR)] = crypto


def crypto_of(index: Index) -> Any:
    """The Crypto registered for ``index``'s safe, None for a plain safe; SafeError for an
    encrypted safe whose key this process has not unlocked (nothing is written in the clear)."""
    c = _crypto.get(os.path.realpath(index.path))
    if c is None and is_encrypted(Path(index.path).parent):
        raise SafeError(f"{Path(index.path).parent} is encrypted and its key is not unlocked here")
    return c


class OpsTable:
    """One ops table of an index: rows by name or id, values sealed on an encrypted safe."""

    def __init__(self, name: str, db: Any, crypto: Any):
        self.name = name
        self.db = db
        self.crypto = crypto if name in SEALED or name in HASHED_ROWS else None
        self._aad = name.encode()

    def row(self, name: str) -> bytes:
        """The row key of ``name`` (a setting, a condition): its UTF-8 bytes, or on an
        encrypted safe a keyed hash of them (a name is not visible without the key)."""
        raw = name.encode("utf-8", "surrogatepass")    # (a source path need not be UTF-8)
        if self.crypto is None or self.name not in HASHED_ROWS:
            return raw
        return self.crypto.object_key(ROW_HASH_KIND, b"pointsafe ops row\0" + self._aad + b"\0" + raw)

    def seal(self, key: bytes, value: bytes) -> bytes:
        """``value`` as stored under ``key``."""
        if self.crypto is None or self.name not in SEALED:
            return value
        return self.crypto.seal_value(self._aad, key, value)

    def open(self, key: bytes, stored: bytes) -> bytes:
        """The value stored under ``key`` (IntegrityError when a sealed one was changed)."""
        if self.crypto is None or self.name not in SEALED:
            return bytes(stored)
        return self.crypto.open_value(self._aad, bytes(key), stored)

    def get(self, txn: Any, key: bytes) -> bytes | None:
        """The value under ``key``, or None."""
        v = txn.get(key, db=self.db)
        return None if v is None else self.open(key, v)

    def put(self, txn: Any, key: bytes, value: bytes) -> None:
        """Store ``value`` under ``key``."""
        txn.put(key, self.seal(key, value), db=self.db)

    def delete(self, txn: Any, key: bytes) -> bool:
        """Remove the row ``key``; True if it was there."""
        return bool(txn.delete(key, db=self.db))

    def items(self, txn: Any) -> Iterator[tuple[bytes, bytes]]:
        """Every (row key, value), in key order."""
        for k, v in txn.cursor(db=self.db):
            yield bytes(k), self.open(k, v)

    def keys(self, txn: Any) -> Iterator[bytes]:
        """Every row key, in order (no value is opened)."""
        for k in txn.cursor(db=self.db).iternext(keys=True, values=False):
            yield bytes(k)


def ensure_tables(index: Index) -> dict[str, OpsTable]:
    """Open (creating when needed) the ops tables; returns name -> :class:`OpsTable`."""
    crypto = crypto_of(index)
    return {name: OpsTable(name, index.table(name), crypto) for name in OPS_TABLES}


def read_points(index: Index, txn: Any) -> list[Point]:
    """Every point in the index's ``points`` table (sealed values opened on an encrypted safe)."""
    crypto = crypto_of(index)
    out = []
    for k, v in txn.cursor(db=index.db["points"]):
        out.append(Point.from_json(bytes(v) if crypto is None else crypto.open_value(b"points", bytes(k), v)))
    return out


def index_tables(index: Index, create: bool) -> dict[str, OpsTable] | None:
    """The task history's index tables (name -> LMDB database): made when missing with
    ``create``, else None when one is missing (a safe made before them, a read-only one)."""
    crypto = crypto_of(index)
    if create:
        return {name: OpsTable(name, index.table(name), crypto) for name in INDEX_TABLES}
    dbs = {name: index.existing(name) for name in INDEX_TABLES}
    if any(v is None for v in dbs.values()):
        return None
    return {name: OpsTable(name, db, crypto) for name, db in dbs.items()}


def writable(safe_dir: str | Path) -> bool:
    """Whether this process may write the safe's index: False when the index lies on a
    read-only filesystem or the process lacks write permission on the index folder or its
    files (a safe on a read-only mount, another user's safe). Such a safe can be read but can
    hold no task history. Anything this cannot tell (a missing index) counts as writable, so
    that opening it reports the real trouble."""
    index = Path(safe_dir) / INDEX_DIR
    try:
        if os.statvfs(index).f_flag & os.ST_RDONLY:
            return False
    except OSError:
        return True
    for p in (index, index / "data.mdb", index / "lock.mdb"):
        if p.exists() and not os.access(p, os.W_OK):
            return False
    return True


@contextmanager
def opened(safe_dir: str | Path) -> Iterator[Index]:
    """Open the safe's index for a few short transactions, then close it.

    Never hold this open while the same process opens the safe (LMDB forbids opening one
    environment twice in a process).
    """
    idx = Index(Path(safe_dir) / INDEX_DIR)
    try:
        ensure_tables(idx)
        yield idx
    finally:
        idx.close()


def id_key(n: int) -> bytes:
    """The table key of id ``n``: 8 bytes, big-endian (so keys sort as the ids)."""
    return struct.pack(">Q", n)


def key_id(b: bytes) -> int:
    """The id a table key of :func:`id_key` holds."""
    return struct.unpack(">Q", b)[0]


def next_id(txn: Any, table: OpsTable) -> int:
    """One more than the highest id in ``table`` (1 for an empty table)."""
    cur = txn.cursor(db=table.db)
    return key_id(cur.key()) + 1 if cur.last() else 1


def get_json(txn: Any, table: OpsTable, key: bytes) -> dict | None:
    """The JSON record under ``key`` in ``table``, or None when there is none."""
    v = table.get(txn, key)
    return json.loads(v) if v is not None else None


def put_json(txn: Any, table: OpsTable, key: bytes, value: dict) -> None:
    """Store ``value`` as UTF-8 JSON (sorted keys) under ``key`` in ``table``."""
    table.put(txn, key, json.dumps(value, sort_keys=True).encode())
