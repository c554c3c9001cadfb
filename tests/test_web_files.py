"""Browsing and downloading through a real ``pointsafe web`` server: paged listings of a
100,000-entry directory, files byte for byte, directories as tar and zip, hostile names and
path traversal attempts. One handler test runs the app in-process to count the objects a
page reads."""

from __future__ import annotations

import base64
import http.client
import io
import os
import re
import subprocess
import zipfile
from urllib.parse import urlsplit

import pytest

from _tree_util import DIR, HARDLINK, LNK, REG, FIFO, Spec, assert_trees_equal, make_tree
from _web_util import PASSWORD, login, running, set_password
from conftest import needs_root, run_cli

N_BIG = 100_000


def _backup(src, safe, name="data") -> str:
    import json
    r = run_cli("backup", src, "--name", name, "--json", safe=safe)
    assert r.code in (0, 3), r.err
    return json.loads(r.out)["id"]


def _big_point(safe) -> str:
    """A point (built with the writer API, no files on disk) whose ``big/`` holds N_BIG empty
    files ``f000000`` ..; it also has snapshot and consistency records."""
    from pointsafe.cas import Entry, Safe, build_tree, utc_now_iso
    from pointsafe.cas.tree import DIR as T_DIR, REG as T_REG
    with Safe.open(safe) as s, s.writer("test") as w:
        entries = [Entry(f"f{i:06d}".encode(), T_REG, 0o644, mtime_ns=10**18) for i in range(N_BIG)]
        big = build_tree(w.put_node, entries)
        root = build_tree(w.put_node, [Entry(b"big", T_DIR, 0o755, ref=big, mtime_ns=10**18)])
        now = utc_now_iso()
        p = w.add_point({"name": "many", "kind": "tree", "source": "/many", "host": "test", "started": now,
                         "finished": now, "size": 0, "warnings": [], "stats": {"files": N_BIG},
                         "snapshot": {"provider": "btrfs", "path": "/srv/.snap-1", "took_ms": 12},
                         "consistency": {"sqlite": {"database": "app.db", "method": "backup-api"}}}, root)
    return p.id


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    from pointsafe.cas import Safe
    safe = tmp_path_factory.mktemp("big") / "safe"
    Safe.init(safe).close()
    pid = _big_point(safe)
    set_password(safe)
    with running(safe) as server:
        yield safe, pid, server


def test_a_page_of_a_huge_directory_reads_only_that_page(big):
    safe, pid, server = big
    c = login(server)
    r = c.get(f"/points/{pid}/tree/big/", params={"format": "json"})
    j = r.json()
    assert j["total"] == N_BIG and j["offset"] == 0 and len(j["entries"]) == 200
    assert [e["path"] for e in j["entries"][:2]] == ["big/f000000", "big/f000001"]
    assert j["nodes_read"] <= 3        # the index node and the one or two leaf pages that hold the page
    j = c.get(f"/points/{pid}/tree/big/", params={"format": "json", "offset": 54_321, "limit": 1000}).json()
    assert [e["path"] for e in j["entries"]] == [f"big/f{i:06d}" for i in range(54_321, 55_321)]
    assert j["nodes_read"] <= 1 + 1 + 1000 // 32
    html = c.get(f"/points/{pid}/tree/big/", params={"offset": 99_900}).text
    rows = re.findall(r'<a href="/points/[0-9a-f]+/tree/big/f(\d+)">', html)
    assert rows == [f"{i:06d}" for i in range(99_900, N_BIG)]
    assert "previous page" in html and 'id="next"' not in html
    first = c.get(f"/points/{pid}/tree/big/").text
    assert "f000199" in first and "f000200" not in first and 'id="next"' in first


