"""Mounting and unmounting: checks, the background daemon, the trio loop.

``mount()`` returns once the filesystem answers. In the background form it forks *before*
importing trio or pyfuse3 (neither survives a fork); the child starts a new session, opens the
safe, mounts, waits for the kernel's INIT, raises the mount's read-ahead (which INIT would
otherwise lower again), and only then writes ``K`` to a pipe the parent is waiting on — or
``E`` and a one-line message. The child then serves until ``fusermount3 -u`` (or
``pointsafe umount``) unmounts it, or until SIGTERM/SIGINT/SIGHUP, which unmount it.

Mount options: ``ro,nodev,nosuid,default_permissions`` (the kernel enforces the stored modes,
owners and POSIX ACLs) and ``fsname=pointsafe,subtype=pointsafe`` so that /proc/self/mountinfo
names the type ``fuse.pointsafe``. ``allow_other`` only on request.
"""

from __future__ import annotations

import gc
import logging
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from pointsafe.cas import SafeError, UsageError

from .mounts import FSTYPE, mount_at, raise_read_ahead

READY_TIMEOUT = 120.0
GIL_SWITCH_SECONDS = 0.0005
log = logging.getLogger("pointsafe.mount")
BUCKET_REFRESH_SECONDS = 30.0   # a mount of a safe in a bucket looks for other machines' commits this often


class MountError(SafeError):
    """The mount could not be made (bad mount point, no FUSE, unknown point...)."""


@dataclass
class MountOptions:
    """How to mount: the safe, the mount point, one point or all, the daemon's caches, threads,
    read-ahead, log and permissions (see ``pointsafe mount --help``)."""
    safe: Path
    mountpoint: Path
    point: str | None = None
    foreground: bool = False
    allow_other: bool = False
    default_permissions: bool = True
    chunk_cache_bytes: int = 256 << 20
    dir_cache_bytes: int = 64 << 20
    threads: int = 8
    read_ahead_kb: int = 4096
    log_file: Path | None = None
    debug: bool = False
    # The unlocked master key of an encrypted safe (the parent unlocks; the fork copies it, so it
    # never passes through argv or the environment). None for a plain safe.
    master_key: bytes | None = field(default=None, repr=False)
    # Instead of opening ``safe``: called in the mount process, it returns what the view reads
    # (an object with the Safe calls the view makes, closed at the end) and the chunk source of
    # file data (see View); ``source_name`` names it in the log. The server's mount (the CLI
    # wires server/remote_view.py in here).
    source: Callable[[], tuple[Any, Any]] | None = field(default=None, repr=False)
    source_name: str = ""


def default_log_file() -> Path:
    """Where a background mount logs: $XDG_STATE_HOME/pointsafe/mount.log (or ~/.local/state/...)."""
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "pointsafe" / "mount.log"


def check_fuse() -> None:
    """Raise MountError with what to install or load unless /dev/fuse and fusermount3 are there."""
    if not os.path.exists("/dev/fuse"):
        raise MountError("FUSE is not available: /dev/fuse is missing (load the fuse module, or run "
                         "the container with --device /dev/fuse)")
    if shutil.which("fusermount3") is None:
        raise MountError("FUSE is not available: fusermount3 is not installed (apt-get install fuse3)")


def check_mountpoint(mp: Path) -> None:
    """Raise MountError unless ``mp`` is an existing, readable, empty directory with nothing mounted on it."""
    m = mount_at(str(mp))
    if m is not None:
        hint = f"pointsafe umount {mp}" if m.fstype == FSTYPE else f"umount {mp}"
        raise MountError(f"{mp}: already mounted ({m.fstype}); unmount it first with '{hint}'")
    if not mp.exists():
        raise MountError(f"{mp}: mount point does not exist")
    if not mp.is_dir():
        raise MountError(f"{mp}: mount point is not a directory")
    try:
        if any(os.scandir(mp)):
            raise MountError(f"{mp}: mount point is not empty")
    except PermissionError:
        raise MountError(f"{mp}: mount point is not readable") from None


def fuse_options(o: MountOptions) -> set[str]:
    """The FUSE mount options for ``o``: read-only, nodev, nosuid, named pointsafe, with the
    permission options it asks for."""
    opts = {"fsname=pointsafe", "subtype=pointsafe", "ro", "nodev", "nosuid"}
    if o.default_permissions:
        opts.add("default_permissions")
    if o.allow_other:
        opts.add("allow_other")
    return opts


