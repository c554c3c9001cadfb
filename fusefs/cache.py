"""A byte-bounded LRU cache whose misses are loaded once, however many threads ask.

The mount serves concurrent FUSE requests from worker threads. When several readers want the
same chunk (two ``cat`` of one file, a loop device and the kernel's read-ahead racing) the
first caller loads it and the others wait for that load instead of reading and decompressing
the same record again ("single flight"). Sizes are counted in bytes so that memory stays
bounded whatever the chunk or directory sizes are.

A load rarely has anyone waiting for it (the read-ahead of small files starts a flight for
every file it loads), so a flight is two slots and a flag, and waiters share one condition of
the cache, notified only when a flight someone waits for lands: an ``Event`` per flight cost a
fifth of the small-file read-ahead's CPU.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Callable, Generic, Hashable, Iterable, TypeVar, cast

V = TypeVar("V")


class _Flight:
    """One load under way: waiters wait on the cache's condition until ``done``, then read
    ``value`` or ``error``."""

    __slots__ = ("done", "error", "value", "waiters")

    def __init__(self) -> None:
        self.done = False
        self.waiters = 0
        self.value: object = None
        self.error: BaseException | None = None


class ByteLRU(Generic[V]):
    """LRU of ``key -> value`` holding at most ``limit`` bytes (as measured by ``sizeof``).

    Thread-safe. A value larger than the whole limit is kept alone (everything else is evicted),
    so memory stays within ``max(limit, largest value)``.
    """

    def __init__(self, limit: int, sizeof: Callable[[V], int] = len):  # type: ignore[assignment]
        self.limit = limit
        self.sizeof = sizeof
        self.items: OrderedDict[Hashable, tuple[V, int]] = OrderedDict()
        self.bytes = 0
        self.lock = threading.Lock()
        self.landed = threading.Condition(self.lock)     # a flight someone waits for is done
        self.flights: dict[Hashable, _Flight] = {}
        self.hits = 0
        self.misses = 0

    def peek(self, key: Hashable) -> V | None:
        """The cached value of ``key`` (counted as a hit and made newest), or None; never loads."""
        with self.lock:
            item = self.items.get(key)
            if item is None:
                return None
            self.items.move_to_end(key)
            self.hits += 1
            return item[0]

    def peek_many(self, keys: Iterable[Hashable]) -> dict | None:
        """{key: value} for every key of ``keys`` when all are cached (each made newest and
        counted as a hit), else None; never loads. One lock round for the whole batch."""
        out: dict = {}
        with self.lock:
            items = self.items
            for k in keys:
                item = items.get(k)
                if item is None:
                    return None
                out[k] = item[0]
            for k in out:
                items.move_to_end(k)
            self.hits += len(out)
        return out

    def __contains__(self, key: Hashable) -> bool:
        """Whether ``key`` is cached or being loaded."""
        with self.lock:
            return key in self.items or key in self.flights

    def put(self, key: Hashable, value: V) -> None:
        """Cache ``value`` under ``key``, evicting the oldest values past the byte limit."""
        n = self.sizeof(value)
        with self.lock:
            self._put_locked(key, value, n)

    def _put_locked(self, key: Hashable, value: V, n: int) -> None:
        if n > self.limit:
            # Larger than the whole budget (a directory of a million entries): keep it alone,
            # so that lookups in it do not decode it again each time.
            self.items.clear()
            self.items[key] = (value, n)
            self.bytes = n
            return
        old = self.items.pop(key, None)
        if old is not None:
            self.bytes -= old[1]
        self.items[key] = (value, n)
        self.bytes += n
        while self.bytes > self.limit and self.items:
            _, (_, m) = self.items.popitem(last=False)
            self.bytes -= m

    def get(self, key: Hashable, load: Callable[[], V]) -> V:
        """The cached value, or ``load()``'s result (loaded once for all concurrent callers).

        An exception from ``load`` reaches every caller waiting on that load and nothing is
        cached, so a later call tries again.
        """
        with self.lock:
            item = self.items.get(key)
            if item is not None:
                self.items.move_to_end(key)
                self.hits += 1
                return item[0]
            flight = self.flights.get(key)
            owner = flight is None
            if flight is None:
                flight = self.flights[key] = _Flight()
                self.misses += 1
        if not owner:
            return cast(V, self.wait(flight))   # the owner stored a V (or an error, raised)
        try:
            value = load()
        except BaseException as e:
            self.settle(key, error=e)
            raise
        self.settle(key, value)
        return value

    # -- batch form of get(), for callers that load many keys at once ---------------------

    def claim(self, keys: Iterable[Hashable]) -> tuple[dict, list, list]:
        """Split ``keys`` into (cached {key: value}, keys this caller must load, flights to wait on).

        Every key returned in the second list must be settled with :meth:`settle`.
        """
        found: dict = {}
        mine: list = []
        waits: list = []
        with self.lock:
            for k in dict.fromkeys(keys):
                item = self.items.get(k)
                if item is not None:
                    self.items.move_to_end(k)
                    self.hits += 1
                    found[k] = item[0]
                    continue
                f = self.flights.get(k)
                if f is None:
                    self.flights[k] = _Flight()
                    self.misses += 1
                    mine.append(k)
                else:
                    waits.append((k, f))
        return found, mine, waits

    def settle(self, key: Hashable, value: V | None = None, error: BaseException | None = None) -> None:
        """Finish a load claimed with :meth:`claim`: cache the value (or pass on the error)."""
        n = self.sizeof(cast(V, value)) if error is None else 0   # without an error, a value
        with self.lock:
            f = self.flights.pop(key)
            if error is None:
                self._put_locked(key, cast(V, value), n)
            f.value, f.error, f.done = value, error, True
            if f.waiters:
                self.landed.notify_all()

    def wait(self, flight: _Flight) -> object:
        """The value another thread's load of a claimed key produced (or its error, raised)."""
        with self.lock:
            if not flight.done:
                flight.waiters += 1
                while not flight.done:
                    self.landed.wait()
        if flight.error is not None:
            raise flight.error
        return flight.value

    def clear(self) -> None:
        """Drop every cached value (loads under way still finish)."""
        with self.lock:
            self.items.clear()
            self.bytes = 0
