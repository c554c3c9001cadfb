"""The ``pointsafe`` command: parse, call the rooms, print. No logic of its own.

Each command lives in a module of this package with ``register(subparsers)``; the module
sets ``func(args) -> exit code`` on its parser.

What reaches the user (nothing prints a Python traceback unless POINTSAFE_DEBUG is set):

- an error pointsafe expects (a SafeError, an OSError, an LMDB error): one line,
  ``pointsafe: error: ...``, and the error's exit code (1);
- a bug (any other exception, see ``ops.logs.is_bug``): its traceback is written to the
  --log-file or a crash log, and one line names the bug and that file:
  ``pointsafe: internal error (a bug in pointsafe): KeyError: 'x'; the traceback is in PATH``,
  exit 1. It is never dressed as an ordinary error, so that it gets reported and fixed;
- a command line argparse cannot parse: one line, ``pointsafe CMD: error: ...``, exit 2
  (argparse's code; nothing ran).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import NoReturn

# The rooms, lmdb and the command modules are imported when a command needs them: --version
# imports none of them, and a command imports only its own module (start-up of the commands a
# scheduler runs every hour).

# Command modules, in the order their commands appear in --help.
COMMAND_MODULES = [
    "cmd_safe",      # init, verify, repair
    "cmd_key",       # key list|add|remove|passwd|export|import
    "cmd_backup",    # backup
    "cmd_points",    # points, show, ls, diff, restore
    "cmd_mount",     # mount, umount
    "cmd_gc",        # forget, gc, defrag
    "cmd_ops",       # tasks, status, alerts, report, config
    "cmd_snapshots",  # snapshots
    "cmd_web",       # web, web passwd
    "cmd_serve",     # serve
    "cmd_agent",     # agent add|list|remove|rotate
]
# The module of each command; a command not named here (or --help) registers every module.
COMMAND_OF = {"init": "cmd_safe", "verify": "cmd_safe", "repair": "cmd_safe", "backup": "cmd_backup",
              "points": "cmd_points", "show": "cmd_points", "ls": "cmd_points", "diff": "cmd_points",
              "restore": "cmd_points", "mount": "cmd_mount", "umount": "cmd_mount", "forget": "cmd_gc",
              "gc": "cmd_gc", "defrag": "cmd_gc", "tasks": "cmd_ops", "status": "cmd_ops", "alerts": "cmd_ops",
              "report": "cmd_ops", "config": "cmd_ops", "snapshots": "cmd_snapshots", "web": "cmd_web",
              "key": "cmd_key", "serve": "cmd_serve", "agent": "cmd_agent"}
# top-level options that take a value
_VALUED = ("--safe", "--log-file", "--syslog-socket", "--password-file", "--password-command", "--s3-endpoint")

DESCRIPTION = """\
pointsafe keeps recovery points of directory trees, block devices and disk images in a safe:
a deduplicating, compressed, content-addressed store. Any point can be listed, restored or
mounted read-only.

