"""Per-agent quotas on bytes stored: counted as uploaded, soft (an alert) and hard (507, nothing
stored) as disk quotas; ``agent list`` shows them, gc takes off what it removes and
``--recount`` counts again in full."""

from __future__ import annotations

import json
import os

from _server_util import add_agent, agent, backup_json, make_safe, running, safe_state
from conftest import run_cli


def _src(tmp_path, name: str, size: int = 1_000_000, data: bytes | None = None):
    src = tmp_path / name
    src.mkdir()
    (src / "data").write_bytes(data if data is not None else os.urandom(size))
    return src


def _listed(safe) -> dict[str, dict]:
    r = run_cli("agent", "list", "--json", safe=safe)
    assert r.code == 0, r.err
    return {a["name"]: a for a in json.loads(r.out)}


def _alerts(safe) -> list[dict]:
    r = run_cli("alerts", "--json", safe=safe)
    assert r.code == 0, r.err
    return json.loads(r.out)


def test_beyond_the_hard_quota_the_backup_is_refused_with_one_line_and_nothing_is_stored(tmp_path):
    safe = make_safe(tmp_path)
    r = run_cli("agent", "add", "small", "--quota-hard", "300K", "--json", safe=safe)
    assert r.code == 0, r.err
    tok = json.loads(r.out)["token"]
    src = _src(tmp_path, "src")
    with running(safe) as server:
        before = safe_state(safe)
        r = agent(server, tok, "backup", src)
        assert r.code == 1, r.out + r.err
        lines = r.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("pointsafe: error:") and "hard quota" in lines[0], r.err
        assert "507" in lines[0] and "Traceback" not in r.err
        assert safe_state(safe) == before                       # no object, no point
        assert _listed(safe)["small"]["stored_bytes"] == 0
        assert agent(server, tok, "backup", src).code == 1    # refused again: the alert is latched, not repeated
        crit = [a for a in _alerts(safe) if a["severity"] == "critical" and "small" in a["message"]]
        assert len(crit) == 1 and "hard quota" in crit[0]["message"]
        # the admin raises the quota: the same backup goes through and the alert clears
        r = run_cli("agent", "set", "small", "--quota-hard", "off", safe=safe)
        assert r.code == 0, r.err
        p = backup_json(server, tok, src)
        assert p["stats"]["files"] == 1
        assert _listed(safe)["small"]["stored_bytes"] >= 1_000_000
        # the condition was seen clear: crossing the quota again is a new alert
        assert run_cli("agent", "set", "small", "--quota-hard", "1M", safe=safe).code == 0
        (src / "more").write_bytes(os.urandom(100_000))
        assert agent(server, tok, "backup", src).code == 1
    assert len([a for a in _alerts(safe) if "small" in a["message"] and a["severity"] == "critical"]) == 2


def test_beyond_the_soft_quota_the_backup_succeeds_and_the_server_raises_one_warning(tmp_path):
    safe = make_safe(tmp_path)
    tok = add_agent(safe, "chatty", "--quota-soft", "200K", "--quota-hard", "10M")
    src = _src(tmp_path, "src")
    with running(safe) as server:
        p = backup_json(server, tok, src)
        assert p["stats"]["files"] == 1
        info = server.client(tok).get("/api/v1/info").json()   # the agent sees its own count and quotas
        assert info["stored_bytes"] >= 1_000_000 and info["quota_soft"] == 200 * 1024
        (src / "more").write_bytes(os.urandom(50_000))
        r = agent(server, tok, "backup", src)
        assert r.code == 0 and "over its soft quota of 200.0 KiB" in r.out, r.out   # the agent is told too
    warn = [a for a in _alerts(safe) if "chatty" in a["message"]]
    assert len(warn) == 1 and warn[0]["severity"] == "warning" and "soft quota" in warn[0]["message"], warn
    listed = _listed(safe)["chatty"]
    assert listed["quota_soft"] == 200 * 1024 and listed["quota_hard"] == 10 * 1024 * 1024
    assert listed["stored_bytes"] >= 1_050_000 and listed["points"] == 2
    rows = run_cli("agent", "list", safe=safe).out.splitlines()
    assert "STORED" in rows[0] and "SOFT" in rows[0] and "HARD" in rows[0]
    assert "200.0 KiB" in rows[1] and "10.0 MiB" in rows[1]