@dataclass
class Mounted:
    """A mount made: the serving daemon's pid (0 after a foreground run) and the point shown (None: all)."""
    pid: int                # the daemon serving the mount (0 after a foreground run)
    point_id: str | None    # the point shown, None for the whole safe


def mount(o: MountOptions) -> Mounted:
    """Mount as ``o`` says; returns once the mount answers (background) or after it ends."""
    o.safe = Path(os.path.abspath(o.safe))
    # Resolved once, here: the daemon must never stat its own mount point while serving.
    o.mountpoint = Path(os.path.realpath(o.mountpoint))
    check_fuse()
    check_mountpoint(o.mountpoint)
    if o.log_file is None and not o.foreground:
        o.log_file = default_log_file()
    if o.log_file is not None:
        o.log_file = Path(os.path.abspath(o.log_file))
        try:
            o.log_file.parent.mkdir(parents=True, exist_ok=True)
            with open(o.log_file, "a"):
                pass
        except OSError as e:
            raise MountError(f"{o.log_file}: cannot write the log file: {e.strerror}") from None
    if o.foreground:
        code = _serve(o, ready_fd=None)
        if code:
            raise MountError("the mount process failed; see the log above")
        return Mounted(0, None)
    r, w = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:                                   # the daemon
        os.close(r)
        code = 1
        try:
            os.setsid()
            _detach(o.log_file)
            code = _serve(o, ready_fd=w)
        except BaseException as e:                 # nothing may escape into the parent's code
            try:
                os.write(w, f"Einternal error: {type(e).__name__}: {e}".encode())
            except OSError:
                pass
        finally:
            os._exit(code)
    os.close(w)
    msg = _wait_ready(r, pid)
    if not msg.startswith(b"K"):
        text = msg[1:].decode(errors="replace") if msg.startswith(b"E") else "the mount process died before the mount was ready"
        raise MountError(text)
    return Mounted(pid, msg[1:].decode() or None)


def _wait_ready(r: int, pid: int) -> bytes:
    buf = b""
    deadline = time.monotonic() + READY_TIMEOUT
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                os.kill(pid, signal.SIGTERM)
                return b"Etimed out waiting for the mount to become ready"
            ready, _, _ = select.select([r], [], [], left)
            if not ready:
                continue
            chunk = os.read(r, 4096)
            if not chunk:
                break                              # the daemon closes the pipe after its answer
            buf += chunk
    finally:
        os.close(r)
    if not buf.startswith(b"K"):
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass
    return buf


def _detach(log_file: Path | None) -> None:
    os.chdir("/")
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    if log_file is not None:
        fd = os.open(log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        os.dup2(fd, 2)
        os.close(fd)
    else:
        os.dup2(null, 2)
    os.close(null)


def _setup_logging(o: MountOptions, stream) -> None:
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter(
        f"%(asctime)s pointsafe mount {o.mountpoint} [{os.getpid()}] %(levelname)s: %(message)s"))
    root = logging.getLogger("pointsafe")
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if o.debug else logging.INFO)
    root.propagate = False


