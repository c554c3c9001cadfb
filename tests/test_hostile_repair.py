"""Repair after gc: records of dead nodes that gc left in packs it did not compact."""

from __future__ import annotations

import os

from conftest import run_cli


def _write(src, name: str, size: int) -> None:
    (src / name).write_bytes(os.urandom(size))


def test_repair_after_gc_leaves_a_safe_that_verifies(tmp_path, safe_dir):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(4):
        _write(src, f"f{i}", 600_000)
    run_cli("backup", src, safe=safe_dir, check=True)
    for _ in range(3):
        _write(src, "f0", 600_000)      # the old f0 and the old trees die when forgotten
        run_cli("backup", src, safe=safe_dir, check=True)
    run_cli("forget", "--keep-last", "1", safe=safe_dir, check=True)
    run_cli("gc", safe=safe_dir, check=True)
    run_cli("verify", safe=safe_dir, check=True)
    r = run_cli("repair", safe=safe_dir)
    assert r.code == 0, r.out + r.err
    assert "missing" not in r.out
    r = run_cli("verify", safe=safe_dir)
    assert r.code == 0, r.out + r.err
    # The safe keeps working: gc, a new backup, a restore of every file.
    run_cli("gc", safe=safe_dir, check=True)
    run_cli("backup", src, safe=safe_dir, check=True)
    run_cli("verify", safe=safe_dir, check=True)
    out = tmp_path / "out"
    run_cli("restore", "latest", out, safe=safe_dir, check=True)
    for i in range(4):
        assert (out / f"f{i}").read_bytes() == (src / f"f{i}").read_bytes()


def test_backup_refuses_a_safe_with_a_missing_pack_and_heals_after_repair(tmp_path, safe_dir):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        _write(src, f"f{i}", 300_000)
    run_cli("backup", src, safe=safe_dir, check=True)
    packs = sorted((safe_dir / "packs").iterdir())
    packs[-1].unlink()        # the newest pack: the nodes and the point written last
    r = run_cli("backup", "--name", "again", src, safe=safe_dir)
    assert r.code == 1 and "is missing" in r.err and "'pointsafe repair'" in r.err, r.err
    run_cli("repair", safe=safe_dir)                  # exits 1: objects were lost
    run_cli("backup", "--name", "again", src, safe=safe_dir, check=True)
    run_cli("gc", safe=safe_dir, check=True)
    run_cli("verify", safe=safe_dir, check=True)
    out = tmp_path / "out"
    run_cli("restore", "again@latest", out, safe=safe_dir, check=True)
    for i in range(3):
        assert (out / f"f{i}").read_bytes() == (src / f"f{i}").read_bytes()


def _killed_backup(tmp_path, safe_dir) -> None:
    """A backup SIGKILLed once it has committed a few packs (orphans are left)."""
    import signal
    import subprocess
    import sys
    import time
    src = tmp_path / "src"
    src.mkdir()
    for i in range(40):
        _write(src, f"f{i:02}", 250_000)
    p = subprocess.Popen([sys.executable, "-m", "pointsafe.cli", "--safe", str(safe_dir), "backup", str(src)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while len(list((safe_dir / "packs").iterdir())) < 8 and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=60)


def _dry_run_orphans(safe_dir):
    import re
    dry = run_cli("gc", "--dry-run", safe=safe_dir, check=True).out
    m = re.search(r"bury (\d+) orphans of an interrupted backup \((\d+) objects die", dry)
    if m is None:
        import pytest
        pytest.skip("the backup committed nothing before it was killed")
    return int(m.group(1)), int(m.group(2))


def test_gc_after_a_killed_backup_says_the_same_numbers_as_its_dry_run(tmp_path, safe_dir):
    _killed_backup(tmp_path, safe_dir)
    _, dying = _dry_run_orphans(safe_dir)
    done = run_cli("gc", safe=safe_dir, check=True).out
    assert f"({dying} objects died" in done, done
    run_cli("verify", safe=safe_dir, check=True)


def test_status_counts_the_orphans_of_a_killed_backup(tmp_path, safe_dir):
    import json
    _killed_backup(tmp_path, safe_dir)
    orphans, _ = _dry_run_orphans(safe_dir)
    st = json.loads(run_cli("--json", "status", safe=safe_dir).out)["safe"]
    assert st["orphans"] == orphans
    assert f"{orphans} orphans" in run_cli("status", safe=safe_dir).out
    run_cli("gc", safe=safe_dir, check=True)
    assert json.loads(run_cli("--json", "status", safe=safe_dir).out)["safe"]["orphans"] == 0
