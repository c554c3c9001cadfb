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

Writes are single short LMDB write transactions. They do not take the safe's writer lock:
LMDB serialises writers across processes, so read-only commands (restore, verify) can record
their tasks while a backup runs.
"""

from __future__ import annotations

import json
import struct
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from pointsafe.cas.index import Index
from pointsafe.cas.store import INDEX_DIR

OPS_TABLES = ("tasks", "tasks_running", "alerts", "alert_latches", "config")


def ensure_tables(index: Index) -> dict:
    """Open (creating when needed) the ops tables; returns name -> LMDB database."""
    return {name: index.table(name) for name in OPS_TABLES}


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
    return struct.pack(">Q", n)


def key_id(b: bytes) -> int:
    return struct.unpack(">Q", b)[0]


def next_id(txn, db) -> int:
    cur = txn.cursor(db=db)
    return key_id(cur.key()) + 1 if cur.last() else 1


def get_json(txn, db, key: bytes) -> dict | None:
    v = txn.get(key, db=db)
    return json.loads(v) if v is not None else None


def put_json(txn, db, key: bytes, value: dict) -> None:
    txn.put(key, json.dumps(value, sort_keys=True).encode(), db=db)
