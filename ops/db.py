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

from pointsafe.cas.index import Index
from pointsafe.cas.store import INDEX_DIR

OPS_TABLES = ("tasks", "tasks_running", "alerts", "alert_latches", "config")
INDEX_TABLES = ("task_facets", "task_index")   # made when first written (a read-only safe may lack them)


def ensure_tables(index: Index) -> dict:
    """Open (creating when needed) the ops tables; returns name -> LMDB database."""
    return {name: index.table(name) for name in OPS_TABLES}


def index_tables(index: Index, create: bool) -> dict | None:
    """The task history's index tables (name -> LMDB database): made when missing with
    ``create``, else None when one is missing (a safe made before them, a read-only one)."""
    if create:
        return {name: index.table(name) for name in INDEX_TABLES}
    dbs = {name: index.existing(name) for name in INDEX_TABLES}
    return None if any(v is None for v in dbs.values()) else dbs


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


def next_id(txn: Any, db: Any) -> int:
    """One more than the highest id in table ``db`` (1 for an empty table)."""
    cur = txn.cursor(db=db)
    return key_id(cur.key()) + 1 if cur.last() else 1


def get_json(txn: Any, db: Any, key: bytes) -> dict | None:
    """The JSON record under ``key`` in ``db``, or None when there is none."""
    v = txn.get(key, db=db)
    return json.loads(v) if v is not None else None


def put_json(txn: Any, db: Any, key: bytes, value: dict) -> None:
    """Store ``value`` as UTF-8 JSON (sorted keys) under ``key`` in ``db``."""
    txn.put(key, json.dumps(value, sort_keys=True).encode(), db=db)
