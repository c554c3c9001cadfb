"""A qcow2 disk image read as the guest sees it: raw blocks through a read-only NBD export.

``qemu-nbd`` (Debian's qemu-utils) serves the image on a unix socket in a private (0700)
temporary directory; the client is libnbd's Python binding (Debian's python3-libnbd). The
binding is not on PyPI and lives in the system's dist-packages, outside a virtual
environment: :func:`nbd_module` imports it from there without putting the rest of that
directory on ``sys.path``. libnbd rather than ``nbdinfo --map``: one connection answers both
the dirty-bitmap extents and the reads, with no text to parse, and a qemu-nbd started without
``--persistent`` serves exactly one client, so the export ends with the connection (also when
pointsafe is killed).

The qemu-img helpers here edit an image's persistent dirty bitmaps; qemu-img takes the image's
write lock, so they fail with :class:`QemuError` while a running QEMU has the image open.
"""
from __future__ import annotations

import fcntl
import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from types import ModuleType

from pointsafe.cas import Entry, SafeError
from pointsafe.cas.tree import REG

from .pipeline import Pipeline
from .volume import feed

QCOW2_MAGIC = b"QFI\xfb"
# Where Debian installs python3-libnbd (module ``nbd`` and its ``libnbdmod`` extension).
SYSTEM_DIRS = ("/usr/lib/python3/dist-packages", "/usr/lib/python3.11/dist-packages")
BASE_ALLOCATION = "base:allocation"
STATE_ZERO = 2          # base:allocation flag: the range reads as zeros
STATE_DIRTY = 1         # qemu:dirty-bitmap flag: the range was written to
STATUS_STEP = 1 << 30   # block_status takes a 32-bit length
STALE_PREFIX = "pointsafe-nbd-"


class QemuError(SafeError):
    """qemu-img or qemu-nbd failed, or a tool is missing (the message says which)."""


