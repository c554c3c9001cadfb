"""Agents' backups through the safe server are points in time, as local ones: the agent takes
the snapshot on its own machine (real ``pointsafe serve`` on loopback, real loop btrfs)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from _server_util import add_agent, agent, backup_json, make_safe, running, safe_state
from _tree_util import assert_trees_equal, snapshot as tree_snapshot
from btrfs_util import btrfs_volume, make_subvolume
from test_snapshot_btrfs import fill, moving_writer, problems, snaps


def test_agent_backup_of_a_btrfs_subvolume_is_read_from_a_snapshot_kept_once(tmp_path):
    safe = make_safe(tmp_path)
    tok = add_agent(safe, "web1", "--can-restore")
    log = tmp_path / "hooks.log"
    with btrfs_volume(tmp_path) as mnt, running(safe) as server:
        vol = make_subvolume(mnt, "data")
        fill(vol)
        first = backup_json(server, tok, vol, "--pre-freeze", f"echo freeze >> {log}",
                            "--post-thaw", f"echo thaw $POINTSAFE_SNAPSHOT >> {log}")
        snap = first["snapshot"]
        assert snap["method"] == "btrfs" and snap["held_s"] >= 0, snap
        assert first["source"] == str(vol.resolve())
        assert log.read_text().split("\n")[:2] == ["freeze", "thaw btrfs"]
        assert snaps(vol) == [Path(snap["path"]).name]    # the newest kept, as locally
        second = backup_json(server, tok, vol)
        assert second["snapshot"]["method"] == "btrfs"
        assert second["stats"]["bytes_read"] == 0          # change detection across snapshots
        assert second["upload"]["objects_uploaded"] == 0 and second["upload"]["bytes_uploaded"] == 0
        assert snaps(vol) == [Path(second["snapshot"]["path"]).name]   # exactly one per source
        r = agent(server, tok, "restore", second["id"], tmp_path / "out")
        assert r.code == 0, r.err
        live = {k: v for k, v in tree_snapshot(vol).items() if not k.startswith(b".pointsafe-snapshots")}
        assert_trees_equal(live, tree_snapshot(tmp_path / "out"), check_root=False)  # SOURCE's tree, no snapshot dir


def _stuck_agent_backup(tmp_path: Path, server, tok: str, vol: Path) -> subprocess.Popen:
    """An agent's backup that stops in its --post-thaw hook (the snapshot taken, nothing read)."""
    ready = tmp_path / "ready"
    env = {k: v for k, v in os.environ.items() if k not in ("POINTSAFE_SAFE", "POINTSAFE_PASSWORD")}
    env["POINTSAFE_TOKEN"] = tok
    hook = f"echo $$ > {tmp_path}/hook.pid; touch {ready}; exec sleep 60"
    proc = subprocess.Popen([sys.executable, "-m", "pointsafe.cli", "backup", str(vol), "--server", server.url,
                             "--post-thaw", hook], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the backup never reached its --post-thaw hook"
        time.sleep(0.02)
    return proc


def _end(tmp_path: Path, proc: subprocess.Popen, sig: int) -> None:
    """Send ``sig`` to the stuck backup and end its hook (by the pid it wrote)."""
    try:
        proc.send_signal(sig)
        proc.communicate(timeout=60)
    finally:
        try:
            os.kill(int((tmp_path / "hook.pid").read_text()), signal.SIGKILL)
        except (OSError, ValueError):
            pass


def test_agent_stale_snapshot_of_a_killed_backup_is_removed_by_the_next(tmp_path):
    safe = make_safe(tmp_path)
    tok = add_agent(safe, "web1")
    with btrfs_volume(tmp_path) as mnt, running(safe) as server:
        vol = make_subvolume(mnt, "data")
        fill(vol)
        kept = backup_json(server, tok, vol)["snapshot"]["path"]
        _end(tmp_path, _stuck_agent_backup(tmp_path, server, tok, vol), signal.SIGKILL)
        assert len(snaps(vol)) == 2 and any(n.endswith(".partial") for n in snaps(vol)), snaps(vol)
        r = agent(server, tok, "backup", vol)
        assert r.code == 0, r.err
        assert "left by an interrupted backup" in r.out
        nxt = json.loads(agent(server, tok, "points", "--json").out)[-1]["snapshot"]["path"]
        assert snaps(vol) == [Path(nxt).name] and Path(kept).name not in snaps(vol)


def test_sigterm_during_an_agent_backup_removes_its_snapshot_and_commits_nothing(tmp_path):
    safe = make_safe(tmp_path)
    tok = add_agent(safe, "web1")
    with btrfs_volume(tmp_path) as mnt, running(safe) as server:
        vol = make_subvolume(mnt, "data")
        fill(vol)
        kept = backup_json(server, tok, vol)["snapshot"]["path"]
        before = safe_state(safe)
        proc = _stuck_agent_backup(tmp_path, server, tok, vol)
        assert len(snaps(vol)) == 2
        _end(tmp_path, proc, signal.SIGTERM)
        assert proc.returncode == 130
        assert snaps(vol) == [Path(kept).name]
        assert not [m for m in open("/proc/self/mountinfo") if ".pointsafe-snapshots" in m]
        assert safe_state(safe)[2] == before[2]     # no point


def test_agent_points_are_consistent_under_a_writer(tmp_path):
    safe = make_safe(tmp_path)
    tok = add_agent(safe, "db1", "--can-restore")
    n = 300
    with btrfs_volume(tmp_path, size="600M") as mnt, running(safe) as server:
        vol = make_subvolume(mnt, "data")
        found = []
        with moving_writer(vol, n) as src:
            for i in range(3):
                p = backup_json(server, tok, src, "--snapshot", "btrfs")
                assert p["snapshot"]["method"] == "btrfs"
                out = tmp_path / f"out-{i}"
                r = agent(server, tok, "restore", p["id"], out)
                assert r.code == 0, r.err
                found.append(problems(out, n))
        assert found == [[]] * 3, [f[:5] for f in found]


def test_agent_snapshot_none_reads_live_and_says_so(tmp_path):
    safe = make_safe(tmp_path)
    tok = add_agent(safe, "web1")
    with btrfs_volume(tmp_path) as mnt, running(safe) as server:
        vol = make_subvolume(mnt, "data")
        fill(vol)
        p = backup_json(server, tok, vol, "--snapshot", "none")
        assert p["snapshot"] == "none"
        assert snaps(vol) == []
        r = agent(server, tok, "points", "--json")
        assert json.loads(r.out)[-1]["snapshot"] == "none"


def test_explicit_snapshot_that_cannot_be_taken_fails_the_agent_backup_with_one_line(tmp_path):
    safe = make_safe(tmp_path)
    tok = add_agent(safe, "web1")
    src = tmp_path / "plain"
    src.mkdir()
    (src / "f").write_text("x")
    with running(safe) as server:
        before = safe_state(safe)
        r = agent(server, tok, "backup", src, "--snapshot", "btrfs")
        assert r.code == 1 and "Traceback" not in r.err, r.err
        assert r.err.strip().startswith("pointsafe: error: --snapshot btrfs:"), r.err
        assert safe_state(safe) == before


def test_a_hostile_agent_sending_a_malformed_snapshot_record_is_refused_and_nothing_stored(tmp_path):
    safe = make_safe(tmp_path)
    tok = add_agent(safe, "evil")
    good = {"method": "btrfs", "taken_at": "2026-12-02T01:00:00.000000Z", "held_s": 0.01}
    with running(safe) as server, server.client(tok) as c:
        before = safe_state(safe)
        for snap in ("live", None, 3, [], {}, {**good, "method": "zfs"}, {**good, "taken_at": "yesterday"},
                     {**good, "held_s": -1}, {**good, "held_s": "0"}, {**good, "held_s": True},
                     {**good, "path": 7}, {**good, "extra": 1}, {"method": "btrfs", "taken_at": good["taken_at"]},
                     {**good, "held_s": float("inf")}):
            body = {"name": "x", "kind": "tree", "source": "/s", "root": None, "snapshot": snap}
            r = c.post("/api/v1/points", content=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
            assert r.status_code == 400, (snap, r.text)
            assert "snapshot" in r.text, r.text
        assert safe_state(safe) == before
        # the record a local backup writes is accepted
        r = c.post("/api/v1/points", json={"name": "x", "kind": "tree", "source": "/s", "root": None,
                                           "snapshot": {**good, "path": "/s/.pointsafe-snapshots/x"}})
        assert r.status_code == 200, r.text
        assert r.json()["snapshot"]["method"] == "btrfs"


def test_info_gives_each_agent_its_own_stable_snapshot_id(tmp_path):
    safe = make_safe(tmp_path)
    toks = [add_agent(safe, n) for n in ("a", "b")]
    with running(safe) as server:
        ids = []
        for t in toks:
            with server.client(t) as c:
                ids.append([c.get("/api/v1/info").json()["snapshot_id"] for _ in range(2)])
    assert ids[0][0] == ids[0][1] and ids[1][0] == ids[1][1] and ids[0][0] != ids[1][0]
    from pointsafe.cas import Safe
    from conftest import PW
    with Safe.open(safe, password=PW, write=False) as s:
        sid = s.config.safe_id
    assert sid[:16] not in ids[0][0] and sid[:16] not in ids[1][0]   # reveals not the safe's id


def test_a_database_integration_that_fails_on_the_agent_is_one_line_and_stores_nothing(tmp_path):
    safe = make_safe(tmp_path)
    tok = add_agent(safe, "web1")
    src = tmp_path / "src"
    src.mkdir()
    (src / "db.sqlite").write_bytes(b"this is not an SQLite database " * 200)
    with running(safe) as server:
        before = safe_state(safe)
        r = agent(server, tok, "backup", src, "--sqlite", src / "db.sqlite")
        assert r.code == 1 and "Traceback" not in r.err, r.err
        assert len(r.err.strip().splitlines()) == 1 and "db.sqlite" in r.err, r.err
        assert safe_state(safe) == before


def test_snapshot_paths_named_by_an_agent_are_never_looked_at_on_the_server(tmp_path):
    """An agent's point names paths on the agent's machine: `pointsafe snapshots` on the server
    (and its pruning) must not go looking in a directory an agent named."""
    from pointsafe.cas import Safe
    from conftest import PW, run_cli
    safe = make_safe(tmp_path)
    tok = add_agent(safe, "evil")
    with Safe.open(safe, password=PW, write=False) as s:
        sid = s.config.safe_id
    victim = tmp_path / "victim" / ".pointsafe-snapshots"
    decoy = victim / f"{sid[:16]}-www@20260101T000000.000000Z"
    decoy.mkdir(parents=True)
    snap = {"method": "btrfs", "taken_at": "2026-12-02T01:00:00.000000Z", "held_s": 0.01, "path": str(decoy)}
    with running(safe) as server, server.client(tok) as c:
        r = c.post("/api/v1/points", json={"name": "www", "kind": "tree", "source": str(tmp_path / "victim"),
                                           "root": None, "snapshot": snap})
        assert r.status_code == 200, r.text
    r = run_cli("snapshots", "--json", safe=safe)
    assert r.code == 0, r.err
    assert json.loads(r.out)["snapshots"] == []
    r = run_cli("snapshots", "--prune", safe=safe)
    assert r.code == 0, r.err
    assert decoy.is_dir()
