"""The mount's byte-bounded cache loads a missing value once however many threads ask for it at
once (two readers of one file, the read-ahead racing a reader), hands every waiter the value or
the load's error, and retries after an error."""

from __future__ import annotations

import threading
import time

import pytest

from pointsafe.fusefs.cache import ByteLRU

THREADS = 8


def _race(fn, n: int = THREADS) -> list:
    """``fn()`` on ``n`` threads started together; their results (or exceptions) in order."""
    out: list = [None] * n
    go = threading.Barrier(n)

    def run(i: int) -> None:
        go.wait()
        try:
            out[i] = fn()
        except Exception as e:  # noqa: BLE001 - the test looks at what each thread got
            out[i] = e

    ts = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout=30)
        assert not t.is_alive(), "a waiter never woke up"
    return out


def test_a_value_wanted_by_many_threads_is_loaded_once():
    cache: ByteLRU[bytes] = ByteLRU(1 << 20)
    loads = []

    def load() -> bytes:
        loads.append(1)
        time.sleep(0.2)               # long enough for every other thread to start waiting
        return b"x" * 1000

    got = _race(lambda: cache.get(b"k", load))
    assert got == [b"x" * 1000] * THREADS
    assert len(loads) == 1
    assert cache.peek(b"k") == b"x" * 1000


def test_claimed_batches_wait_for_each_other_and_share_the_values():
    cache: ByteLRU[bytes] = ByteLRU(1 << 20)
    keys = [b"a", b"b", b"c"]
    loaded: list[bytes] = []
    lock = threading.Lock()

    def batch() -> dict:
        found, mine, waits = cache.claim(keys)
        time.sleep(0.1)
        for k in mine:
            with lock:
                loaded.append(k)
            cache.settle(k, k * 10)
        found.update({k: k * 10 for k in mine})
        for k, f in waits:
            found[k] = cache.wait(f)
        return found

    got = _race(batch)
    assert all(g == {k: k * 10 for k in keys} for g in got)
    assert sorted(loaded) == keys             # each key loaded by exactly one thread


def test_a_failed_load_reaches_every_waiter_and_is_tried_again_later():
    cache: ByteLRU[bytes] = ByteLRU(1 << 20)
    calls = []

    def failing() -> bytes:
        calls.append(1)
        time.sleep(0.2)
        raise OSError("pack unreadable")

    got = _race(lambda: cache.get(b"k", failing))
    assert all(isinstance(g, OSError) for g in got)
    assert len(calls) == 1
    assert cache.peek(b"k") is None
    assert cache.get(b"k", lambda: b"fine") == b"fine"


@pytest.mark.parametrize("n", [1, 3])
def test_the_byte_bound_holds_while_loading(n):
    cache: ByteLRU[bytes] = ByteLRU(10_000)
    for i in range(50):
        _race(lambda i=i: cache.get(i, lambda: bytes(3000)), n)
        assert cache.bytes <= 10_000
