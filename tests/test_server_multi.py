"""One ``pointsafe serve`` for several safes: each agent's requests reach its own safe only
(real server process on loopback, two encrypted safes, real agents' backups and restores)."""

from __future__ import annotations

import os

from _server_util import add_agent, agent, backup_json, running, safe_state, start, stop
from _tree_util import assert_trees_equal, snapshot as tree_snapshot
from conftest import run_cli


def _tree(root, tag: str):
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text(f"{tag} " * 1000)
    (root / "sub" / "b.bin").write_bytes(os.urandom(200_000))
    return root


def test_one_listener_serves_two_safes_each_agent_only_its_own(tmp_path):
    safes = {}
    for name in ("one", "two"):
        safes[name] = tmp_path / f"safe-{name}"
        run_cli("init", safes[name], check=True)
    tok_a = add_agent(safes["one"], "web1", "--can-restore")
    tok_b = add_agent(safes["two"], "web2", "--can-restore")
    src_a, src_b = _tree(tmp_path / "src-a", "a"), _tree(tmp_path / "src-b", "b")
    server = start(safes["one"], None, str(safes["two"]))
    try:
        pa = backup_json(server, tok_a, src_a)
        pb = backup_json(server, tok_b, src_b)
        # each point is in its agent's safe, and in no other
        assert safe_state(safes["one"])[2] == [pa["id"]]
        assert safe_state(safes["two"])[2] == [pb["id"]]
        # each agent lists and restores its own points; the other safe's read as unknown
        for tok, mine, other, src in ((tok_a, pa, pb, src_a), (tok_b, pb, pa, src_b)):
            r = agent(server, tok, "points", "--json")
            assert r.code == 0, r.err
            assert mine["id"] in r.out and other["id"] not in r.out
            out = tmp_path / f"out-{mine['id'][:8]}"
            r = agent(server, tok, "restore", mine["id"], out)
            assert r.code == 0, r.err
            assert_trees_equal(tree_snapshot(src), tree_snapshot(out))
            r = agent(server, tok, "restore", other["id"], tmp_path / "stolen")
            assert r.code == 1 and "no point" in r.err and not (tmp_path / "stolen").exists()
            with server.client(tok) as c:
                assert c.post("/api/v1/objects/fetch", json={"ids": [mine["root"]]}).status_code == 200
                r2 = c.post("/api/v1/objects/fetch", json={"ids": [other["root"]]})
                assert r2.status_code == 404, r2.text
        # an unknown token is refused as by one safe; the API document needs none
        with server.client("psa_" + "0" * 40) as c:
            assert c.get("/api/v1/info").status_code == 401
        with server.client(None) as c:
            assert c.get("/api/v1/info").status_code == 401
            assert c.get("/api/openapi.json").status_code == 200
        # a token removed from its safe stops working at once, though the router remembers its safe
        r = run_cli("agent", "remove", "web2", safe=safes["two"])
        assert r.code == 0, r.err
        with server.client(tok_b) as c:
            assert c.get("/api/v1/info").status_code == 401
        # a backup as another agent of the first safe still lands there
        tok_c = add_agent(safes["one"], "web3")
        pc = backup_json(server, tok_c, src_b)
        assert sorted(safe_state(safes["one"])[2]) == sorted([pa["id"], pc["id"]])
        assert safe_state(safes["two"])[2] == [pb["id"]]
    finally:
        stop(server.proc)


def test_the_same_safe_twice_is_refused_with_one_line(tmp_path):
    safe = tmp_path / "safe"
    run_cli("init", safe, check=True)
    r = run_cli("serve", "--listen", "127.0.0.1:1", str(safe), safe=safe)
    assert r.code == 1 and r.err.strip().count("\n") == 0 and "named twice" in r.err, r.err


def test_a_missing_second_safe_fails_before_listening(tmp_path):
    safe = tmp_path / "safe"
    run_cli("init", safe, check=True)
    with running(safe):
        pass
    r = run_cli("serve", "--listen", "127.0.0.1:1", str(tmp_path / "nothing"), safe=safe)
    assert r.code != 0 and "nothing" in r.err and r.err.strip().count("\n") == 0, r.err