The safe is given by --safe PATH (before or after the command) or $POINTSAFE_SAFE. An
encrypted safe (init's default) needs its password: --password-file FILE, --password-command
CMD, $POINTSAFE_PASSWORD, or a prompt on a terminal; 'pointsafe key --help' for its keys.
Exit codes: 0 ok, 1 error, 3 finished with warnings."""

EPILOG = """\
exit codes:
  0    ok
  1    error: the command did not do what was asked. The one line after 'pointsafe: error:'
       says why (a bad argument, an unknown point, a damaged safe, a full disk...); every
       error has this code, so scripts test 'non-zero', and people read the line.
       'pointsafe: internal error (a bug in pointsafe): ...' is a bug: its traceback is in
       the file that line names (the --log-file, else $XDG_CACHE_HOME/pointsafe or
       ~/.cache/pointsafe); please report it with that file.
  2    the command line could not be parsed (nothing ran); 'status': alerts are open
  3    finished with warnings (e.g. files that could not be read); 'status --check' follows
       the Nagios plugin convention instead: 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN
  130  interrupted (Ctrl-C, SIGTERM)

A command refused for a usage error (an unknown point, a missing source, a path that is not in
the point) is listed by 'pointsafe tasks' as 'usage' and raises no alert."""


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The argument parser of every command (``--help`` shows DESCRIPTION and EPILOG); given
    the command line ``argv``, only the module of the command it names is imported."""
    from .common import add_common
    p = _Parser(prog="pointsafe", description=DESCRIPTION, epilog=EPILOG,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common(p, top=True)
    p.add_argument("--version", action="version", version="pointsafe " + _version())
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    word = _command_in(argv) if argv is not None else None
    own = COMMAND_OF.get(word) if word is not None else None
    if own is not None:
        importlib.import_module(f"pointsafe.cli.{own}").register(sub)
        if word in sub.choices:
            return p
    for name in COMMAND_MODULES:     # every command (--help, an unknown word, a map out of date)
        if name != own:
            importlib.import_module(f"pointsafe.cli.{name}").register(sub)
    return p


def _command_in(argv: list[str]) -> str | None:
    """The command a command line names: its first word that is neither a top-level option
    nor an option's value (None when there is none, e.g. for --help)."""
    i = 0
    while i < len(argv):
        a = argv[i]
        if not a.startswith("-"):
            return a
        if a == "--":
            return argv[i + 1] if i + 1 < len(argv) else None
        i += 2 if a in _VALUED else 1
    return None


def _version() -> str:
    from pointsafe import __version__
    return __version__


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors on one line (the usage is one --help away)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def main(argv: list[str] | None = None) -> int:
    """Run one command line; returns the exit code (see EPILOG). Never raises but SystemExit."""
    args: argparse.Namespace | None = None
    words = sys.argv[1:] if argv is None else argv
    if words == ["--version"]:   # what argparse would print, without importing any room
        print("pointsafe " + _version())
        return 0
    import lmdb

    from pointsafe.cas import SafeError
    from pointsafe.ops.recorder import run_recorded

    from . import password
    from .common import EXIT_ERROR, resolve_bucket
    try:
        parser = build_parser(words)
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help()
            return 2
        resolve_bucket(args)     # an s3:// safe: its cache directory from here on
        # the command, recorded as a task when it declares task_kind (an encrypted safe is unlocked first)
        code = run_recorded(args, argv, unlock=password.crypto_for(args))
        sys.stdout.flush()
        return code or 0
    except SafeError as e:
        handler = getattr(args, "on_error", None) if args is not None else None   # (status --check)
        handled: int | None = handler(args, e) if handler is not None else None
        if handled is not None:
            return handled
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
        full = "No space" in str(e) or "MAP_FULL" in str(e)
        hint = "the disk is full" if full else "the index may be damaged; try 'pointsafe verify'"
        print(f"pointsafe: error: the safe's index: {e} ({hint})", file=sys.stderr)
        return EXIT_ERROR
    except Exception as e:   # anything else is a bug (ops.logs.is_bug)
        if os.environ.get("POINTSAFE_DEBUG"):
            raise
        return _report_bug(e, argv)


def _report_bug(e: Exception, argv: list[str] | None) -> int:
    """A bug: its traceback to a log file, one line naming it and the file to the user."""
    import traceback

    from pointsafe.ops import logs

    from .common import EXIT_ERROR
    try:
        where = logs.record_bug(e, argv)
    except Exception:   # even the report failed: the traceback is all there is
        where = None
    try:
        sys.stdout.flush()
    except Exception:
        pass
    print(f"pointsafe: {logs.bug_line(e, where)}", file=sys.stderr)
    if where is None:
        traceback.print_exception(type(e), e, e.__traceback__, file=sys.stderr)
    return EXIT_ERROR


def run() -> None:
    """The console entry point: ``main()`` with ``sys.argv``, its result as the exit status."""
    sys.exit(main())


if __name__ == "__main__":
    run()
