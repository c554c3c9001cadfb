"""Where pack files live: one small interface, and the local directory as its first home.

Everything in cas that touches pack *bytes* goes through a ``PackStore``: the pack writer
(``cas.packwriter``) creates, appends to and commits packs; readers read byte ranges; gc
deletes packs; the next writer's recovery lists packs and drops uncommitted tails. A second
home for packs (an S3-compatible bucket) implements this interface and changes nothing else
in cas.

Guarantees every implementation gives (docs/FORMAT.md, "Pack storage"):

- ``PackSink.commit()`` is the durable point: when it returns, every byte written to the sink
  so far survives a crash and is readable through ``read``. The index transaction that names
  those bytes is committed only after it (ordering rule 2).
- A store whose ``appendable`` is False keeps only whole, sealed packs (an object store cannot
  append): its sink's ``commit`` makes the pack final, and the pack writer never reopens it.
- ``delete`` is durable when it returns; it is called only after the index stopped naming the
  pack (rule 8). Deleting a pack that is not there is not an error.
- Bytes written but not committed are invisible to readers that follow the index, and the next
  writer removes them (``truncate`` back to the committed length, ``delete`` of packs the index
  does not name, ``discard_temporaries``).
- ``read`` returns exactly the bytes asked for, or fewer when the pack is shorter (the caller's
  record check then reports damage); ``FileNotFoundError`` when the pack is gone.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import IO, BinaryIO, Iterator, Protocol

from .header import PRIVATE_FILE_MODE   # a safe is private to its owner: packs are 0600
from .pack import pack_id_from_name, pack_name


class PackSink(Protocol):
    """A pack being written. Not thread-safe: one writer thread."""

    pack_id: int

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Append bytes (buffered; not durable until ``commit``)."""

    def commit(self) -> None:
        """Make every byte written so far durable (the pack and, for a new pack, its name)."""

    def close(self) -> None:
        """Close after the last commit (the pack is sealed)."""

    def abandon(self) -> None:
        """Close without committing what was written since the last commit."""


class PackStore(Protocol):
    """A home for pack files (see the module docstring for the guarantees)."""

    appendable: bool

    def create(self, pack_id: int) -> PackSink:
        """A new, empty pack ``pack_id`` (a leftover of that id is replaced)."""

    def reopen(self, pack_id: int, length: int) -> PackSink | None:
        """Append to pack ``pack_id`` after its first ``length`` bytes, or None when it cannot
        (not appendable, gone, or not exactly ``length`` bytes long)."""

    def read(self, pack_id: int, offset: int, length: int) -> bytes:
        """``length`` bytes of pack ``pack_id`` from ``offset``."""

    def size(self, pack_id: int) -> int | None:
        """The pack's size in bytes, or None when it does not exist."""

    def open_reader(self, pack_id: int, buffer: int = 0) -> BinaryIO:
        """A seekable reader of the whole pack, for walking it front to back (verify, repair,
        compaction), with ``buffer`` bytes of read-ahead (0: none); FileNotFoundError when gone."""

    def replace_header(self, pack_id: int, header: bytes) -> None:
        """Repair only: write the pack's 16-byte header again (it follows from the pack id),
        durably."""

    def pack_ids(self) -> Iterator[int]:
        """Every pack present, in no particular order."""

    def truncate(self, pack_id: int, length: int) -> None:
        """Cut an uncommitted tail: keep the first ``length`` bytes."""

    def delete(self, pack_ids: list[int]) -> None:
        """Remove packs, durably."""

    def discard_temporaries(self) -> None:
        """Remove what an interrupted writer left that is not a pack."""

    def forget(self, pack_id: int) -> None:
        """Drop any cached handle on ``pack_id`` (it was deleted or rewritten)."""

    def close(self) -> None:
        """Release cached handles."""


