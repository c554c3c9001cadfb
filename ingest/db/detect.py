"""Spotting the data directory of a running database server in a tree being backed up.

A file copy of a live MariaDB/MySQL or PostgreSQL data directory, read without ``--mysql`` or
``--postgres``, is usually not a database the server can start from (a MyISAM table torn, InnoDB
pages from different moments). The walk calls :func:`live_database` for every directory it
lists; the backup then warns, naming the database and the option to use. The backup engine
drops that warning for a directory a matching integration covers (``is_covered_warning``).

Cheap by design: the names of the directory decide whether it looks like a data directory at
all (a few membership tests); only then are a pid file and /proc looked at.

- PostgreSQL: ``PG_VERSION``, ``base`` and ``global`` are there, and ``postmaster.pid`` names a
  live process called postgres (or postmaster) whose data directory (line 2 of the pid file, or
  the process's working directory) is this one -- or this one is a snapshot of it (the walk may
  read a btrfs snapshot of SOURCE, which keeps inode numbers; a copy does not). A server shut down cleanly removes the pid file;
  a stale one (crash) names a dead process or another program.
- MariaDB/MySQL: ``mysql`` (the system schema) and one of ``ibdata1``, ``aria_log_control``,
  ``mysql.ibd`` are there, and a live mariadbd/mysqld either is named by a ``*.pid`` file in the
  directory or works in it (the server changes into its data directory at start-up) or was given
  it as ``--datadir``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Sequence

LIVE_DB_MARK = "data directory of a running"

_PG_NAMES = (b"PG_VERSION", b"base", b"global")
_MY_SYSTEM = (b"mysql", b"mysql.ibd")
_MY_ENGINE = (b"ibdata1", b"aria_log_control", b"mysql.ibd")
_PG_PROGRAMS = ("postgres", "postmaster")
_MY_PROGRAMS = ("mariadbd", "mysqld")


@dataclass(frozen=True)
class LiveDatabase:
    """A running server whose data directory was found: what it is, its pid, the option."""
    kind: str      # "PostgreSQL" or "MariaDB/MySQL"
    option: str    # "--postgres" or "--mysql"
    pid: int

    def message(self) -> str:
        """The warning, one line, naming the database and the option to use."""
        example = "--postgres 'host=/run/postgresql user=postgres'" if self.option == "--postgres" \
            else "--mysql /run/mysqld/mysqld.sock"
        return (f"the {LIVE_DB_MARK} {self.kind} server (pid {self.pid}): its files were copied "
                f"while it ran and may not start or may be corrupt; back up with {self.option} "
                f"(e.g. {example})")


def live_database(names: Sequence[bytes], path: bytes | str | Callable[[], bytes]) -> LiveDatabase | None:
    """The running server whose data directory is the directory listed as ``names`` (at
    ``path``, or the path ``path()`` returns: asked for only when the names look like a data
    directory), or None. Never raises.
    """
    try:
        if all(n in names for n in _PG_NAMES):
            return _postgres(_where(path), b"postmaster.pid" in names)
        if any(n in names for n in _MY_SYSTEM) and any(n in names for n in _MY_ENGINE):
            return _mysql(_where(path), [n for n in names if n.endswith(b".pid")])
    except Exception:  # noqa: BLE001 - a detector must never break a backup
        return None
    return None


def _where(path: bytes | str | Callable[[], bytes]) -> bytes:
    return os.fsencode(path() if callable(path) else path)


def _postgres(path: bytes, has_pid_file: bool) -> LiveDatabase | None:
    if not has_pid_file:
        return None
    try:
        with open(os.path.join(path, b"postmaster.pid"), "rb") as f:
            lines = f.read(4096).decode(errors="replace").splitlines()
        pid = int(lines[0].strip())
    except (OSError, ValueError, IndexError):
        return None
    if _program(pid) not in _PG_PROGRAMS:
        return None
    named = os.fsencode(lines[1].strip()) if len(lines) > 1 and lines[1].strip() else b""
    if not (_same_dir(path, named, b"global") or _same_dir(path, _cwd(pid), b"global")):
        return None   # a copy of another server's data directory
    return LiveDatabase("PostgreSQL", "--postgres", pid)


def _mysql(path: bytes, pid_files: list[bytes]) -> LiveDatabase | None:
    for name in pid_files:
        try:
            with open(os.path.join(path, name), "rb") as f:
                pid = int(f.read(64).strip() or b"0")
        except (OSError, ValueError):
            continue
        if _program(pid) in _MY_PROGRAMS:
            return LiveDatabase("MariaDB/MySQL", "--mysql", pid)
    for pid in _pids():
        if _program(pid) in _MY_PROGRAMS and (_same_dir(path, _cwd(pid), b"mysql")
                                             or _same_dir(path, _datadir_arg(pid), b"mysql")):
            return LiveDatabase("MariaDB/MySQL", "--mysql", pid)
    return None


def _same_dir(here: bytes, live: bytes | None, marker: bytes) -> bool:
    """Whether the directory ``here`` is the live data directory ``live``: the same path, or a
    snapshot of it (btrfs keeps inode numbers in a snapshot: the directory and its ``marker``
    entry have the same inodes; a copy has new ones)."""
    if not live:
        return False
    if os.path.realpath(here) == os.path.realpath(live):
        return True
    try:
        a, b = os.stat(here), os.stat(live)
        if (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino) or a.st_ino != b.st_ino:
            return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)
        return (os.stat(os.path.join(here, marker), follow_symlinks=False).st_ino
                == os.stat(os.path.join(live, marker), follow_symlinks=False).st_ino)
    except OSError:
        return False


def _pids() -> list[int]:
    try:
        return [int(n) for n in os.listdir("/proc") if n.isdigit()]
    except OSError:
        return []


def _program(pid: int) -> str | None:
    """The command name of a live process (/proc/PID/comm), None when there is none."""
    if pid <= 0:
        return None
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        if stat[stat.rindex(b")") + 2:][:1] in (b"Z", b"X"):
            return None   # a zombie: dead, only not reaped
        with open(f"/proc/{pid}/comm", "rb") as f:
            return f.read().decode(errors="replace").strip()
    except (OSError, ValueError):
        return None


def _cwd(pid: int) -> bytes | None:
    try:
        return os.readlink(f"/proc/{pid}/cwd".encode())
    except OSError:
        return None


def _datadir_arg(pid: int) -> bytes | None:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            args = f.read().split(b"\0")
    except OSError:
        return None
    for a in args:
        if a.startswith(b"--datadir="):
            return a[len(b"--datadir="):]
    return None
