"""Fetching data chunks for the mount: batched lookups, checked records, cached, loaded once.

A 1 MiB FUSE read of a file with 32 KiB chunks needs about 32 objects. Fetching them one by
one (``Safe.get``: an LMDB transaction, a ``pread`` and a record check each) costs more in
Python than the bytes themselves, so this module looks the whole batch up in one short LMDB
read transaction and reads the records in pack order, adjacent records with one ``pread``
(backups write a file's chunks one after the other). An uncompressed chunk read alone is
served as a view of its record buffer; one read together with others is copied out, so the
cache, which counts the buffer a value keeps alive, stays within its bound exactly.

Every record is checked by ``cas.pack.decode_record_view``, the decoder of the whole safe
(header CRC, stored-bytes checksum, expected key, length; in an encrypted safe the
authentication tag, through the safe's ``crypto``), so damaged bytes are never returned.
Anything unexpected — a pack gone because gc or defrag moved its objects, a record
that fails its check — falls back to ``Safe.get`` for that one object, which looks the object
up again and raises ``IntegrityError``/``ObjectMissing`` when it really is damaged or gone. No LMDB transaction outlives a call.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import cast

from pointsafe.cas import IntegrityError, Kind, Safe
from pointsafe.cas.index import ObjectEntry
from pointsafe.cas.pack import decode_record_view

from .cache import ByteLRU

MAX_RUN = 4 * 1024 * 1024      # bytes of adjacent records read with one pread


Chunk = bytes | memoryview    # a chunk's bytes: a view of its record buffer when read alone, raw


ENTRY_OVERHEAD = 256           # bytes a cached chunk costs besides its data (objects, key, LRU slot)


def _held(value: Chunk) -> int:
    """Bytes a cached value keeps alive: a raw chunk is a view of its whole record buffer;
    with the cache's own per-entry cost, so that 100,000 tiny files stay within the bound too."""
    # (the buffer under a view is the bytes object one pread returned)
    n = len(cast(bytes, value.obj)) if isinstance(value, memoryview) else len(value)
    return n + ENTRY_OVERHEAD


class ChunkSource:
    """Data chunks of one safe through a byte-bounded cache shared by all open files."""

    def __init__(self, safe: Safe, cache_bytes: int):
        self.safe = safe
        self.cache: ByteLRU[Chunk] = ByteLRU(cache_bytes, sizeof=_held)
        self.packs = safe.store   # every pack byte comes through the safe's pack store

    def peek_many(self, keys: list[bytes]) -> dict[bytes, Chunk] | None:
        """Every chunk in ``keys`` if all are cached, else None (nothing is loaded)."""
        return self.cache.peek_many(keys)

    def get_many(self, keys: list[bytes], known: Mapping[bytes, ObjectEntry] | None = None) -> dict[bytes, Chunk]:
        """The raw bytes of every chunk in ``keys`` (IntegrityError/ObjectMissing on damage);
        ``known`` may hold index entries the caller has looked up already."""
        found, mine, waits = self.cache.claim(keys)
        if mine:
            try:
                loaded = self._load(mine, known)
            except BaseException as e:
                for k in mine:
                    self.cache.settle(k, error=e)
                raise
            for k in mine:
                v = loaded.get(k)
                if isinstance(v, BaseException):
                    self.cache.settle(k, error=v)
                else:
                    self.cache.settle(k, v)
            for k in mine:
                v = loaded[k]
                if isinstance(v, BaseException):
                    raise v
                found[k] = v
        for k, f in waits:
            found[k] = self.cache.wait(f)
        return found

    def prefetch(self, keys: list[bytes]) -> None:
        """Load those of ``keys`` that are data chunks and not cached yet (others are skipped:
        a small file's root may be a LIST node); errors are left for a real read to report."""
        cache = self.cache
        with cache.lock:
            keys = [k for k in keys if k not in cache.items and k not in cache.flights]
        if not keys:
            return
        idx = self.safe.index
        with idx.read() as txn:
            # one index look-up per key: the entries found here are the ones the load uses
            known = {k: e for k in keys if (e := idx.get_object(txn, k)) is not None and e.kind == Kind.CHUNK}
        if known:
            try:
                self.get_many(list(known), known)
            except Exception:  # noqa: BLE001, S110 - a real read of the same file reports it
                pass

    def _load(self, keys: list[bytes], known: Mapping[bytes, ObjectEntry] | None = None
              ) -> dict[bytes, Chunk | BaseException]:
        """The chunks of ``keys`` read in pack order, each checked; a chunk that cannot be
        had is its exception (for the caller to raise). Unless ``known`` holds them all, the
        keys are looked up in the index."""
        safe = self.safe
        entries: list[tuple[bytes, ObjectEntry | None]]
        if known is not None and all(k in known for k in keys):
            entries = [(k, known[k]) for k in keys]
        else:
            idx = safe.index
            with idx.read() as txn:
                entries = [(k, idx.get_object(txn, k)) for k in keys]
        out: dict[bytes, Chunk | BaseException] = {}
        located = []
        for k, e in entries:
            if e is None:
                out[k] = self._single(k)    # raises ObjectMissing, or finds it moved
            else:
                located.append((e.pack, e.offset, k, e))
        located.sort(key=lambda t: (t[0], t[1]))       # pack order: sequential on disk
        i = 0
        while i < len(located):
            # Neighbouring records (a backup writes a file's chunks one after the other) come
            # in one pread: far fewer system calls and GIL hand-offs than one per record.
            pack, start, _, first = located[i]
            end = start + first.record_len
            j = i + 1
            while (j < len(located) and located[j][0] == pack and located[j][1] == end
                   and end - start < MAX_RUN):
                end += located[j][3].record_len
                j += 1
            try:
                buf = memoryview(self.packs.read(pack, start, end - start))
            except OSError:
                # The pack is gone or unreadable: gc/defrag moved these objects, or real trouble.
                self.packs.forget(pack)
                for _, _, k, _ in located[i:j]:
                    out[k] = self._single(k)
                i = j
                continue
            shared = j - i > 1
            for _, off, k, e in located[i:j]:
                try:
                    _, raw = decode_record_view(buf[off - start:off - start + e.record_len], pack, off,
                                                rehash=False, expect_key=k, crypto=safe.crypto)
                    # A raw chunk is a view of the read buffer: copy it out when the buffer
                    # holds other records, so that the cache's byte count stays exact.
                    out[k] = bytes(raw) if shared and isinstance(raw, memoryview) else raw
                except IntegrityError:
                    out[k] = self._single(k)
            i = j
        safe.objects_read += len(located)
        return out

    def _single(self, key: bytes) -> bytes | BaseException:
        """One object through ``Safe.get`` (which re-looks-up moved objects); errors returned."""
        try:
            return self.safe.get(key)
        except Exception as e:  # noqa: BLE001 - IntegrityError, ObjectMissing: the caller raises it
            return e

    def close(self) -> None:
        """Nothing of its own to close: pack handles belong to the safe's store."""

