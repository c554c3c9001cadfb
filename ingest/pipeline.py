"""The backup pipeline: reader -> chunker -> hash/dedup/compress (thread pool) -> writer.

The reader (the caller's thread: a tree walker or a volume reader) cuts data into chunks and
groups them, with the structural events around them (file start/end, directory start/end), into
*batches* of a few MiB. Each batch is handed to a thread pool that hashes every chunk (BLAKE3),
asks the safe whether it is already stored and compresses only the new ones (one
ZstdCompressor per thread; blake3, zstd and file reads release the GIL, so both cores work).
A single assembler thread takes batches back *in order*, appends new records to the pack
through the safe's Writer, builds each file's Merkle list and each directory's tree node.

Memory is bounded by the queue: at most ``MAX_BATCHES_IN_FLIGHT`` batches of ``BATCH_BYTES``.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

from pointsafe.cas import BlobBuilder, BlobReader, Entry, Kind, Prepared, Writer, build_tree, object_key, prepare
from pointsafe.cas.crypto import Crypto

from .chunking import is_zero

BATCH_BYTES = 4 * 1024 * 1024
BATCH_EVENTS = 1024
MAX_BATCHES_IN_FLIGHT = 12
_KIND_CHUNK = bytes((Kind.CHUNK,))


@dataclass
class Stats:
    """Counters of one backup (see the field comments); ``as_dict`` is what a point records."""
    files: int = 0
    dirs: int = 0
    other: int = 0
    files_unchanged: int = 0
    bytes_read: int = 0        # bytes the point covers by reading (or reusing, with changed blocks)
    bytes_scanned: int = 0     # bytes actually read from the source (== bytes_read for a full read)
    bytes_new: int = 0         # raw bytes of chunks the safe did not hold
    bytes_stored: int = 0      # record bytes appended to packs (after compression)
    objects_new: int = 0
    size: int = 0              # logical bytes of the regular files / the volume

    def as_dict(self) -> dict:
        """The counters as a new dict (JSON-able)."""
        return dict(self.__dict__)


class Batch:
    """Events and chunk data gathered for one hashing job of the worker threads."""
    __slots__ = ("chunks", "events", "nbytes", "future")

    def __init__(self) -> None:
        self.chunks: list[memoryview] = []
        self.events: list[tuple] = []
        self.nbytes = 0
        self.future: Future | None = None


def _hash_batch(chunks: list[memoryview], known: Callable[[bytes], bool],
                level: int | None, crypto: Crypto | None = None) -> list[tuple[bytes, Prepared | None] | None]:
    """Worker: (key, Prepared or None when already stored) per chunk; None for zero chunks.
    ``crypto`` is the safe's (keyed ids, sealed records) or None for a plain safe."""
    key_of = object_key if crypto is None else crypto.object_key
    out: list[tuple[bytes, Prepared | None] | None] = []
    for mv in chunks:
        if is_zero(mv):
            out.append(None)
            continue
        key = key_of(Kind.CHUNK, mv)
        if known(key):
            out.append((key, None))
        else:
            # prepare reads any buffer (hashing, zstd, raw copy); cas declares it for bytes only.
            out.append((key, prepare(Kind.CHUNK, mv, level, key=key, crypto=crypto)))
    return out


