"""Run one CLI command as a recorded task.

For every command, before it runs: set up logging, and mark abandoned the tasks of processes
that died (this is "the next time the safe is opened"). For a command whose parser declares
``task_kind`` (``p.set_defaults(task_kind="backup")``), or that is named like one of the
task kinds (backup, restore, forget, gc, defrag, verify, repair): record a running task, run the
command, then end the task as ok, warning or error from its exit code or exception, raise the
alerts it calls for, and check the standing conditions (stale sources, quotas). Backups are
refused below the hard quota and stopped by the writers' space check when they reach it.
SIGTERM (systemd stopping a job) unwinds the command like Ctrl-C, so its task ends as error.

How a task ends (``state``):

- ``ok`` / ``warning`` / ``error`` from the command's exit code or exception. ``error`` raises a
  critical alert, ``warning`` a warning one.
- ``usage``: the command was refused for a usage error, an exception whose class says so
  (``exc.usage``: UsageError, PointNotFound; cas/errors.py), which the rooms raise only while
  checking the command's input, before any work. A mistyped command (an unknown point, a
  source that does not exist, a ``--path`` not in the point) is kept in the history, so that
  ``pointsafe tasks`` shows who ran what, but it is not a failure of the safe: it raises no
  alert, is not reported by mail, and ``status`` neither lists its name as a source nor shows
  it as a source's last backup task. What it costs: a scheduled backup whose source vanished
  raises no alert of its own (its exit status, its one line on stderr and a warning in the log
  still say so); the stale alert of its name (no new point for its interval) fires as before.
  Bad command lines that argparse rejects never reach this module. NotASafe is not a usage
  error: a mistyped ``--safe`` is never recorded (there is no index), so a NotASafe that is
  recorded means a damaged safe.
- an **internal error** (a bug: any exception that is not an error pointsafe expects, see
  ``ops.logs.is_bug``) ends the task as ``error`` with ``fields.bug`` (the exception's type) and
  ``error`` = the line the user sees, naming the file with the traceback; it alerts.

Recording never turns a successful command into a failure: if the safe's index cannot be
written (a full disk, a damaged index), the command runs anyway and a note says the task was
not recorded. The index is opened only around the command, never during it (LMDB forbids a
process to open one environment twice).
"""

from __future__ import annotations

import gc as _pygc
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Callable

import lmdb

from pointsafe.cas import Point, SafeError
from pointsafe.cas.index import Index, data_file_problem
from pointsafe.cas.store import INDEX_DIR

from . import alerts, config, logs, quota, tasks
from .db import is_encrypted, opened, read_points, use_crypto, writable

ARG_FIELDS = ("source", "name", "point", "target", "path")
# Commands recorded even if their parser does not declare task_kind (the kinds of the issue).
KIND_BY_COMMAND = {k: k for k in ("backup", "restore", "forget", "gc", "defrag", "verify", "repair")}


class Terminated(KeyboardInterrupt):
    """SIGTERM (systemd stopping a job, a shutdown): unwind like Ctrl-C so the task is ended."""


def safe_dir_of(args) -> Path | None:
    """The safe the command works on, if it is there (a header and an index that is not
    visibly damaged: the command itself reports a damaged one)."""
    p = getattr(args, "safe", None) or os.environ.get("POINTSAFE_SAFE")
    if not p:
        return None
    p = Path(p)
    try:
        if not ((p / "header").is_file() and (p / INDEX_DIR / "data.mdb").is_file()):
            return None
        return p if data_file_problem(p / INDEX_DIR) is None else None
    except OSError:   # e.g. permission denied: the command itself says so
        return None


Unlock = Callable[[Path], Any]    # safe folder -> its Crypto (None: a plain safe)