def test_handler_counts_the_objects_a_page_reads(big):
    """In-process (the same app over httpx's ASGI transport): the objects read from packs for
    the first page of the 100,000-entry directory, against reading the whole directory."""
    import asyncio

    import httpx

    from pointsafe.cas import Safe, read_tree
    from pointsafe.ingest.browse import lookup
    from pointsafe.web import create_app
    safe, pid, _ = big

    async def first_page(s) -> tuple[int, int]:
        transport = httpx.ASGITransport(app=create_app(s))
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as c:
            tok = re.search(r'name="token" value="([^"]+)"', (await c.get("/login")).text).group(1)
            assert (await c.post("/login", data={"password": PASSWORD, "token": tok})).status_code == 303
            before = s.objects_read
            r = await c.get(f"/points/{pid}/tree/big/?format=json")
            assert r.status_code == 200 and len(r.json()["entries"]) == 200
            return s.objects_read - before, r.json()["nodes_read"]

    with Safe.open(safe, write=False) as s:
        page_reads, nodes_read = asyncio.run(first_page(s))
        before = s.objects_read
        e = lookup(s, s.point(pid), "big")
        assert len(read_tree(s.get, e.ref)) == N_BIG
        whole_reads = s.objects_read - before
    print(f"first page of {N_BIG} entries: {page_reads} objects read; the whole directory: {whole_reads}")
    assert page_reads <= 3                 # the root node (to find big/), big's index node, one leaf page
    assert nodes_read == page_reads - 1    # what the page itself reports (the lookup of big/ aside)
    assert whole_reads > 100 * page_reads


def test_point_page_shows_snapshot_and_consistency(big):
    safe, pid, server = big
    html = login(server).get(f"/points/{pid}").text
    snap = re.search(r'<table id="snapshot">.*?</table>', html, re.S).group(0)
    assert "provider" in snap and "btrfs" in snap and "/srv/.snap-1" in snap
    cons = re.search(r'<table id="consistency">.*?</table>', html, re.S).group(0)
    assert "sqlite" in cons and "backup-api" in cons


