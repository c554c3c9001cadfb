"""Errors: each class carries its exit code and message; a program bug is reported as a bug,
its traceback in a log file (never a bare traceback, never dressed as an ordinary error).

The bug is put in by the test, the rest is real: the test starts the real ``pointsafe`` entry
point in a subprocess after replacing ``Safe.open`` with code that dereferences None (the same
AttributeError as restore's on a missing object today). No input triggers a bug reliably (the
ones found get fixed), and pointsafe has no hook for making one.
"""

from __future__ import annotations

import inspect
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from _ops_util import cli_json, open_alerts, task_list
from conftest import run_cli
from pointsafe.cas import errors

BUG_LINE = "pointsafe: internal error (a bug in pointsafe): AttributeError: 'NoneType' object has no attribute 'kind'"

# Run the real CLI in a process where opening a safe hits a bug (every command that reads a
# safe goes through Safe.open; the task recorder does not).
_BUGGY = """
import sys
from pointsafe.cas.store import Safe
def buggy(*args, **kwargs):
    point = None
    return point.kind
Safe.open = buggy
sys.argv = ["pointsafe"] + sys.argv[1:]
from pointsafe.cli.main import run
run()
"""


def run_buggy(*args, safe: Path, env: dict) -> subprocess.CompletedProcess:
    """``pointsafe --safe SAFE ARGS...`` with the bug above, in a subprocess."""
    e = {k: v for k, v in os.environ.items() if k not in ("POINTSAFE_SAFE", "POINTSAFE_DEBUG")}
    e.update(env)
    cmd = [sys.executable, "-c", _BUGGY, "--safe", str(safe), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=e, check=False)


@pytest.fixture
def src(tmp_path):
    d = tmp_path / "src"
    d.mkdir()
    (d / "a.txt").write_bytes(b"hello\n" * 1000)
    return d


def test_each_error_class_carries_its_code_and_message():
    classes = [c for _, c in inspect.getmembers(errors, inspect.isclass) if issubclass(c, errors.SafeError)]
    assert len(classes) >= 10
    for c in classes:
        assert c.exit_code == 1, c            # the CLI contract: one code for errors
        msg = str(c())                         # raised without a message: its docstring's meaning
        assert msg and "\n" not in msg and msg == c.__doc__.strip().splitlines()[0], c
    assert str(errors.PointNotFound("no point with id 'abcd'")) == "no point with id 'abcd'"
    assert {c.__name__ for c in classes if c.usage} == {"UsageError", "PointNotFound"}
    e = errors.IntegrityError("bad record", pack=3, offset=16)
    assert (str(e), e.pack, e.offset) == ("bad record", 3, 16)


def test_bug_in_a_task_is_logged_with_its_traceback_and_recorded(safe_dir, src, tmp_path):
    cache = tmp_path / "cache"
    assert run_cli("backup", src, "--name", "www", safe=safe_dir).code == 0
    r = run_buggy("verify", safe=safe_dir, env={"XDG_CACHE_HOME": str(cache)})
    assert r.returncode == 1
    assert "Traceback" not in r.stderr and len(r.stderr.splitlines()) == 1, r.stderr
    assert r.stderr.startswith(BUG_LINE + "; the traceback is in "), r.stderr
    assert "pointsafe: error:" not in r.stderr
    # The crash log: under the user's cache, private, with the whole traceback.
    (log,) = (cache / "pointsafe").iterdir()
    assert r.stderr.strip().endswith(str(log))
    assert log.name.startswith("crash-") and log.name.endswith(".log")
    assert stat.S_IMODE(log.stat().st_mode) == 0o600
    assert stat.S_IMODE((cache / "pointsafe").stat().st_mode) == 0o700
    text = log.read_text()
    assert "Traceback (most recent call last)" in text and "in buggy" in text and "cmd_verify" in text
    assert "pointsafe --safe" in text and " verify" in text          # the command line
    # The task: an internal error, naming the same file, and a critical alert.
    t = task_list(safe_dir)[-1]
    assert (t["kind"], t["state"], t["fields"]["bug"]) == ("verify", "error", "AttributeError")
    assert t["error"] == r.stderr.strip().removeprefix("pointsafe: ")
    (a,) = open_alerts(safe_dir)
    assert a["severity"] == "critical" and a["task"] == t["id"] and "a bug in pointsafe" in a["message"]


def test_bug_goes_to_the_log_file_when_one_is_given(safe_dir, src, tmp_path):
    log = tmp_path / "pointsafe.jsonl"
    cache = tmp_path / "cache"
    r = run_buggy("--log-file", log, "show", "latest",
                  safe=safe_dir, env={"XDG_CACHE_HOME": str(cache)})
    assert r.returncode == 1 and len(r.stderr.splitlines()) == 1, r.stderr
    assert r.stderr.strip() == f"{BUG_LINE}; the traceback is in {log}"
    assert not cache.exists()                      # no second copy
    (rec,) = [json.loads(x) for x in log.read_text().splitlines() if "traceback" in json.loads(x)]
    assert rec["level"] == "critical" and rec["bug"] == "AttributeError"
    assert "Traceback (most recent call last)" in rec["traceback"] and "in buggy" in rec["traceback"]


def test_debug_shows_the_bare_traceback(safe_dir, tmp_path):
    r = run_buggy("verify", safe=safe_dir,
                  env={"POINTSAFE_DEBUG": "1", "XDG_CACHE_HOME": str(tmp_path / "c")})
    assert r.returncode == 1 and "Traceback (most recent call last)" in r.stderr
    assert "AttributeError: 'NoneType' object has no attribute 'kind'" in r.stderr


def test_no_cache_to_write_falls_back_to_the_temporary_directory(safe_dir, tmp_path):
    blocked = tmp_path / "not-a-dir"
    blocked.write_text("a file where the cache directory would be")
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    r = run_buggy("verify", safe=safe_dir,
                  env={"XDG_CACHE_HOME": str(blocked), "TMPDIR": str(tmp)})
    assert r.returncode == 1 and len(r.stderr.splitlines()) == 1, r.stderr
    (log,) = tmp.iterdir()
    assert log.name.startswith("pointsafe-crash-") and r.stderr.strip().endswith(str(log))
    assert stat.S_IMODE(log.stat().st_mode) == 0o600


def test_bad_command_lines_are_one_line(safe_dir):
    for args in (("backup",), ("frob",), ("gc", "--threshold", "120")):
        r = run_cli(*args, safe=safe_dir)
        assert r.code == 2 and len(r.err.splitlines()) == 1 and ": error: " in r.err, r.err
        assert "--help" in r.err and "usage:" not in r.err
    h = run_cli("--help")
    assert h.code == 0 and "exit codes:" in h.out and "a bug in pointsafe" in h.out
    assert cli_json("tasks", safe=safe_dir)[0] == []            # nothing ran, nothing recorded
