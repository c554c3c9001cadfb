"""A hostile agent against pointsafe serve: every refusal is clear, and nothing is stored or changed."""

from __future__ import annotations

import json
import os
import socket
import time

import pytest

from _server_util import add_agent, agent, backup_json, make_safe, safe_state, start, stop
from conftest import run_cli
from pointsafe.cas import Kind, encode_node
from pointsafe.cas.tree import REG, Entry, encode_tree
from pointsafe.server import protocol


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A served safe with agents a and b (both --can-restore), one point each."""
    tmp = tmp_path_factory.mktemp("hostile")
    safe = make_safe(tmp)
    tokens = {n: add_agent(safe, n, "--can-restore") for n in ("a", "b")}
    srcs = {}
    for n in tokens:
        src = tmp / f"src-{n}"
        src.mkdir()
        (src / "secret").write_bytes(f"the data of {n} ".encode() * 5000)
        srcs[n] = src
    server = start(safe)
    try:
        for n, tok in tokens.items():
            backup_json(server, tok, srcs[n])
        yield server, tokens, tmp
    finally:
        stop(server.proc)


def _chunk(data: bytes, oid: bytes | None = None) -> bytes:
    return b"".join(protocol.encode(Kind.CHUNK, oid or protocol.agent_id(Kind.CHUNK, data), protocol.CODEC_RAW,
                                    len(data), data))


def _node(kind: int, children: list[bytes], payload: bytes) -> tuple[bytes, bytes]:
    raw = encode_node(children, payload)
    oid = protocol.agent_id(kind, raw)
    return oid, b"".join(protocol.encode(kind, oid, protocol.CODEC_RAW, len(raw), raw))


def _tree(entries: list[Entry]) -> tuple[bytes, bytes]:
    children, payload = encode_tree(entries)
    return _node(Kind.TREE, children, payload)


def _raw_http(url: str, request: bytes, shut: bool = True) -> bytes:
    """Send ``request`` bytes as they are on one connection and read the answer until close."""
    host, port = url.split("//")[1].split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(request)
        if shut:
            s.shutdown(socket.SHUT_WR)
        out = b""
        while True:
            try:
                b = s.recv(65536)
            except (ConnectionResetError, TimeoutError):
                break
            if not b:
                break
            out += b
    return out


def _unchanged(server, before) -> None:
    assert safe_state(server.safe) == before


def test_no_token_or_a_wrong_one_is_refused_on_every_route(world):
    server, tokens, _ = world
    for token in (None, "psa_" + "A" * 43, tokens["a"] + "x", "Basic abc"):
        c = server.client(token)
        for method, path in (("GET", "/api/v1/info"), ("GET", "/api/v1/points"), ("POST", "/api/v1/points"),
                             ("POST", "/api/v1/objects"), ("POST", "/api/v1/objects/missing"),
                             ("POST", "/api/v1/objects/fetch"), ("POST", "/api/v1/admin/gc")):
            r = c.request(method, path, content=b"{}")
            assert r.status_code == 401 and "token" in r.json()["error"], (token, path, r.text)
    assert server.client(None).get("/api/openapi.json").json()["openapi"].startswith("3.")


def test_every_admin_route_is_refused_for_an_agent_token_and_changes_nothing(world):
    server, tokens, _ = world
    before = safe_state(server.safe)
    agents_before = run_cli("agent", "list", "--json", safe=server.safe).out
    c = server.client(tokens["a"])
    for what in ("forget", "gc", "defrag", "repair", "verify", "settings", "config", "agents", "agents/b",
                 "agents/a/rotate", "key", "web/passwd", "forget/../gc"):
        for method in ("GET", "POST", "PUT", "DELETE"):
            r = c.request(method, f"/api/v1/admin/{what}", json={"point": before[2][0], "all": True})
            assert r.status_code in (403, 404), (what, method, r.status_code)
            assert r.json()["error"], r.text
            if r.status_code == 404:
                continue
            assert "may not use the administration" in r.json()["error"]
    _unchanged(server, before)
    assert run_cli("agent", "list", "--json", safe=server.safe).out == agents_before


def test_another_agents_points_and_objects_read_as_missing(world):
    server, tokens, tmp = world
    a, b = server.client(tokens["a"]), server.client(tokens["b"])
    bp = b.get("/api/v1/points").json()["points"]
    assert len(bp) >= 1
    b_root, b_id = bp[0]["root"], bp[0]["id"]
    assert b_id not in [p["id"] for p in a.get("/api/v1/points").json()["points"]]
    # b's root (its id, as b knows it), and b's objects as the safe names them
    r = a.post("/api/v1/objects/fetch", json={"ids": [b_root]})
    assert r.status_code == 404 and "not in the safe" in r.json()["error"]
    assert a.post("/api/v1/objects/missing", json={"ids": [b_root]}).json()["missing"] == [b_root]
    from pointsafe.cas import Safe
    from conftest import PW
    with Safe.open(server.safe, password=PW, write=False) as s:
        safe_ids = [k.hex() for k in (p.root for p in s.points()) if k is not None]
    r = a.post("/api/v1/objects/fetch", json={"ids": safe_ids})
    assert r.status_code == 404
    before = safe_state(server.safe)
    # a point naming b's root, a tree naming b's root: refused, nothing stored
    r = a.post("/api/v1/points", json={"name": "steal", "kind": "tree", "source": "/x", "root": b_root})
    assert r.status_code == 409 and "not in the safe" in r.json()["error"]
    _, body = _tree([Entry(b"stolen", 2, 0o755, ref=bytes.fromhex(b_root))])
    r = a.post("/api/v1/objects", content=body)
    assert r.status_code == 422 and "upload it first" in r.json()["error"]
    _unchanged(server, before)
    # through the CLI: b's point id is not a point of a's
    r = agent(server, tokens["a"], "restore", b_id, tmp / "stolen-restore")
    assert r.code == 1 and "no point" in r.err and not (tmp / "stolen-restore").exists()


def test_forged_objects_are_refused_and_nothing_of_their_upload_is_stored(world):
    server, tokens, _ = world
    a = server.client(tokens["a"])
    before = safe_state(server.safe)
    good = os.urandom(5000)
    good_id = protocol.agent_id(Kind.CHUNK, good)
    forged = _chunk(b"not what the id says", oid=good_id)
    for body in (forged, _chunk(good) + _chunk(b"evil", oid=protocol.agent_id(Kind.CHUNK, b"good"))):
        r = a.post("/api/v1/objects", content=body)
        assert r.status_code == 422 and "does not hash to its id" in r.json()["error"], r.text
    # the good chunk sent beside the forged one was not stored either
    assert a.post("/api/v1/objects/missing", json={"ids": [good_id.hex()]}).json()["missing"] == [good_id.hex()]
    # a chunk sent as a tree, a node whose bytes are not a tree, a point object, an unknown kind
    r = a.post("/api/v1/objects", content=b"".join(protocol.encode(Kind.TREE, protocol.agent_id(Kind.TREE, good),
                                                                   0, len(good), good)))
    assert r.status_code in (400, 422), r.text
    _, junk = _node(Kind.TREE, [], b"\xff\xff\xff\x7f")
    r = a.post("/api/v1/objects", content=junk)
    assert r.status_code == 400 and "not a valid tree node" in r.json()["error"], r.text
    for kind in (Kind.POINT, Kind.TOMBSTONE, 0, 99):
        r = a.post("/api/v1/objects", content=protocol.REC.pack(kind, bytes(32), 0, 1, 1) + b"x")
        assert r.status_code == 400 and "not an object an agent may send" in r.json()["error"], r.text
    _unchanged(server, before)


def test_malformed_truncated_and_oversized_bodies_are_refused_with_nothing_stored(world):
    server, tokens, _ = world
    a = server.client(tokens["a"])
    before = safe_state(server.safe)
    data = b"x" * 1000
    rec = _chunk(data)
    bad = {
        "truncated header": rec[:20],
        "truncated body": rec[:-1],
        "bad codec": protocol.REC.pack(1, protocol.agent_id(1, data), 7, len(data), len(data)) + data,
        "zstd garbage": protocol.REC.pack(1, protocol.agent_id(1, data), 1, len(data), 10) + b"0123456789",
        "length lies": protocol.REC.pack(1, protocol.agent_id(1, data), 0, len(data) + 1, len(data)) + data,
        "huge claim": protocol.REC.pack(1, protocol.agent_id(1, data), 0, 2**31, 2**31),
    }
    for what, body in bad.items():
        r = a.post("/api/v1/objects", content=body)
        assert r.status_code == 400 and "nothing stored" in r.json()["error"], (what, r.text)
    for body in (b"{not json", b"[]", b'{"ids": "abc"}', b"[" * 100_000 + b"]" * 100_000, b'{"ids": ["zz"]}', b'{"ids": [1]}',
                 json.dumps({"ids": ["00" * 32] * (protocol.MAX_IDS + 1)}).encode(), b"\xff\xfe"):
        for path in ("/api/v1/objects/missing", "/api/v1/objects/fetch"):
            r = a.post(path, content=body)
            assert r.status_code == 400, (path, body[:30], r.text)
    for point in ({"name": "../x", "kind": "tree", "source": "/s", "root": None},
                  {"name": "a/b", "kind": "tree", "source": "/s", "root": None},
                  {"name": "x", "kind": "tree", "source": "/s/../../etc", "root": None},
                  {"name": "x", "kind": "tree", "source": "relative", "root": None},
                  {"name": "x", "kind": "volume", "source": "/s", "root": None},
                  {"name": "x", "kind": "tree", "source": "/s", "root": "../../etc/passwd"},
                  {"name": "x", "kind": "tree", "source": "/s", "root": None, "agent": "b"},
                  {"name": "x", "kind": "tree", "source": "/s", "root": None, "size": "big"},
                  {"name": "x", "kind": "tree", "source": "/s", "root": None, "size": -1},
                  {"name": "x", "kind": "tree", "source": "/s", "root": None, "stats": {"bytes_new": "lots"}},
                  {"name": "x", "kind": "tree", "source": "/s", "root": None, "warnings": [1, 2]},
                  {"name": "x", "kind": "tree", "source": "/s", "root": None, "started": "yesterday"},
                  {"name": "x", "kind": "tree", "source": "/s", "root": None, "labels": {"a": ["b"]}},
                  {"name": "x", "kind": "tree", "source": "/s", "root": None, "root_meta": {"mode": "rwx"}},
                  {"name": "x", "kind": "tree", "source": "/s", "root": None, "root_meta": {"xattrs": [["zz", "00"]]}},
                  {"name": "x", "kind": "tree", "source": "/s", "root": None,
                   "snapshot": {"method": "btrfs", "path": "/etc"}},
                  {"name": "x", "kind": "tree", "source": "/s", "root": None,
                   "snapshot": {"method": "btrfs", "taken_at": "2026-12-02T10:00:00Z", "held_s": 0,
                                "subvol": {"uuid": "x" * 5000, "parent_uuid": "", "ctransid": 1}}},
                  {"name": "x", "kind": "tree", "source": "/s", "root": None,
                   "snapshot": {"method": "btrfs", "taken_at": "2026-12-02T10:00:00Z", "held_s": 0,
                                "subvol": {"uuid": "ab", "parent_uuid": "cd", "ctransid": "9"}}},
                  {"name": "x", "kind": "tree", "source": "/s", "root": None, "consistency": ["postgres"]},
                  {"name": "x", "kind": "tree", "source": "/s", "root": None, "consistency": {"pg": {"wal": [{}]}}},
                  {"name": "x", "kind": "tree", "source": "/s", "root": None, "consistency": {"pg": {"k": "x" * 5000}}},
                  ["not", "an", "object"]):
        r = a.post("/api/v1/points", json=point)
        assert r.status_code == 400, (point, r.text)
    # a body larger than the limit: refused from its Content-Length, before it is read
    head = (f"POST /api/v1/objects HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {tokens['a']}\r\n"
            f"Content-Type: application/octet-stream\r\nContent-Length: {protocol.MAX_BODY + 1}\r\n\r\n").encode()
    answer = _raw_http(server.url, head + rec, shut=False)
    assert b" 413 " in answer.split(b"\r\n")[0] and b"more than the limit" in answer, answer[:300]
    # ... and one that streams past the limit without saying its length
    chunked = (f"POST /api/v1/objects HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {tokens['a']}\r\n"
               "Transfer-Encoding: chunked\r\n\r\n").encode()
    piece = b"%x\r\n" % (1 << 20) + b"\0" * (1 << 20) + b"\r\n"
    host, port = server.url.split("//")[1].split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(chunked)
        try:
            for _ in range(protocol.MAX_BODY // (1 << 20) + 2):
                s.sendall(piece)
        except (BrokenPipeError, ConnectionResetError):
            pass
        got = s.recv(65536)
    assert b" 413 " in got.split(b"\r\n")[0], got[:300]
    # a body cut short (the client goes away mid-body)
    head = (f"POST /api/v1/objects HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {tokens['a']}\r\n"
            f"Content-Length: {len(rec) * 3}\r\n\r\n").encode()
    _raw_http(server.url, head + rec)
    # path traversal in the URL
    answer = _raw_http(server.url, f"GET /api/v1/../../../etc/passwd HTTP/1.1\r\nHost: x\r\n"
                                   f"Authorization: Bearer {tokens['a']}\r\nConnection: close\r\n\r\n".encode())
    assert b" 404 " in answer.split(b"\r\n")[0] and b"root:" not in answer, answer[:300]
    time.sleep(0.5)
    _unchanged(server, before)
    r = run_cli("points", safe=server.safe)       # what the admin reads of the points still reads
    assert r.code == 0 and "Traceback" not in r.err, r.err
    assert a.get("/api/v1/info").status_code == 200     # the server is still serving
    assert protocol.agent_id(1, data).hex() in a.post("/api/v1/objects/missing",
                                                      json={"ids": [protocol.agent_id(1, data).hex()]}).json()["missing"]


def test_a_tree_naming_paths_outside_the_target_restores_nothing_outside(world):
    server, tokens, tmp = world
    a = server.client(tokens["a"])
    data = b"escaped\n"
    cid = protocol.agent_id(Kind.CHUNK, data)
    entries = [Entry(name, REG, 0o644, size=len(data), ref=cid) for name in (b"../evil", b"..", b"/abs", b"ok")]
    tid, tree = _tree(entries)
    r = a.post("/api/v1/objects", content=_chunk(data) + tree)
    assert r.status_code == 200, r.text
    r = a.post("/api/v1/points", json={"name": "trap", "kind": "tree", "source": "/trap", "root": tid.hex(),
                                       "root_meta": {"mode": 0o755}})
    assert r.status_code == 200, r.text
    target = tmp / "deep" / "target"
    target.parent.mkdir()
    r = agent(server, tokens["a"], "restore", "trap@latest", target)
    assert r.code in (0, 3), r.err
    assert sorted(os.listdir(target.parent)) == ["target"]
    assert (target / "ok").read_bytes() == data
    assert not (tmp / "evil").exists() and not os.path.exists("/abs")


def test_an_upload_answer_does_not_tell_whether_another_agent_holds_the_same_content(world):
    server, tokens, tmp = world
    a, b = server.client(tokens["a"]), server.client(tokens["b"])
    theirs = (tmp / "src-b" / "secret").read_bytes()[:60_000]    # content b stored (a chunk of it, or not)
    fresh = os.urandom(60_000)
    answers = []
    for client, data in ((b, theirs), (a, theirs), (a, fresh)):
        r = client.post("/api/v1/objects", content=_chunk(data))
        assert r.status_code == 200, r.text
        answers.append(r.json())
    # a gets the same answer for content the safe had (from b) and for content it never had
    assert answers[1] == answers[2] == {"received": 1}


def test_a_restore_keeps_its_temporary_copy_out_of_the_targets_directory(world, tmp_path):
    """The target's directory may belong to someone else, who could swap a temporary directory
    there for a link elsewhere while the restore runs as root: nothing goes there but the target."""
    import threading
    server, tokens, tmp = world
    shared = tmp_path / "shared"            # a directory the target's owner controls
    shared.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    stop_flag = threading.Event()
    seen: list[str] = []

    def swapper():                          # the hostile owner: swap whatever appears for a link out
        while not stop_flag.is_set():
            for n in os.listdir(shared):
                if n != "target" and not os.path.islink(shared / n):
                    seen.append(n)
                    try:
                        os.rename(shared / n, tmp_path / f"moved-{n}")
                        os.symlink(outside, shared / n)
                    except OSError:
                        pass
    t = threading.Thread(target=swapper, daemon=True)
    t.start()
    try:
        r = agent(server, tokens["a"], "restore", "src-a@latest", shared / "target",
                  env={"XDG_CACHE_HOME": str(tmp_path / "cache")})
    finally:
        stop_flag.set()
        t.join(timeout=10)
    assert r.code == 0, r.err
    assert seen == [] and os.listdir(outside) == []
    assert (shared / "target" / "secret").read_bytes() == b"the data of a " * 5000
    assert not (tmp_path / "cache").exists()      # streamed: nothing of the point was put anywhere else
