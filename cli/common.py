"""What every command shares: the safe argument, JSON output, one-line errors, progress."""

from __future__ import annotations

import argparse
import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from pointsafe.cas import Safe, UsageError
from pointsafe.ops.quota import human_bytes  # noqa: F401  (re-exported for the commands)

EXIT_OK, EXIT_ERROR, EXIT_WARNINGS = 0, 1, 3


def add_common(p: argparse.ArgumentParser, top: bool = False) -> None:
    """--safe and --json, accepted before or after the command name."""
    d = {} if top else {"default": argparse.SUPPRESS}
    p.add_argument("--safe", metavar="PATH", help="the safe (default: $POINTSAFE_SAFE)", **d)
    p.add_argument("--json", action="store_true", help="print a machine-readable result on stdout", **d)
    p.add_argument("--log-file", metavar="PATH", help="append what happens, as JSON lines, to PATH", **d)
    p.add_argument("--syslog", action="store_true", help="also log to the system logger (/dev/log)", **d)
    p.add_argument("--syslog-socket", metavar="PATH", help="log to the syslog socket PATH (implies --syslog)", **d)


def safe_path(args) -> Path:
    path = getattr(args, "safe", None) or os.environ.get("POINTSAFE_SAFE")
    if not path:
        raise UsageError("no safe given: use --safe PATH or set POINTSAFE_SAFE")
    return Path(path)


def open_safe(args) -> Safe:
    return Safe.open(safe_path(args))


def emit_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2, sort_keys=True, default=str)
    sys.stdout.write("\n")


def say(args, text: str = "") -> None:
    """Human output: on stdout normally, on stderr with --json (stdout is for JSON)."""
    print(text, file=sys.stderr if getattr(args, "json", False) else sys.stdout)


def parse_size(text: str) -> int:
    """An argparse type for sizes: 4096, 64K, 256M, 1G (binary units)."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(t[-1:], 1)
    try:
        return int(t[:-1] if t[-1:] in "KMG" else t) * mult
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad size {text!r}: use e.g. 64K, 256M, 1G") from None


@contextmanager
def progress(args, total: int | None, description: str) -> Iterator:
    """A rich progress bar (bytes, rate, ETA) on a terminal; a no-op otherwise.

    Yields ``advance(nbytes)``.
    """
    if getattr(args, "json", False) or not sys.stderr.isatty() or getattr(args, "quiet", False):
        yield lambda n: None
        return
    from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                               TransferSpeedColumn)
    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                  TransferSpeedColumn(), TimeRemainingColumn(), transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)
