"""Shared fixtures: a safe with tiny packs, a CLI runner, FUSE helpers."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from pointsafe.cas import Safe

ROOT = Path(__file__).resolve().parent.parent

# Every CLI run gets a password and a cheap KDF, so that the safes the tests make with
# 'pointsafe init' are encrypted (init's default) and cost no 64 MiB Argon2id per command.
TEST_PASSWORD = "test password \u00e9"
PW = TEST_PASSWORD.encode()     # for Safe.open of a CLI-made safe in a test (plain safes ignore it)
CLI_ENV = {"POINTSAFE_PASSWORD": TEST_PASSWORD, "POINTSAFE_KDF_MEMORY_KIB": "8192", "POINTSAFE_KDF_TIME": "1"}
# The machines here keep about 22% of their disk free, near the default soft quota (20%): tests
# that are not about quotas must not start warning when the disk fills a little. Set in the
# environment by clean_env (so a test about the defaults removes it: quota_defaults).
QUOTA_ENV = {"POINTSAFE_DEFAULT_QUOTA_SOFT": "off"}


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    """No $POINTSAFE_SAFE; :data:`CLI_ENV` for every pointsafe process a test starts (run_cli,
    Popen of a backup to kill, a mount's daemon) and for in-process CLI calls."""
    monkeypatch.delenv("POINTSAFE_SAFE", raising=False)
    monkeypatch.delenv("POINTSAFE_NEW_PASSWORD", raising=False)
    for k, v in (CLI_ENV | QUOTA_ENV).items():
        monkeypatch.setenv(k, v)


@pytest.fixture
def quota_defaults(monkeypatch):
    """The built-in quota defaults (20% soft, 10% hard), for tests about them."""
    monkeypatch.delenv("POINTSAFE_DEFAULT_QUOTA_SOFT", raising=False)
    monkeypatch.delenv("POINTSAFE_DEFAULT_QUOTA_HARD", raising=False)


@pytest.fixture
def safe_dir(tmp_path) -> Path:
    """A new safe with small packs, so that small test data still spans many packs."""
    path = tmp_path / "safe"
    Safe.init(path, pack_size=256 * 1024).close()
    return path


@pytest.fixture
def safe(safe_dir):
    s = Safe.open(safe_dir)
    yield s
    s.close()


@dataclass
class Result:
    code: int
    out: str
    err: str


def run_cli(*args, safe: Path | None = None, input: bytes | None = None, timeout: float = 300,
            env: dict | None = None, check: bool = False) -> Result:
    """Run ``pointsafe`` in a subprocess, as a user would, with :data:`CLI_ENV` (the test
    password, a cheap KDF) unless ``env`` says otherwise (a value None removes a variable)."""
    cmd = [sys.executable, "-m", "pointsafe.cli"]
    if safe is not None:
        cmd += ["--safe", str(safe)]
    cmd += [str(a) for a in args]
    e = dict(os.environ)
    e.pop("POINTSAFE_SAFE", None)
    e.update(CLI_ENV)
    for k, v in (env or {}).items():
        if v is None:
            e.pop(k, None)
        else:
            e[k] = v
    p = subprocess.run(cmd, input=input, capture_output=True, timeout=timeout, env=e)
    r = Result(p.returncode, p.stdout.decode(errors="replace"), p.stderr.decode(errors="replace"))
    if check and r.code != 0:
        raise AssertionError(f"pointsafe {' '.join(map(str, args))} exited {r.code}: {r.err}")
    return r


@pytest.fixture
def cli():
    return run_cli


def fuse_skip_reason() -> str | None:
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing"
    if shutil.which("fusermount3") is None:
        return "fusermount3 is not installed"
    if os.geteuid() != 0:
        return "FUSE tests run as root"
    return None


needs_fuse = pytest.mark.skipif(fuse_skip_reason() is not None, reason=fuse_skip_reason() or "")
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (loop mounts, chown, device nodes)")


@pytest.fixture
def safe_with_point(tmp_path) -> tuple[Path, str, Path]:
    """A safe (tiny packs) holding one point of ``src`` (``d/f``, 200 kB random; ``g``): (safe,
    point id, source)."""
    import json
    safe = tmp_path / "safe"
    Safe.init(safe, pack_size=64 * 1024).close()
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "f").write_bytes(os.urandom(200_000))
    (src / "g").write_text("hello\n")
    r = run_cli("backup", src, "--name", "data", "--json", safe=safe, check=True)
    return safe, json.loads(r.out)["id"], src


# A safe in a bucket as a fixture parameter of tests written for local safes (``any_safe``,
# ``safe_home``: local and s3; tests/_s3_util.py), on one SeaweedFS for the session.
from _s3_util import any_safe, safe_home, weed_session  # noqa: E402,F401
