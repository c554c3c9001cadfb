"""Quotas on a real, small ext4 filesystem (loop-mounted), filled for real."""

from __future__ import annotations

import pytest

import os

from _ops_util import cli_json, fill_until_free_pct, free_bytes, loop_ext4, open_alerts, task_list
from conftest import needs_root, run_cli

pytestmark = pytest.mark.usefixtures("quota_defaults")   # these tests are about the built-in quotas

MiB = 1 << 20


@needs_root
def test_soft_warning_hard_stop_and_gc_reclaims(tmp_path):
    small = tmp_path / "small"
    small.mkdir()
    (small / "note.txt").write_text("a small source\n")
    big = tmp_path / "big"
    big.mkdir()
    for i in range(3):                                   # 24 MiB that does not compress
        (big / f"part{i}.bin").write_bytes(os.urandom(8 * MiB))
    with loop_ext4(tmp_path, 128) as fs:
        safe = fs / "safe"
        # 1 MiB packs: packs seal and commit while the big backup runs, so its stop leaves
        # committed orphans for gc, not only an uncommitted tail.
        run_cli("init", safe, "--pack-size", "1M", check=True)
        filler = fill_until_free_pct(fs, 15)

        # Soft quota (20%): the backup succeeds, says so, and an alert stays open.
        r = run_cli("backup", small, "--name", "small", safe=safe)
        assert r.code == 0, r.err
        assert "warning: the safe's filesystem has" in r.err and "soft quota keeps 20% free" in r.err
        st, r = cli_json("status", safe=safe, ok_codes=(2,))
        assert st["space"]["state"] == "soft" and 14 < st["space"]["free_pct"] < 16
        assert [(a["kind"], a["severity"]) for a in st["alerts"]] == [("quota", "warning")]

        # Hard quota (10%): the big backup starts (15% free) and is stopped on the way.
        free_before = free_bytes(fs)
        r = run_cli("backup", big, "--name", "big", safe=safe)
        assert r.code == 1
        last = r.err.splitlines()[-1]
        assert last.startswith("pointsafe: error: backup stopped, no point was made: ")
        assert "would cross the hard quota (10% free)" in last
        assert [p["name"] for p in cli_json("points", safe=safe)[0]] == ["small"]
        written = free_before - free_bytes(fs)
        assert written > 2 * MiB                           # it did write before stopping
        t = task_list(safe)[-1]
        assert (t["kind"], t["state"]) == ("backup", "error") and "hard quota" in t["error"]
        kinds = sorted((a["kind"], a["severity"]) for a in open_alerts(safe))
        assert kinds == [("quota", "warning"), ("task", "critical")]   # the stop kept 10% free

        # gc reclaims what the stopped backup wrote; the safe verifies.
        assert run_cli("gc", safe=safe).code == 0
        reserve = safe / "reserve"   # gc keeps room for index commits on a full disk (cas/release.py)
        kept = reserve.stat().st_size if reserve.exists() else 0
        assert free_bytes(fs) + kept >= free_before - 256 * 1024
        assert run_cli("verify", safe=safe).code == 0

        # Below the hard quota a backup is refused before it writes anything.
        fill_until_free_pct(fs, 8, name="filler2")
        r = run_cli("backup", small, "--name", "small", safe=safe)
        assert r.code == 1 and r.err.splitlines()[-1].startswith("pointsafe: error: backup refused: ")
        assert len(cli_json("points", safe=safe)[0]) == 1

        # The quotas are the safe's own settings: lowered, the same backup runs.
        run_cli("config", "set", "quota.hard", "2%", safe=safe, check=True)
        run_cli("config", "set", "quota.soft", "5%", safe=safe, check=True)
        r = run_cli("backup", small, "--name", "small", safe=safe)
        assert r.code == 0 and "warning" not in r.err, r.err
        run_cli("alerts", "ack", "--all", safe=safe, check=True)
        assert run_cli("status", safe=safe).code == 0

        # A full disk: a task that cannot be recorded is noted, and the command still succeeds.
        filler.unlink()
        run_cli("repair", safe=safe, check=True)     # a compact index: recording must grow it
        n_tasks = len(task_list(safe))
        fill_until_free_pct(fs, 0, name="filler3")
        r = run_cli("restore", "small@latest", tmp_path / "restored", safe=safe)
        assert r.code == 0, r.err
        assert (tmp_path / "restored" / "note.txt").read_text() == "a small source\n"
        assert "could not record the task" in r.err and "Traceback" not in r.err
        st, _ = cli_json("status", safe=safe, ok_codes=(0, 2))     # the status page still shows
        assert st["space"]["free"] < 64 * 1024 and len(task_list(safe)) == n_tasks