def is_qcow2(path: str | os.PathLike[str]) -> bool:
    """Whether the file at ``path`` starts with the qcow2 magic."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == QCOW2_MAGIC
    except OSError:
        return False


def nbd_module() -> ModuleType:
    """libnbd's Python binding: importable as is, or from the system's dist-packages (added to
    ``sys.path`` only while importing it). QemuError when it is not installed."""
    try:
        return importlib.import_module("nbd")
    except ImportError:
        pass
    for d in SYSTEM_DIRS:
        if os.path.exists(os.path.join(d, "nbd.py")):
            sys.path.append(d)
            try:
                return importlib.import_module("nbd")
            except ImportError:
                continue
            finally:
                sys.path.remove(d)
    raise QemuError("reading a qcow2 image needs libnbd's Python binding (apt-get install python3-libnbd)")


def missing_tools() -> str | None:
    """The first of the tools a qcow2 read needs that is absent, or None."""
    for tool in ("qemu-img", "qemu-nbd"):
        if shutil.which(tool) is None:
            return f"{tool} (apt-get install qemu-utils)"
    try:
        nbd_module()
    except QemuError:
        return "libnbd's Python binding (apt-get install python3-libnbd)"
    return None


def _run(args: list[str], what: str) -> str:
    try:
        proc = subprocess.run(args, capture_output=True, text=True, timeout=300)
    except FileNotFoundError:
        raise QemuError(f"{what}: {args[0]} is not installed (apt-get install qemu-utils)") from None
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()
        msg = tail[-1] if tail else f"exit code {proc.returncode}"
        if "lock" in msg:
            msg += " (a running QEMU has the image open: back it up through the VM, or stop it)"
        raise QemuError(f"{what}: {msg}")
    return proc.stdout


def image_info(image: str) -> dict:
    """``qemu-img info`` of a qcow2 image (``virtual-size``, ``format-specific``...)."""
    return json.loads(_run(["qemu-img", "info", "-U", "--output=json", "-f", "qcow2", image], f"{image}: qemu-img info"))


def virtual_size(image: str) -> int:
    """The size of the disk the guest sees."""
    return int(image_info(image)["virtual-size"])


def bitmaps(image: str) -> list[dict]:
    """The persistent dirty bitmaps of a qcow2 image: ``{name, granularity, flags}`` each
    (flags such as ``auto``, ``in-use``), as ``qemu-img info`` reports them."""
    info = image_info(image)
    return list(((info.get("format-specific") or {}).get("data") or {}).get("bitmaps") or [])


def add_bitmap(image: str, name: str) -> None:
    """Start a new, empty, enabled persistent dirty bitmap ``name`` in ``image``."""
    _run(["qemu-img", "bitmap", "-f", "qcow2", "--add", image, name], f"{image}: adding dirty bitmap {name}")


def remove_bitmap(image: str, name: str) -> None:
    """Remove the persistent dirty bitmap ``name`` from ``image``."""
    _run(["qemu-img", "bitmap", "-f", "qcow2", "--remove", image, name], f"{image}: removing dirty bitmap {name}")


class Export:
    """A read-only NBD export of a qcow2 image (``with Export(image, bitmap) as ex``): its
    virtual ``size``, :meth:`pread`, :meth:`extents` of the allocation or of the dirty bitmap
    ``bitmap`` (exposed with ``qemu-nbd -B``)."""

    def __init__(self, image: str, bitmap: str | None = None) -> None:
        self.image = image
        self.bitmap = bitmap
        self.size = 0
        self._dir: str | None = None
        self._pid: int | None = None
        self._lock: int | None = None
        self._h = None
        self._nbd: ModuleType | None = None

    def __enter__(self) -> "Export":
        nbd = self._nbd = nbd_module()
        clear_stale()
        self._dir = tempfile.mkdtemp(prefix=STALE_PREFIX)     # mode 0700: the socket is private
        try:
            # Held while the export lives: a directory whose lock is free was left by a killed
            # pointsafe (clear_stale).
            # Locked before it gets its name: a "lock" that clear_stale can take is a dead one's.
            tmp_lock = os.path.join(self._dir, "lock.new")
            self._lock = os.open(tmp_lock, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_CLOEXEC, 0o600)
            fcntl.flock(self._lock, fcntl.LOCK_EX)
            os.rename(tmp_lock, os.path.join(self._dir, "lock"))
            sock = os.path.join(self._dir, "sock")
            pidfile = os.path.join(self._dir, "pid")
            args = ["qemu-nbd", "--fork", f"--pid-file={pidfile}", "-r", "-f", "qcow2", "-k", sock]
            if self.bitmap:
                args += ["-B", self.bitmap]
            what = f"{self.image}: qemu-nbd" + (f" (dirty bitmap {self.bitmap})" if self.bitmap else "")
            _run(args + [self.image], what)
            try:
                with open(pidfile) as f:
                    self._pid = int(f.read().strip())
            except (OSError, ValueError):
                self._pid = None
            h = nbd.NBD()
            h.add_meta_context(BASE_ALLOCATION)
            if self.bitmap:
                h.add_meta_context(self.context)
            try:
                h.connect_unix(sock)
            except nbd.Error as e:
                raise QemuError(f"{self.image}: connecting to qemu-nbd: {e}") from None
            self._h = h
            if self.bitmap and not h.can_meta_context(self.context):
                raise QemuError(f"{self.image}: the export does not offer {self.context}")
            self.size = h.get_size()
        except BaseException:
            self.close()
            raise
        return self

    @property
    def context(self) -> str:
        """The NBD meta context of the exported dirty bitmap."""
        return f"qemu:dirty-bitmap:{self.bitmap}"

    def pread(self, n: int, off: int) -> bytes:
        """``n`` bytes of the guest's disk at ``off``."""
        assert self._h is not None
        try:
            return self._h.pread(n, off)
        except self._nbd.Error as e:
            raise QemuError(f"{self.image}: reading {n} bytes at offset {off} through qemu-nbd: {e}") from None

    def extents(self, context: str = BASE_ALLOCATION) -> Iterator[tuple[int, int, int]]:
        """(offset, length, flags) covering the whole disk in ``context`` (base:allocation
        flags: 1 hole, 2 zero; a dirty bitmap's: 1 dirty)."""
        assert self._h is not None
        off = 0
        while off < self.size:
            got: list[tuple[int, int, int]] = []

            def cb(ctx: str, start: int, entries: list[int], err, got=got) -> int:
                if ctx == context:
                    pos = start
                    for i in range(0, len(entries) - 1, 2):
                        got.append((pos, entries[i], entries[i + 1]))
                        pos += entries[i]
                return 0

            try:
                self._h.block_status(min(STATUS_STEP, self.size - off), off, cb)
            except self._nbd.Error as e:
                raise QemuError(f"{self.image}: block status at offset {off} through qemu-nbd: {e}") from None
            if not got:
                raise QemuError(f"{self.image}: no block status for {context} at offset {off}")
            for o, n, fl in got:
                n = min(n, self.size - o)
                if n > 0:
                    yield o, n, fl
            off = got[-1][0] + got[-1][1]

    def close(self) -> None:
        """Disconnect; the export (served to one client) ends; its directory is removed."""
        if self._h is not None:
            try:
                self._h.shutdown()
            except Exception:
                pass
            close = getattr(self._h, "close", None)   # libnbd >= 1.16; before, the handle closes when freed
            if close is not None:
                close()
            self._h = None
        if self._pid is not None:
            _reap(self._pid)
            self._pid = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def __exit__(self, *exc) -> None:
        self.close()


