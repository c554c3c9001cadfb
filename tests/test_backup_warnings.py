"""Warnings, not holes: what cannot be read (or keeps changing) becomes a warning naming its
path; the point is made and the backup exits 3. Hooks: a failing pre-hook aborts with one line
and makes no point; the post-hook always runs and is told how it went."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from _backup_util import backup, one_error_line, restore
from conftest import needs_root, run_cli
from pointsafe.cas import Safe

TEST_USER = "pointsafe-test"


def unprivileged_user() -> str:
    """A user without CAP_DAC_OVERRIDE to run backups as (created once, no home, no login)."""
    try:
        import pwd
        pwd.getpwnam(TEST_USER)
        return TEST_USER
    except KeyError:
        pass
    r = subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", TEST_USER],
                       capture_output=True, text=True)
    if r.returncode not in (0, 9):   # 9: created meanwhile by someone else
        pytest.skip(f"cannot create a test user: {r.stderr.strip()}")
    return TEST_USER


def unprivileged_prefix(user: str) -> tuple[list[str], bool]:
    """(command prefix, True when it runs as ``user``) for running this Python without the
    power to read what its permissions forbid.

    ``runuser -u USER`` when USER can execute this interpreter. When it cannot (the venv's
    Python lives under /root, mode 0700, on the CI machines), ``setpriv`` runs it as root
    without CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH: the same file permission checks an
    ordinary user meets, on files it does not own (mode 0000 stops even their owner)."""
    probe = subprocess.run(["runuser", "-u", user, "--", sys.executable, "-c", "import pointsafe.cli.main"],
                           capture_output=True, cwd="/")
    if probe.returncode == 0:
        return ["runuser", "-u", user, "--"], True
    if shutil.which("setpriv") is None:
        pytest.skip(f"{user} cannot run {sys.executable} and setpriv is missing")
    return ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--"], False


@needs_root
def test_unreadable_file_and_directory_become_warnings(tmp_path):
    if shutil.which("runuser") is None:
        pytest.skip("runuser (util-linux) is missing")
    user = unprivileged_user()
    prefix, as_user = unprivileged_prefix(user)
    # pytest's tmp_path is private to root: work in a directory the user can reach
    work = Path(tempfile.mkdtemp(prefix="ps-unpriv-", dir="/tmp"))
    try:
        os.chmod(work, 0o1777)   # the post-hook, run as that user, writes its status file here
        src = work / "src"
        (src / "sub").mkdir(parents=True)
        (src / "ok.txt").write_text("readable\n")
        (src / "sub" / "fine").write_text("also readable\n")
        secret = src / "secret.bin"
        secret.write_bytes(b"top secret\n")
        secret.chmod(0o000)
        os.link(secret, src / "sub" / "secret-link")   # its other name: a warning too, not a hole
        locked = src / "locked"
        locked.mkdir()
        (locked / "inside").write_text("x")
        locked.chmod(0o000)
        safe = work / "safe"
        Safe.init(safe, pack_size=256 * 1024).close()
        if as_user:
            subprocess.run(["chown", "-R", f"{user}:", str(safe)], check=True)
        status = work / "status"
        hook = f"echo $POINTSAFE_STATUS > {status}"
        cmd = [*prefix, sys.executable, "-m", "pointsafe.cli", "--safe", str(safe),
               "backup", str(src), "--json", "--post-hook", hook]
        env = {k: v for k, v in os.environ.items() if k != "POINTSAFE_SAFE"}
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=work)
        assert p.returncode == 3, f"exit {p.returncode}: {p.stderr}"
        assert "Traceback" not in p.stderr
        point = json.loads(p.stdout)
        paths = {w["path"]: w["message"] for w in point["warnings"]}
        assert any(k.endswith("/src/secret.bin") for k in paths), point["warnings"]
        assert any(k.endswith("/src/sub/secret-link") for k in paths), point["warnings"]
        assert any(k.endswith("/src/locked") for k in paths), point["warnings"]
        assert len(paths) == 3, point["warnings"]
        assert status.read_text().strip() == "warning"
        # the point is there, with everything that could be read
        assert point["stats"]["files"] >= 2
        r = run_cli("show", point["id"], "--json", safe=safe)
        assert r.code == 0 and json.loads(r.out)["warnings"] == point["warnings"]
        out = work / "out"
        restore(safe, point["id"], out, expect=0)
        assert (out / "ok.txt").read_text() == "readable\n"
        assert (out / "sub" / "fine").read_text() == "also readable\n"
        assert not (out / "secret.bin").exists(), "an unread file must not be restored as a hole"
        assert not (out / "sub" / "secret-link").exists(), "nor its other names"
    finally:
        for d in (work / "src" / "locked",):
            if d.exists():
                d.chmod(0o755)
        shutil.rmtree(work, ignore_errors=True)


# Appends a few bytes every 0.2 ms: the size changes many times during every read attempt
# (whatever the timestamp granularity), and the raised priority lets it wake up on time even on
# a busy machine, while it takes little CPU from the backup it races.
WRITER = """
import os, sys, time
path, stop = sys.argv[1], sys.argv[2]
try:
    os.nice(-15)
