"""What every command shares: the safe argument, JSON output, one-line errors, progress."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from pointsafe.cas import Safe, UsageError

from . import password
from pointsafe.ops.quota import human_bytes  # noqa: F401  (re-exported for the commands)

EXIT_OK, EXIT_ERROR, EXIT_WARNINGS = 0, 1, 3


def add_common(p: argparse.ArgumentParser, top: bool = False) -> None:
    """--safe and --json, accepted before or after the command name."""
    d: dict[str, Any] = {} if top else {"default": argparse.SUPPRESS}
    p.add_argument("--safe", metavar="PATH", help="the safe (default: $POINTSAFE_SAFE)", **d)
    p.add_argument("--json", action="store_true", help="print a machine-readable result on stdout", **d)
    p.add_argument("--log-file", metavar="PATH", help="append what happens, as JSON lines, to PATH", **d)
    p.add_argument("--syslog", action="store_true", help="also log to the system logger (/dev/log)", **d)
    p.add_argument("--syslog-socket", metavar="PATH", help="log to the syslog socket PATH (implies --syslog)", **d)
    p.add_argument("--s3-endpoint", metavar="URL",
                   help="the S3-compatible store of an s3:// safe (default: $AWS_ENDPOINT_URL, or AWS)", **d)
    p.add_argument("--unsafe-no-locking", action="store_true",
                   help="use an s3:// safe on a store that ignores conditional creation (If-None-Match), "
                        "which cannot keep two writers apart", **d)
    password.add_options(p, d)


def resolve_bucket(args) -> None:
    """When the safe is ``s3://BUCKET/PREFIX``, point ``args.safe`` at its local cache directory,
    made or brought up to date from the bucket (cas/s3safe.py), so that every room below finds
    the safe by its directory. ``init`` makes the bucket safe itself."""
    raw = getattr(args, "safe", None) or os.environ.get("POINTSAFE_SAFE")
    if not raw or not raw.startswith("s3://") or getattr(args, "command", None) in ("init", "umount"):
        return
    from pointsafe.cas.s3safe import resolve
    args.safe = str(resolve(raw, getattr(args, "s3_endpoint", None), getattr(args, "unsafe_no_locking", False)))


def safe_path(args) -> Path:
    """The safe given by --safe or $POINTSAFE_SAFE; UsageError when neither is."""
    path = getattr(args, "safe", None) or os.environ.get("POINTSAFE_SAFE")
    if not path:
        raise UsageError("no safe given: use --safe PATH or set POINTSAFE_SAFE")
    return Path(path)


def open_safe(args, write: bool | None = None) -> Safe:
    """The safe of :func:`safe_path`, opened (read-only when its filesystem is, or with
    ``write=False``), unlocked with its password when it is encrypted (cli/password.py)."""
    return password.open_safe(args, safe_path(args), write=write)


def emit_json(obj: Any) -> None:
    """Print ``obj`` on stdout as indented JSON with sorted keys (values JSON cannot hold as their str())."""
    json.dump(obj, sys.stdout, indent=2, sort_keys=True, default=str)
    sys.stdout.write("\n")


def add_listen_options(p, default: str) -> None:
    """--listen, --tls-cert and --tls-key of a command that serves HTTP (``web``, ``serve``)."""
    p.add_argument("--listen", default=None, metavar="HOST:PORT",
                   help=f"address to listen on (default {default}; [::1]:PORT for IPv6)")
    p.add_argument("--tls-cert", metavar="FILE", help="serve HTTPS with this certificate (PEM)")
    p.add_argument("--tls-key", metavar="FILE", help="the certificate's private key (PEM)")


def announce_serving(what: str, listen, tls: bool) -> Callable[[], None]:
    """The line a server prints on stderr once it listens: ``pointsafe: serving WHAT at URL``."""
    host = f"[{listen.host}]" if ":" in listen.host else listen.host
    url = f"{'https' if tls else 'http'}://{host}:{listen.port}/"
    return lambda: print(f"pointsafe: serving {what} at {url} (Ctrl-C stops)", file=sys.stderr, flush=True)


def say(args, text: str = "") -> None:
    """Human output: on stdout normally, on stderr with --json (stdout is for JSON)."""
    print(text, file=sys.stderr if getattr(args, "json", False) else sys.stdout)


_CONTROL = {c: f"\\x{c:02x}" for c in [*range(0x20), 0x7f, *range(0x80, 0xa0)]}


def printable(text: str) -> str:
    """``text`` with control characters written as ``\\xNN``: what a safe's records hold (file
    names in warnings, what an agent sent) may carry terminal escape sequences, which must not
    reach the reader's terminal."""
    return text.translate(_CONTROL)