def clear_stale() -> list[str]:
    """Stop the qemu-nbd servers that killed backups left waiting for their client (they hold
    their image's lock, so its bitmaps could not be edited) and remove their directories;
    returns the directories removed."""
    removed: list[str] = []
    tmp = tempfile.gettempdir()
    try:
        names = [n for n in os.listdir(tmp) if n.startswith(STALE_PREFIX)]
    except OSError:
        return removed
    for n in names:
        d = os.path.join(tmp, n)
        try:
            # "lock" is named only once its backup holds it (Export.__enter__): a directory
            # without one is being set up, or was left empty by a backup killed before
            # (removed once old).
            fd = os.open(os.path.join(d, "lock"), os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            try:
                if time.time() - os.stat(d).st_mtime > 600:
                    shutil.rmtree(d, ignore_errors=True)
            except OSError:
                pass
            continue
        except OSError:
            continue    # not ours
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue    # its backup is running
            # its qemu-nbd: by the pid file it wrote, or (killed before that was written) by
            # the socket in this directory on its command line
            for pid in _qemu_nbds_of(os.path.join(d, "sock"), os.path.join(d, "pid")):
                try:
                    os.kill(pid, signal.SIGKILL)
                    _reap(pid)
                except OSError:
                    pass
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
        finally:
            os.close(fd)
    return removed


def _qemu_nbds_of(sock: str, pidfile: str) -> set[int]:
    """The qemu-nbd processes serving on ``sock``: the one ``pidfile`` names and any whose
    command line names ``sock`` (one started by a backup killed before it wrote its pid)."""
    found: set[int] = set()
    try:
        with open(pidfile) as f:
            found.add(int(f.read().strip()))
    except (OSError, ValueError):
        pass
    want = os.fsencode(sock)
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            continue
        if args and args[0].endswith(b"qemu-nbd") and want in args:
            found.add(int(name))
    out = set()
    for pid in found:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"qemu-nbd" in f.read():
                    out.add(pid)
        except OSError:
            pass
    return out


def _reap(pid: int, timeout: float = 5.0) -> None:
    """Wait for the forked qemu-nbd to leave (it ends with its client), SIGKILL it after
    ``timeout``: it must not hold the image's lock when the bitmaps are edited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        if _is_zombie(pid):
            return
        time.sleep(0.01)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def dirty_ranges(image: str, bitmap: str) -> list[tuple[int, int]]:
    """The (offset, length) ranges the dirty bitmap ``bitmap`` of ``image`` marks written."""
    with Export(image, bitmap) as ex:
        return [(o, n) for o, n, fl in ex.extents(ex.context) if fl & STATE_DIRTY]


def read_export(ex: Export, pipe: Pipeline, block: int, progress: Callable[[int], None] | None = None,
                name: str = "volume") -> int:
    """Feed the guest's disk of ``ex`` into ``pipe`` as one blob named ``name``, as
    :func:`pointsafe.ingest.volume.read_volume` does for a raw image: ranges that read as
    zeros are holes, the rest is read in whole blocks; returns the size."""
    progress = progress or (lambda n: None)
    size = ex.size
    pipe.file(Entry(name=os.fsencode(name), type=REG))
    pos = 0
    for start, length, flags in ex.extents():
        if flags & STATE_ZERO:
            continue
        a = max(pos, start - start % block)
        end = min(size, -(-(start + length) // block) * block)
        if a >= end:
            continue
        if a > pos:
            pipe.hole(a - pos)
        feed(ex.pread, pipe, block, a, end, progress)
        pos = end
    if pos < size:
        pipe.hole(size - pos)
    pipe.end()
    return size