def fsync_dir(path: Path) -> None:
    """fsync a directory, so that names created or removed in it are durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class PackFiles:
    """A small LRU of read-only pack file descriptors shared by reader threads."""

    def __init__(self, packs_dir: Path, limit: int = 64):
        self.dir = packs_dir
        self.limit = limit
        self.fds: OrderedDict[int, int] = OrderedDict()
        self.lock = threading.Lock()

    def pread(self, pack_id: int, length: int, offset: int) -> bytes:
        """``length`` bytes of pack ``pack_id`` at ``offset`` (FileNotFoundError when gone)."""
        with self.lock:
            fd = self.fds.get(pack_id)
            if fd is not None:
                self.fds.move_to_end(pack_id)
        if fd is None:
            fd = os.open(self.dir / pack_name(pack_id), os.O_RDONLY | os.O_CLOEXEC)
            with self.lock:
                old = self.fds.get(pack_id)
                if old is not None:
                    os.close(fd)
                    fd = old
                else:
                    self.fds[pack_id] = fd
                    while len(self.fds) > self.limit:
                        _, victim = self.fds.popitem(last=False)
                        os.close(victim)
        return os.pread(fd, length, offset)

    def forget(self, pack_id: int) -> None:
        """Close the descriptor of ``pack_id`` if one is cached."""
        with self.lock:
            fd = self.fds.pop(pack_id, None)
        if fd is not None:
            os.close(fd)

    def close(self) -> None:
        """Close every cached descriptor."""
        with self.lock:
            for fd in self.fds.values():
                os.close(fd)
            self.fds.clear()


class _LocalSink:
    """A pack file being appended to: buffered writes, fsync of the file (and of the directory
    for a new file) as the durable point."""

    def __init__(self, store: "LocalPackStore", pack_id: int, f: IO[bytes], new: bool):
        self.store = store
        self.pack_id = pack_id
        self.f = f
        self.new = new

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.f.write(data)

    def commit(self) -> None:
        self.f.flush()
        os.fsync(self.f.fileno())
        if self.new:
            fsync_dir(self.store.dir)
            self.new = False

    def close(self) -> None:
        self.f.close()

    def abandon(self) -> None:
        try:
            self.f.close()
        except OSError:
            pass   # a full disk cannot flush the buffer: those bytes were never committed


class LocalPackStore:
    """Packs as files ``<safe>/packs/<16 hex digits>.pack`` (docs/FORMAT.md)."""

    appendable = True

    def __init__(self, packs_dir: Path, read_fds: int = 64):
        self.dir = packs_dir
        self.files = PackFiles(packs_dir, read_fds)

    def path(self, pack_id: int) -> Path:
        """The file of pack ``pack_id``."""
        return self.dir / pack_name(pack_id)

    def create(self, pack_id: int) -> PackSink:
        """A new, empty pack file (mode 0600; a leftover of that id is removed first);
        OSError on failure. The name is durable after the sink's first ``commit``."""
        path = self.path(pack_id)
        path.unlink(missing_ok=True)   # an uncommitted leftover of a crashed writer
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, PRIVATE_FILE_MODE)
        os.fchmod(fd, PRIVATE_FILE_MODE)   # whatever the umask
        return _LocalSink(self, pack_id, os.fdopen(fd, "wb", buffering=1 << 20), new=True)

    def reopen(self, pack_id: int, length: int) -> PackSink | None:
        """Append to pack ``pack_id`` after its first ``length`` bytes, or None when the file is
        gone or not exactly ``length`` bytes long."""
        path = self.path(pack_id)
        try:
            f = open(path, "r+b", buffering=1 << 20)
        except FileNotFoundError:
            return None
        if os.fstat(f.fileno()).st_size != length:
            f.close()
            return None
        f.seek(length)
        return _LocalSink(self, pack_id, f, new=False)

    def read(self, pack_id: int, offset: int, length: int) -> bytes:
        """``length`` bytes from ``offset`` (fewer at the end of the file) through the shared
        descriptor cache; FileNotFoundError when the pack is gone. Thread-safe."""
        return self.files.pread(pack_id, length, offset)

    def size(self, pack_id: int) -> int | None:
        """The pack file's size in bytes, or None when it does not exist."""
        try:
            return self.path(pack_id).stat().st_size
        except FileNotFoundError:
            return None

    def pack_ids(self) -> Iterator[int]:
        """The id of every pack file in the directory, in no particular order."""
        for name in os.listdir(self.dir):
            pid = pack_id_from_name(name)
            if pid is not None:
                yield pid

    def open_reader(self, pack_id: int, buffer: int = 0) -> BinaryIO:
        """The pack file opened for reading, with ``buffer`` bytes of read buffer (0: none);
        FileNotFoundError when gone."""
        return open(self.path(pack_id), "rb", buffering=buffer)

    def replace_header(self, pack_id: int, header: bytes) -> None:
        """Write the first bytes of the pack file again and fsync it (repair only)."""
        fd = os.open(self.path(pack_id), os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.pwrite(fd, header, 0)
            os.fsync(fd)
        finally:
            os.close(fd)

    def truncate(self, pack_id: int, length: int) -> None:
        """Cut the pack file back to ``length`` bytes (writer lock held; OSError on failure)."""
        os.truncate(self.path(pack_id), length)

    def delete(self, pack_ids: list[int]) -> None:
        """Unlink the packs (missing ones are fine) and fsync the directory once, so that the
        removal is durable when this returns."""
        for pid in pack_ids:
            self.path(pid).unlink(missing_ok=True)
            self.files.forget(pid)
        if pack_ids:
            fsync_dir(self.dir)

    def discard_temporaries(self) -> None:
        """Remove every ``*.tmp`` file of the packs directory."""
        for name in os.listdir(self.dir):
            if name.endswith(".tmp"):
                (self.dir / name).unlink(missing_ok=True)

    def forget(self, pack_id: int) -> None:
        """Close the cached read descriptor of ``pack_id``, if any."""
        self.files.forget(pack_id)

    def close(self) -> None:
        """Close every cached read descriptor."""
        self.files.close()
