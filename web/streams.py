"""Downloads as streams: a file's or a volume's bytes, a directory as tar or zip.

Everything is produced piece by piece from the safe (a chunk at a time), so a download of any
size runs in bounded memory, and the first bytes leave before the last are read. The tar
stream is POSIX pax (tarfile's headers, ``TarInfo.tobuf``): names as raw bytes (non-UTF-8
names round-trip), exact mtimes in nanoseconds, owners, modes, symlinks, hard links, devices,
FIFOs and xattrs. The zip stream (zipfile on an unseekable sink) holds regular files,
directories and symlinks, with names in UTF-8 (a non-UTF-8 byte becomes U+FFFD there:
use tar for an exact copy).
"""

from __future__ import annotations

import logging
import os
import stat
import tarfile
import time
import zipfile
from collections.abc import Iterator

from pointsafe.cas import BlobReader, Entry, IntegrityError, ObjectMissing, Safe
from pointsafe.cas.tree import BLK, CHR, DIR, FIFO, LNK, REG
from pointsafe.ingest.browse import display_name, walk

log = logging.getLogger("pointsafe.web")   # stderr of `pointsafe web`, and the --log-file

PIECE = 1 << 20
_ZEROS = bytes(PIECE)


def _zeros(n: int) -> Iterator[bytes]:
    while n > 0:
        k = min(n, PIECE)
        yield _ZEROS[:k]
        n -= k


def blob_pieces(safe: Safe, ref: bytes | None, size: int, start: int = 0, end: int | None = None) -> Iterator[bytes]:
    """Bytes ``start .. end`` (default: all ``size``) of blob ``ref`` in pieces, holes as
    zeros; IntegrityError when the stored pieces do not cover them as the list says (the
    stream then stops short)."""
    end = size if end is None else min(end, size)
    if start >= end:
        return
    if ref is None:
        yield from _zeros(end - start)
        return
    reader = BlobReader(ref, size, safe.get, safe.kind)
    done = start
    for off, length, key in reader.extents(start, end):
        lo, hi = max(off, start), min(off + length, end)
        if lo != done:
            raise IntegrityError(f"blob {ref.hex()[:12]}: a gap or overlap at offset {off}")
        if key is None:
            yield from _zeros(hi - lo)
        else:
            data = safe.get(key)
            if len(data) != length:
                raise IntegrityError(f"blob {ref.hex()[:12]}: a piece at offset {off} holds {len(data)} bytes, "
                                     f"its list says {length}")
            yield data if (lo, hi) == (off, off + length) else data[lo - off:hi - off]
        done = hi
    if done != end:
        raise IntegrityError(f"blob {ref.hex()[:12]}: holds {done} bytes, its entry says {size}")


def parse_range(header: str | None, size: int) -> tuple[int, int] | None | str:
    """The one byte range ``Range: bytes=A-B`` (or ``A-``, ``-N``) asks for, as (start, end
    exclusive); None to send everything (no header, several ranges, another unit); ``"bad"``
    when it cannot be satisfied (answered 416)."""
    if not header:
        return None
    unit, _, spec = header.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    a, sep, b = spec.strip().partition("-")
    if not sep or not (a.isdigit() or b.isdigit()) or (a and not a.isdigit()) or (b and not b.isdigit()):
        return None
    if not a:                                  # the last N bytes
        n = int(b)
        return (max(0, size - n), size) if n and size else "bad"
    first = int(a)
    last = min(int(b), size - 1) if b else size - 1
    if first >= size or last < first:
        return "bad"
    return first, last + 1


# -- tar ---------------------------------------------------------------------------------------

_TAR_TYPES = {DIR: tarfile.DIRTYPE, REG: tarfile.REGTYPE, LNK: tarfile.SYMTYPE, FIFO: tarfile.FIFOTYPE,
              CHR: tarfile.CHRTYPE, BLK: tarfile.BLKTYPE}
_S = "surrogateescape"


def _tarinfo(path: bytes, e: Entry, links: dict[int, bytes]) -> tarfile.TarInfo | None:
    """The header of one entry (None for a type tar cannot hold: sockets)."""
    typ = _TAR_TYPES.get(e.type)
    if typ is None:
        return None
    ti = tarfile.TarInfo(path.decode("utf-8", _S))
    ti.mode, ti.uid, ti.gid = e.mode & 0o7777, e.uid, e.gid
    sec, ns = divmod(e.mtime_ns, 1_000_000_000)
    ti.mtime = max(0, sec)
    pax = {"mtime": f"{sec}.{ns:09d}"}
    for xn, xv in e.xattrs:
        pax["SCHILY.xattr." + xn.decode("utf-8", _S)] = xv.decode("utf-8", _S)
    ti.pax_headers = pax
    ti.type = typ
    if typ == tarfile.REGTYPE:
        first = links.get(e.link_group) if e.link_group else None
        if first is not None:
            ti.type, ti.linkname = tarfile.LNKTYPE, first.decode("utf-8", _S)
        else:
            if e.link_group:
                links[e.link_group] = path
            ti.size = e.size
    elif typ == tarfile.SYMTYPE:
        ti.linkname = e.target.decode("utf-8", _S)
    elif typ in (tarfile.CHRTYPE, tarfile.BLKTYPE):
        ti.devmajor, ti.devminor = os.major(e.rdev), os.minor(e.rdev)
    return ti


ERRORS_NAME = b".pointsafe-download-errors.txt"


