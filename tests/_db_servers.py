"""Private database servers for the database tests, started from the Debian packages.

Each server lives in a temporary directory under /tmp (the pytest base directory is mode 0700
and the servers run as their own unprivileged users, so they could not reach it): a data
directory, and a run directory for the socket, pid file and log. Servers listen only on a unix
socket. ``stop()`` is always called from a ``finally`` by the fixtures; it is idempotent.

Also here: a writer thread that inserts checksummed rows continuously, and the checks that a
restored database holds a gap-free prefix of those rows.
"""

from __future__ import annotations

import glob
import hashlib
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

MARIADBD = "/usr/sbin/mariadbd"
INSTALL_DB = "/usr/bin/mariadb-install-db"


def pg_bindir() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"),
                   key=lambda p: int(Path(p).parent.parent.name))
    return Path(found[-1]).parent if found else None


def mariadb_skip_reason() -> str | None:
    if not (os.path.exists(MARIADBD) and os.path.exists(INSTALL_DB)):
        return "mariadb-server is not installed (scripts/setup installs it)"
    try:
        import pymysql  # noqa: F401
    except ImportError:
        return "PyMySQL is not installed (pip install -e '.[test]')"
    if os.geteuid() != 0:
        return "the MariaDB tests start a server as the mysql user: run as root"
    return None


def postgres_skip_reason() -> str | None:
    if pg_bindir() is None:
        return "postgresql is not installed (scripts/setup installs it)"
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed (pip install -e '.[test]')"
    if os.geteuid() != 0:
        return "the PostgreSQL tests start a server as the postgres user: run as root"
    return None


def new_dir(prefix: str, owner: str | None = None) -> Path:
    d = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    if owner:
        pw = pwd.getpwnam(owner)
        os.chown(d, pw.pw_uid, pw.pw_gid)
    return d


def chown_tree(path: Path, owner: str) -> None:
    subprocess.run(["chown", "-R", f"{owner}:{owner}", str(path)], check=True)


def _wait(pred, timeout: float, what: str, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.05)
    tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
    raise TimeoutError(f"{what} within {timeout} s\n{tail}")


# ----------------------------------------------------------------------------------- MariaDB

@dataclass
class MariaDB:
    """A mariadbd on ``datadir``, listening on ``run/mysqld.sock`` only, as user mysql."""

    datadir: Path
    run: Path
    binlog: bool = True
    proc: subprocess.Popen | None = None

    @property
    def socket(self) -> str:
        return str(self.run / "mysqld.sock")

    @property
    def log(self) -> Path:
        return self.run / "error.log"

    @property
    def dsn(self) -> str:
        return f"mysql://root@localhost/?socket={self.socket}"

    @classmethod
    def create(cls, binlog: bool = True) -> "MariaDB":
        """A fresh data directory (mariadb-install-db), not started."""
        base = new_dir("ps-mariadb-", "mysql")
        datadir, run = base / "data", base / "run"
        for d in (datadir, run):
            d.mkdir()
        chown_tree(base, "mysql")
        subprocess.run([INSTALL_DB, "--no-defaults", "--user=mysql", f"--datadir={datadir}",
                        "--auth-root-authentication-method=socket", "--skip-test-db"],
                       check=True, capture_output=True, timeout=120)
        return cls(datadir, run, binlog)

    def start(self, timeout: float = 90) -> None:
        self.run.mkdir(exist_ok=True)
        chown_tree(self.run, "mysql")
        args = [MARIADBD, "--no-defaults", "--user=mysql", f"--datadir={self.datadir}",
                f"--socket={self.socket}", f"--pid-file={self.run / 'mysqld.pid'}",
                f"--log-error={self.log}", "--skip-networking", "--innodb-buffer-pool-size=64M",
                "--innodb-log-file-size=48M", "--skip-name-resolve"]
        if self.binlog:
            args += ["--log-bin=binlog", "--server-id=1"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait(lambda: self._ping() or self.proc.poll() is not None, timeout,
              "mariadbd did not start", self.log)
        if self.proc.poll() is not None:
            raise RuntimeError(f"mariadbd exited with {self.proc.returncode}\n"
                               + self.log.read_text(errors="replace")[-3000:])

    def _ping(self) -> bool:
        import pymysql
        try:
            pymysql.connect(unix_socket=self.socket, user="root", connect_timeout=1).close()
            return True
        except Exception:
            return False

    def connect(self, **kw):
        import pymysql
        kw.setdefault("user", "root")
        kw.setdefault("autocommit", True)
        return pymysql.connect(unix_socket=self.socket, **kw)

    def sql(self, *statements: str, db: str | None = None) -> list:
        con = self.connect(database=db) if db else self.connect()
        try:
            out = []
            with con.cursor() as c:
                for s in statements:
                    c.execute(s)
                    out = list(c.fetchall())
            return out
        finally:
            con.close()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.datadir.parent, ignore_errors=True)


