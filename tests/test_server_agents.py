"""pointsafe serve with real agents: concurrent backups, restores byte for byte, dedup, tokens."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time

from _server_util import (add_agent, agent, agent_popen, backup_json, chunk_bytes, make_safe, running, safe_state, start,
                          stop)
from _tree_util import all_types_tree, assert_trees_equal, make_tree
from conftest import run_cli


def _tree(root, seed: int):
    """A tree with one of everything, plus data of its own (so agents differ)."""
    make_tree(root, all_types_tree(seed))
    (root / "own").write_bytes(os.urandom(700_000) + str(seed).encode())
    return root


def test_three_agents_back_up_at_once_and_each_restores_its_own_points_byte_for_byte(tmp_path):
    safe = make_safe(tmp_path)
    tokens = {n: add_agent(safe, n, "--can-restore") for n in ("alpha", "beta", "gamma")}
    srcs = {n: _tree(tmp_path / f"src-{n}", i) for i, n in enumerate(tokens)}
    with running(safe) as server:
        procs = {n: agent_popen(server, tokens[n], "backup", srcs[n], "-q", "--json") for n in tokens}
        points = {}
        for n, p in procs.items():
            out, err = p.communicate(timeout=300)
            assert p.returncode == 0, err.decode()
            points[n] = json.loads(out)
        for n, tok in tokens.items():
            r = agent(server, tok, "points", "--json")
            assert r.code == 0, r.err
            assert [p["id"] for p in json.loads(r.out)] == [points[n]["id"]]   # its own, no other
            target = tmp_path / f"restored-{n}"
            r = agent(server, tok, "restore", points[n]["id"][:12], target)
            assert r.code == 0, r.err
            assert_trees_equal(srcs[n], target)
    # the server's safe holds them as any point, restorable on the server too
    r = run_cli("restore", points["beta"]["id"], tmp_path / "on-server", safe=safe)
    assert r.code == 0, r.err
    assert_trees_equal(srcs["beta"], tmp_path / "on-server")
    r = run_cli("verify", safe=safe)
    assert r.code == 0, r.out + r.err


def test_an_unchanged_second_backup_uploads_nothing_and_a_changed_file_only_its_chunks(tmp_path):
    safe = make_safe(tmp_path)
    tok = add_agent(safe, "web1", "--can-restore")
    src = _tree(tmp_path / "src", 1)
    with running(safe) as server:
        first = backup_json(server, tok, src)
        assert first["upload"]["objects_uploaded"] > 0
        before = safe_state(safe)
        second = backup_json(server, tok, src)
        assert second["upload"]["objects_uploaded"] == 0 and second["upload"]["bytes_uploaded"] == 0
        assert second["stats"]["bytes_read"] == 0          # change detection through the server
        after = safe_state(safe)
        assert after[0] == before[0] + 1 and after[1] - before[1] < 4096   # the point's record, nothing more
        with open(src / "own", "r+b") as f:
            f.seek(300_000)
            f.write(b"changed")
        third = backup_json(server, tok, src)
        assert 0 < third["upload"]["bytes_uploaded"] < 400_000   # the changed chunks and the nodes above them
        r = agent(server, tok, "restore", third["id"], tmp_path / "out")
        assert r.code == 0, r.err
    assert_trees_equal(src, tmp_path / "out")


def test_agents_with_the_same_data_share_the_safes_objects(tmp_path):
    safe = make_safe(tmp_path)
    a, b = add_agent(safe, "a"), add_agent(safe, "b")
    src = _tree(tmp_path / "src", 3)
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-a", str(src), str(copy)], check=True)
    with running(safe) as server:
        backup_json(server, a, src)
        data = chunk_bytes(safe)
        pb = backup_json(server, b, copy)
        # b uploads what it has not uploaded itself (it cannot learn what a holds) ...
        assert pb["upload"]["bytes_uploaded"] > 1_000_000
        # ... and the safe stores none of its data twice (only b's own trees: other inode numbers)
        assert chunk_bytes(safe) == data > 1_000_000


def test_an_agent_without_can_restore_backs_up_but_cannot_read_contents(tmp_path):
    safe = make_safe(tmp_path)
    tok = add_agent(safe, "writeonly")
    src = _tree(tmp_path / "src", 4)
    with running(safe) as server:
        p = backup_json(server, tok, src)
        second = backup_json(server, tok, src)     # change detection reads its trees: allowed
        assert second["upload"]["objects_uploaded"] == 0
        r = agent(server, tok, "restore", p["id"], tmp_path / "out")
        assert r.code == 1 and "may not read file contents" in r.err and "Traceback" not in r.err, r.err
        assert not any((tmp_path / "out").glob("*"))


def test_sources_bound_what_an_agent_may_back_up(tmp_path):
    safe = make_safe(tmp_path)
    ok_dir, other = tmp_path / "allowed", tmp_path / "other"
    (ok_dir / "sub").mkdir(parents=True)
    other.mkdir()
    (ok_dir / "sub" / "f").write_text("x")
    tok = add_agent(safe, "bound", "--sources", str(ok_dir))
    with running(safe) as server:
        assert backup_json(server, tok, ok_dir / "sub")["source"] == str(ok_dir / "sub")
        r = agent(server, tok, "backup", other, "-q")
        assert r.code == 1 and "may not back up" in r.err, r.err
        # sent anyway, straight to the API: refused by the server
        c = server.client(tok)
        rec = {"name": "x", "kind": "tree", "source": str(other), "root": None}
        resp = c.post("/api/v1/points", json=rec)
        assert resp.status_code == 403 and "may not back up" in resp.json()["error"]
    assert len(safe_state(safe)[2]) == 1


def test_agent_tokens_are_shown_once_stored_as_hashes_and_rotate_and_remove_take_effect(tmp_path):
    safe = make_safe(tmp_path, "--encryption", "none")
    r = run_cli("agent", "add", "box", "--can-restore", "--json", safe=safe)
    assert r.code == 0, r.err
    rec = json.loads(r.out)
    token = rec["token"]
    assert rec["name"] == "box" and rec["can_restore"] is True and "token_sha256" not in rec
    index = b"".join(p.read_bytes() for p in (safe / "index").glob("*"))
    import hashlib
    assert token.encode() not in index and hashlib.sha256(token.encode()).hexdigest().encode() in index
    listed = json.loads(run_cli("agent", "list", "--json", safe=safe).out)
    assert [a["name"] for a in listed] == ["box"] and "token" not in listed[0] and "token_sha256" not in listed[0]
    r = run_cli("agent", "add", "box", safe=safe)
    assert r.code == 1 and "exists already" in r.err
    r = run_cli("agent", "add", "../x", safe=safe)
    assert r.code == 1 and "bad agent name" in r.err
    with running(safe) as server:
        assert server.client(token).get("/api/v1/info").status_code == 200
        r = run_cli("agent", "rotate", "box", safe=safe)
        assert r.code == 0, r.err
        new = r.out.strip().splitlines()[-1]
        assert server.client(token).get("/api/v1/info").status_code == 401
        assert server.client(new).get("/api/v1/info").json()["agent"] == "box"
        r = run_cli("agent", "remove", "box", safe=safe)
        assert r.code == 0, r.err
        resp = server.client(new).get("/api/v1/info")
        assert resp.status_code == 401 and "unknown token" in resp.json()["error"]
        r = agent(server, new, "points")
        assert r.code == 1 and "unknown token" in r.err and "Traceback" not in r.err
    assert json.loads(run_cli("agent", "list", "--json", safe=safe).out) == []


def test_the_token_never_comes_from_the_command_line(tmp_path):
    safe = make_safe(tmp_path)
    tok = add_agent(safe, "t")
    src = tmp_path / "src"
    src.mkdir()
    with running(safe) as server:
        r = agent(server, None, "backup", src)
        assert r.code == 1 and "POINTSAFE_TOKEN" in r.err, r.err
        f = tmp_path / "token"
        f.write_text(tok + "\n")
        r = agent(server, None, "backup", src, "-q", "--token-file", f)
        assert r.code == 0, r.err
        r = agent(server, None, "points", "--token-file", tmp_path / "nope")
        assert r.code == 1 and "cannot read --token-file" in r.err
    r = run_cli("backup", "--help")
    assert "--token-file" in r.out and "--token " not in r.out and "--token=" not in r.out


def test_every_request_is_a_task_and_a_commit_is_a_backup_task(tmp_path):
    safe = make_safe(tmp_path)
    tok = add_agent(safe, "logged")
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("data")
    with running(safe) as server:
        p = backup_json(server, tok, src)
        assert server.client("psa_wrong").get("/api/v1/points").status_code == 401
    tasks = json.loads(run_cli("tasks", "--json", safe=safe).out)
    backups = [t for t in tasks if t["kind"] == "backup"]
    assert len(backups) == 1 and backups[0]["fields"]["point"] == p["id"] and backups[0]["fields"]["agent"] == "logged"
    reqs = [t for t in tasks if t["kind"] == "request"]
    assert {t["fields"]["path"] for t in reqs} >= {"/api/v1/info", "/api/v1/points", "/api/v1/objects/missing",
                                                   "/api/v1/objects"}
    refused = [t for t in reqs if t["fields"].get("status") == 401]
    assert len(refused) == 1 and refused[0]["state"] == "usage" and "unknown token" in refused[0]["error"]
    shutil.rmtree(src)


def test_the_hard_quota_stops_an_agents_upload_with_no_point(tmp_path):
    safe = make_safe(tmp_path)
    tok = add_agent(safe, "full")
    run_cli("config", "set", "quota.hard", "99%", safe=safe, check=True)   # the disk is "full" already
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(os.urandom(100_000))
    with running(safe) as server:
        r = agent(server, tok, "backup", src, "-q")
        assert r.code == 1 and "HTTP 507" in r.err and "Traceback" not in r.err, r.err
    assert safe_state(safe)[2] == []


def test_requests_are_rate_limited_per_agent_and_the_agent_waits_and_goes_on(tmp_path):
    safe = make_safe(tmp_path)
    fast, calm = add_agent(safe, "fast"), add_agent(safe, "calm")
    src = tmp_path / "src"
    src.mkdir()
    for i in range(30):
        (src / f"d{i}").mkdir()
        (src / f"d{i}" / "f").write_bytes(os.urandom(2000))
    server = start(safe, env={"POINTSAFE_SERVER_RATE": "5"})
    try:
        c = server.client(fast)
        codes = [c.get("/api/v1/info").status_code for _ in range(40)]
        assert codes.count(200) >= 10 and 429 in codes, codes
        refused = c.get("/api/v1/info")
        assert refused.status_code == 429 and "too many requests from agent fast" in refused.json()["error"]
        assert server.client(calm).get("/api/v1/info").status_code == 200      # another agent's own bucket
        assert backup_json(server, calm, src)["stats"]["files"] == 30           # it waits on 429s and goes on
        assert backup_json(server, calm, src)["upload"]["objects_uploaded"] == 0  # 31 tree reads, slowed, not failed
    finally:
        stop(server.proc)
    seen = {a["name"]: a["last_contact"] for a in json.loads(run_cli("agent", "list", "--json", safe=safe).out)}
    assert seen["fast"] and seen["calm"]
    add_agent(safe, "idle")
    rows = {line.split()[0]: line.split() for line in run_cli("agent", "list", safe=safe).out.splitlines()[1:]}
    assert rows["idle"][3] == "never" and rows["calm"][3].startswith("20"), rows


def test_a_bad_point_name_is_refused_before_anything_is_read_or_sent(tmp_path):
    safe = make_safe(tmp_path)
    tok = add_agent(safe, "n")
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(os.urandom(100_000))
    with running(safe) as server:
        before = safe_state(safe)
        for name in ("a/b", "x@y", "tab\there", " "):
            r = agent(server, tok, "backup", src, "--name", name)
            assert r.code == 1 and "bad point name" in r.err, (name, r.err)
        assert safe_state(safe) == before


def test_forget_and_gc_on_the_server_beside_it_and_the_agent_uploads_again_what_gc_took(tmp_path):
    safe = make_safe(tmp_path)
    tok = add_agent(safe, "g", "--can-restore")
    src = _tree(tmp_path / "src", 5)
    with running(safe) as server:
        p = backup_json(server, tok, src)
        r = run_cli("forget", p["id"], safe=safe)
        assert r.code == 0, r.err
        r = run_cli("gc", safe=safe)
        assert r.code == 0, r.err
        assert chunk_bytes(safe) == 0
        r = agent(server, tok, "points", "--json")
        assert json.loads(r.out) == []
        again = backup_json(server, tok, src)                 # its rows name objects gc removed: sent again
        assert again["upload"]["bytes_uploaded"] >= p["upload"]["bytes_uploaded"] > 0
        r = agent(server, tok, "restore", again["id"], tmp_path / "out")
        assert r.code == 0, r.err
    assert_trees_equal(src, tmp_path / "out")
    r = run_cli("verify", safe=safe)
    assert r.code == 0, r.out + r.err


def test_the_safe_is_held_from_an_agents_first_upload_to_its_commit_and_released_after(tmp_path):
    from pointsafe.cas import Kind
    from pointsafe.server import protocol
    safe = make_safe(tmp_path)
    tok = add_agent(safe, "held")
    data = os.urandom(10_000)
    cid = protocol.agent_id(Kind.CHUNK, data)
    server = start(safe, env={"POINTSAFE_SERVER_IDLE": "1"})
    try:
        c = server.client(tok)
        r = run_cli("gc", safe=safe)
        assert r.code == 0, r.err                         # no backup under way: gc runs beside the server
        body = b"".join(protocol.encode(Kind.CHUNK, cid, protocol.CODEC_RAW, len(data), data))
        assert c.post("/api/v1/objects", content=body).status_code == 200
        r = run_cli("gc", safe=safe)                      # under way: gc must not take the upload away
        assert r.code == 1 and "lock" in r.err.lower(), r.err
        time.sleep(3)                                     # the agent went away: its backup times out
        r = run_cli("gc", safe=safe)
        assert r.code == 0, r.err
        assert c.post("/api/v1/objects", content=body).status_code == 200
        root = {"name": "held", "kind": "tree", "source": "/x", "root": None}
        assert c.post("/api/v1/points", json=root).status_code == 200
        r = run_cli("gc", safe=safe)                      # committed: released at once
        assert r.code == 0, r.err
    finally:
        stop(server.proc)


def test_a_local_backup_never_reads_against_an_agents_point_of_the_same_name(tmp_path):
    safe = make_safe(tmp_path)
    tok = add_agent(safe, "web1")
    src = _tree(tmp_path / "src", 5)
    with running(safe) as server:
        sent = backup_json(server, tok, src)
    # the same name (and here even the same files: agent and server share this machine) backed
    # up on the server itself: the agent's point is another machine's, never a local base
    r = run_cli("backup", src, "--name", sent["name"], "--json", "-q", safe=safe)
    assert r.code == 0, r.err
    local = json.loads(r.out)
    assert local["stats"]["files_unchanged"] == 0
    assert local["stats"]["bytes_read"] == sent["stats"]["bytes_read"] > 0