def _errors_text(problems: list[tuple[bytes, str]]) -> bytes:
    lines = ["These files could not be read from the safe; the archive holds them with zeros (tar)",
             "or cut short (zip) in place of their content. 'pointsafe verify' tells more.", ""]
    lines += [f"{display_name(p)}: {msg}" for p, msg in problems]
    return ("\n".join(lines) + "\n").encode()


def _content(safe: Safe, path: bytes, e: Entry, problems: list[tuple[bytes, str]]) -> Iterator[bytes]:
    """A file's bytes for an archive: when its content is missing or damaged, zeros for the
    rest of its size, and the file is named in ``problems`` (the archive stays well-formed)."""
    sent = 0
    try:
        for piece in blob_pieces(safe, e.ref, e.size):
            yield piece
            sent += len(piece)
    except (IntegrityError, ObjectMissing) as err:
        problems.append((path, str(err)))
        log.warning("download: %s: %s", display_name(path), err)
        yield from _zeros(e.size - sent)


def tar_stream(safe: Safe, top: Entry, name: bytes) -> Iterator[bytes]:
    """The tree below directory ``top`` as a pax tar stream, its members under ``name/``
    (the directory itself first). Reads each directory and file when the stream reaches it.
    A file whose content is damaged is sent as zeros and named in a last member,
    ``name/.pointsafe-download-errors.txt``."""
    links: dict[int, bytes] = {}
    problems: list[tuple[bytes, str]] = []
    written = 0
    items = [(name, top)]

    def members() -> Iterator[tuple[bytes, Entry]]:
        yield from items
        yield from walk(safe, top, name)

    for path, e in members():
        ti = _tarinfo(path, e, links)
        if ti is None:
            continue
        head = ti.tobuf(tarfile.PAX_FORMAT, "utf-8", _S)
        yield head
        written += len(head)
        if ti.type == tarfile.REGTYPE and ti.size:
            for piece in _content(safe, path, e, problems):
                yield piece
                written += len(piece)
            pad = -ti.size % tarfile.BLOCKSIZE
            if pad:
                yield bytes(pad)
                written += pad
    if problems:
        body = _errors_text(problems)
        ti = tarfile.TarInfo((name + b"/" + ERRORS_NAME).decode("utf-8", _S))
        ti.size, ti.mode, ti.mtime = len(body), 0o644, int(time.time())
        for piece in (ti.tobuf(tarfile.PAX_FORMAT, "utf-8", _S), body, bytes(-len(body) % tarfile.BLOCKSIZE)):
            yield piece
            written += len(piece)
    end = 2 * tarfile.BLOCKSIZE
    end += -(written + end) % tarfile.RECORDSIZE
    yield bytes(end)


# -- zip ---------------------------------------------------------------------------------------

class _Sink:
    """An unseekable file for zipfile: what it writes is taken away by the stream."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def write(self, b: bytes) -> int:
        self.parts.append(bytes(b))
        return len(b)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass

    def take(self) -> bytes:
        out = b"".join(self.parts)
        self.parts.clear()
        return out


def _zip_time(mtime_ns: int) -> tuple[int, int, int, int, int, int]:
    t = time.gmtime(max(315532800, min(mtime_ns // 1_000_000_000, 4354819199)))   # zip holds 1980..2107
    return t.tm_year, t.tm_mon, t.tm_mday, t.tm_hour, t.tm_min, t.tm_sec


def zip_stream(safe: Safe, top: Entry, name: bytes) -> Iterator[bytes]:
    """Regular files, directories and symlinks below directory ``top`` as a zip stream
    (stored, zip64 where needed), under ``name/``; a damaged file is cut short and named in
    ``name/.pointsafe-download-errors.txt``."""
    problems: list[tuple[bytes, str]] = []
    sink = _Sink()
    zf = zipfile.ZipFile(sink, "w", zipfile.ZIP_STORED, allowZip64=True)
    for path, e in [(name, top), *walk(safe, top, name)]:
        text = path.decode("utf-8", "replace")
        if e.type == DIR:
            zi = zipfile.ZipInfo(text + "/", _zip_time(e.mtime_ns))
            zi.external_attr = (stat.S_IFDIR | e.mode) << 16 | 0x10
            zf.writestr(zi, b"")
        elif e.type == LNK:
            zi = zipfile.ZipInfo(text, _zip_time(e.mtime_ns))
            zi.external_attr = (stat.S_IFLNK | 0o777) << 16
            zi.create_system = 3
            zf.writestr(zi, e.target)
        elif e.type == REG:
            zi = zipfile.ZipInfo(text, _zip_time(e.mtime_ns))
            zi.external_attr = (stat.S_IFREG | e.mode) << 16
            zi.create_system = 3
            zi.file_size = e.size
            with zf.open(zi, "w", force_zip64=e.size >= 1 << 31) as out:
                try:
                    for piece in blob_pieces(safe, e.ref, e.size):
                        out.write(piece)
                        chunk = sink.take()
                        if chunk:
                            yield chunk
                except (IntegrityError, ObjectMissing) as err:
                    problems.append((path, str(err)))
                    log.warning("download: %s: %s", display_name(path), err)
        chunk = sink.take()
        if chunk:
            yield chunk
    if problems:
        zf.writestr((name + b"/" + ERRORS_NAME).decode("utf-8", "replace"), _errors_text(problems))
    zf.close()
    yield sink.take()

