"""Database integrations: make a file-level point of a live database one that the database starts from.

A file copy of a running database is usually corrupt: the files are read one after the other
while the server keeps writing to them. Each integration here coordinates with one kind of
database for the duration of the backup:

- ``mysql``: MariaDB/MySQL. FLUSH TABLES WITH READ LOCK; the binary-log position is recorded.
  Reading live (no snapshot): InnoDB is also brought to rest (dirty pages flushed, log sequence
  number steady) for as long as the source is read, and the settings that takes are put back by
  a guardian process should the backup be killed (``guardian``). With a snapshot: the lock is
  held only until the snapshot is taken, and no server setting is touched.
- ``postgres``: PostgreSQL's non-exclusive backup mode on one connection; backup_label,
  tablespace_map and the WAL from the start to the stop LSN (only those segments: the live
  pg_wal's other segments are left out of the point) are grafted in. With a snapshot, backup
  mode ends as soon as the snapshot is taken.
- ``sqlite``: SQLite's online backup API into a temporary file, which replaces the live file in
  the point (WAL/journal companions replaced by empty files). Inside a snapshot nothing is
  copied: the snapshot is a consistent (crash-consistent) image, which SQLite recovers from.

The backup engine drives them through the ``Consistency`` protocol. Reading the live source::

    start()        before the source is read; SafeError (one line) if the DB is unreachable,
                   credentials fail, or the lock / backup mode cannot be taken
    files_read()   when the source tree has been read; locks are released here
    extra_files()  (path relative to the SOURCE root, bytes or a filesystem path to read) to add
                   to or replace in the point's tree
    info()         recorded on the point under record["consistency"][name]
    close()        always (also on failure): releases everything, removes temporary files

Reading a snapshot of the source, the engine sets ``snapshot_mode = True`` on each integration
before ``start()``, and the order is::

    --pre-freeze hook, start() (each), snapshot taken, snapshot_taken() (each): locks and backup
    mode end here, --post-thaw hook, the snapshot is read, files_read(), extra_files(), info(),
    close()

``snapshot_taken()`` is never called when no snapshot is taken.

Besides: ``excludes()`` names files the walk leaves out (``walk_excludes``), and, for the
engine's warnings, ``covered_paths()`` names the directories (relative to
SOURCE) whose changes during the read the database repairs itself (its data directory), so that
"file changed while being read" there is no warning (``is_covered_warning``); ``warnings()``
lists what the integration found and dealt with that the user must hear of (e.g. server settings
a killed backup had left changed, repaired).

``from_args(args)`` builds them from ``--mysql DSN``, ``--postgres DSN``, ``--sqlite PATH``
(each repeatable); ``add_arguments(parser)`` declares those options and ``--allow-inconsistent``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Protocol, runtime_checkable

from pointsafe.cas import UsageError

__all__ = ["Consistency", "ConsistencyError", "add_arguments", "covered_roots", "from_args", "is_covered_warning",
           "relative_to_source", "walk_excludes"]


@runtime_checkable
class Consistency(Protocol):
    """A database integration: what a backup calls around reading SOURCE so that the database
    files in the point are a consistent copy. The order is ``start``, (SOURCE is read),
    ``files_read``, ``extra_files``, ``info``; ``close`` always, last, even after a failure.
    With ``snapshot_mode`` set before ``start``: ``start``, (snapshot taken), ``snapshot_taken``,
    (snapshot read), ``files_read``, ``extra_files``, ``info``, ``close``."""

    name: str
    snapshot_mode: bool   # set by the engine before start(): a snapshot will be taken and read

    def start(self) -> None:
        """Connect and bring the database to a state its files can be copied in (backup mode,
        a lock, a snapshot); ConsistencyError, one line, when it cannot."""
        ...

    def snapshot_taken(self) -> None:
        """(snapshot_mode only) The snapshot has been taken: end the state ``start`` began
        (unlock, leave backup mode) now, before the snapshot is read; ConsistencyError when
        that fails (the snapshot would not be consistent)."""
        ...

    def files_read(self) -> None:
        """SOURCE has been read: end the state ``start`` began (unlock, leave backup mode);
        ConsistencyError when the copy turned out not to be consistent."""
        ...

    def extra_files(self) -> list[tuple[str, bytes | str]]:
        """Files to add to the point after the walk, as (path relative to SOURCE, bytes or
        the path of a local file to read); only valid after ``files_read``."""
        ...

    def covered_paths(self) -> list[str]:
        """Directories (relative to SOURCE, "" for SOURCE itself) whose files may change while
        read without harm: the database repairs them (WAL replay, a copy made again); valid
        after ``start``."""
        ...

    def excludes(self) -> list[str]:
        """Patterns (relative to SOURCE, as ``--exclude``) of files to leave out of the point
        because ``extra_files`` supplies the ones needed (PostgreSQL's live WAL segments);
        valid after ``start``."""
        ...

    def warnings(self) -> list[str]:
        """Problems found and dealt with that the user must hear of (each becomes a warning on
        the point); valid after ``start``."""
        ...

    def info(self) -> dict:
        """What to record in the point about the copy (versions, positions, timings); JSON-able."""
        ...

    def close(self) -> None:
        """Release everything (connections, locks, settings changed, temporary files); never
        raises; safe to call more than once and after a failed ``start``."""
        ...


from .errors import ConsistencyError  # noqa: E402  (after the Protocol, which it does not need)

HELP = {
    "mysql": """MariaDB/MySQL server whose data directory lies inside SOURCE: take FLUSH TABLES
        WITH READ LOCK and record the binary-log position; with a snapshot the lock is held
        while the snapshot is taken only, else InnoDB is also brought to rest while SOURCE is
        read (the settings that takes are put back even if the backup is killed).
        DSN: mysql://USER[:PASSWORD]@HOST[:PORT]/[?socket=PATH&lock_timeout=SECONDS] or a socket path;
        the password may also come from $MYSQL_PWD. Repeatable.""",
    "postgres": """PostgreSQL server whose data directory lies inside SOURCE: run the backup (or,
        with a snapshot, the snapshot) in non-exclusive backup mode and store backup_label,
        tablespace_map and the WAL from its start to its stop, which the copy starts from.
        DSN: a libpq connection string or URI ("host=/run/postgresql user=postgres",
        "postgresql://..."); $PGPASSWORD and ~/.pgpass work. Repeatable.""",
    "sqlite": """SQLite database file inside SOURCE: copy it with SQLite's online backup API and
        store that consistent copy in place of the live file (inside a snapshot the snapshot's
        file is stored as it is). Repeatable.""",
    "allow_inconsistent": """when a database named by --mysql/--postgres/--sqlite cannot be
        reached or locked, back up anyway: the point carries a warning and the command exits 3
        (without this option such a backup fails and creates no point).""",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Declare --mysql, --postgres, --sqlite (repeatable) and --allow-inconsistent on ``p``."""
    g = p.add_argument_group("database consistency")
    g.add_argument("--mysql", metavar="DSN", action="append", default=[], help=HELP["mysql"])
    g.add_argument("--postgres", metavar="DSN", action="append", default=[], help=HELP["postgres"])
    g.add_argument("--sqlite", metavar="PATH", action="append", default=[], help=HELP["sqlite"])
    g.add_argument("--allow-inconsistent", action="store_true", help=HELP["allow_inconsistent"])


def _source(args) -> str | None:
    for attr in ("source", "SOURCE", "src", "path"):
        v = getattr(args, attr, None)
        if isinstance(v, (str, os.PathLike)):
            return os.fspath(v)
    return None


def from_args(args: argparse.Namespace) -> list[Consistency]:
    """The integrations named on the command line, in the order mysql, postgres, sqlite.

    Nothing is contacted here; ``start()`` does that. Raises UsageError for a malformed DSN.
    """
    source = _source(args)
    out: list[Consistency] = []
    mysql = list(getattr(args, "mysql", None) or [])
    postgres = list(getattr(args, "postgres", None) or [])
    sqlite = list(getattr(args, "sqlite", None) or [])
    if (mysql or postgres or sqlite) and getattr(args, "volume", False):
        raise UsageError("--mysql/--postgres/--sqlite apply to directory backups, not --volume")
    # Names key record["consistency"]: the kind alone, numbered (or, for SQLite, by path) when
    # a kind is given more than once. A DSN never becomes a name: it may hold a password.
    if mysql:
        from .mysql import MySQL
        out += [MySQL(dsn, source, _name("mysql", i, len(mysql))) for i, dsn in enumerate(mysql)]
    if postgres:
        from .postgres import Postgres
        out += [Postgres(dsn, source, _name("postgres", i, len(postgres))) for i, dsn in enumerate(postgres)]
    if sqlite:
        from .sqlite import SQLite
        out += [SQLite(path, source, "sqlite" if len(sqlite) == 1 else f"sqlite:{path}") for path in sqlite]
    return out


def _name(kind: str, i: int, n: int) -> str:
    return kind if n == 1 else f"{kind}#{i + 1}"


def relative_to_source(path: str | os.PathLike, source: str | None, what: str) -> str:
    """``path`` relative to the backup's SOURCE root ("" for the root itself).

    Raises ConsistencyError when it lies outside SOURCE: a database whose files are not in the
    backup cannot be made consistent by it, and saying so beats a point without the database.
    """
    p = Path(os.path.realpath(path))
    if source is None:
        raise ConsistencyError(f"{what}: no SOURCE to place {p} in")
    root = Path(os.path.realpath(source))
    try:
        rel = p.relative_to(root)
    except ValueError:
        raise ConsistencyError(f"{what}: {p} is not inside the backup source {root}") from None
    return "" if str(rel) == "." else str(rel)


# Read warnings (ingest/walk.py) that a database's own recovery makes harmless in the
# directories it covers, and the warning ingest/db/detect.py gives for a live database there.
_COVERED_MESSAGES = ("file changed while being read", "vanished during the backup")


def covered_roots(active: list, source: str | os.PathLike) -> list[str]:
    """The absolute paths (as the walk names them, under ``source``) that the integrations in
    ``active`` cover (``Consistency.covered_paths``)."""
    out = []
    for c in active:
        for rel in getattr(c, "covered_paths", list)():
            out.append(os.path.normpath(os.path.join(os.fspath(source), rel)))
    return out


def is_covered_warning(w: dict, roots: list[str]) -> bool:
    """True when warning ``w`` ({"path", "message"}) is one that a database integration makes
    moot: a file under one of ``roots`` (``covered_roots``) that changed or vanished while read,
    or the live-database warning of detect.py for such a directory."""
    path, message = str(w.get("path", "")), str(w.get("message", ""))
    if not any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots):
        return False
    from .detect import LIVE_DB_MARK
    return message.startswith(_COVERED_MESSAGES) or LIVE_DB_MARK in message


def walk_excludes(active: list) -> list[str]:
    """Exclude patterns (relative to SOURCE, as --exclude) the integrations in ``active`` add:
    the live WAL segments PostgreSQL's point replaces by the ones its backup needs."""
    return [p for c in active for p in getattr(c, "excludes", list)()]