# ----------------------------------------------------------------------------------- PostgreSQL

@dataclass
class Postgres:
    """A PostgreSQL cluster in ``datadir``, on a unix socket in ``run`` only, as user postgres.

    Role ``postgres`` connects without a password over the socket; role ``alice`` (password
    ``right``) needs scram-sha-256 and lacks the privilege to start a backup.
    """

    datadir: Path
    run: Path
    started: bool = False

    @property
    def bindir(self) -> Path:
        return pg_bindir()

    @property
    def log(self) -> Path:
        return self.run / "postgres.log"

    @property
    def dsn(self) -> str:
        return f"host={self.run} dbname=postgres user=postgres"

    def as_postgres(self, *args, **kw) -> subprocess.CompletedProcess:
        kw.setdefault("check", True)
        kw.setdefault("capture_output", True)
        kw.setdefault("timeout", 120)
        return subprocess.run(["runuser", "-u", "postgres", "--", *map(str, args)], cwd="/tmp", **kw)

    @classmethod
    def create(cls) -> "Postgres":
        base = new_dir("ps-postgres-", "postgres")
        datadir, run = base / "data", base / "run"
        self = cls(datadir, run)
        self.as_postgres(self.bindir / "initdb", "-D", datadir, "-U", "postgres", "-A", "trust", "-k",
                         "--no-sync", "-E", "UTF8", "--locale=C.UTF-8")
        (datadir / "pg_hba.conf").write_text(
            "local all alice scram-sha-256\nlocal all all trust\n")
        with open(datadir / "postgresql.conf", "a") as f:
            f.write("\nlisten_addresses = ''\nfsync = on\nmax_wal_size = 32MB\nmin_wal_size = 32MB\n"
                    "shared_buffers = 32MB\nlog_min_messages = warning\n")
        return self

    def start(self, timeout: float = 90) -> None:
        self.run.mkdir(exist_ok=True)
        chown_tree(self.run, "postgres")
        os.chmod(self.datadir, 0o700)
        r = self.as_postgres(self.bindir / "pg_ctl", "-D", self.datadir, "-l", self.log, "-w",
                             "-t", int(timeout), "-o", f"-k {self.run}", "start", check=False)
        if r.returncode != 0:
            raise RuntimeError(f"pg_ctl start failed: {r.stdout.decode()} {r.stderr.decode()}\n"
                               + (self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""))
        self.started = True

    def connect(self, dbname: str = "postgres", **kw):
        import psycopg
        kw.setdefault("user", "postgres")
        return psycopg.connect(host=str(self.run), dbname=dbname, autocommit=True, **kw)

    def sql(self, *statements: str, dbname: str = "postgres") -> list:
        with self.connect(dbname) as con:
            out: list = []
            for s in statements:
                cur = con.execute(s)
                out = cur.fetchall() if cur.description else []
            return out

    def stop(self) -> None:
        if self.started:
            self.as_postgres(self.bindir / "pg_ctl", "-D", self.datadir, "-m", "fast", "-w", "stop",
                             check=False)
            self.started = False

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.datadir.parent, ignore_errors=True)


# ----------------------------------------------------------------------------------- writer

def payload(i: int) -> tuple[str, str]:
    """Row i's payload and its checksum: deterministic, so a restored row can be checked."""
    data = hashlib.blake2b(str(i).encode(), digest_size=64).hexdigest() * 3
    return data, hashlib.sha256(data.encode()).hexdigest()


@dataclass
class Writer:
    """A thread inserting rows 1, 2, 3, ... with checksums, each insert committed on its own.

    ``insert(conn, i)`` is supplied per database; ``committed`` is the highest id whose
    commit returned. ``stalls`` records the longest wait of a single insert.
    """

    connect: object
    insert: object
    pause: float = 0.002
    committed: int = 0
    longest_insert: float = 0.0
    error: BaseException | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __post_init__(self):
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self, first: int = 1) -> "Writer":
        self.committed = first - 1
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            con = self.connect()
            try:
                i = self.committed + 1
                while not self._stop.is_set():
                    t0 = time.monotonic()
                    self.insert(con, i)
                    self.longest_insert = max(self.longest_insert, time.monotonic() - t0)
                    self.committed = i
                    i += 1
                    if self.pause:
                        time.sleep(self.pause)
            finally:
                con.close()
        except BaseException as e:  # reported by stop()
            self.error = e

    def wait_rows(self, n: int, timeout: float = 60) -> None:
        _wait(lambda: self.committed >= n or self.error is not None, timeout, f"writer reached {n} rows")

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(timeout=60)
        if self.error:
            raise self.error
        return self.committed


