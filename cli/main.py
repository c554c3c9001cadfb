"""The ``pointsafe`` command: parse, call the rooms, print. No logic of its own.

Each command lives in a module of this package with ``register(subparsers)``; the module
sets ``func(args) -> exit code`` on its parser. Errors derived from SafeError print as one
line (``pointsafe: error: ...``) with their exit code; nothing prints a traceback unless
POINTSAFE_DEBUG is set.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

import lmdb

from pointsafe.cas import SafeError
from pointsafe.ops.recorder import run_recorded

from .common import EXIT_ERROR, add_common

# Command modules, in the order their commands appear in --help.
COMMAND_MODULES = [
    "cmd_safe",      # init, verify, repair
    "cmd_backup",    # backup
    "cmd_points",    # points, show, ls, diff, restore
    "cmd_mount",     # mount, umount
    "cmd_gc",        # forget, gc, defrag
    "cmd_ops",       # tasks, status, alerts, report, config
]

DESCRIPTION = """\
pointsafe keeps recovery points of directory trees, block devices and disk images in a safe:
a deduplicating, compressed, content-addressed store. Any point can be listed, restored or
mounted read-only.

The safe is given by --safe PATH (before or after the command) or $POINTSAFE_SAFE.
Exit codes: 0 ok, 1 error, 3 finished with warnings."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pointsafe", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common(p, top=True)
    p.add_argument("--version", action="version", version="pointsafe " + _version())
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"pointsafe.cli.{name}").register(sub)
    return p


def _version() -> str:
    from pointsafe import __version__
    return __version__


class _Parser(argparse.ArgumentParser):
    pass


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        code = run_recorded(args, argv)   # the command, recorded as a task when it declares task_kind
        sys.stdout.flush()
        return code or 0
    except SafeError as e:
        print(f"pointsafe: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("pointsafe: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except OSError as e:
        if os.environ.get("POINTSAFE_DEBUG"):
            raise
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        print(f"pointsafe: error: {where}{e.strerror or e}", file=sys.stderr)
        return EXIT_ERROR
    except lmdb.Error as e:
        if os.environ.get("POINTSAFE_DEBUG"):
            raise
        hint = "the disk is full" if "No space" in str(e) or "MAP_FULL" in str(e) else "the index may be damaged; try 'pointsafe verify'"
        print(f"pointsafe: error: the safe's index: {e} ({hint})", file=sys.stderr)
        return EXIT_ERROR


def run() -> None:
    sys.exit(main())


if __name__ == "__main__":
    run()