def _serve(o: MountOptions, ready_fd: int | None) -> int:
    """Open, mount, signal readiness, serve until unmounted. Returns the exit code."""
    def fail(text: str) -> int:
        if ready_fd is not None:
            os.write(ready_fd, b"E" + text.encode())
            os.close(ready_fd)
            return 1
        raise MountError(text)

    stream = sys.stderr
    if ready_fd is None and o.log_file is not None:
        stream = open(o.log_file, "a", buffering=1)
    _setup_logging(o, stream)
    # Only now: trio and pyfuse3 must not be imported before the fork.
    import pyfuse3
    import trio

    from pointsafe.cas import Safe, resolve_point

    from .memory import give_back, limit_arenas
    from .ops import Operations
    from .view import View

    limit_arenas()
    # The trio thread answers every FUSE request; a read-ahead thread running Python holds the
    # GIL until it blocks or the switch interval ends (5 ms by default), and each request of a
    # `tar` waits for that. 0.5 ms: tar of 20,000 small files 17% faster in wall time (6 runs
    # each, alternated, on a shared machine), for the same CPU; a sequential `cat` of 297 MB
    # the same within the noise (0.79-0.96 s either way, 3-5% more CPU).
    sys.setswitchinterval(GIL_SWITCH_SECONDS)

    chunks = None
    try:
        if o.source is not None:
            safe, chunks = o.source()
        else:
            safe = Safe.open(o.safe, master_key=o.master_key)
    except SafeError as e:
        return fail(str(e))
    point = None
    try:
        if o.point is not None:
            point = resolve_point(safe, o.point)
            if point.kind not in ("tree", "volume"):
                safe.close()
                return fail(f"point {point.id[:12]} has unknown kind {point.kind!r}")
    except SafeError as e:
        safe.close()
        return fail(str(e))
    view = View(safe, point, chunk_cache_bytes=o.chunk_cache_bytes, dir_cache_bytes=o.dir_cache_bytes, chunks=chunks)
    ops = Operations(view, threads=o.threads)
    inited = []
    ops.on_init = lambda: inited.append(True)       # called when the kernel's INIT is handled
    try:
        pyfuse3.init(ops, str(o.mountpoint), fuse_options(o))
    except RuntimeError as e:
        view.close()
        safe.close()
        return fail(f"{o.mountpoint}: cannot mount: {e}")
    what = f"point {point.id[:12]}" if point else "every point"
    signalled = []

    async def ready_when_inited() -> None:
        with trio.move_on_after(READY_TIMEOUT):
            while not inited:
                await trio.sleep(0.002)
        raise_read_ahead(str(o.mountpoint), o.read_ahead_kb)
        log.info("mounted %s of %s", what, o.source_name or o.safe)
        if ready_fd is not None:
            os.write(ready_fd, b"K" + (point.id.encode() if point else b""))
            os.close(ready_fd)
        else:
            print(f"mounted {what} of {o.source_name or o.safe} at {o.mountpoint}; press Ctrl-C to unmount",
                  file=sys.stderr)

    async def on_signals(cancel) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as sigs:
            async for _ in sigs:
                signalled.append(True)
                pyfuse3.terminate()
                return

    async def collect_garbage() -> None:
        # Python's automatic cyclic GC rescans the young objects every 700 allocations; a
        # `find` creates a node per entry, and those scans cost more than serving the entries
        # (measured: 120,000 entries listed in 0.7 s instead of 1.7 s without them). The mount
        # makes few reference cycles (exception tracebacks), so collect them on a timer.
        rounds = 0
        while True:
            await trio.sleep(2)
            rounds += 1
            gc.collect(2 if rounds % 30 == 0 else 1)
            give_back()      # freed chunk buffers back to the system (fusefs/memory.py)

    async def follow_bucket() -> None:
        # A safe in a bucket: other machines' backups, forgets and gc arrive as index segments;
        # apply them now and then, so that new points appear (a read that finds a pack gone
        # applies them at once: cas Safe.get).
        every = float(os.environ.get("POINTSAFE_S3_REFRESH_SECONDS", BUCKET_REFRESH_SECONDS))
        while True:
            await trio.sleep(every)
            try:
                await trio.to_thread.run_sync(safe.refresh)
            except SafeError as e:
                log.warning("could not bring the safe's cache up to date from its bucket: %s", e)

    async def main() -> None:
        async with trio.open_nursery() as n:
            n.start_soon(ready_when_inited)
            n.start_soon(on_signals, n.cancel_scope)
            n.start_soon(collect_garbage)
            if getattr(safe, "remote", None) is not None:
                n.start_soon(follow_bucket)
            await pyfuse3.main()
            n.cancel_scope.cancel()

    code = 0
    gc.freeze()          # what is alive now (modules, the view) is never rescanned
    gc.disable()
    try:
        trio.run(main)
    except BaseException as e:
        log.error("mount process failed: %s", e, exc_info=e)
        signalled.append(True)
        code = 1
    finally:
        pyfuse3.close(unmount=bool(signalled))
        view.close()
        safe.close()
        log.info("unmounted")
    return code


def umount(mountpoint: Path, lazy: bool = False) -> None:
    """Unmount a pointsafe mount; refuse anything else with one clear line."""
    mp = os.path.abspath(mountpoint)
    m = mount_at(mp)
    if m is None:
        if not os.path.lexists(mp):
            raise UsageError(f"{mp}: no such directory")
        raise UsageError(f"{mp}: not mounted")
    if m.fstype != FSTYPE:
        raise UsageError(f"{mp}: not a pointsafe mount (it is {m.fstype}); refusing to unmount it")
    mp = m.mountpoint
    cmd = ["fusermount3", "-u"] + (["-z"] if lazy else []) + [mp]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        err = (p.stderr.strip().splitlines() or ["fusermount3 failed"])[-1]
        if "busy" in err.lower():
            raise UsageError(f"{mp}: the mount is busy (a process uses it); close it or use --lazy")
        raise UsageError(f"{mp}: cannot unmount: {err}")