def parse_size(text: str) -> int:
    """An argparse type for sizes: 4096, 64K, 256M, 1G (binary units)."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(t[-1:], 1)
    try:
        return int(t[:-1] if t[-1:] in "KMG" else t) * mult
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad size {text!r}: use e.g. 64K, 256M, 1G") from None


PROGRESS_INTERVAL = 30.0   # seconds between progress lines in the log (no terminal)


class Meter:
    """What a long command has done so far, for the progress bar and the progress log lines.

    Call it with ``(nbytes, files=0)`` as work is done; ``set_total(nbytes, files)`` gives (or
    corrects) what is expected, as an estimate. Sizes are shown in binary units, as in every
    summary (``human_bytes``)."""

    def __init__(self, description: str, total: int | None, on_change: Callable[[Meter], None] | None = None,
                 poll: Callable[[], int] | None = None):
        self.description = description
        self.total = total
        self.total_files: int | None = None
        self.estimated = False
        self.done = 0
        self.files = 0
        self.started = time.monotonic()
        self.on_change = on_change or (lambda m: None)
        self.poll = poll
        self.on_phase: Callable[[Meter], None] = lambda m: None

    def __call__(self, nbytes: int, files: int = 0) -> None:
        self.done += nbytes
        self.files += files
        self.on_change(self)

    def set_total(self, nbytes: int | None, files: int | None = None) -> None:
        """Expect about ``nbytes`` and ``files`` (None: unknown)."""
        self.total, self.total_files, self.estimated = nbytes, files, True
        self.on_change(self)

    def phase(self, description: str, total: int | None = None) -> None:
        """A new phase of the job: ``description`` (and ``total``, None: unknown) from now on;
        without a terminal the log gets a progress line for it at once."""
        self.description, self.total, self.estimated = description, total, False
        self.sample()
        self.on_phase(self)

    def sample(self) -> None:
        """Bring ``done`` up to date from the ``poll`` probe, for jobs that report nothing
        themselves (gc, defrag); ``done`` never goes back."""
        if self.poll is not None:
            self.done = max(self.done, self.poll())

    def rate(self) -> float:
        """Bytes per second since the start."""
        return self.done / max(time.monotonic() - self.started, 1e-6)

    def line(self) -> str:
        """One line for a log: ``backing up /src: 1.2 GiB of about 3.4 GiB (35%), ...``."""
        about = "about " if self.estimated else ""
        text = f"{self.description}: {human_bytes(self.done)}"
        if self.total:
            text += f" of {about}{human_bytes(self.total)} ({min(100.0, 100.0 * self.done / self.total):.0f}%)"
        if self.files or self.total_files:
            text += f", {self.files} files" + (f" of {about}{self.total_files}" if self.total_files else "")
        return text + f", {human_bytes(self.rate())}/s"


def progress_interval() -> float:
    """Seconds between progress lines in the log: $POINTSAFE_PROGRESS_INTERVAL, else 30 (0: none)."""
    try:
        return max(0.0, float(os.environ.get("POINTSAFE_PROGRESS_INTERVAL", PROGRESS_INTERVAL)))
    except ValueError:
        return PROGRESS_INTERVAL


@contextmanager
def progress(args: argparse.Namespace, total: int | None, description: str,
             poll: Callable[[], int] | None = None) -> Iterator[Meter]:
    """Progress of a long command. Yields a :class:`Meter` (call it with bytes done).

    On a terminal: a progress bar (bytes done of the total, files, rate, time left), unless
    --json or --quiet. Without a terminal (cron, systemd): every 30 s
    ($POINTSAFE_PROGRESS_INTERVAL) a progress line in the log (--log-file, --syslog), or on
    stderr when there is no log and no --quiet; and a line in the log at each
    :meth:`Meter.phase`.

    A job that reports nothing itself gives ``poll`` instead, a probe of the bytes done so
    far, read before each line; it gets the log lines but no bar."""
    if sys.stderr.isatty():
        if poll is not None or getattr(args, "json", False) or getattr(args, "quiet", False):
            yield Meter(description, total)
            return
        with _bar(description, total) as meter:
            yield meter
        return
    meter = Meter(description, total, poll=poll)
    interval = progress_interval()
    if not interval:
        yield meter
        return
    stop = threading.Event()
    to_stderr = not _has_log() and not getattr(args, "quiet", False)
    command = getattr(args, "command", None)
    meter.on_phase = lambda m: _log_line(m, False, command)
    t = threading.Thread(target=_log_lines, args=(meter, interval, stop, to_stderr, command),
                         name="pointsafe-progress", daemon=True)
    t.start()
    try:
        yield meter
    finally:
        stop.set()
        t.join(timeout=5)


def _has_log() -> bool:
    from pointsafe.ops.logs import LOGGER
    return any(not isinstance(h, logging.NullHandler) for h in LOGGER.handlers)


def _log_lines(meter: Meter, interval: float, stop: threading.Event, to_stderr: bool, command: str | None) -> None:
    while not stop.wait(interval):
        meter.sample()
        _log_line(meter, to_stderr, command)


def _log_line(meter: Meter, to_stderr: bool, command: str | None) -> None:
    """One progress line in the log (and on stderr with ``to_stderr``)."""
    from pointsafe.ops import logs
    line = meter.line()
    logs.event(logging.INFO, line, kind="progress", command=command, done_bytes=meter.done,
               total_bytes=meter.total, files=meter.files, total_files=meter.total_files)
    if to_stderr:
        try:
            print(f"pointsafe: {line}", file=sys.stderr, flush=True)
        except (OSError, ValueError):
            pass


@contextmanager
def _bar(description: str, total: int | None) -> Iterator[Meter]:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
    from rich.text import Text

    class Amount(ProgressColumn):
        def render(self, task) -> Text:
            m: Meter = task.fields["meter"]
            about = "~" if m.estimated else ""
            text = human_bytes(m.done) + (f" / {about}{human_bytes(m.total)}" if m.total else "")
            if m.files or m.total_files:
                text += f", {m.files}" + (f" / {about}{m.total_files}" if m.total_files else "") + " files"
            return Text(text, style="progress.download")

    class Rate(ProgressColumn):
        def render(self, task) -> Text:
            speed = task.finished_speed or task.speed
            return Text("" if speed is None else f"{human_bytes(speed)}/s", style="progress.data.speed")

    def changed(m: Meter) -> None:
        bar.update(task, completed=m.done, total=m.total)

    with Progress(TextColumn("{task.description}"), BarColumn(), Amount(), Rate(), TimeRemainingColumn(),
                  console=Console(stderr=True), transient=True) as bar:   # stdout is for results
        meter = Meter(description, total, changed)
        task = bar.add_task(description, total=total, meter=meter)
        yield meter
