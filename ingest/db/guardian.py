"""Server settings a live ``--mysql`` backup changes are put back, whatever ends the backup.

Reading a live data directory, the MySQL integration lowers ``innodb_max_dirty_pages_pct`` to 0
and raises ``innodb_io_capacity(_max)`` (mysql.py says why). Those are global settings: they
outlive the backup's connection, so a backup killed with SIGKILL (or by the OOM killer, or a
machine-room script) would leave the server flushing at full speed for good. Two things stop
that:

1. **A guardian process.** Before changing anything, the backup starts
   ``python -m pointsafe.ingest.db.guardian`` in a session of its own (so a signal to the
   backup's process group does not reach it), hands it on its stdin the original values, the
   values set and how to connect, and keeps that pipe open. When the backup puts the settings
   back itself, it writes ``done`` and closes the pipe; the guardian exits. When the pipe closes
   without ``done`` -- the backup died, however -- the guardian connects and puts back every
   setting that still holds the value the backup set (one changed since by someone else is left
   alone). It ignores SIGTERM, SIGINT and SIGHUP: a service stop that signals every process of
   the unit makes the backup end, and then the guardian restores.

2. **A state file**, written (fsync'd) before the first setting is changed and removed once they
   are back: ``$XDG_STATE_HOME/pointsafe/mysql-settings/<server>-<pid>.json`` (by default
   ``~/.local/state/pointsafe/...``), holding the originals, the values set, the backup's and
   the guardian's pid (with their start times and the boot id, so that a reused pid is not
   taken for them) and when the server started. Should the guardian die too (SIGKILL of the
   whole service), the next ``backup --mysql`` of that server finds the file, puts the settings
   back (``repair_left``) and says so in a warning on its point; ``left_behind()`` lists such
   files for a status check. A server restarted since took its settings from its configuration:
   the file is then just removed.

No password is written to the state file; the guardian gets the connection options (password
included) on its stdin only.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

SETTINGS = ("innodb_max_dirty_pages_pct", "innodb_io_capacity_max", "innodb_io_capacity")
# The order to put them back in: innodb_io_capacity may not exceed innodb_io_capacity_max.
RESTORE_ORDER = ("innodb_io_capacity", "innodb_io_capacity_max", "innodb_max_dirty_pages_pct")
RESTART_SLACK = 5.0   # seconds: a server start time that moved more than this means a restart


def state_dir() -> Path:
    """Where the state files are: $XDG_STATE_HOME/pointsafe/mysql-settings (~/.local/state/...)."""
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "pointsafe" / "mysql-settings"


def server_key(datadir: str) -> str:
    """A short name for a server in file names: from its data directory (one server per)."""
    return hashlib.blake2b(os.path.normpath(datadir).encode(), digest_size=8).hexdigest()


# ------------------------------------------------------------------------------ processes

def boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def process_start(pid: int) -> int | None:
    """The start time of a live process (clock ticks since boot), None when there is none (or
    only a zombie: a dead process nobody reaped)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
        fields = data[data.rindex(b")") + 2:].split()
        return None if fields[0] in (b"Z", b"X") else int(fields[19])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid: int | None, start: int | None, boot: str) -> bool:
    return bool(pid) and boot == boot_id() and start is not None and process_start(int(pid or 0)) == start


def _owners_alive(state: dict) -> bool:
    boot = state.get("boot_id", "")
    return (_alive(state.get("pid"), state.get("pid_start"), boot)
            or _alive(state.get("guardian_pid"), state.get("guardian_start"), boot))


# ------------------------------------------------------------------------------ state files