def test_each_agent_counts_what_it_uploaded_once_even_when_shared_and_gc_takes_off_what_it_removed(tmp_path):
    safe = make_safe(tmp_path)
    a, b = add_agent(safe, "a"), add_agent(safe, "b")
    data = os.urandom(800_000)
    src_a, src_b = _src(tmp_path, "sa", data=data), _src(tmp_path, "sb", data=data)
    with running(safe) as server:
        pa = backup_json(server, a, src_a)
        first = _listed(safe)["a"]["stored_bytes"]
        assert first >= 800_000
        backup_json(server, a, src_a)                           # unchanged: uploads nothing, counts nothing more
        assert _listed(safe)["a"]["stored_bytes"] == first
        backup_json(server, b, src_b)                           # the same data: stored once, counted for b too
        assert _listed(safe)["b"]["stored_bytes"] >= 800_000
    listed = _listed(safe)
    assert listed["a"]["stored_bytes"] == first
    # a's points forgotten and gc'd: b still holds the data; gc took off a's count what it removed
    ids = [p["id"] for p in json.loads(run_cli("points", "--json", safe=safe).out) if p.get("agent") == "a"]
    assert len(ids) == 2 and pa["id"] in ids
    assert run_cli("forget", *ids, safe=safe).code == 0
    assert run_cli("gc", safe=safe).code == 0
    after = _listed(safe)
    # a's chunks are b's too (same content): they stay in the safe and a's rows still name them
    assert 800_000 <= after["a"]["stored_bytes"] < first           # its own trees went, the shared chunks stay
    assert after["b"]["stored_bytes"] == listed["b"]["stored_bytes"]
    r = run_cli("agent", "list", "--recount", "--json", safe=safe)
    assert r.code == 0, r.err
    recounted = {x["name"]: x for x in json.loads(r.out)}
    assert {n: recounted[n]["stored_bytes"] for n in "ab"} == {n: after[n]["stored_bytes"] for n in "ab"}


def test_gc_drops_what_it_removed_from_the_count_and_recount_agrees(tmp_path):
    safe = make_safe(tmp_path)
    tok = add_agent(safe, "solo", "--quota-hard", "1500K")
    src = _src(tmp_path, "src")
    with running(safe) as server:
        p = backup_json(server, tok, src)
        assert _listed(safe)["solo"]["stored_bytes"] >= 1_000_000
    assert run_cli("forget", p["id"], safe=safe).code == 0
    assert run_cli("gc", safe=safe).code == 0
    assert _listed(safe)["solo"]["stored_bytes"] == 0
    r = run_cli("agent", "list", "--recount", "--json", safe=safe)
    assert r.code == 0, r.err
    assert json.loads(r.out)[0]["stored_bytes"] == 0
    # and at the hard quota the server counts again before refusing: gc'd bytes do not block
    (src / "data").write_bytes(os.urandom(1_000_000))
    with running(safe) as server:
        backup_json(server, tok, src)
        (src / "data2").write_bytes(os.urandom(400_000))
        p3 = backup_json(server, tok, src)        # 1.4 MB held: under 1500K
        assert p3["stats"]["files"] == 2


def test_bad_quota_values_are_refused_with_one_line(tmp_path):
    safe = make_safe(tmp_path)
    for opts, words in ((["--quota-hard", "10%"], "amount of bytes"),
                        (["--quota-soft", "lots"], "bad --quota-soft 'lots': an agent's quota is an amount"),
                        (["--quota-soft", "2G", "--quota-hard", "1G"], "above the hard")):
        r = run_cli("agent", "add", "x", *opts, safe=safe)
        assert r.code == 1 and words in r.err and len(r.err.strip().splitlines()) == 1, r.err
    assert _listed(safe) == {}
    add_agent(safe, "x")
    r = run_cli("agent", "set", "x", safe=safe)
    assert r.code == 1 and "nothing to change" in r.err
    r = run_cli("agent", "set", "x", "--quota-soft", "5G", "--no-can-restore", safe=safe)
    assert r.code == 0, r.err
    assert _listed(safe)["x"]["quota_soft"] == 5 << 30 and _listed(safe)["x"]["quota_hard"] is None
