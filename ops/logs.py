"""Logs: what pointsafe did, for people reading a file or the system log later.

``--log-file PATH`` appends one JSON object per line: ``time`` (ISO UTC), ``level``,
``message`` (a sentence a person understands), ``pid``, ``host`` and the event's fields (task
id, kind, state, ...). ``--syslog`` sends the same messages to the system logger (``/dev/log``
or ``--syslog-socket PATH``) as ``pointsafe[PID]: message``, facility daemon.

Other rooms log through ``logging.getLogger("pointsafe")`` and need nothing from here.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import socket
import sys

from .clock import iso, real_now

LOGGER = logging.getLogger("pointsafe")


class JsonLines(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
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
