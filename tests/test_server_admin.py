"""Admin tokens (``agent add NAME --admin``): the admin routes over HTTP, and nothing else; agent
tokens are still refused there."""

from __future__ import annotations

import json
import os

from _server_util import add_agent, agent, backup_json, make_safe, running, safe_state
from conftest import run_cli
from pointsafe.cas import Kind
from pointsafe.server import protocol


def _admin(safe, name: str = "ops") -> str:
    r = run_cli("agent", "add", name, "--admin", "--json", safe=safe)
    assert r.code == 0, r.err
    rec = json.loads(r.out)
    assert rec["admin"] is True and rec["sources"] == [] and rec["can_restore"] is False
    return rec["token"]


def test_an_admin_token_lists_agents_and_forgets_points_and_an_agent_token_is_still_refused(tmp_path):
    safe = make_safe(tmp_path)
    tok = add_agent(safe, "web1", "--can-restore", "--quota-hard", "1G")
    adm = _admin(safe)
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(os.urandom(100_000))
    with running(safe) as server:
        p1 = backup_json(server, tok, src)["id"]
        (src / "g").write_text("more\n")
        p2 = backup_json(server, tok, src)["id"]
        a, c = server.client(adm), server.client(tok)
        # the agent's token: refused on both routes, nothing changed
        before = safe_state(safe)
        r = c.get("/api/v1/admin/agents")
        assert r.status_code == 403 and "may not use the administration" in r.json()["error"]
        r = c.post("/api/v1/admin/forget", json={"points": [p1]})
        assert r.status_code == 403 and "may not use the administration" in r.json()["error"]
        assert safe_state(safe) == before
        # the admin's: the agents, as 'agent list --json' shows them
        r = a.get("/api/v1/admin/agents")
        assert r.status_code == 200, r.text
        rows = {x["name"]: x for x in r.json()["agents"]}
        assert rows["web1"]["points"] == 2 and rows["web1"]["newest"]["id"] == p2
        assert rows["web1"]["quota_hard"] == 1 << 30 and rows["web1"]["stored_bytes"] >= 100_000
        assert rows["ops"]["admin"] is True and "token_sha256" not in rows["web1"]
        # forget: one point goes, the agent sees the other only
        r = a.post("/api/v1/admin/forget", json={"points": [p1[:12]]})
        assert r.status_code == 200 and r.json()["points_dropped"] == 1, r.text
        r = agent(server, tok, "points", "--json")
        assert r.code == 0 and [p["id"] for p in json.loads(r.out)] == [p2], r.out + r.err
        for body, status, words in (({"points": ["feedfacefeed"]}, 404, "feedfacefeed"), ({"points": "x"}, 400, "give"),
                                    ([], 400, "give")):
            r = a.post("/api/v1/admin/forget", json=body)
            assert r.status_code == status and words in r.json()["error"], r.text
        r = a.get("/api/v1/admin/gc")
        assert r.status_code == 404 and "no such admin route" in r.json()["error"]
        # the admin's token backs up and reads nothing
        r = a.get("/api/v1/points")
        assert r.status_code == 403 and "admin token" in r.json()["error"]
        r = agent(server, adm, "backup", src)
        assert r.code == 1 and "admin token" in r.err and len(r.err.strip().splitlines()) == 1, r.err
    tasks = json.loads(run_cli("tasks", "--json", safe=safe).out)
    assert any(t["fields"].get("agent") == "ops" and t["fields"].get("path") == "/api/v1/admin/forget"
               and t["fields"].get("status") == 200 for t in tasks)


def test_an_admin_forget_waits_for_the_agents_backups_under_way(tmp_path):
    safe = make_safe(tmp_path)
    tok, adm = add_agent(safe, "w"), _admin(safe)
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("x\n")
    with running(safe) as server:
        first = backup_json(server, tok, src)["id"]
        c, a = server.client(tok), server.client(adm)
        raw = os.urandom(5000)
        body = b"".join(bytes(x) for x in protocol.encode(Kind.CHUNK, protocol.agent_id(Kind.CHUNK, raw),
                                                          protocol.CODEC_RAW, len(raw), raw))
        assert c.post("/api/v1/objects", content=body).status_code == 200    # a backup is under way
        r = a.post("/api/v1/admin/forget", json={"points": [first]})
        assert r.status_code == 503 and "under way" in r.json()["error"]
        assert first in safe_state(safe)[2]
        r = c.post("/api/v1/points", json={"name": "w", "kind": "tree", "source": "/x", "root": None})
        assert r.status_code == 200, r.text                                 # its commit ends it
        r = a.post("/api/v1/admin/forget", json={"points": [first]})
        assert r.status_code == 200 and r.json()["points_dropped"] == 1, r.text
        assert first not in safe_state(safe)[2]


def test_an_admin_token_takes_no_agent_options(tmp_path):
    safe = make_safe(tmp_path)
    r = run_cli("agent", "add", "ops", "--admin", "--sources", "/srv", safe=safe)
    assert r.code == 1 and "admin token backs up nothing" in r.err
    _admin(safe)
    r = run_cli("agent", "set", "ops", "--quota-hard", "1G", safe=safe)
    assert r.code == 1 and "admin token" in r.err
    rows = run_cli("agent", "list", safe=safe).out.splitlines()
    assert rows[1].split()[:2] == ["ops", "admin"]
