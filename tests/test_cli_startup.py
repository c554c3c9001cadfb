"""Start-up: ``pointsafe --version`` imports none of pointsafe's rooms or their libraries, and the
commands a scheduler runs every hour (``backup`` of an unchanged tree, ``status``) import only
what they use -- not the FUSE browser, the web dashboard, gc or mail. (Modules, not wall time:
the machine's load must not make this test fail.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import run_cli

# Run the CLI exactly as the console script does, and write the names of the imported modules
# to a file when the interpreter exits (after the command's own sys.exit).
_WRAPPER = """
import atexit, json, sys
out = sys.argv.pop(1)
atexit.register(lambda: open(out, "w").write(json.dumps(sorted(sys.modules))))
sys.argv[0] = "pointsafe"
from pointsafe.cli.main import run
run()
"""

NEVER_FOR_SCHEDULED = ("trio", "pyfuse3", "pointsafe.fusefs", "pointsafe.web", "starlette",
                       "uvicorn", "jinja2", "rich", "smtplib", "psycopg", "pymysql", "http.server")


def imported_by(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, set[str]]:
    """(the finished process, the modules it had imported) of ``pointsafe ARGS``."""
    out = tmp_path / "modules.json"
    p = subprocess.run([sys.executable, "-c", _WRAPPER, str(out), *args], capture_output=True, text=True,
                       timeout=120)
    return p, set(json.loads(out.read_text()))


def loaded(mods: set[str], names: tuple[str, ...]) -> list[str]:
    return sorted(m for m in mods if any(m == n or m.startswith(n + ".") for n in names))


def test_version_imports_no_room_and_no_library(tmp_path):
    p, mods = imported_by(tmp_path, "--version")
    assert p.returncode == 0 and p.stdout.strip() == "pointsafe 0.1.0", p
    heavy = ("trio", "pyfuse3", "rich", "zstandard", "lmdb", "blake3", "cryptography", "argon2", "pyfastcdc",
             "pointsafe.cas", "pointsafe.ingest", "pointsafe.ops", "pointsafe.fusefs", "pointsafe.gc",
             "pointsafe.web", "subprocess", "logging")
    assert loaded(mods, heavy) == []


def test_help_still_lists_every_command(tmp_path):
    r = run_cli("--help")
    assert r.code == 0
    for cmd in ("init", "backup", "restore", "mount", "gc", "status", "snapshots", "web"):
        assert f"    {cmd}" in r.out, cmd
    r = run_cli("nosuchcommand")
    assert r.code == 2 and "invalid choice" in r.err and "backup" in r.err, r.err


def test_scheduled_backup_and_status_import_only_what_they_use(tmp_path):
    safe, src = tmp_path / "safe", tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("hello")
    run_cli("init", safe, check=True)
    run_cli("backup", src, "-q", safe=safe, check=True)
    p, mods = imported_by(tmp_path, "--safe", str(safe), "backup", str(src), "-q")
    assert p.returncode == 0, p.stderr
    assert "pointsafe.ingest.walk" in mods           # (the wrapper really ran the backup)
    assert loaded(mods, NEVER_FOR_SCHEDULED + ("pointsafe.gc", "pointsafe.ingest.restore")) == []
    p, mods = imported_by(tmp_path, "status", "--safe", str(safe))
    assert p.returncode in (0, 2), p.stderr
    assert "pointsafe.ops.status" in mods             # (status shows fragmentation: it uses gc's walk)
    assert loaded(mods, NEVER_FOR_SCHEDULED + ("pointsafe.ingest.walk", "pointsafe.ingest.restore")) == []


def test_an_option_before_the_command_still_finds_it(tmp_path):
    safe = tmp_path / "safe"
    run_cli("init", safe, check=True)
    r = run_cli("--json", "points", safe=safe)
    assert r.code == 0 and json.loads(r.out) == [], r
    r = run_cli("--safe=" + str(safe), "points", "--json")
    assert r.code == 0 and json.loads(r.out) == [], r
