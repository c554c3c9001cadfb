"""The dashboard's Agents page and the agent column of the points pages, on a real ``pointsafe
web`` over a safe that real agents backed up into through a real ``pointsafe serve``."""

from __future__ import annotations

import json
import os
import re

import httpx
import pytest

import _server_util as srv
from _web_util import login, running, set_password
from conftest import CLI_ENV, run_cli


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """Agents web1 (two points, over its soft quota), db2 (never seen); a local point too."""
    with pytest.MonkeyPatch.context() as mp:      # module scope: before conftest's own per-test environment
        for k, v in CLI_ENV.items():
            mp.setenv(k, v)
        yield from _site(tmp_path_factory.mktemp("agents"))


def _site(tmp):
    safe = srv.make_safe(tmp)
    set_password(safe)
    src = tmp / "www"
    src.mkdir()
    (src / "index.html").write_bytes(os.urandom(150_000))
    web1 = srv.add_agent(safe, "web1", "--sources", str(src), "--can-restore", "--quota-soft", "100K",
                         "--quota-hard", "1G")
    srv.add_agent(safe, "db2", "--quota-hard", "5G")
    with srv.running(safe) as server:
        first = srv.backup_json(server, web1, src)
        (src / "more.txt").write_text("more\n")
        second = srv.backup_json(server, web1, src)
    local = tmp / "local"
    local.mkdir()
    (local / "f").write_text("local\n")
    r = run_cli("backup", local, "--name", "localdata", "--json", safe=safe)
    assert r.code == 0, r.err
    listed = {a["name"]: a for a in json.loads(run_cli("agent", "list", "--json", safe=safe).out)}
    with running(safe) as web:
        yield {"web": web, "client": login(web), "first": first["id"], "second": second["id"],
               "local": json.loads(r.out)["id"], "listed": listed, "src": str(src)}


def test_the_agents_page_shows_each_agent_its_contact_points_and_quota(site):
    c = site["client"]
    rows = {a["name"]: a for a in c.get("/agents?format=json").json()}
    web1, db2 = rows["web1"], rows["db2"]
    assert web1["points"] == 2 and web1["newest"]["id"] == site["second"]
    assert web1["last_contact"] == site["listed"]["web1"]["last_contact"] and web1["last_contact"].startswith("20")
    assert web1["stored_bytes"] == site["listed"]["web1"]["stored_bytes"] >= 150_000
    assert web1["quota_state"] == "soft" and web1["sources"] == [site["src"]] and web1["can_restore"] is True
    assert "token_sha256" not in web1 and "token" not in web1
    assert db2["points"] == 0 and db2["newest"] is None and db2["last_contact"] is None and db2["stored_bytes"] == 0
    html = c.get("/agents").text
    row = re.search(r'<tr id="agent-web1">(.*?)</tr>', html, re.S).group(1)
    assert f'href="/points/{site["second"]}"' in row and site["src"] in row
    assert "100.0 KiB" in row and "1.0 GiB" in row and 'class="num warn"' in row   # over its soft quota
    assert 'href="/points?agent=web1"' in row
    row = re.search(r'<tr id="agent-db2">(.*?)</tr>', html, re.S).group(1)
    assert "never" in row and "5.0 GiB" in row and "off" in row
    assert 'href="/agents"' in c.get("/").text                                   # in the navigation


def test_the_points_pages_show_the_agent_of_points_made_through_the_server(site):
    c = site["client"]
    html = c.get("/points").text
    for pid in (site["first"], site["second"]):
        row = re.search(rf'<tr><td>[^<]*</td><td><a class="mono" href="/points/{pid}">.*?</tr>', html, re.S).group(0)
        assert '<a class="agent" href="/agents#agent-web1">web1</a>' in row
    row = re.search(rf'<a class="mono" href="/points/{site["local"]}">.*?</tr>', html, re.S).group(0)
    assert 'class="agent"' not in row
    only = c.get("/points?agent=web1&format=json").json()
    assert sorted(p["id"] for p in only) == sorted([site["first"], site["second"]])
    assert all(p["agent"] == "web1" for p in only)
    assert "localdata" not in c.get("/points?agent=web1").text
    page = c.get(f"/points/{site['second']}").text
    assert re.search(r'<a id="agent" href="/agents#agent-web1">web1</a>', page)
    assert 'id="agent"' not in c.get(f"/points/{site['local']}").text


def test_the_agents_page_needs_a_login(site):
    anon = httpx.Client(base_url=site["web"].url, timeout=60)
    r = anon.get("/agents")
    assert r.status_code == 401 and "web1" not in r.text
    r = anon.get("/agents?format=json")
    assert r.status_code == 401 and r.json() == {"error": "login required"}


def test_a_web_password_on_an_encrypted_safe_leaves_its_settings_readable(tmp_path):
    # 'web passwd' once wrote its row raw into the sealed config table: every command that
    # reads the settings (serve, config, status) then failed on the safe
    safe = srv.make_safe(tmp_path)
    set_password(safe)
    r = run_cli("config", safe=safe)
    assert r.code == 0 and "web_password" not in r.out, r.err
    assert b"state.web_password" not in b"".join(p.read_bytes() for p in (safe / "index").glob("*"))
    with srv.running(safe) as server:
        assert server.client(None).get("/api/v1/info").status_code == 401
    with running(safe) as web:
        assert login(web).get("/agents").status_code == 200
