"""MariaDB/MySQL: FLUSH TABLES WITH READ LOCK, and InnoDB at rest, while the source is read.

Why the global read lock alone is not enough for a *file copy* (as opposed to a snapshot taken
in an instant): it stops statements, but InnoDB keeps writing its files from background threads
(page cleaner, checkpoints, purge, persistent-statistics updates). A data file read before such
a write and a redo log read after it can disagree in a way crash recovery cannot repair. So,
holding the lock, ``start()`` also brings InnoDB to rest: it lowers innodb_max_dirty_pages_pct
to 0 and waits until no page is dirty and the log sequence number (LSN) stays put. The files
on disk are then the whole database; recovery on the copy has nothing to redo.

``files_read()`` checks that the LSN did not move while the source was read. If it did (a
background write slipped in), the InnoDB files are copied again under the lock, after InnoDB
is at rest again, and ``extra_files()`` grafts those copies over what the tree read. Only then
is the lock released. MyISAM and Aria tables are flushed and closed by the lock itself.

The binary-log position (and GTID position) under the lock is recorded: it is where a replica
or a point-in-time recovery from the binary logs starts.

The settings lowered for the flush are global: a guardian process puts them back should the
backup be killed, and the next backup of the server repairs what a killed backup and guardian
left (guardian.py).

**With a snapshot** (``snapshot_mode``): the snapshot holds every file as of one instant, which
InnoDB's crash recovery starts from, and MyISAM/Aria tables are closed by the lock. So
``start()`` takes FLUSH TABLES WITH READ LOCK and records the binary-log position, and
``snapshot_taken()`` releases the lock: it is held for the snapshot only. No server setting is
changed, InnoDB is not waited for, and nothing is copied again.

Costs, measured in docs/BENCHMARKS.md: the lock is held for the flush, the wait for rest, and
the reading of the source; writers stall for that long.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
import tempfile
import time
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from pointsafe.cas import UsageError

from . import relative_to_source
from . import guardian as guard
from .errors import ConsistencyError, one_line

LOCK_TIMEOUT = 30.0      # seconds FLUSH TABLES WITH READ LOCK may wait (lock_wait_timeout)
REST_TIMEOUT = 120.0     # seconds InnoDB may take to flush its dirty pages under the lock
RESCUE_TRIES = 3
FLUSH_IO_CAPACITY = 10000  # pages/s the page cleaner may write while the backup waits for it
PREFLUSH_PAGES = 256       # dirty pages left for the flush under the lock
# InnoDB files a background write may touch (ibtmp1 is recreated at start-up and not needed).
INNODB_PATTERNS = ("ibdata*", "ib_logfile*", "undo[0-9]*", "*.ibd", "#ib_redo*")

# Driver error numbers worth a specific message.
ER_ACCESS_DENIED = {1044, 1045, 1698}
ER_LOCK_WAIT_TIMEOUT = {1205}
ER_SPECIFIC_ACCESS = {1227}
CR_CONNECT = {2002, 2003, 2005, 2006, 2013}


def parse_dsn(dsn: str) -> dict:
    """``mysql://USER[:PASSWORD]@HOST[:PORT]/[DB][?socket=PATH&lock_timeout=S]`` or a socket path.

    Returns PyMySQL connect() keywords plus ``lock_timeout``. A password missing from the DSN is
    taken from $MYSQL_PWD.
    """
    opts: dict = {"user": "root", "lock_timeout": LOCK_TIMEOUT}
    if dsn.startswith("/"):
        opts["unix_socket"] = dsn
    else:
        u = urlsplit(dsn)
        if u.scheme not in ("mysql", "mariadb"):
            raise UsageError(f"--mysql {_redact(dsn)}: expected mysql://USER@HOST/?socket=PATH or a socket path")
        if u.username:
            opts["user"] = unquote(u.username)
        if u.password is not None:
            opts["password"] = unquote(u.password)
        opts["host"] = u.hostname or "localhost"
        try:
            if u.port:
                opts["port"] = u.port
        except ValueError:
            raise UsageError(f"--mysql {_redact(dsn)}: bad port") from None
        for key, values in parse_qs(u.query).items():
            v = values[-1]
            if key in ("socket", "unix_socket"):
                opts["unix_socket"] = v
            elif key == "lock_timeout":
                try:
                    opts["lock_timeout"] = float(v)
                except ValueError:
                    raise UsageError(f"--mysql: lock_timeout={v} is not a number of seconds") from None
            elif key in ("defaults_file", "read_default_file"):
                opts["read_default_file"] = v
            else:
                raise UsageError(f"--mysql: unknown DSN option {key!r} (socket, lock_timeout, defaults_file)")
    if "password" not in opts and os.environ.get("MYSQL_PWD"):
        opts["password"] = os.environ["MYSQL_PWD"]
    return opts


def _redact(dsn: str) -> str:
    u = urlsplit(dsn)
    if u.password is None:
        return dsn
    return dsn.replace(":" + u.password + "@", ":***@", 1)


class MySQL:
    """``--mysql DSN``: a MariaDB or MySQL server whose data directory lies inside SOURCE."""

    def __init__(self, dsn: str, source: str | None, name: str = "mysql",
                 rest_timeout: float = REST_TIMEOUT):
        self.name = name
        self.dsn = _redact(dsn)
        self.opts = parse_dsn(dsn)
        self.lock_timeout = self.opts.pop("lock_timeout")
        self.source = source
        self.rest_timeout = rest_timeout
        self.snapshot_mode = False
        self.con: Any = None    # a PyMySQL connection (the driver is optional and untyped)
        self._locked_at: float | None = None
        self._saved_flushing: dict[str, Any] | None = None
        self._tmpdir: str | None = None
        self._extra: list[tuple[str, bytes | str]] = []
        self._info: dict = {}
        self._warnings: list[str] = []
        self._guardian: guard.Guardian | None = None
        self._datadir: str | None = None
        self._rel = ""
        self._innodb_dirs: list[str] = []

    # ------------------------------------------------------------------ protocol

    def start(self) -> None:
        """See ``Consistency.start``; on failure ``close`` has already run."""
        try:
            self._start()
        except BaseException:
            self.close()  # never leave the lock or the lowered flush setting behind
            raise

    def _start(self) -> None:
        c = self._connect().cursor()
        datadir, version, dirs = self._layout(c)
        self._datadir = datadir
        self._rel = relative_to_source(datadir, self.source, f"mysql {self.dsn}: data directory")
        self._innodb_dirs = sorted({os.path.normpath(os.path.join(datadir, d)) for d in dirs if d})
        for d in self._innodb_dirs:
            relative_to_source(d, self.source, f"mysql {self.dsn}: InnoDB directory")
        self._info = {"server": version, "datadir": self._rel,
                      "mode": "snapshot" if self.snapshot_mode else "live"}
        self._repair_left(c)

        # Before the lock: close tables (and, reading live, flush most dirty pages) while
        # writers still run, so that the lock is held for as short a time as possible.
        c.execute(f"SET SESSION lock_wait_timeout = {max(1, int(round(self.lock_timeout)))}")
        self._run(c, "FLUSH NO_WRITE_TO_BINLOG TABLES", "flush tables", timeout_ok=True)
        if not self.snapshot_mode:
            self._lower_dirty_pct(c)
            t0 = time.monotonic()
            self._preflush(c)
            self._info["preflush_seconds"] = round(time.monotonic() - t0, 4)

        t0 = time.monotonic()
        self._run(c, "FLUSH TABLES WITH READ LOCK", "FLUSH TABLES WITH READ LOCK")
        self._locked_at = time.monotonic()
        self._info["lock_wait_seconds"] = round(self._locked_at - t0, 4)
        self._info.update(self._binlog_position(c))
        if not self.snapshot_mode:
            self._info["lsn"] = self._rest(c)
            self._info["rest_seconds"] = round(time.monotonic() - self._locked_at, 4)

    def _repair_left(self, c) -> None:
        """Put back what killed backups of this server left changed (guardian.py); say so."""
        try:
            self._warnings = guard.repair_left(c, self._datadir or "")
        except Exception as e:
            self._warnings = [f"could not check for settings left changed by a killed backup: {one_line(e)}"]
        if self._warnings:
            self._info["repaired_settings"] = list(self._warnings)

    def snapshot_taken(self) -> None:
        """See ``Consistency.snapshot_taken``: UNLOCK TABLES (the lock was held for the
        snapshot only; ``lock_held_seconds`` in ``info``)."""
        if self.con is None or self._locked_at is None:
            return
        try:
            self._unlock(self.con.cursor())
        except Exception as e:
            raise ConsistencyError(f"mysql {self.dsn}: lost the server while holding the lock for the "
                                   f"snapshot: {one_line(e)}") from None

    def files_read(self) -> None:
        """See ``Consistency.files_read``."""
        if self.con is None or self._locked_at is None:
            return
        if self.snapshot_mode:   # snapshot_taken() was not called: the lock ends here at the latest
            self.snapshot_taken()
            return
        try:
            c = self.con.cursor()
            lsn = self._lsn(c)
            tries = 0
            while lsn != self._info["lsn"]:
                # A background write reached InnoDB's files while they were read: copy them again.
                tries += 1
                if tries > RESCUE_TRIES:
                    raise ConsistencyError(
                        f"mysql {self.dsn}: InnoDB kept writing under the lock (LSN {self._info['lsn']} "
                        f"-> {lsn}); the copy would not be consistent")
                self._info["lsn"] = self._rest(c)
                self._rescue_copy()
                lsn = self._lsn(c)
            self._info["recopied_innodb"] = tries > 0
            self._unlock(c)
        except ConsistencyError:
            raise
        except Exception as e:
            raise ConsistencyError(f"mysql {self.dsn}: lost the server while holding the lock: "
                                   f"{one_line(e)}") from None

    def extra_files(self) -> list[tuple[str, bytes | str]]:
        """See ``Consistency.extra_files``."""
        return list(self._extra)

    def covered_paths(self) -> list[str]:
        """See ``Consistency.covered_paths``: the data directory and the InnoDB directories."""
        if self._datadir is None:
            return []
        out = [self._rel]
        for d in self._innodb_dirs:
            try:
                out.append(relative_to_source(d, self.source, "mysql"))
            except ConsistencyError:
                pass
        return sorted(set(out))

    def excludes(self) -> list[str]:
        """See ``Consistency.excludes``: none."""
        return []

    def warnings(self) -> list[str]:
        """See ``Consistency.warnings``: settings put back that killed backups had left."""
        return list(self._warnings)

    def info(self) -> dict:
        """See ``Consistency.info`` (a copy)."""
        return dict(self._info)

    def close(self) -> None:
        """See ``Consistency.close``."""
        if self.con is not None:
            try:
                c = self.con.cursor()
                if self._locked_at is not None:
                    self._unlock(c)
                self._restore_dirty_pct(c)
            except Exception:
                pass  # the server drops the lock with the session anyway
            try:
                self.con.close()
            except Exception:
                pass
            self.con = None
        if self._saved_flushing:
            # Global settings outlive the session: put them back over a new connection.
            try:
                self._restore_dirty_pct(self._connect().cursor())
            except Exception:
                pass   # the guardian puts them back when this process ends
            finally:
                if self.con is not None:
                    self.con.close()
                    self.con = None
        if self._tmpdir:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None

    # ------------------------------------------------------------------ steps

    def _connect(self) -> Any:
        """Connect (``self.con``) and return the connection; ConsistencyError, one line, when
        PyMySQL is missing, the login fails or the server cannot be reached."""
        try:
            import pymysql
        except ImportError:
            raise ConsistencyError("--mysql needs PyMySQL: pip install 'pointsafe[db]'") from None
        where = self.opts.get("unix_socket") or f"{self.opts.get('host')}:{self.opts.get('port', 3306)}"
        try:
            self.con = con = pymysql.connect(autocommit=True, connect_timeout=10, **self.opts)
        except pymysql.err.MySQLError as e:
            code = e.args[0] if e.args and isinstance(e.args[0], int) else None
            if code in ER_ACCESS_DENIED:
                raise ConsistencyError(f"mysql {self.dsn}: login failed for user "
                                       f"{self.opts.get('user')!r}: {one_line(e)}") from None
            raise ConsistencyError(f"mysql {self.dsn}: cannot connect to {where}: {one_line(e)}") from None
        except OSError as e:
            raise ConsistencyError(f"mysql {self.dsn}: cannot connect to {where}: {one_line(e)}") from None
        return con

    def _run(self, c, sql: str, what: str, timeout_ok: bool = False) -> None:
        import pymysql
        try:
            c.execute(sql)
        except pymysql.err.MySQLError as e:
            code = e.args[0] if e.args and isinstance(e.args[0], int) else None
            if timeout_ok and code in ER_LOCK_WAIT_TIMEOUT:
                return
            if code in ER_LOCK_WAIT_TIMEOUT:
                raise ConsistencyError(
                    f"mysql {self.dsn}: {what} not granted within {self.lock_timeout:g} s "
                    f"(a long query or LOCK TABLES holds the tables)") from None
            if code in ER_SPECIFIC_ACCESS or code in ER_ACCESS_DENIED:
                raise ConsistencyError(f"mysql {self.dsn}: {what} refused: {one_line(e)}") from None
            raise ConsistencyError(f"mysql {self.dsn}: {what} failed: {one_line(e)}") from None

    def _layout(self, c) -> tuple[str, str, list]:
        c.execute("SELECT @@datadir, @@version")
        datadir, version = c.fetchone()
        dirs = []
        for var in ("innodb_data_home_dir", "innodb_log_group_home_dir", "innodb_undo_directory"):
            try:
                c.execute(f"SELECT @@{var}")
                dirs.append(c.fetchone()[0] or "")
            except Exception:
                pass
        return datadir, version, dirs

    def _status(self, c, name: str) -> str | None:
        c.execute("SHOW GLOBAL STATUS LIKE %s", (name,))
        row = c.fetchone()
        return row[1] if row else None

    def _lsn(self, c) -> int:
        v = self._status(c, "Innodb_lsn_current")           # MariaDB
        if v is not None:
            return int(v)
        c.execute("SHOW ENGINE INNODB STATUS")               # MySQL
        text = c.fetchone()[2]
        for line in text.splitlines():
            if line.startswith("Log sequence number"):
                return int(line.split()[-1])
        raise ConsistencyError(f"mysql {self.dsn}: cannot read InnoDB's log sequence number")

    def _lower_dirty_pct(self, c) -> None:
        """Make the page cleaner write every dirty page, fast, until the backup ends.

        innodb_max_dirty_pages_pct = 0 makes it flush all dirty pages; it then writes about
        innodb_io_capacity pages a second (default 200, 3 MB/s: half a minute for 100 MB of
        freshly loaded rows), so that is raised too. All three are put back by close().
        """
        names = guard.SETTINGS
        try:
            c.execute("SELECT " + ", ".join(f"@@GLOBAL.{n}" for n in names))
            current = dict(zip(names, c.fetchone()))
            # Another backup of this server running now has lowered them: its originals are ours.
            saved = guard.running_originals(self._datadir or "") or current
            applied = {"innodb_max_dirty_pages_pct": 0,
                       "innodb_io_capacity_max": max(int(saved["innodb_io_capacity_max"]), FLUSH_IO_CAPACITY),
                       "innodb_io_capacity": max(int(saved["innodb_io_capacity"]), FLUSH_IO_CAPACITY)}
            self._arm_guardian(c, {k: _jsonable(v) for k, v in saved.items()}, applied)
            self._saved_flushing = saved
            c.execute("SET GLOBAL innodb_max_dirty_pages_pct = 0")
        except ConsistencyError:
            raise
        except Exception as e:
            self._saved_flushing = None
            raise ConsistencyError(f"mysql {self.dsn}: cannot make InnoDB flush its pages "
                                   f"(needs SUPER or SYSTEM_VARIABLES_ADMIN): {one_line(e)}") from None
        try:
            c.execute(f"SET GLOBAL innodb_io_capacity_max = {applied['innodb_io_capacity_max']}")
            c.execute(f"SET GLOBAL innodb_io_capacity = {applied['innodb_io_capacity']}")
        except Exception:
            pass  # slower, still correct

    def _arm_guardian(self, c, saved: dict, applied: dict) -> None:
        """Start the guardian and write the state file (guardian.py) before any change."""
        assert self._datadir is not None, "after _layout"
        try:
            self._guardian = guard.Guardian.arm(dict(self.opts), self._datadir, self.dsn, saved, applied,
                                                guard.server_started(c))
        except OSError as e:
            raise ConsistencyError(f"mysql {self.dsn}: cannot start the process that puts InnoDB's "
                                   f"settings back should the backup be killed: {e}") from None

    def _restore_dirty_pct(self, c) -> None:
        saved = self._saved_flushing
        if saved:
            c.execute(f"SET GLOBAL innodb_io_capacity = {int(saved['innodb_io_capacity'])}")
            c.execute(f"SET GLOBAL innodb_io_capacity_max = {int(saved['innodb_io_capacity_max'])}")
            c.execute(f"SET GLOBAL innodb_max_dirty_pages_pct = {float(saved['innodb_max_dirty_pages_pct'])}")
            self._saved_flushing = None
        if self._guardian is not None and self._saved_flushing is None:
            self._guardian.disarm()
            self._guardian = None

    def _preflush(self, c) -> None:
        """Before the lock, while writers run: let the page cleaner bring the dirty pages down,
        so that the flush left to do under the lock is small. Gives up quietly (the lock then
        waits longer) after rest_timeout or when the count stops falling."""
        deadline = time.monotonic() + self.rest_timeout
        best, best_at = None, time.monotonic()
        while time.monotonic() < deadline:
            dirty = int(self._status(c, "Innodb_buffer_pool_pages_dirty") or 0)
            if dirty <= PREFLUSH_PAGES:
                return
            if best is None or dirty < best * 0.9:
                best, best_at = dirty, time.monotonic()
            elif time.monotonic() - best_at > 3:
                return
            time.sleep(0.1)

    def _rest(self, c) -> int:
        """Wait until InnoDB has no dirty page and its LSN holds still; return that LSN."""
        deadline = time.monotonic() + self.rest_timeout
        last = None
        steady = 0
        while True:
            dirty = int(self._status(c, "Innodb_buffer_pool_pages_dirty") or 0)
            lsn = self._lsn(c)
            steady = steady + 1 if (dirty == 0 and lsn == last) else 0
            if steady >= 2:
                return lsn
            last = lsn
            if time.monotonic() > deadline:
                raise ConsistencyError(f"mysql {self.dsn}: InnoDB did not come to rest within "
                                       f"{self.rest_timeout:g} s ({dirty} dirty pages)")
            time.sleep(0.02 if dirty == 0 else 0.05)

    def _binlog_position(self, c) -> dict:
        out: dict = {}
        for sql in ("SHOW MASTER STATUS", "SHOW BINARY LOG STATUS"):
            try:
                c.execute(sql)
                row = c.fetchone()
                if row:
                    out["binlog_file"], out["binlog_position"] = row[0], int(row[1])
                break
            except Exception:
                continue
        for var in ("gtid_binlog_pos", "gtid_executed"):
            try:
                c.execute(f"SELECT @@GLOBAL.{var}")
                out["gtid"] = c.fetchone()[0]
                break
            except Exception:
                continue
        return out

    def _innodb_files(self) -> list[str]:
        """Every InnoDB file under the data directory and the InnoDB directories."""
        found: set[str] = set()
        for top in {os.path.realpath(str(self._datadir)), *self._innodb_dirs}:
            for dirpath, _dirnames, filenames in os.walk(top):
                for f in filenames:
                    if any(fnmatch.fnmatch(f, p) for p in INNODB_PATTERNS):
                        found.add(os.path.join(dirpath, f))
                if os.path.basename(dirpath) == "#innodb_redo":  # MySQL 8.0.30+
                    found.update(os.path.join(dirpath, f) for f in filenames)
        return sorted(found)

    def _rescue_copy(self) -> None:
        """Copy every InnoDB file now (lock held, InnoDB at rest) for extra_files()."""
        if self._tmpdir is None:
            self._tmpdir = tempfile.mkdtemp(prefix="pointsafe-mysql-")
        self._extra = []
        for i, path in enumerate(self._innodb_files()):
            dst = os.path.join(self._tmpdir, str(i))
            shutil.copyfile(path, dst)
            self._extra.append((relative_to_source(path, self.source, "mysql"), dst))

    def _unlock(self, c) -> None:
        c.execute("UNLOCK TABLES")
        if self._locked_at is not None:
            self._info["lock_held_seconds"] = round(time.monotonic() - self._locked_at, 4)
            self._locked_at = None
        self._restore_dirty_pct(c)


def _jsonable(v: Any) -> Any:
    """A server value (Decimal, int, str) as JSON can hold it."""
    try:
        return int(v) if float(v) == int(float(v)) else float(v)
    except (TypeError, ValueError):
        return str(v)
