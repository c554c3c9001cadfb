"""SQLite: a consistent copy through the online backup API, grafted over the live file.

The live file read by the tree backup is not usable on its own: a writer may be half-way through
a transaction (rollback-journal mode: a hot ``-journal`` next to it) or most recent commits may
live only in the ``-wal`` file. So ``start()`` takes a read transaction on the database (the busy
timeout decides whether the lock can be had) and copies it, inside that transaction, with
``sqlite3_backup`` into a temporary file. ``extra_files()`` then replaces, in the point:

- the database file by that copy;
- in WAL mode, ``-wal`` and ``-shm`` by empty files: a stale WAL copied from the live database
  would otherwise be replayed over the consistent copy, and a read-only WAL database (a mount)
  can only be opened when both files exist;
- in rollback mode, ``-journal`` by an empty file (a zero-length journal is never hot; a stale
  hot journal would otherwise be "rolled back" into the copy).

The point holds the database as of ``start()``.

Inside a snapshot (``snapshot_mode``) no copy is made: the snapshot holds the database file and
its journal or WAL as of one instant, a crash-consistent image that SQLite recovers from when
it opens it (rolling back a hot journal, replaying the WAL). ``start()`` then only checks that
the file is inside SOURCE and records that the snapshot is the copy.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import tempfile
import time
from datetime import datetime, timezone

from . import relative_to_source
from .errors import ConsistencyError, one_line

LOCK_TIMEOUT = float(os.environ.get("POINTSAFE_SQLITE_TIMEOUT", "10"))


class SQLite:
    """``--sqlite PATH``: one SQLite database file inside the backup source."""

    def __init__(self, path: str, source: str | None, name: str = "sqlite",
                 lock_timeout: float = LOCK_TIMEOUT):
        self.name = name
        self.path = os.path.abspath(path)
        self.source = source
        self.lock_timeout = lock_timeout
        self._tmpdir: str | None = None
        self._copy: str | None = None
        self._rel = ""
        self._info: dict = {}
        self._mode = ""
        self.snapshot_mode = False

    def start(self) -> None:
        """See ``Consistency.start``; on failure ``close`` has already run."""
        try:
            self._start()
        except BaseException:
            self.close()
            raise

    def _start(self) -> None:
        what = f"sqlite {self.path}"
        if not os.path.isfile(self.path):
            raise ConsistencyError(f"{what}: no such database file")
        self._rel = relative_to_source(self.path, self.source, what)
        if self.snapshot_mode:
            self._info = {"path": self._rel, "copy": "snapshot",
                          "bytes": os.path.getsize(self.path)}
            return
        try:
            src = sqlite3.connect(self.path, timeout=self.lock_timeout, isolation_level=None)
        except sqlite3.Error as e:
            raise ConsistencyError(f"{what}: cannot open: {one_line(e)}") from None
        self._tmpdir = tempfile.mkdtemp(prefix="pointsafe-sqlite-")
        self._copy = os.path.join(self._tmpdir, os.path.basename(self.path))
        t0 = time.monotonic()
        try:
            try:
                mode = src.execute("PRAGMA journal_mode").fetchone()[0].lower()
                # The read transaction: the shared lock (or WAL snapshot) the copy is taken under.
                src.execute("BEGIN")
                src.execute("SELECT count(*) FROM sqlite_master").fetchone()
            except sqlite3.OperationalError as e:
                msg = one_line(e)
                if "locked" in msg or "busy" in msg:
                    raise ConsistencyError(f"{what}: could not get a read lock within "
                                           f"{self.lock_timeout:g} s: {msg}") from None
                raise ConsistencyError(f"{what}: {msg}") from None
            except sqlite3.DatabaseError as e:
                raise ConsistencyError(f"{what}: {one_line(e)}") from None
            dst = sqlite3.connect(self._copy)
            try:
                src.backup(dst)
                pages = dst.execute("PRAGMA page_count").fetchone()[0]
            finally:
                dst.close()
            src.execute("COMMIT")
        except sqlite3.Error as e:
            raise ConsistencyError(f"{what}: copy failed: {one_line(e)}") from None
        finally:
            src.close()
        self._info = {
            "path": self._rel, "journal_mode": mode, "pages": pages,
            "bytes": os.path.getsize(self._copy),
            "copied_at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            "copy_seconds": round(time.monotonic() - t0, 4),
        }
        self._mode = mode

    def snapshot_taken(self) -> None:
        """See ``Consistency.snapshot_taken``: nothing is held."""

    def files_read(self) -> None:
        """See ``Consistency.files_read``."""
        pass  # the copy was taken in start(); nothing is held

    def covered_paths(self) -> list[str]:
        """See ``Consistency.covered_paths``: none (the copy replaces the file in the point)."""
        return []

    def excludes(self) -> list[str]:
        """See ``Consistency.excludes``: none."""
        return []

    def warnings(self) -> list[str]:
        """See ``Consistency.warnings``: none."""
        return []

    def extra_files(self) -> list[tuple[str, bytes | str]]:
        """See ``Consistency.extra_files``."""
        if self._copy is None:
            return []
        out: list[tuple[str, bytes | str]] = [(self._rel, self._copy)]
        if self._mode == "wal":
            out += [(self._rel + "-wal", b""), (self._rel + "-shm", b"")]
        else:
            out.append((self._rel + "-journal", b""))
        return out

    def info(self) -> dict:
        """See ``Consistency.info`` (a copy)."""
        return dict(self._info)

    def close(self) -> None:
        """See ``Consistency.close``."""
        if self._tmpdir:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None
        self._copy = None