def _write_durably(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, json.dumps(data, indent=1).encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _states(datadir: str | None = None) -> list[tuple[Path, dict]]:
    d = state_dir()
    prefix = server_key(datadir) + "-" if datadir is not None else ""
    out = []
    try:
        names = sorted(os.listdir(d))
    except OSError:
        return []
    for n in names:
        if not n.endswith(".json") or not n.startswith(prefix):
            continue
        try:
            out.append((d / n, json.loads((d / n).read_text())))
        except (OSError, ValueError):
            continue
    return out


def running_originals(datadir: str) -> dict[str, Any] | None:
    """The originals recorded by a backup of this server that is running now (its lowered
    values must not be taken for the server's own), or None."""
    for _path, state in _states(datadir):
        if _owners_alive(state):
            return dict(state["saved"])
    return None


def left_behind() -> list[dict]:
    """State files of backups (and guardians) that are all gone: settings possibly left
    changed on those servers. Each: the file, the server's data directory, the DSN (no
    password), the originals and the values set, the dead backup's pid and when it wrote."""
    out = []
    for path, state in _states():
        if not _owners_alive(state):
            out.append({"file": str(path), **{k: state.get(k) for k in
                        ("datadir", "dsn", "saved", "applied", "pid", "written_at")}})
    return out


def server_started(cursor: Any) -> float:
    """When the server started (Unix time, to a second), from its uptime."""
    cursor.execute("SHOW GLOBAL STATUS LIKE 'Uptime'")
    return time.time() - float(cursor.fetchone()[1])


# ------------------------------------------------------------------------------ restoring

def restore_settings(cursor: Any, saved: dict, applied: dict) -> list[str]:
    """Put back, of ``saved``, each setting that still holds the value in ``applied``; return
    "name: now -> back" for each one put back."""
    done = []
    for name in RESTORE_ORDER:
        if name not in saved or name not in applied:
            continue
        cursor.execute(f"SELECT @@GLOBAL.{name}")
        now = cursor.fetchone()[0]
        if _same(now, applied[name]) and not _same(now, saved[name]):
            cursor.execute(f"SET GLOBAL {name} = {_literal(name, saved[name])}")
            done.append(f"{name} {_show(now)} -> {_show(saved[name])}")
    return done


def _same(a: Any, b: Any) -> bool:
    try:
        return abs(float(a) - float(b)) < 1e-9
    except (TypeError, ValueError):
        return str(a) == str(b)


def _literal(name: str, v: Any) -> str:
    return repr(float(v)) if name == "innodb_max_dirty_pages_pct" else str(int(float(v)))


def _show(v: Any) -> str:
    f = float(v)
    return str(int(f)) if f == int(f) else f"{f:g}"


def repair_left(cursor: Any, datadir: str) -> list[str]:
    """Find what killed backups (and their guardians) of this server left, put it back, remove
    their state files; return one message per such backup for the user. Backups running now
    are left alone."""
    msgs = []
    started = server_started(cursor)
    for path, state in _states(datadir):
        if _owners_alive(state):
            continue
        who = f"a backup killed before it could put the server's settings back (pid {state.get('pid')}, " \
              f"{state.get('written_at')})"
        if abs(float(state.get("server_started", 0)) - started) > RESTART_SLACK:
            path.unlink(missing_ok=True)   # restarted since: its settings are its configuration's
            continue
        done = restore_settings(cursor, state.get("saved", {}), state.get("applied", {}))
        path.unlink(missing_ok=True)
        if done:
            msgs.append(f"{who} had left {', '.join(done.copy())}: put back")
        else:
            msgs.append(f"{who}: its settings had already been changed since; left as they are")
    return msgs


# ------------------------------------------------------------------------------ the guardian

class Guardian:
    """The guardian process of one backup (see the module's docstring)."""

    def __init__(self, proc: subprocess.Popen, state_path: Path):
        self.proc = proc
        self.state_path = state_path

    @classmethod
    def arm(cls, connect_opts: dict, datadir: str, dsn: str, saved: dict, applied: dict,
            started: float) -> "Guardian":
        """Start the guardian and write the state file, both before any setting is changed;
        OSError when either cannot be done."""
        proc = subprocess.Popen([sys.executable, "-m", "pointsafe.ingest.db.guardian"],
                                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True, close_fds=True,
                                cwd="/")   # holds no directory of the source (a mount) busy
        try:
            path = state_dir() / f"{server_key(datadir)}-{os.getpid()}.json"
            state = {"datadir": datadir, "dsn": dsn, "saved": saved, "applied": applied,
                     "pid": os.getpid(), "pid_start": process_start(os.getpid()),
                     "guardian_pid": proc.pid, "guardian_start": process_start(proc.pid),
                     "boot_id": boot_id(), "server_started": started,
                     "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            _write_durably(path, state)
            assert proc.stdin is not None
            proc.stdin.write(json.dumps({"opts": connect_opts, "saved": saved, "applied": applied,
                                         "state": str(path)}).encode() + b"\n")
            proc.stdin.flush()
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        return cls(proc, path)

    def disarm(self) -> None:
        """The settings are back: tell the guardian, wait for it, remove the state file."""
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write(b"done\n")
            self.proc.stdin.close()
        except (OSError, ValueError):
            pass   # the guardian is gone already
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.state_path.unlink(missing_ok=True)


def _guard() -> int:
    """The guardian's main: wait for the backup's pipe to close; restore unless told ``done``."""
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    cfg = json.loads(sys.stdin.buffer.readline() or b"null")
    if not cfg:
        return 0
    rest = sys.stdin.buffer.read()   # returns at EOF: when the backup closes it or dies
    if rest.startswith(b"done"):
        return 0
    import pymysql
    for attempt in range(30):
        try:
            con = pymysql.connect(autocommit=True, connect_timeout=10, **cfg["opts"])
            try:
                restore_settings(con.cursor(), cfg["saved"], cfg["applied"])
            finally:
                con.close()
            Path(cfg["state"]).unlink(missing_ok=True)
            return 0
        except Exception:  # noqa: BLE001 - the server may be restarting: try again, then leave the file
            time.sleep(min(10, 1 + attempt))
    return 1


if __name__ == "__main__":
    sys.exit(_guard())
