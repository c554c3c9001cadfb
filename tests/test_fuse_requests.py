"""What the kernel asks the mount per small file when `tar` or `find` walks it: the entries come
with their attributes from readdirplus (no lookup, no getattr per file), and each file costs
an open, one read and a release, nothing more. POINTSAFE_MOUNT_COUNT=1 makes the mount count
its requests per kind (the ``requests`` of the stats xattr); without it nothing is counted."""

from __future__ import annotations

import subprocess
import time

import pytest

from _fuse_util import mounted, stats
from conftest import fuse_skip_reason, run_cli

pytestmark = pytest.mark.skipif(fuse_skip_reason() is not None, reason=fuse_skip_reason() or "")

DIRS, PER_DIR = 4, 60
FILES = DIRS * PER_DIR


@pytest.fixture(scope="module")
def safe(tmp_path_factory):
    base = tmp_path_factory.mktemp("requests")
    src = base / "src"
    for d in range(DIRS):
        sub = src / f"d{d}"
        sub.mkdir(parents=True)
        for i in range(PER_DIR):
            (sub / f"f{i:03d}.txt").write_bytes(b"line %d of %d\n" % (i, d) * (1 + i % 40))
    s = base / "safe"
    run_cli("init", s, check=True)
    run_cli("backup", src, "--name", "small", safe=s, check=True, timeout=300)
    return s


def _settled(mp, key: str, want: int, timeout: float = 10.0) -> dict:
    """The request counts once ``key`` reached ``want`` (the kernel sends RELEASE after close
    returns), or as they are after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        req = stats(mp)["requests"]
        if req[key] >= want or time.monotonic() > deadline:
            return req
        time.sleep(0.05)


def test_tar_costs_an_open_a_read_and_a_release_per_file(safe, tmp_path, monkeypatch):
    monkeypatch.setenv("POINTSAFE_MOUNT_COUNT", "1")
    mp = tmp_path / "m"
    with mounted(safe, mp, "latest"):
        before = stats(mp)["requests"]
        p = subprocess.run(f"tar -C {mp} -cf - . | cat > /dev/null", shell=True, timeout=120)
        assert p.returncode == 0
        after = _settled(mp, "release", before["release"] + FILES)
    used = {k: after[k] - before[k] for k in after}
    assert used["open"] == FILES
    assert used["release"] == FILES
    assert FILES <= used["read"] <= FILES + 2          # one read per small file
    assert used["lookup"] == 0                           # every entry came with readdirplus
    assert used["getattr"] <= 3                          # attributes from the listing, cached
    assert used["flush"] <= 1                            # ENOSYS once, then never again
    per_file = sum(used.values()) / FILES
    assert per_file <= 3.2, f"{per_file:.2f} requests per file: {used}"


def test_find_costs_no_request_per_file(safe, tmp_path, monkeypatch):
    monkeypatch.setenv("POINTSAFE_MOUNT_COUNT", "1")
    mp = tmp_path / "m"
    with mounted(safe, mp, "latest"):
        before = stats(mp)["requests"]
        p = subprocess.run(["find", str(mp), "-printf", "%s %m\n"], capture_output=True, timeout=120)
        assert p.returncode == 0 and len(p.stdout.splitlines()) == FILES + DIRS + 1
        after = stats(mp)["requests"]
    used = {k: after[k] - before[k] for k in after if after[k] != before[k]}
    assert used.get("lookup", 0) == 0 and used.get("getattr", 0) <= 2, used
    # per directory: opendir, two readdirs, releasedir (statfs and the stats getxattr aside)
    per_dir = sum(n for k, n in used.items() if k not in ("getxattr", "statfs"))
    assert per_dir <= 4 * (DIRS + 1), used


def test_requests_are_not_counted_unless_asked(safe, tmp_path, monkeypatch):
    monkeypatch.delenv("POINTSAFE_MOUNT_COUNT", raising=False)
    mp = tmp_path / "m"
    with mounted(safe, mp, "latest"):
        assert "requests" not in stats(mp)
