"""PostgreSQL: the backup runs inside the server's non-exclusive backup mode.

PostgreSQL makes a file copy taken while it runs usable by itself, provided that
(1) the copy is bracketed by ``pg_backup_start`` / ``pg_backup_stop`` (``pg_start_backup`` /
``pg_stop_backup`` before version 15) on one session kept open throughout -- the server then
writes full-page images so that torn pages are repaired by WAL replay; (2) the ``backup_label``
(and ``tablespace_map``) returned by the stop call are placed in the data directory of the
restored copy, which makes the server start recovery from the backup's checkpoint instead of the
(later) one in pg_control; and (3) the WAL from the start LSN to the stop LSN is there to replay.

``files_read()`` stops backup mode and copies the WAL segments from the start to the stop LSN out
of pg_wal at once (the server may recycle them soon); ``extra_files()`` grafts them, backup_label
and tablespace_map over what the tree read. The live pg_wal's segments are left out of the walk
(``excludes``): the point holds exactly the segments from the start to the stop LSN, not every
segment the server happened to keep (timeline history files and archive_status/ are kept).

With a snapshot (``snapshot_mode``), backup mode brackets the snapshot instead of the read:
``snapshot_taken()`` stops it and copies that WAL, and the snapshot is read afterwards.

Files of the data directory (and of tablespaces inside SOURCE) that change while they are read
are expected in backup mode -- the full-page images in the WAL repair them -- so no "changed
while being read" warning is given for them (``covered_paths``). A temporary physical replication slot, when the role
may create one, keeps the server from removing that WAL during a long backup.

Restoring (docs/RESTORE.md): copy the data directory out, remove postmaster.pid (it names the
server that ran when the point was taken), fix ownership, start the server: it replays the WAL
to the end of the backup and opens.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from typing import TYPE_CHECKING, Any

from . import relative_to_source
from .errors import ConsistencyError, one_line

if TYPE_CHECKING:
    import psycopg


def wal_file_name(tli: int, lsn: int, seg_size: int) -> str:
    """The name of the WAL segment file holding ``lsn`` on timeline ``tli``, for segments of
    ``seg_size`` bytes (as PostgreSQL's XLogFileName).
    """
    segno = lsn // seg_size
    per_id = 0x100000000 // seg_size
    return f"{tli:08X}{segno // per_id:08X}{segno % per_id:08X}"


def parse_lsn(text: str) -> int:
    """An LSN written as PostgreSQL shows it ("16/B374D848") as an integer; ValueError when
    malformed.
    """
    hi, lo = text.split("/")
    return (int(hi, 16) << 32) | int(lo, 16)


def _row(cur: psycopg.Cursor[Any], sql: str, params: tuple[object, ...] | None = None) -> Any:
    """The first row of ``sql``; LookupError when it returns none (callers turn any failure
    of a query into one ConsistencyError line)."""
    row = cur.execute(sql, params).fetchone()
    if row is None:
        raise LookupError(f"no row from {sql.split()[1]}")
    return row


class Postgres:
    """``--postgres DSN``: a PostgreSQL server whose data directory lies inside SOURCE."""

    def __init__(self, dsn: str, source: str | None, name: str = "postgres"):
        self.name = name
        self.dsn = dsn
        self.source = source
        self.con: psycopg.Connection[Any] | None = None
        self._in_backup = False
        self._tmpdir: str | None = None
        self._extra: list[tuple[str, bytes | str]] = []
        self._info: dict = {}
        self._t0 = 0.0
        self._slot: str | None = None
        self.snapshot_mode = False
        self._rel: str | None = None
        self._tablespaces: list[str] = []

    @property
    def _what(self) -> str:
        return f"postgres {_redact(self.dsn)}"

    # ------------------------------------------------------------------ protocol

    def start(self) -> None:
        """See ``Consistency.start``; on failure ``close`` has already run."""
        try:
            self._start()
        except BaseException:
            self.close()  # leaves backup mode (the session's end aborts it) and drops the slot
            raise

    def _start(self) -> None:
        cur = self._connect().cursor()
        try:
            version = int(_row(cur, "SHOW server_version_num")[0])
            datadir = _row(cur, "SHOW data_directory")[0]
            seg = cur.execute("SELECT setting::bigint FROM pg_settings WHERE name = 'wal_segment_size'").fetchone()
        except Exception as e:
            raise ConsistencyError(f"{self._what}: cannot read the server's settings "
                                   f"(the role needs pg_read_all_settings): {one_line(e)}") from None
        self._version = version
        self._seg_size = int(seg[0]) if seg and seg[0] else 16 << 20
        if self._seg_size < 1 << 20:  # before PostgreSQL 11 the unit was 8 kB blocks
            self._seg_size *= 8192
        self._datadir = datadir
        self._rel = relative_to_source(datadir, self.source, f"{self._what}: data directory")
        self._tablespaces = self._tablespaces_inside(cur)
        self._reserve_wal(cur)
        label = "pointsafe " + time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self._t0 = time.monotonic()
        try:
            if version >= 150000:
                lsn = _row(cur, "SELECT pg_backup_start(%s, true)::text", (label,))[0]
            else:
                lsn = _row(cur, "SELECT pg_start_backup(%s, true, false)::text", (label,))[0]
        except Exception as e:
            raise ConsistencyError(f"{self._what}: cannot enter backup mode: {one_line(e)}") from None
        self._in_backup = True
        self._info = {"server_version": version, "datadir": self._rel, "label": label, "start_lsn": lsn,
                      "wal_segment_size": self._seg_size, "wal_held_by_slot": self._slot is not None,
                      "mode": "snapshot" if self.snapshot_mode else "live"}

    def snapshot_taken(self) -> None:
        """See ``Consistency.snapshot_taken``: leave backup mode, copy the WAL it needs."""
        self._stop()

    def files_read(self) -> None:
        """See ``Consistency.files_read`` (with a snapshot, backup mode has ended already)."""
        self._stop()

    def covered_paths(self) -> list[str]:
        """See ``Consistency.covered_paths``: the data directory, the tablespaces in SOURCE."""
        return [] if self._rel is None else [self._rel, *self._tablespaces]

    def excludes(self) -> list[str]:
        """See ``Consistency.excludes``: the live WAL segments (``extra_files`` has the ones
        from the start to the stop LSN)."""
        if self._rel is None:
            return []
        prefix = self._rel + "/" if self._rel else ""
        return [prefix + "pg_wal/" + "[0-9A-F]" * 24]

    def warnings(self) -> list[str]:
        """See ``Consistency.warnings``: none."""
        return []

    def _tablespaces_inside(self, cur) -> list[str]:
        """The tablespace directories inside SOURCE, relative to it."""
        try:
            rows = cur.execute("SELECT pg_tablespace_location(oid) FROM pg_tablespace "
                               "WHERE spcname NOT IN ('pg_default', 'pg_global')").fetchall()
        except Exception:
            return []
        out = []
        for (loc,) in rows:
            try:
                out.append(relative_to_source(loc, self.source, self._what))
            except ConsistencyError:
                pass   # outside SOURCE: not in the point at all
        return out

    def _stop(self) -> None:
        if not self._in_backup:
            return
        assert self.con is not None, "in backup mode only while connected"
        cur = self.con.cursor()
        try:
            if self._version >= 150000:
                row = _row(cur, "SELECT lsn::text, labelfile, spcmapfile FROM pg_backup_stop(false)")
            else:
                row = _row(cur, "SELECT lsn::text, labelfile, spcmapfile FROM pg_stop_backup(false, false)")
        except Exception as e:
            raise ConsistencyError(f"{self._what}: leaving backup mode failed (the session may have "
                                   f"ended; the copy would not be consistent): {one_line(e)}") from None
        self._in_backup = False
        stop_lsn, label, spcmap = row
        self._info["stop_lsn"] = stop_lsn
        self._info["backup_seconds"] = round(time.monotonic() - self._t0, 4)
        prefix = self._rel + "/" if self._rel else ""
        self._extra = [(prefix + "backup_label", label.encode())]
        if spcmap:
            self._extra.append((prefix + "tablespace_map", spcmap.encode()))
        self._copy_wal(label, parse_lsn(stop_lsn), prefix)

    def extra_files(self) -> list[tuple[str, bytes | str]]:
        """See ``Consistency.extra_files``."""
        return list(self._extra)

    def info(self) -> dict:
        """See ``Consistency.info`` (a copy)."""
        return dict(self._info)

    def close(self) -> None:
        """See ``Consistency.close``."""
        if self.con is not None:
            try:
                self.con.close()  # ends backup mode if still on; the temporary slot goes with it
            except Exception:
                pass
            self.con = None
            self._in_backup = False
        if self._tmpdir:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None

    # ------------------------------------------------------------------ steps

    def _connect(self) -> psycopg.Connection[Any]:
        """Connect (``self.con``) and return the connection; ConsistencyError, one line, when
        psycopg is missing, the DSN is bad, the login fails or the server cannot be reached."""
        try:
            import psycopg
        except ImportError:
            raise ConsistencyError("--postgres needs psycopg: pip install 'pointsafe[db]'") from None
        try:
            self.con = con = psycopg.connect(self.dsn, autocommit=True, connect_timeout=10,
                                             application_name="pointsafe backup")
        except psycopg.ProgrammingError as e:
            raise ConsistencyError(f"{self._what}: bad connection string: {one_line(e)}") from None
        except psycopg.Error as e:
            msg = one_line(e)
            if "authentication failed" in msg or "password" in msg or "no pg_hba.conf entry" in msg:
                raise ConsistencyError(f"{self._what}: login failed: {_last_clause(msg)}") from None
            raise ConsistencyError(f"{self._what}: cannot connect: {_last_clause(msg)}") from None
        return con

    def _reserve_wal(self, cur) -> None:
        """Keep the WAL from here on until the session ends, when the role may (best effort)."""
        slot = f"pointsafe_{os.getpid()}_{int(time.time() * 1000) % 10**9}"
        try:
            cur.execute("SELECT pg_create_physical_replication_slot(%s, true, true)", (slot,))
            self._slot = slot
        except Exception:
            self._slot = None

    def _copy_wal(self, label: str, stop_lsn: int, prefix: str) -> None:
        m = re.search(r"START WAL LOCATION: \S+ \(file ([0-9A-F]{24})\)", label)
        t = re.search(r"START TIMELINE: (\d+)", label)
        if not m:
            raise ConsistencyError(f"{self._what}: unexpected backup_label from the server")
        first = m.group(1)
        tli = int(t.group(1)) if t else int(first[:8], 16)
        per_id = 0x100000000 // self._seg_size
        start_seg = int(first[8:16], 16) * per_id + int(first[16:24], 16)
        end_seg = max(start_seg, (stop_lsn - 1) // self._seg_size)
        if stop_lsn % self._seg_size:
            end_seg = max(end_seg, stop_lsn // self._seg_size)
        wal_dir = os.path.join(self._datadir, "pg_wal")
        self._tmpdir = tempfile.mkdtemp(prefix="pointsafe-pgwal-")
        names = []
        for segno in range(start_seg, end_seg + 1):
            name = wal_file_name(tli, segno * self._seg_size, self._seg_size)
            try:
                shutil.copyfile(os.path.join(wal_dir, name), os.path.join(self._tmpdir, name))
            except FileNotFoundError:
                raise ConsistencyError(
                    f"{self._what}: WAL segment {name} was removed before the backup ended; raise "
                    f"wal_keep_size or let the role create replication slots") from None
            self._extra.append((prefix + "pg_wal/" + name, os.path.join(self._tmpdir, name)))
            names.append(name)
        self._info["timeline"] = tli
        self._info["wal_files"] = names


def _redact(dsn: str) -> str:
    dsn = re.sub(r"(password\s*=\s*)(\S+)", r"\1***", dsn)
    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", dsn)


def _last_clause(msg: str) -> str:
    """libpq repeats 'connection to server ... failed:' per address; keep the reason."""
    parts = [p.strip() for p in re.split(r"connection to server [^:]*failed:", msg) if p.strip()]
    return parts[-1] if parts else msg
