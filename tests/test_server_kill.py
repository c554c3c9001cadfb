"""The server SIGKILLed during uploads: no partial point; the agent's retry completes with what the
server already has."""

from __future__ import annotations

import json
import os
import signal
import time

from _server_util import add_agent, agent, agent_popen, backup_json, make_safe, safe_state, start, stop
from _tree_util import assert_trees_equal
from _web_util import free_port
from conftest import run_cli


def _source(root, files: int = 16, size: int = 4 << 20):
    root.mkdir()
    for i in range(files):
        (root / f"f{i:02}").write_bytes(os.urandom(size))
    return root


def _wait_for_objects(safe, n: int, proc, timeout: float = 120) -> int:
    deadline = time.monotonic() + timeout
    while True:
        objects = safe_state(safe)[0]
        if objects >= n:
            return objects
        assert proc.poll() is None, "the backup ended before the server was killed"
        assert time.monotonic() < deadline, "the server stored nothing"
        time.sleep(0.02)


def _backup_then_kill(tmp_path):
    """(safe, token, source, port, the agent's process): a backup under way when the server is
    SIGKILLed, once it has stored some objects."""
    safe = make_safe(tmp_path)
    tok = add_agent(safe, "k", "--can-restore")
    src = _source(tmp_path / "src")
    port = free_port()
    server = start(safe, port)
    proc = agent_popen(server, tok, "backup", src, "-q", "--json")
    try:
        _wait_for_objects(safe, 80, proc)
    finally:
        stop(server.proc, signal.SIGKILL)
    return safe, tok, src, port, proc


def test_a_server_killed_mid_upload_leaves_no_point_and_a_rerun_uploads_only_the_rest(tmp_path):
    safe, tok, src, port, proc = _backup_then_kill(tmp_path)
    try:
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 1 and "cannot reach the server" in err.decode(), err.decode()
    objects, _, points = safe_state(safe)
    assert points == [] and objects >= 80          # what was committed stays; no point
    server = start(safe, port)
    try:
        rec = backup_json(server, tok, src)
        up = rec["upload"]
        assert 0 < up["objects_uploaded"] <= up["objects_offered"] - objects, up
        r = agent(server, tok, "restore", rec["id"], tmp_path / "out")
        assert r.code == 0, r.err
    finally:
        stop(server.proc)
    assert_trees_equal(src, tmp_path / "out")
    assert len(safe_state(safe)[2]) == 1
    r = run_cli("verify", safe=safe)
    assert r.code == 0, r.out + r.err


def test_the_agent_rides_out_a_server_restart_and_its_backup_completes(tmp_path):
    safe, tok, src, port, proc = _backup_then_kill(tmp_path)
    server = None
    try:
        server = start(safe, port)          # back within the agent's retries
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err.decode()
        rec = json.loads(out)
        r = agent(server, tok, "restore", rec["id"], tmp_path / "out")
        assert r.code == 0, r.err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if server is not None:
            stop(server.proc)
    assert_trees_equal(src, tmp_path / "out")
    assert safe_state(safe)[2] == [rec["id"]]
    r = run_cli("verify", safe=safe)
    assert r.code == 0, r.out + r.err
