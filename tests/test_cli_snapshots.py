"""``pointsafe snapshots [--prune] [--json]`` and the snapshot shown by ``points``/``show``, on
a real loop-mounted btrfs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from _backup_util import backup as cli_backup
from _backup_util import one_error_line
from btrfs_util import btrfs_volume, make_subvolume
from conftest import run_cli
from pointsafe.cas import Safe

SNAPDIR = ".pointsafe-snapshots"


def listed(safe_dir: Path) -> list[dict]:
    return json.loads(run_cli("snapshots", "--json", safe=safe_dir, check=True).out)["snapshots"]


def leftover(vol: Path, safe_dir: Path, name: str, stamp: str, partial: bool) -> Path:
    """A snapshot as a killed backup (partial) or an older backup leaves it, made by btrfs itself."""
    with Safe.open(safe_dir) as s:
        sid = s.config.safe_id
    path = vol / SNAPDIR / f"{sid[:16]}-{name}@{stamp}{'.partial' if partial else ''}"
    subprocess.run(["btrfs", "subvolume", "snapshot", "-r", str(vol), str(path)], check=True, capture_output=True)
    return path


def test_snapshots_lists_and_prunes(tmp_path, safe_dir):
    with btrfs_volume(tmp_path) as mnt:
        vol = make_subvolume(mnt, "data")
        (vol / "d").mkdir()
        (vol / "d" / "f").write_text("x" * 5000)
        r = run_cli("snapshots", safe=safe_dir, check=True)
        assert r.out.strip() == "no snapshots"
        a = cli_backup(safe_dir, vol, "--snapshot", "btrfs")
        b = cli_backup(safe_dir, vol / "d", name="d")
        items = listed(safe_dir)
        assert sorted((x["name"], x["state"], x["method"]) for x in items) == [
            ("d", "retained", "btrfs"), ("data", "retained", "btrfs")]
        assert {x["path"] for x in items} == {a["snapshot"]["path"], b["snapshot"]["path"]}
        killed = leftover(vol, safe_dir, "data", "20991231T000000.000000Z", partial=True)
        older = leftover(vol, safe_dir, "d", "20000101T000000.000000Z", partial=False)
        items = {x["path"]: x["state"] for x in listed(safe_dir)}
        assert items[str(killed)] == "stale" and items[str(older)] == "stale"
        assert items[a["snapshot"]["path"]] == "retained"
        text = run_cli("snapshots", safe=safe_dir, check=True).out
        assert "stale    btrfs    data  " in text and str(killed) in text
        r = run_cli("snapshots", "--prune", "--json", safe=safe_dir, check=True)
        out = json.loads(r.out)
        assert sorted(x["path"] for x in out["removed"]) == sorted([str(killed), str(older)])
        assert sorted(x["state"] for x in out["snapshots"]) == ["retained", "retained"]
        assert not killed.exists() and not older.exists()
        assert sorted(os.listdir(vol / SNAPDIR)) == sorted(Path(p["snapshot"]["path"]).name for p in (a, b))


def test_points_and_show_say_how_the_source_was_frozen(tmp_path, safe_dir):
    with btrfs_volume(tmp_path) as mnt:
        vol = make_subvolume(mnt, "data")
        (vol / "f").write_text("x")
        snap = cli_backup(safe_dir, vol, "--snapshot", "btrfs")
        live = cli_backup(safe_dir, vol, "--snapshot", "none")
        lines = run_cli("points", safe=safe_dir, check=True).out.splitlines()
        assert "SNAPSHOT" in lines[0]
        assert lines[1].split()[-2] == "btrfs" and lines[2].split()[-2] == "none"
        show = run_cli("show", snap["id"], safe=safe_dir, check=True).out
        line = [x for x in show.splitlines() if x.startswith("snapshot")][0]
        assert "btrfs taken " in line and " held " in line and snap["snapshot"]["path"] in line
        show = run_cli("show", live["id"], safe=safe_dir, check=True).out
        assert "none (the live source was read: not a point in time)" in show
        rec = json.loads(run_cli("show", live["id"], "--json", safe=safe_dir, check=True).out)
        assert rec["snapshot"] == "none"


def test_prune_refuses_while_a_backup_runs_and_keeps_its_snapshot(tmp_path, safe_dir):
    with btrfs_volume(tmp_path) as mnt:
        vol = make_subvolume(mnt, "data")
        (vol / "f").write_text("x")
        ready = tmp_path / "ready"
        cmd = [sys.executable, "-m", "pointsafe.cli", "--safe", str(safe_dir), "backup", str(vol),
               "--snapshot", "btrfs", "--post-thaw", f"echo $$ > {tmp_path}/hook.pid; touch {ready}; exec sleep 30"]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 60
            while not ready.exists():
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.02)
            running = os.listdir(vol / SNAPDIR)
            assert len(running) == 1 and running[0].endswith(".partial")
            r = run_cli("snapshots", "--prune", safe=safe_dir)
            one_error_line(r)
            assert os.listdir(vol / SNAPDIR) == running
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.communicate(timeout=60)
            try:
                os.kill(int((tmp_path / "hook.pid").read_text()), signal.SIGKILL)
            except (OSError, ValueError):
                pass
        assert os.listdir(vol / SNAPDIR) == []