HOSTILE = [b"<img src=x onerror=alert(1)>.html", b"<script>alert(1)<\\script>", b'quote"and&amp;', b"bad\xff\xfename",
           b"new\nline", b"esc\x1b[31mred", b"pct%2Fslash", b"q?mark#hash", b"sp ace", "ünïcode".encode(), b"dots..", b"-"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from pointsafe.cas import Safe
    tmp = tmp_path_factory.mktemp("files")
    safe = tmp / "safe"
    Safe.init(safe, pack_size=1 << 20).close()
    src = tmp / "src"
    (src / "sub").mkdir(parents=True)
    big = os.urandom(3 << 20)
    with open(src / "big.bin", "wb") as f:                       # many chunks and a hole
        f.write(big)
        f.seek(8 << 20)
        f.write(big[:12345])
    (src / "notes.txt").write_text("plain text\n")
    (src / "empty").write_bytes(b"")
    hostile = src / "hostile"
    hostile.mkdir()
    for n in HOSTILE:
        with open(os.path.join(os.fsencode(hostile), n), "wb") as f:
            f.write(b"content of " + n)
    pid = _backup(src, safe)
    set_password(safe)
    with running(safe) as server:
        yield safe, pid, server, src


def test_download_is_byte_identical(files):
    safe, pid, server, src = files
    c = login(server)
    for name, ctype in (("big.bin", "application/octet-stream"), ("notes.txt", "text/plain"), ("empty", None)):
        r = c.get(f"/points/{pid}/raw/{name}")
        want = (src / name).read_bytes()
        assert r.status_code == 200 and r.content == want, name
        assert int(r.headers["content-length"]) == len(want)
        if ctype:
            assert r.headers["content-type"].split(";")[0] == ctype
        assert r.headers["content-disposition"].startswith("attachment;")
        assert "sandbox" in r.headers["content-security-policy"]
    assert c.get(f"/points/{pid}/raw/sub").status_code == 404        # a directory is no file
    assert c.get(f"/points/{pid}/raw/nope").status_code == 404


def test_hostile_names_are_escaped_and_downloadable(files):
    safe, pid, server, src = files
    c = login(server)
    html = c.get(f"/points/{pid}/tree/hostile/").text
    assert "<script>" not in html and "<img" not in html and "\x1b" not in html
    assert "&lt;img src=x onerror=alert(1)&gt;.html" in html and "&lt;script&gt;" in html
    assert "bad\\xff\\xfename" in html
    assert "new\\nline" in html and "esc\\x1b[31mred" in html
    links = re.findall(r'<a class="download" href="([^"]+)">', html)
    assert len(links) == len(HOSTILE)
    got = {}
    for href in links:
        r = c.get(href.replace("&amp;", "&"))
        assert r.status_code == 200, href
        got[r.content[len(b"content of "):]] = r.content
    assert sorted(got) == sorted(HOSTILE)
    j = c.get(f"/points/{pid}/tree/hostile/?format=json").json()
    raw = {base64.b64decode(e["path_b64"]) for e in j["entries"] if "path_b64" in e}
    assert raw == {b"hostile/bad\xff\xfename"}


def _raw_get(server, cookie: str, path: str) -> int:
    u = urlsplit(server.url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    try:
        conn.putrequest("GET", path, skip_accept_encoding=True)
        conn.putheader("Cookie", cookie)
        conn.endheaders()
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def test_path_traversal_is_refused(files):
    safe, pid, server, src = files
    c = login(server)
    cookie = f"pointsafe_session={c.cookies['pointsafe_session']}"
    assert _raw_get(server, cookie, f"/points/{pid}/raw/notes.txt") == 200
    for path in ("../../etc/passwd", "sub/../notes.txt", "%2e%2e/notes.txt", "sub%2F..%2Fnotes.txt",
                 "sub%2fnotes.txt", "notes.txt%00", "%00", ".", "sub/./../notes.txt"):
        for word in ("raw", "tree", "tar"):
            assert _raw_get(server, cookie, f"/points/{pid}/{word}/{path}") == 400, (word, path)


def _tree_spec() -> Spec:
    t = 1_700_000_000_123_456_789
    return Spec(DIR, 0o750, 0, 0, t, children={
        b"file.txt": Spec(REG, 0o640, 1234, 2345, t + 1, content=[(0, b"hello tar\n")]),
        b"setuid": Spec(REG, 0o4755, 0, 0, t + 2, content=[(0, os.urandom(70_000))]),
        b"sparse": Spec(REG, 0o600, 0, 0, t + 3, content=[(0, b"head"), (3 << 20, b"tail")]),
        b"link": Spec(LNK, 0o777, 0, 0, t + 4, target=b"file.txt"),
        b"hard": Spec(HARDLINK, link_to=b"file.txt"),
        b"fifo": Spec(FIFO, 0o644, 0, 0, t + 5),
        b"x\xffy": Spec(REG, 0o644, 0, 0, t + 6, content=[(0, b"non-utf8 name")]),
        b"attrs": Spec(REG, 0o644, 0, 0, t + 7, content=[(0, b"x")], xattrs={b"user.note": b"kept"}),
        b"sub": Spec(DIR, 0o755, 7, 8, t + 8, children={
            b"deep.bin": Spec(REG, 0o644, 0, 0, t + 9, content=[(0, os.urandom(200_000))]),
            b"empty": Spec(DIR, 0o700, 0, 0, t + 10)}),
    })


@needs_root
def test_tar_stream_extracts_to_the_same_tree(tmp_path):
    from pointsafe.cas import Safe
    safe = tmp_path / "safe"
    Safe.init(safe, pack_size=1 << 20).close()
    src = make_tree(tmp_path / "src", _tree_spec())
    pid = _backup(src, safe)
    set_password(safe)
    with running(safe) as server:
        c = login(server)
        for url, top, want in ((f"/points/{pid}/tar/", f"data-{pid[:12]}", src), (f"/points/{pid}/tar/sub", "sub", src / "sub")):
            r = c.get(url)
            assert r.status_code == 200 and r.headers["content-type"] == "application/x-tar"
            assert len(r.content) % 10240 == 0
            out = tmp_path / f"out-{top}"
            out.mkdir()
            p = subprocess.run(["tar", "--xattrs", "--xattrs-include=user.*", "--numeric-owner", "-xpf", "-",
                                "-C", str(out)], input=r.content, capture_output=True, timeout=120)
            assert p.returncode == 0, p.stderr.decode()
            assert_trees_equal(want, out / top, check_atime=False, check_sparse=False)
        z = c.get(f"/points/{pid}/zip/sub")
        assert z.status_code == 200 and z.headers["content-type"] == "application/zip"
        with zipfile.ZipFile(io.BytesIO(z.content)) as zf:
            assert zf.read("sub/deep.bin") == (src / "sub" / "deep.bin").read_bytes()
            assert "sub/empty/" in zf.namelist()


def test_byte_ranges_of_a_file(files):
    safe, pid, server, src = files
    c = login(server)
    want = (src / "big.bin").read_bytes()
    url = f"/points/{pid}/raw/big.bin"
    for spec, lo, hi in (("bytes=0-9", 0, 10), ("bytes=1000000-3500000", 1_000_000, 3_500_001),
                         ("bytes=8388000-", 8_388_000, len(want)), ("bytes=-5", len(want) - 5, len(want))):
        r = c.get(url, headers={"range": spec})
        assert r.status_code == 206, spec
        assert r.content == want[lo:hi], spec
        assert r.headers["content-range"] == f"bytes {lo}-{hi - 1}/{len(want)}"
        assert int(r.headers["content-length"]) == hi - lo
    r = c.get(url, headers={"range": f"bytes={len(want)}-"})
    assert r.status_code == 416 and r.headers["content-range"] == f"bytes */{len(want)}"
    assert c.get(url, headers={"range": "bytes=0-1,5-6"}).content == want      # several ranges: all of it


def test_damaged_content_is_named_and_the_archive_stays_whole(tmp_path):
    from _cas_util import flip_bit, record_offset_of, stored_offset

    import httpx

    from pointsafe.cas import BlobReader, Safe
    from pointsafe.ingest.browse import lookup
    safe = tmp_path / "safe"
    Safe.init(safe).close()
    src = tmp_path / "src"
    src.mkdir()
    (src / "good.txt").write_text("fine\n")
    (src / "bad.bin").write_bytes(os.urandom(300_000))
    pid = _backup(src, safe)
    with Safe.open(safe) as s:
        e = lookup(s, s.point(pid), "bad.bin")
        key = next(k for _, _, k in BlobReader(e.ref, e.size, s.get, lambda k: s.entry(k).kind).extents() if k)
        path, oe = record_offset_of(s, key)
    flip_bit(path, stored_offset(oe, 100))
    set_password(safe)
    with running(safe) as server:
        c = login(server)
        r = c.get(f"/points/{pid}/tar/")
        assert r.status_code == 200
        out = tmp_path / "out"
        out.mkdir()
        subprocess.run(["tar", "-xf", "-", "-C", str(out)], input=r.content, check=True, timeout=60)
        top = out / f"data-{pid[:12]}"
        assert (top / "good.txt").read_text() == "fine\n"
        assert (top / "bad.bin").stat().st_size == 300_000
        assert "bad.bin" in (top / ".pointsafe-download-errors.txt").read_text()
        z = zipfile.ZipFile(io.BytesIO(c.get(f"/points/{pid}/zip/").content))
        assert "bad.bin" in z.read(f"data-{pid[:12]}/.pointsafe-download-errors.txt").decode()
        with pytest.raises(httpx.HTTPError):        # a single file cannot say so: the transfer breaks off
            r = c.get(f"/points/{pid}/raw/bad.bin")
            assert len(r.content) == 300_000 and r.content == (src / "bad.bin").read_bytes()
        assert c.get(f"/points/{pid}/raw/good.txt").content == b"fine\n"     # still serving
    log = server.log.read_text()
    assert "pointsafe web: " in log and "bad.bin" in log and "Traceback" not in log