class _Recorder:
    def __init__(self, args, argv: list[str], unlock: Unlock | None = None):
        self.args = args
        self.unlock = unlock
        self.argv = argv
        self.kind: str | None = (getattr(args, "task_kind", None)
                                 or KIND_BY_COMMAND.get(getattr(args, "command", None) or ""))
        self.safe_dir = safe_dir_of(args)
        self.task: dict | None = None
        self.settings: dict[str, str] | None = None
        self.noted = False

    def note(self, what: str, e: BaseException) -> None:
        """Say once that recording failed; the command goes on."""
        logs.event(logging.WARNING, f"could not {what}: {e}")
        if not self.noted:
            self.noted = True
            print(f"pointsafe: note: could not {what} in the safe ({e}); the command is not affected",
                  file=sys.stderr)

    # -- before ---------------------------------------------------------------------------------

    def start(self) -> None:
        """Sweep abandoned tasks and record this command's task (a note if that fails).

        A safe this process may not write (a read-only filesystem, no write permission on the
        index) cannot hold a task history: nothing is recorded and nothing is said."""
        if self.safe_dir is None or not writable(self.safe_dir):
            return
        if not self._unlocked():
            return
        try:
            with opened(self.safe_dir) as idx:
                for t in alerts.sweep_abandoned(idx):
                    logs.event(logging.ERROR, f"{t['kind']} task {t['id']} (started {t['started']}) was "
                               f"abandoned: {t['error']}", task=t["id"], kind=t["kind"], state="abandoned")
                if self.kind:
                    self.settings = config.effective(config.load(idx))
                    self.task = tasks.create(idx, self.kind, self.argv, self._arg_fields())
        except Exception as e:
            self.note("record the task" if self.kind else "check the task history", e)
            return
        if self.task:
            logs.event(logging.INFO, f"{self.kind} task {self.task['id']} started: pointsafe {' '.join(self.argv)}",
                       task=self.task["id"], kind=self.kind, state="running", argv=self.argv)

    def _unlocked(self) -> bool:
        """Unlock an encrypted safe before anything is written to it (its task values are
        sealed): True when the recorder may write. A wrong or missing password raises here,
        so the command fails with nothing written. A command that declares
        ``needs_key=False`` (init, key list, key import) is not recorded on an encrypted safe."""
        assert self.safe_dir is not None
        if not is_encrypted(self.safe_dir):
            return True
        if self.unlock is None or not getattr(self.args, "needs_key", True):
            return False
        try:
            use_crypto(self.safe_dir, self.unlock(self.safe_dir))
        except SafeError as e:
            if self.kind != "repair":
                raise
            # repair mends what may make unlocking fail (a replaced header): it unlocks by
            # itself with the header it keeps; this run is not recorded
            logs.event(logging.WARNING, f"repair is not recorded in the task history: {e}")
            return False
        return True

    def _arg_fields(self) -> dict:
        out = {}
        for a in ARG_FIELDS:
            v = getattr(self.args, a, None)
            if isinstance(v, (str, Path)) and str(v):
                out[a] = str(v)
        return out

    def guard_space(self) -> None:
        """Backups: refuse below the hard quota, warn below the soft one, stop at the hard one."""
        if self.kind != "backup" or self.safe_dir is None:
            return
        settings = self.settings or config.effective({})
        quota.preflight(self.safe_dir, settings)
        sp = quota.space(self.safe_dir)
        if quota.state(sp, settings) == "soft":
            msg = quota.describe(sp, settings, "soft")
            print(f"pointsafe: warning: {msg}", file=sys.stderr)
            logs.event(logging.WARNING, msg, kind="quota")
        self.args.space_check = quota.guard(settings)   # handed to the backup's writer (cli/cmd_backup.py)

    # -- after ----------------------------------------------------------------------------------

    def finish(self, code: int | None, exc: BaseException | None, active: tasks.ActiveTask) -> None:
        state, error = self._outcome(code, exc, active)
        fields = dict(active.fields)
        fields.pop("error", None)
        if state == "error" and exc is not None and logs.is_bug(exc):
            fields["bug"] = type(exc).__name__
        safe_dir = self.safe_dir
        if self.task is None or safe_dir is None:    # (a task is only ever made in a safe)
            return
        started = self.task["started"]
        rec = None
        for attempt in range(2):
            try:
                with opened(safe_dir) as idx:
                    if self.kind == "backup" and state in ("ok", "warning") and "point" not in fields:
                        p = self._new_point(idx, started)
                        if p:
                            fields.setdefault("point", p.id)
                            fields.setdefault("name", p.name)
                    rec = tasks.finish(idx, self.task["id"], state, error=error, fields=fields,
                                       warnings=active.warnings, warning_count=active.warning_count,
                                       exit_code=code if exc is None else _exit_code_of(exc))
                    if rec is not None:
                        self._task_alerts(idx, rec)
                    alerts.evaluate(idx, safe_dir)
                break
            except Exception as e:
                if attempt == 0 and "already open" in str(e):
                    _pygc.collect()   # a command left its safe open: let it be closed, then retry
                    continue
                self.note("record the end of the task", e)
                break
        level = {"ok": logging.INFO, "warning": logging.WARNING, "usage": logging.WARNING}.get(state, logging.ERROR)
        summary = f"{self.kind} task {self.task['id']} ended {state}"
        if state == "usage":
            summary = f"{self.kind} task {self.task['id']} refused (a usage error; no alert): {error}"
        elif error:
            summary += f": {error}"
        elif active.warning_count:
            summary += f" with {active.warning_count} warning(s); first: {_warning_line(active.warnings[0])}"
        if fields.get("point"):
            summary += f" (point {str(fields['point'])[:12]})"
        logs.event(level, summary, task=self.task["id"], kind=self.kind, state=state, error=error,
                   warnings=active.warning_count, **{k: v for k, v in fields.items() if _plain(v)})

    def _outcome(self, code, exc, active) -> tuple[str, str | None]:
        reported = active.fields.get("error")
        if exc is not None:
            if isinstance(exc, Terminated):
                return "error", "terminated by SIGTERM (a stopped job or a shutdown)"
            if isinstance(exc, KeyboardInterrupt):
                return "error", "interrupted (Ctrl-C or SIGINT)"
            if isinstance(exc, SafeError):
                return ("usage" if exc.usage else "error"), str(exc)
            if isinstance(exc, OSError):
                where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
                return "error", f"{where}{exc.strerror or exc}"
            if isinstance(exc, lmdb.Error):
                return "error", f"the safe's index: {exc}"
            if isinstance(exc, SystemExit):
                code = exc.code if isinstance(exc.code, int) else 1
            else:   # a bug: its traceback goes to a log file, named in the task's error
                return "error", logs.bug_line(exc, logs.record_bug(exc, self.argv))
        code = code or 0
        if code == 0:
            return ("warning" if active.warning_count else "ok"), None
        if code == 3:
            return "warning", None
        return "error", reported or f"the command exited with code {code}"

    def _new_point(self, idx: Index, started: str) -> Point | None:
        """The point that finished last, at or after ``started`` (the backup's own), or None."""
        best: Point | None = None
        best_finished = ""
        with idx.read() as t:
            for p in read_points(idx, t):
                finished = p.finished or ""
                if finished >= started and (best is None or finished > best_finished):
                    best, best_finished = p, finished
        return best

    def _task_alerts(self, idx, rec: dict) -> None:
        state, kind, tid = rec["state"], rec["kind"], rec["id"]
        src = rec["fields"].get("name") or rec["fields"].get("source")
        if state == "warning":
            from pointsafe.ingest.changed_blocks import MISSED_WRITES
            for w in rec["warnings"]:
                if MISSED_WRITES in str(w.get("message", "")):
                    # a periodic full read caught the change source out: the points before it
                    # may lack those writes
                    alerts.raise_alert(idx, "verify", "critical", f"{kind} task {tid}: {_warning_line(w)}; the "
                                       "incremental points before it may lack those writes", task=tid, source=src)
            first = f"; first: {_warning_line(rec['warnings'][0])}" if rec["warnings"] else ""
            n = rec["warning_count"]
            msg = (f"{kind} task {tid} finished with {n} warning{'s' if n != 1 else ''}{first}" if n else
                   f"{kind} task {tid} finished with warnings")
            alerts.raise_alert(idx, "task", "warning", msg, task=tid, source=src)
        elif state == "error":
            if kind == "verify":
                alerts.raise_alert(idx, "verify", "critical", f"verify (task {tid}) failed: {rec['error']}", task=tid)
            else:
                alerts.raise_alert(idx, "task", "critical", f"{kind} task {tid} failed: {rec['error']}",
                                   task=tid, source=src)


