"""Running ``pointsafe`` on a terminal (a pty), answering its password prompts."""

from __future__ import annotations

import os
import pty
import select
import signal
import sys
import time

from conftest import CLI_ENV


def run_tty(*args, answers: list[str], env: dict | None = None, timeout: float = 120) -> tuple[int, str]:
    """Run ``pointsafe ARGS`` with a pty as its stdin, stdout, stderr and controlling terminal;
    each time it prints a prompt (output ending in ': ') the next of ``answers`` is typed.
    Returns (exit code, everything it printed). ``env`` adds to the environment (None: remove);
    $POINTSAFE_PASSWORD is removed unless ``env`` gives it."""
    e = dict(os.environ)
    e.update(CLI_ENV)
    e.pop("POINTSAFE_PASSWORD", None)
    e.pop("POINTSAFE_SAFE", None)
    for k, v in (env or {}).items():
        if v is None:
            e.pop(k, None)
        else:
            e[k] = v
    argv = [sys.executable, "-m", "pointsafe.cli", *map(str, args)]
    pid, fd = pty.fork()
    if pid == 0:                                  # the child: exec at once
        try:
            os.execve(sys.executable, argv, e)
        finally:
            os._exit(127)
    out = b""
    seen = 0                                      # output already answered
    left = list(answers)
    deadline = time.monotonic() + timeout
    try:
        while True:
            wait = deadline - time.monotonic()
            if wait <= 0:
                os.kill(pid, signal.SIGKILL)
                raise AssertionError(f"pointsafe {' '.join(map(str, args))} did not finish: {out!r}")
            ready, _, _ = select.select([fd], [], [], min(wait, 0.5))
            if not ready:
                continue
            try:
                chunk = os.read(fd, 4096)
            except OSError:                       # EIO: the child closed the terminal
                break
            if not chunk:
                break
            out += chunk
            if left and out[seen:].rstrip(b" ").endswith(b":") and out.endswith(b" "):
                os.write(fd, left.pop(0).encode() + b"\n")
                seen = len(out)
    finally:
        os.close(fd)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), out.decode(errors="replace")