except OSError:
    pass
with open(path, "ab", buffering=0) as f:
    open(stop + ".started", "w").close()
    while not os.path.exists(stop):
        f.write(b"more data\\n")
        time.sleep(0.0002)
"""


def test_file_changing_while_read_is_a_warning(safe_dir, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "stable").write_bytes(os.urandom(100_000))
    busy = src / "busy.log"
    busy.write_bytes(os.urandom(4 << 20))
    stop = tmp_path / "stop"
    w = subprocess.Popen([sys.executable, "-c", WRITER, str(busy), str(stop)])
    try:
        deadline = time.monotonic() + 30
        while not Path(str(stop) + ".started").exists():
            assert time.monotonic() < deadline and w.poll() is None, "writer did not start"
            time.sleep(0.01)
        p = backup(safe_dir, src, "-q", expect=3)
    finally:
        stop.touch()
        w.wait(timeout=30)
    msgs = [x for x in p["warnings"] if x["path"].endswith("busy.log")]
    assert len(msgs) == 1 and "chang" in msgs[0]["message"], p["warnings"]
    assert len(p["warnings"]) == 1
    out = tmp_path / "out"
    restore(safe_dir, p["id"], out)
    assert (out / "stable").read_bytes() == (src / "stable").read_bytes()
    assert (out / "busy.log").stat().st_size > 4 << 20   # the last read is kept


def test_pre_hook_failure_aborts_without_a_point(safe_dir, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("x")
    status = tmp_path / "status"
    r = run_cli("backup", src, "--pre-hook", "echo checking >&2; echo 'database is down' >&2; exit 7",
                "--post-hook", f"echo $POINTSAFE_STATUS > {status}", safe=safe_dir)
    line = one_error_line(r, "pre-hook", "7")
    assert "database is down" in line
    assert status.read_text().strip() == "error", "the post-hook runs after a failure too"
    assert json.loads(run_cli("points", "--json", safe=safe_dir).out) == []


def test_hooks_run_in_order_around_the_reading(safe_dir, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    log = tmp_path / "log"
    p = backup(safe_dir, src, "--pre-hook", f"echo dumped > $POINTSAFE_SOURCE/dump.sql; echo pre $POINTSAFE_NAME >> {log}",
               "--post-hook", f"echo post $POINTSAFE_STATUS >> {log}", name="db")
    assert log.read_text().splitlines() == ["pre db", "post ok"]
    # the pre-hook ran before reading: what it wrote is in the point
    r = run_cli("ls", p["id"], "--json", safe=safe_dir)
    assert [e["path"] for e in json.loads(r.out)] == ["dump.sql"]


def test_pre_hook_may_create_the_source(safe_dir, tmp_path):
    src = tmp_path / "snapshot"
    status = tmp_path / "status"
    p = backup(safe_dir, src, "--pre-hook", f"mkdir -p {src} && echo data > {src}/f",
               "--post-hook", f"echo $POINTSAFE_STATUS > {status}")
    assert p["stats"]["files"] == 1
    assert status.read_text().strip() == "ok"


def test_busy_safe_is_one_line_and_the_post_hook_still_runs(safe_dir, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    status = tmp_path / "status"
    with Safe.open(safe_dir) as safe, safe.writer("another backup"):
        r = run_cli("backup", src, "--post-hook", f"echo $POINTSAFE_STATUS > {status}", safe=safe_dir)
    one_error_line(r, "busy", "another backup")
    assert status.read_text().strip() == "error"
    assert json.loads(run_cli("points", "--json", safe=safe_dir).out) == []