def _exit_code_of(exc: BaseException) -> int:
    """The exit code the CLI gives for this exception (cli/main.py)."""
    if isinstance(exc, KeyboardInterrupt):
        return 130
    if isinstance(exc, SystemExit):
        return exc.code if isinstance(exc.code, int) else 1
    return exc.exit_code if isinstance(exc, SafeError) else 1


def _warning_line(w: dict) -> str:
    return f"{w['path']}: {w['message']}" if w.get("path") else w["message"]


def _plain(v: Any) -> bool:
    return isinstance(v, (str, int, float, bool)) or v is None


def run_recorded(args, argv: list[str] | None = None, unlock: Unlock | None = None) -> int:
    """Run ``args.func(args)`` as described in the module docstring; returns its exit code.

    ``unlock`` gives an encrypted safe's Crypto (cli/password.py: the password sources); it is
    called before anything is recorded, and its errors (a wrong password) propagate with
    nothing written. Without it an encrypted safe records no task.

    Exceptions of the command propagate (after being recorded) so that the CLI prints them.
    """
    logs.setup(getattr(args, "log_file", None), getattr(args, "syslog", False),
               getattr(args, "syslog_socket", None))
    rec = _Recorder(args, list(sys.argv[1:] if argv is None else argv), unlock)
    rec.start()
    if rec.kind is None:
        return args.func(args)
    active = tasks.activate(rec.kind)
    code = None
    old_term = _catch_sigterm()
    try:
        rec.guard_space()
        code = args.func(args)
    except BaseException as e:
        rec.finish(None, e, active)
        raise
    else:
        rec.finish(code, None, active)
    finally:
        tasks.deactivate()
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
    return code


def _catch_sigterm():
    """Turn SIGTERM into Terminated while a task runs (only if nobody else handles it)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return None

    def on_term(signum, frame):
        raise Terminated()
    signal.signal(signal.SIGTERM, on_term)
    return signal.SIG_DFL