class Pipeline:
    """Feed it events with :meth:`file`, :meth:`data`, ...; :meth:`finish` returns the root.

    Use from one thread (the reader). The assembler runs in its own thread.
    """

    def __init__(self, writer: Writer, fanout: int, workers: int = 2):
        self.writer = writer
        self.fanout = fanout
        self.stats = Stats()
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="pointsafe-hash")
        self.q: queue.Queue = queue.Queue(maxsize=MAX_BATCHES_IN_FLIGHT)
        self.batch = Batch()
        self.error: BaseException | None = None
        self.root: tuple[bytes | None, int] | None = None
        self.asm = _Assembler(self)
        self.thread = threading.Thread(target=self._run_assembler, name="pointsafe-assembler", daemon=True)
        self.thread.start()

    # -- reader side --------------------------------------------------------------------

    def file(self, entry: Entry) -> None:
        """Begin a regular file; its data/hole events follow, then end() or abort()."""
        self._event(("file", entry))

    def data(self, mv: memoryview) -> None:
        """Data of the current file, in order. The pipeline keeps ``mv`` until its batch is
        handled: the caller must not reuse or change the buffer behind it. Hands a full batch
        to the worker threads.
        """
        b = self.batch
        b.events.append(("data", len(b.chunks)))
        b.chunks.append(mv)
        b.nbytes += len(mv)
        self.stats.bytes_read += len(mv)
        self.stats.bytes_scanned += len(mv)
        if b.nbytes >= BATCH_BYTES or len(b.events) >= BATCH_EVENTS:
            self._submit()

    def reuse_from(self, blob: BlobReader, start: int, end: int) -> None:
        """Bytes [start, end) of the current file taken from the stored ``blob`` (its chunks
        whole) without reading them, as one event: the assembler adds the stretch with
        ``BlobBuilder.add_from``, which takes the blob's LIST nodes whole where it can, so an
        unchanged stretch costs a few node reads, not one event per block. The assembler
        thread reads ``blob``'s nodes (``Safe.get`` and the agent's RemoteSafe.get are
        thread-safe)."""
        if end > start:
            self.stats.bytes_read += end - start
            self._event(("reuse_from", blob, start, end))

    def hole(self, length: int) -> None:
        """``length`` bytes of zeros (a hole) in the current file, stored as no chunk."""
        self._event(("hole", length))

    def end(self) -> None:
        """The current file is complete: its blob is finished and its entry added."""
        self._event(("end",))

    def abort(self) -> None:
        """Drop the file begun last (it changed under the reader or could not be read)."""
        self._event(("abort",))

    def entry(self, entry: Entry) -> None:
        """A finished entry: a directory-less leaf, or an unchanged file whose ref is known."""
        self._event(("entry", entry))

    def link(self, entry: Entry) -> None:
        """A hardlink to a file seen earlier in this backup (same link_group)."""
        self._event(("link", entry))

    def opendir(self, entry: Entry) -> None:
        """Begin directory ``entry``: the entries that follow, until ``closedir``, are its own."""
        self._event(("dir", entry))

    def closedir(self) -> None:
        """End the innermost open directory: its tree node is built and its entry added to its
        parent.
        """
        self._event(("enddir",))

    def _event(self, ev: tuple) -> None:
        b = self.batch
        b.events.append(ev)
        if len(b.events) >= BATCH_EVENTS:
            self._submit()

    def _submit(self) -> None:
        b = self.batch
        if not b.events:
            return
        if b.chunks:
            b.future = self.pool.submit(_hash_batch, b.chunks, self.writer.known, self.writer.level,
                                         self.writer.crypto)
        self.batch = Batch()
        while True:
            if self.error is not None:
                raise self.error
            try:
                self.q.put(b, timeout=0.2)
                return
            except queue.Full:
                continue

    def finish(self) -> tuple[bytes | None, int]:
        """Flush everything; return (root key, size) of the outermost dir or file."""
        self._submit()
        self.q.put(None)
        self.thread.join()
        self.pool.shutdown()
        if self.error is not None:
            raise self.error
        return self.root if self.root is not None else (None, 0)

    def cancel(self) -> None:
        """Stop the assembler after an error on the reader side."""
        self.error = self.error or RuntimeError("cancelled")
        try:
            while True:
                self.q.get_nowait()
        except queue.Empty:
            pass
        try:
            self.q.put_nowait(None)
        except queue.Full:
            pass
        self.thread.join(timeout=30)
        self.pool.shutdown(cancel_futures=True)

    # -- assembler side -----------------------------------------------------------------

    def _run_assembler(self) -> None:
        try:
            while True:
                b = self.q.get()
                if b is None:
                    return
                if self.error is not None:
                    continue
                results = b.future.result() if b.future is not None else ()
                self.asm.handle(b, results)
        except BaseException as e:  # handed to the reader thread
            self.error = e
            try:
                while True:
                    self.q.get_nowait()
            except queue.Empty:
                pass


class _Assembler:
    """Builds blobs and trees from events, in order, in the assembler thread."""

    def __init__(self, p: Pipeline):
        self.p = p
        self.w = p.writer
        self.stats = p.stats
        self.dirs: list[tuple[Entry, list[Entry]]] = []
        self.cur_file: Entry | None = None
        self.blob: BlobBuilder | None = None
        self.groups: dict[int, Entry] = {}

    def _add(self, e: Entry) -> None:
        if self.dirs:
            self.dirs[-1][1].append(e)
        else:
            self.p.root = (e.ref, e.size)

    def _blob(self) -> BlobBuilder:
        """The blob of the file being stored (events of a file come between "file" and "end")."""
        assert self.blob is not None, "file data outside a file"
        return self.blob

    def _file(self) -> Entry:
        """The entry of the file being stored."""
        assert self.cur_file is not None, "end of a file that was not begun"
        return self.cur_file

    def handle(self, b: Batch, results) -> None:
        w = self.w
        st = self.stats
        for ev in b.events:
            t = ev[0]
            if t == "data":
                r = results[ev[1]]
                n = len(b.chunks[ev[1]])
                if r is None:
                    self._blob().add(None, n)
                    continue
                key, prep = r
                if prep is not None:
                    before = w.bytes_written
                    if w.put_prepared(prep):
                        st.bytes_new += n
                        st.objects_new += 1
                        st.bytes_stored += w.bytes_written - before
                self._blob().add(key, n)
            elif t == "hole":
                self._blob().add(None, ev[1])
            elif t == "reuse_from":
                self._blob().add_from(ev[1], ev[2], ev[3])
            elif t == "file":
                self.cur_file = ev[1]
                self.blob = BlobBuilder(self._put_node, self.p.fanout)
            elif t == "end":
                e, blob = self._file(), self._blob()
                e.ref = blob.finish()
                e.size = blob.size
                st.files += 1
                st.size += e.size
                if e.link_group:
                    self.groups[e.link_group] = e
                self._add(e)
                self.cur_file = self.blob = None
            elif t == "abort":
                self.cur_file = self.blob = None
            elif t == "entry":
                e = ev[1]
                if e.type == 1:
                    st.files += 1
                    st.files_unchanged += 1
                    st.size += e.size
                    if e.link_group:
                        self.groups[e.link_group] = e
                else:
                    st.other += 1
                self._add(e)
            elif t == "link":
                e = ev[1]
                first = self.groups.get(e.link_group)
                if first is not None:
                    e.ref, e.size = first.ref, first.size
                st.files += 1
                self._add(e)
            elif t == "dir":
                self.dirs.append((ev[1], []))
            elif t == "enddir":
                d, entries = self.dirs.pop()
                d.ref = build_tree(self._put_node, entries)
                st.dirs += 1
                self._add(d)

    def _put_node(self, kind: int, children: list[bytes], payload: bytes) -> bytes:
        before = self.w.bytes_written
        key = self.w.put_node(kind, children, payload)
        self.stats.bytes_stored += self.w.bytes_written - before
        if self.w.bytes_written != before:
            self.stats.objects_new += 1
        return key
