"""The dashboard, task history, points, diff and volume image pages of a real ``pointsafe web``
server, checked against what the CLI's ``--json`` says about the same safe."""

from __future__ import annotations

import json
import os
import re

import pytest

from _web_util import login, running, set_password
from conftest import run_cli


def _j(*args, safe):
    r = run_cli(*args, "--json", safe=safe)
    assert r.code in (0, 2, 3), r.err
    return json.loads(r.out)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A safe with two tree sources (two points of 'data'), a volume, a verify, a failed backup
    (task in error, its alert), served; yields a dict of what the tests need."""
    from pointsafe.cas import Safe
    tmp = tmp_path_factory.mktemp("site")
    safe = tmp / "safe"
    Safe.init(safe, pack_size=256 * 1024).close()
    for k, v in (("quota.soft", "off"), ("quota.hard", "off")):
        run_cli("config", "set", k, v, safe=safe, check=True)
    data, www = tmp / "data", tmp / "www"
    (data / "sub").mkdir(parents=True)
    (data / "sub" / "a.txt").write_text("first\n")
    (data / "keep.bin").write_bytes(os.urandom(50_000))
    www.mkdir()
    (www / "index.html").write_text("<h1>hi</h1>\n")
    p1 = _j("backup", data, "--name", "data", safe=safe)["id"]
    (data / "sub" / "a.txt").write_text("second, longer\n")
    (data / "new.txt").write_text("new\n")
    p2 = _j("backup", data, "--name", "data", safe=safe)["id"]
    pw = _j("backup", www, "--name", "www", safe=safe)["id"]
    img = tmp / "disk.img"
    with open(img, "wb") as f:
        f.write(os.urandom(300_000))
        f.seek(2 << 20)
        f.write(os.urandom(70_000))
    pv = _j("backup", img, "--volume", "--name", "disk", safe=safe)["id"]
    run_cli("verify", safe=safe, check=True)
    run_cli("config", "set", "quota.hard", "99.9%", safe=safe, check=True)
    assert run_cli("backup", www, "--name", "www", safe=safe).code == 1
    run_cli("config", "set", "quota.hard", "off", safe=safe, check=True)
    set_password(safe)
    with running(safe) as server:
        yield {"safe": safe, "server": server, "p1": p1, "p2": p2, "pw": pw, "pv": pv, "img": img}


@pytest.fixture
def client(site):
    return login(site["server"])


def test_dashboard_shows_what_status_says(site, client):
    safe = site["safe"]
    web = client.get("/", headers={"accept": "application/json"}).json()
    cli = _j("status", safe=safe)
    assert web["ok"] is cli["ok"] is False
    for k in ("points", "packs", "logical_bytes", "unique_bytes", "dedup_ratio", "compression_ratio"):
        assert web["safe"][k] == cli["safe"][k], k
    for k in ("quota_soft", "quota_hard", "state"):
        assert web["space"][k] == cli["space"][k], k

    def sources(st):
        return [(s["name"], s["last_point"] and s["last_point"]["id"], s["last_task"] and s["last_task"]["id"],
                 s["last_task"] and s["last_task"]["state"], s["stale"], s["interval_seconds"]) for s in st["sources"]]
    assert sources(web) == sources(cli)
    assert [(a["id"], a["message"]) for a in web["alerts"]] == [(a["id"], a["message"]) for a in cli["alerts"]]
    assert [t["id"] for t in web["recent_tasks"]] == [t["id"] for t in cli["recent_tasks"]]
    extra = web["dashboard"]
    verify = [t for t in _j("tasks", "--kind", "verify", safe=safe)]
    assert extra["recency"]["verify"]["id"] == verify[-1]["id"] and extra["recency"]["gc"] is None
    assert len(extra["series"]["t"]) == 4 and extra["series"]["bytes_new"][0] > 0

    html = client.get("/").text
    www = next(s for s in cli["sources"] if s["name"] == "www")
    row = re.search(r"<tr><td>www</td>.*?</tr>", html, re.S).group(0)
    assert www["last_point"]["id"][:12] in row
    assert f'<span class="badge bad">{www["last_task"]["state"]}</span>' in row     # error, in red
    assert "open alert(s)" in html and "backup task" in html and "failed" in html
    assert html.count("<svg") == 3 and "Bytes new per backup" in html
    assert "never run" in html          # gc


def test_task_history_pages_newest_first_with_before(site, client):
    """/tasks?limit=N shows the newest N, its 'older' link the N below the last one shown,
    to the oldest; JSON with limit/before gives the same page (oldest first, as the CLI)."""
    every = [t["id"] for t in _j("tasks", safe=site["safe"])]
    assert len(every) >= 5
    seen, url = [], "/tasks?limit=2"
    while url:
        html = client.get(url).text
        table = re.search(r'<table id="tasks">.*?</table>', html, re.S).group(0)
        ids = [int(i) for i in re.findall(r'<a href="/tasks/(\d+)">', table)]
        assert 1 <= len(ids) <= 2 and ids == sorted(ids, reverse=True)
        seen += ids
        assert f"{len(every)} task(s) in all" in html
        older = re.search(r'<a href="(/tasks\?[^"]*before=\d+)">older</a>', html)
        url = older.group(1).replace("&amp;", "&") if older else None
    assert seen == every[::-1]
    page = client.get("/tasks", params={"format": "json", "limit": 2, "before": every[-1]}).json()
    assert [t["id"] for t in page] == every[-3:-1]
    www = [t["id"] for t in _j("tasks", safe=site["safe"]) if t["fields"].get("name") == "www"]
    html = client.get("/tasks", params={"source": "www", "limit": 1, "before": www[-1]}).text
    assert re.findall(r'<a href="/tasks/(\d+)">', html) == [str(www[-2])]


def test_task_filters_match_the_cli(site, client):
    safe = site["safe"]
    for q, args in ((("state", "error"),), ("--state", "error")), ((("kind", "verify"),), ("--kind", "verify")), \
                   ((("state", "ok"), ("kind", "backup")), ("--state", "ok", "--kind", "backup")):
        web = client.get("/tasks", params=dict(q) | {"format": "json"}).json()
        assert [t["id"] for t in web] == [t["id"] for t in _j("tasks", *args, safe=safe)], q
    web = client.get("/tasks", params={"source": "www", "format": "json"}).json()
    assert [t["fields"]["name"] for t in web] == ["www", "www"]
    assert [t["state"] for t in web] == ["ok", "error"]
    html = client.get("/tasks", params={"state": "error"}).text
    table = re.search(r'<table id="tasks">.*?</table>', html, re.S).group(0)
    assert table.count("<tr>") == 1 + 1 and ">error<" in table
    assert client.get("/tasks", params={"state": "bogus"}).status_code == 400


def test_task_page_shows_its_lines_and_alerts(site, client):
    failed = _j("tasks", "--state", "error", safe=site["safe"])[0]
    page = client.get(f"/tasks/{failed['id']}")
    assert page.status_code == 200
    assert "backup refused" in page.text and "pointsafe" in page.text and "--name www" in page.text
    j = client.get(f"/tasks/{failed['id']}?format=json").json()
    assert j["id"] == failed["id"] and j["state"] == "error"
    assert [a["task"] for a in j["alerts"]] == [failed["id"]]
    assert j["alerts"][0]["message"] in page.text.replace("&#39;", "'")
    assert client.get("/tasks/99999").status_code == 404


def test_points_and_point_pages(site, client):
    safe = site["safe"]
    assert client.get("/points?format=json").json() == _j("points", safe=safe)
    assert client.get(f"/points/{site['p2']}?format=json").json() == _j("show", site["p2"], safe=safe)
    html = client.get("/points").text
    for name in ("data", "www", "disk"):
        assert f"<h2>{name} " in html
    assert client.get("/points?name=www&format=json").json()[0]["id"] == site["pw"]
    page = client.get(f"/points/{site['p2']}").text
    assert "bytes_new" in page and '/diff' in page and site["p1"] in page    # compare with the older one
    assert '<p id="snapshot">none</p>' in page          # a point read live says so (not a table)
    # A POINT as the CLI takes it also names a point.
    assert client.get("/points/data@latest?format=json").json()["id"] == site["p2"]
    assert client.get("/points/ffffffffffff").status_code == 404


def test_diff_matches_the_cli(site, client):
    web = client.get("/diff", params={"a": site["p1"], "b": site["p2"], "format": "json"}).json()
    assert web == _j("diff", site["p1"], site["p2"], safe=site["safe"])
    assert {(d["change"], d["path"]) for d in web} >= {("M", "sub/a.txt"), ("+", "new.txt")}
    html = client.get("/diff", params={"a": site["p1"], "b": site["p2"]}).text
    assert "new.txt" in html and f"/points/{site['p2']}/tree/sub/a.txt" in html


def test_volume_image_download(site, client):
    r = client.get(f"/points/{site['pv']}/image")
    assert r.status_code == 200
    want = site["img"].read_bytes()
    assert int(r.headers["content-length"]) == len(want)
    assert r.content == want
    assert "attachment" in r.headers["content-disposition"]
    t = client.get(f"/points/{site['pv']}/tree/")
    assert t.status_code == 404 and "image" in t.text
