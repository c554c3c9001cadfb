"""The web room's small pieces on their own: URL paths, byte ranges, listen addresses, charts."""

from __future__ import annotations

import pytest

from pointsafe.cas import UsageError
from pointsafe.web.chart import svg_chart
from pointsafe.web.paths import BadPath, split_url_path, tail_of, url_path
from pointsafe.web.server import check_listen, parse_listen
from pointsafe.web.streams import parse_range


@pytest.mark.parametrize("raw", [b"..", b"a/../b", b"%2e%2e", b"%2E%2E/x", b"a%2Fb", b"a%2fb", b"x%00", b"%00",
                                 b".", b"a/./b", b"%2e"])
def test_url_paths_that_could_climb_are_refused(raw):
    with pytest.raises(BadPath):
        split_url_path(raw)


def test_url_paths_carry_raw_bytes():
    names = [b"bad\xff\xfe", b"<x>&\"'", b"new\nline", b"sp ace", b"pct%2F", "ünï".encode(), b"q?#"]
    encoded = url_path(names)
    assert all(c.isascii() and c not in " \n<>\"'?#" for c in encoded)
    assert split_url_path(encoded.encode()) == names
    assert split_url_path(b"//a//b/") == [b"a", b"b"]
    assert tail_of(b"/points/abc/tree/a/b", 3) == b"a/b"
    assert tail_of(b"/points/abc/tree", 3) == b""


@pytest.mark.parametrize("header,want", [
    (None, None), ("bytes=0-9", (0, 10)), ("bytes=5-", (5, 100)), ("bytes=-10", (90, 100)),
    ("bytes=90-1000", (90, 100)), ("bytes=100-", "bad"), ("bytes=9-5", "bad"), ("bytes=-0", "bad"),
    ("bytes=0-1,4-5", None), ("items=0-1", None), ("bytes=x-1", None), ("bytes=-", None),
])
def test_byte_ranges(header, want):
    assert parse_range(header, 100) == want


def test_listen_addresses():
    assert parse_listen("8080") == parse_listen("127.0.0.1:8080")
    assert parse_listen("[::1]:9000").loopback and parse_listen("localhost:80").loopback
    assert parse_listen("127.0.0.2:80").loopback
    assert not parse_listen("0.0.0.0:80").loopback and not parse_listen("[::]:80").loopback
    for bad in ("", "host", ":80", "1.2.3.4:0", "1.2.3.4:65536", "[::1]", "a:b"):
        with pytest.raises(UsageError):
            parse_listen(bad)
    with pytest.raises(UsageError, match="not a loopback"):
        check_listen(parse_listen("0.0.0.0:443"), None, None, True)
    with pytest.raises(UsageError, match="no web password"):
        check_listen(parse_listen("127.0.0.1:80"), None, None, False)
    check_listen(parse_listen("127.0.0.1:80"), None, None, True)


def test_chart_is_an_escaped_svg_picture():
    svg = svg_chart("<b>title</b>", [1.0, 2.0, 3.0], [0.0, 5.0, 2.0], lambda v: f"{v:.0f} <u>", lambda t: "t&")
    assert svg.startswith("<svg") and svg.endswith("</svg>")
    assert "<b>" not in svg and "&lt;b&gt;title" in svg and "&lt;u&gt;" in svg and "t&amp;" in svg
    assert "<polyline" in svg
    bars = svg_chart("x", [1.0], [3.0], str, str, bars=True)
    assert "<rect" in bars and "<polyline" not in bars
    assert "no points yet" in svg_chart("x", [], [], str, str)


def test_newest_task_of_each_kind(safe):
    from pointsafe.ops import tasks
    ids = {}
    for kind in ("verify", "backup", "gc", "verify", "backup"):
        rec = tasks.create(safe.index, kind, [kind])
        tasks.finish(safe.index, rec["id"], "ok")
        ids.setdefault(kind, []).append(rec["id"])
    got = tasks.newest_of_kinds(safe.index, ("verify", "gc", "defrag"))
    assert got["verify"]["id"] == ids["verify"][-1] and got["gc"]["id"] == ids["gc"][-1]
    assert got["verify"]["state"] == "ok" and got["defrag"] is None


def test_the_listening_socket_sends_without_delay():
    """Connections accepted from the socket ``pointsafe web`` binds inherit TCP_NODELAY: an
    answer on a kept-alive connection goes out at once, not after the peer's delayed ACK."""
    import socket

    from pointsafe.web.server import bind
    from _web_util import free_port
    s = bind(parse_listen(f"127.0.0.1:{free_port()}"))
    try:
        c = socket.create_connection(s.getsockname(), timeout=10)
        conn, _ = s.accept()
        with c, conn:
            assert conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    finally:
        s.close()