def check_prefix(rows: list[tuple], low: int, high: int, what: str) -> int:
    """``rows`` = [(id, data, sum)] sorted by id: ids 1..N with no gap, valid checksums, and
    low <= N <= high (everything committed before the point began is there). Returns N."""
    n = len(rows)
    ids = [r[0] for r in rows]
    assert ids == list(range(1, n + 1)), f"{what}: ids are not a gap-free prefix (n={n})"
    for i, data, csum in rows:
        assert hashlib.sha256(data.encode()).hexdigest() == csum, f"{what}: row {i} checksum"
        assert (data, csum) == payload(i), f"{what}: row {i} content"
    assert low <= n <= high, f"{what}: {n} rows, expected between {low} and {high}"
    return n


# ----------------------------------------------------------------------------------- points

def cli_has(command: str) -> bool:
    """Whether ``pointsafe COMMAND`` exists in this checkout."""
    from pointsafe.cli.main import build_parser
    p = build_parser()
    for a in p._actions:
        if getattr(a, "choices", None) and isinstance(a.choices, dict):
            return command in a.choices
    return False


def backup(run_cli, safe: Path, source: Path, *args) -> tuple[int, dict | None, str]:
    """``pointsafe backup SOURCE --name db ARGS --json``: (exit code, point record, stderr)."""
    import json
    r = run_cli("backup", source, "--name", "db", *args, "--json", safe=safe)
    point = json.loads(r.out) if r.code in (0, 3) and r.out.strip() else None
    return r.code, point, r.err


class PointFiles:
    """The files of a point, through ``pointsafe mount MOUNTPOINT POINT`` (read-only FUSE).

    A context manager yielding the directory that shows the point's tree; always unmounted.
    """

    def __init__(self, run_cli, safe: Path, point_id: str):
        self.run_cli, self.safe, self.point_id = run_cli, safe, point_id
        self.dir = new_dir("ps-mnt-")

    def __enter__(self) -> Path:
        r = self.run_cli("mount", self.dir, self.point_id, safe=self.safe, timeout=60)
        if r.code != 0:
            raise AssertionError(f"pointsafe mount failed ({r.code}): {r.err}")
        _wait(lambda: os.path.ismount(self.dir), 30, "the mount did not appear")
        return self.dir

    def __exit__(self, *exc) -> None:
        try:
            self.run_cli("umount", self.dir, safe=self.safe, timeout=60)
        finally:
            if os.path.ismount(self.dir):
                subprocess.run(["fusermount3", "-u", "-z", str(self.dir)], capture_output=True)
            try:
                os.rmdir(self.dir)
            except OSError:
                pass


class RestoredFiles:
    """Fallback while ``pointsafe mount`` does not exist: ``pointsafe restore POINT TARGET``."""

    def __init__(self, run_cli, safe: Path, point_id: str):
        self.run_cli, self.safe, self.point_id = run_cli, safe, point_id
        self.dir = new_dir("ps-rst-")

    def __enter__(self) -> Path:
        target = self.dir / "point"
        r = self.run_cli("restore", self.point_id, target, safe=self.safe, timeout=300)
        if r.code != 0:
            raise AssertionError(f"pointsafe restore failed ({r.code}): {r.err}")
        return target

    def __exit__(self, *exc) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def point_files(run_cli, safe: Path, point_id: str):
    """Through the mount (RESTORE.md's way); through ``pointsafe restore`` where FUSE cannot run."""
    from conftest import fuse_skip_reason
    use_mount = cli_has("mount") and fuse_skip_reason() is None
    return (PointFiles if use_mount else RestoredFiles)(run_cli, safe, point_id)


def copy_out(src: Path, dst: Path) -> None:
    """RESTORE.md's copy step: ``cp -a SRC/. DST/`` (keeps modes, owners, times, links)."""
    dst.mkdir(parents=True, exist_ok=True)
    subprocess.run(["cp", "-a", f"{src}/.", f"{dst}/"], check=True, capture_output=True, timeout=300)


def points(run_cli, safe: Path) -> list:
    import json
    r = run_cli("points", "--json", safe=safe)
    assert r.code == 0, r.err
    data = json.loads(r.out)
    return data if isinstance(data, list) else data.get("points", [])


def assert_clean(code: int, point: dict | None, err: str, source: Path, replaced: list[str],
                 covered: Path | None = None) -> None:
    """The backup succeeded; any warning is about a file the integration replaced in the point,
    or (``covered``) a file below a directory whose changes the database's own recovery repairs.

    (The live file read by the tree walk may change while read -- the WAL segment being
    written, an SQLite file, a PostgreSQL table in backup mode -- but the point holds the
    integration's consistent version.)
    """
    assert code in (0, 3) and point is not None, err
    allowed = {str(source / r) for r in replaced}
    stray = [w for w in point.get("warnings", []) if w["path"] not in allowed
             and not (covered and w["path"].startswith(str(covered) + "/") and "changed" in w["message"])]
    assert not stray, stray
