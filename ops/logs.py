"""Logs: what pointsafe did, for people reading a file or the system log later.

``--log-file PATH`` appends one JSON object per line: ``time`` (ISO UTC), ``level``,
``message`` (a sentence a person understands), ``pid``, ``host`` and the event's fields (task
id, kind, state, ...). ``--syslog`` sends the same messages to the system logger (``/dev/log``
or ``--syslog-socket PATH``) as ``pointsafe[PID]: message``, facility daemon.

Other rooms log through ``logging.getLogger("pointsafe")`` and need nothing from here.

**Program bugs.** An exception that is not an error pointsafe expects (:func:`is_bug`: not a
SafeError, an OSError or an LMDB error) is a bug. :func:`record_bug` writes its full traceback
where a person can find it, once per exception: into the ``--log-file`` (a JSON line at level
critical with a ``traceback`` field) when one is being written, else into a crash log of its own,
``$XDG_CACHE_HOME/pointsafe/crash-<UTC time>-<pid>.log`` (``~/.cache/pointsafe/`` without
XDG_CACHE_HOME; the directory 0700, the file 0600, as a traceback may show paths and names of
the user's files), falling back to the temporary directory. The user is shown one line,
:func:`bug_line`, naming the bug and that file; the task history records the same line.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import platform
import socket
import sys
import tempfile
import traceback
from pathlib import Path

import lmdb

from pointsafe.cas import SafeError

from .clock import iso, real_now

LOGGER = logging.getLogger("pointsafe")


class JsonLines(logging.Formatter):
    """A log formatter writing one JSON object a line: time, level, message, pid, host and the record's fields."""
    def format(self, record: logging.LogRecord) -> str:
        """``record`` as one line of JSON (sorted keys; values JSON cannot hold as their str())."""
        d = {"time": iso(real_now()), "level": record.levelname.lower(), "message": record.getMessage(),
             "pid": os.getpid(), "host": socket.gethostname()}
        d.update(getattr(record, "fields", {}) or {})
        return json.dumps(d, sort_keys=True, default=str)


def setup(log_file: str | None = None, syslog: bool = False, syslog_socket: str | None = None) -> None:
    """Attach the requested handlers to the ``pointsafe`` logger (idempotent per process)."""
    for h in list(LOGGER.handlers):
        LOGGER.removeHandler(h)
        h.close()
    logging.raiseExceptions = False  # a full disk must not print tracebacks over the output
    LOGGER.setLevel(logging.INFO)
    LOGGER.propagate = False
    if log_file:
        try:
            h = logging.FileHandler(log_file, encoding="utf-8")
        except OSError as e:
            print(f"pointsafe: warning: cannot write the log file {log_file}: {e.strerror or e}", file=sys.stderr)
        else:
            h.setFormatter(JsonLines())
            LOGGER.addHandler(h)
    if syslog or syslog_socket:
        address = syslog_socket or "/dev/log"
        try:
            h = logging.handlers.SysLogHandler(address=address, facility=logging.handlers.SysLogHandler.LOG_DAEMON)
        except OSError as e:
            print(f"pointsafe: warning: cannot reach the system logger at {address}: {e.strerror or e}",
                  file=sys.stderr)
        else:
            h.ident = f"pointsafe[{os.getpid()}]: "
            h.setFormatter(logging.Formatter("%(message)s"))
            LOGGER.addHandler(h)
    if not LOGGER.handlers:
        LOGGER.addHandler(logging.NullHandler())


def event(level: int, message: str, **fields) -> None:
    """Log ``message`` with structured ``fields`` (they appear in the JSON lines)."""
    try:
        LOGGER.log(level, message, extra={"fields": fields})
    except Exception:  # a log that cannot be written must not stop a backup
        pass


# -- program bugs ----------------------------------------------------------------------------------

EXPECTED_ERRORS = (SafeError, OSError, lmdb.Error)
_recorded: list[tuple[BaseException, str | None]] = []   # (exception, where its traceback went)


def is_bug(exc: BaseException) -> bool:
    """True for an exception that means a bug in pointsafe (not an error it expects and reports)."""
    return isinstance(exc, Exception) and not isinstance(exc, EXPECTED_ERRORS)


def describe_bug(exc: BaseException) -> str:
    """``internal error (a bug in pointsafe): Type: message``, on one line."""
    text = " ".join(str(exc).split())
    return f"internal error (a bug in pointsafe): {type(exc).__name__}" + (f": {text}" if text else "")


def bug_line(exc: BaseException, where: str | None) -> str:
    """The one line a user sees for a bug: what it was and where its traceback is."""
    if where:
        return f"{describe_bug(exc)}; the traceback is in {where}"
    return f"{describe_bug(exc)}; the traceback could not be saved and follows"


def record_bug(exc: BaseException, argv: list[str] | None = None) -> str | None:
    """Write the traceback of ``exc`` (see the module docstring); returns the file it is in.

    Called again for the same exception, writes nothing and returns the same path. None when
    no file could be written (the caller then prints the traceback).
    """
    for e, where in _recorded:
        if e is exc:
            return where
    argv = list(sys.argv[1:] if argv is None else argv)
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    where = _log_file_path() or _write_crash_log(exc, argv, tb)
    _recorded.append((exc, where))
    event(logging.CRITICAL, bug_line(exc, where), traceback=tb, argv=argv, bug=type(exc).__name__)
    for h in LOGGER.handlers:
        try:
            h.flush()
        except Exception:
            pass
    return where


def _log_file_path() -> str | None:
    """The --log-file being written, if any."""
    for h in LOGGER.handlers:
        if isinstance(h, logging.FileHandler):
            return h.baseFilename
    return None


def crash_dir() -> Path:
    """Where crash logs go: $XDG_CACHE_HOME/pointsafe, else ~/.cache/pointsafe."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "pointsafe"


def _write_crash_log(exc: BaseException, argv: list[str], tb: str) -> str | None:
    from pointsafe import __version__
    t = real_now()
    name = f"crash-{t.strftime('%Y%m%dT%H%M%SZ')}-{os.getpid()}.log"
    text = (f"pointsafe {__version__} hit a bug; please report it with this file.\n"
            f"time     {iso(t)}\n"
            f"command  pointsafe {' '.join(argv)}\n"
            f"process  pid {os.getpid()} on {socket.gethostname()}, uid {os.getuid()}\n"
            f"python   {platform.python_version()} on {platform.platform()}\n"
            f"error    {describe_bug(exc)}\n\n{tb}")
    for d in (crash_dir(), Path(tempfile.gettempdir())):
        try:
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
            path = d / (name if d != Path(tempfile.gettempdir()) else f"pointsafe-{name}")
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError:
            continue
        try:
            with os.fdopen(fd, "w", encoding="utf-8", errors="backslashreplace") as f:
                f.write(text)
        except OSError:
            continue
        return str(path)
    return None
