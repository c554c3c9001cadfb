"""One backup: a source (directory tree, block device or disk image) becomes a point.

Order of work, and what happens when something fails:

1. check the source and the safe (bad input: one clear line, nothing written); choose how the
   source is snapshotted (``--snapshot``, see ingest/snapshot: a snapshot asked for by name
   that cannot be taken fails here, ``auto`` falls back to reading live);
2. run the pre-hook (failure: abort, no point); take the writer lock; remove what killed
   backups of this source left (stale snapshots, clones, mounts);
3. the freeze -- with a snapshot it lasts an instant: the --pre-freeze hook, every database
   integration's ``start()`` (told ``snapshot_mode`` first), the snapshot, every
   ``snapshot_taken()`` (locks released here), the --post-thaw hook (always, also when the
   snapshot fails). Without a snapshot: --pre-freeze, ``start()``, and --post-thaw after step 4;
4. read the snapshot (or the live source) through the pipeline, paths as in SOURCE, against the
   previous point of the same name for change detection (a tree in a btrfs snapshot: only what
   the send stream from the previous point's snapshot names, ingest/changes/btrfs_plan.py);
5. ``files_read()``, graft the files the databases hand back (backup_label, WAL, SQLite copies);
6. commit the point (one record naming the root) -- nothing before this is visible; keep the
   btrfs snapshot as the next backup's base, remove every other snapshot, always (also on
   failure or SIGTERM);
7. run the post-hook, always.

A failure after 4 leaves only unreferenced objects, which ``gc`` reclaims.
"""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator, Protocol

from pointsafe.cas import (BlobBuilder, Entry, Kind, Point, Safe, SafeError, UsageError, Writer, build_tree,
                           latest, parse_utc, read_tree, utc_now_iso)
from pointsafe.cas.blob import BlobReader
from pointsafe.cas.pack import pack_name
from pointsafe.cas.tree import DIR, REG

from .changed_blocks import MISSED_WRITES
from .changes.btrfs_plan import FALLBACK, walk_record
from .changes.btrfs_plan import plan as plan_btrfs_walk
from .changes.btrfs_send import subvol_record
from .changes.guide import Guide
from .changes.qemu_bitmap import Rotation
from .chunking import Cutter, data_extents, is_zero
from .db import covered_roots, is_covered_warning, walk_excludes
from .pipeline import Pipeline
from .snapshot import DEFAULT_COW_SIZE, Provider, Request, Taken
from .snapshot import plan as plan_snapshot
from .snapshot.btrfs import own_dirs
from .volume import read_volume, volume_size
from .walk import TreeWalker, WalkOptions


class HookFailed(SafeError):
    """A pre-hook failed: the backup did not start."""


@dataclass
class BackupOptions:
    """How ``backup`` runs: point name (default: the source's), tree or volume, hooks, exclude
    patterns, one file system, database integrations, worker threads, labels, space check.
    """
    name: str | None = None
    volume: bool = False
    pre_hook: str | None = None
    post_hook: str | None = None
    excludes: list[str] = field(default_factory=list)
    one_file_system: bool = False
    consistency: list = field(default_factory=list)   # ingest.db Consistency objects
    allow_inconsistent: bool = False
    workers: int = 2
    labels: dict = field(default_factory=dict)
    # Called by the writer before it appends (cas.store.Writer): ops' hard quota stops a backup.
    space_check: Callable[[Path, int], None] | None = None
    snapshot: str = "auto"              # auto, btrfs, lvm, reflink, none (ingest/snapshot)
    snapshot_size: str = DEFAULT_COW_SIZE   # LVM copy-on-write size (lvcreate -L SIZE / -l EXTENTS)
    pre_freeze: str | None = None       # shell command run just before the freeze
    full_read: bool = False             # read the source whole: no change source, no source_stat shortcut
    changed_blocks: str | None = None   # --changed-blocks FILE: the byte ranges changed since the previous point
    post_thaw: str | None = None        # shell command run just after it (always)


class Progress(Protocol):
    """What a backup tells about its progress while it runs.

    ``set_total`` is called once the source is known, with the bytes and files the backup is
    expected to cover (an estimate: the previous point of the same name, or the size of a
    volume; None when unknown, e.g. the first backup of a tree); ``__call__`` then reports, in
    steps, bytes covered (read, holes, or unchanged files not read again) and files done. A
    plain ``callable(nbytes)`` is accepted too."""

    def set_total(self, nbytes: int | None, files: int | None = None) -> None:
        """Announce the expected totals (bytes, files; None when unknown), once, before steps."""
        ...

    def __call__(self, nbytes: int, files: int = 0) -> None: ...


@dataclass
class BackupResult:
    """The committed point and the warnings of the run (each a dict with ``path`` and
    ``message``); ``notes``: things worth saying that are not problems (why no snapshot was
    taken under ``auto``, stale snapshots removed)."""
    point: Point
    warnings: list[dict]
    notes: list[str] = field(default_factory=list)


def default_name(source: Path) -> str:
    """The point name a source gets when none is given: its last component, "root" for /.
    Bytes of the name that are not UTF-8 become U+FFFD, so that the name can be stored, and
    control characters become '?', so that it prints on one line."""
    name = os.fsencode(source.name).decode("utf-8", "replace")
    return "".join("?" if _is_control(c) else c for c in name) or "root"


def _is_control(c: str) -> bool:
    return ord(c) < 32 or 127 <= ord(c) < 160


def check_packs_present(safe: Safe) -> None:
    """Raise SafeError when a pack the index names has no file (``Safe.lost_packs``): a backup
    would reuse its objects as if they were stored and make points that cannot be restored."""
    lost = safe.lost_packs()
    if lost:
        more = f" and {len(lost) - 1} more" if len(lost) > 1 else ""
        raise SafeError(f"pack {pack_name(lost[0])}{more} is missing: a backup now would reuse the "
                        "objects that were in it; run 'pointsafe repair' first")


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_source(safe: Safe, source: str, volume: bool) -> tuple[Path, os.stat_result, str]:
    """Resolve the source; return (path, stat, kind). Raise UsageError on bad input."""
    p = Path(source)
    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise UsageError(f"{source}: no such file or directory") from None
    except OSError as e:
        raise UsageError(f"{source}: cannot access: {e.strerror}") from None
    real = p.resolve()
    safe_real = safe.path.resolve()
    if real == safe_real or safe_real in real.parents:
        raise UsageError(f"{source}: is inside the safe {safe.path}; back up something else")
    if stat.S_ISBLK(st.st_mode):
        return real, st, "volume"
    if volume:
        if not stat.S_ISREG(st.st_mode):
            raise UsageError(f"{source}: --volume needs a block device or a disk image file")
        return real, st, "volume"
    if stat.S_ISDIR(st.st_mode):
        return real, st, "tree"
    if stat.S_ISREG(st.st_mode):
        raise UsageError(f"{source}: is a file; back up its directory, or use --volume for a disk image")
    raise UsageError(f"{source}: is neither a directory, a block device nor a disk image")


def run_hook(cmd: str, env: dict, what: str, timeout: float = 3600) -> None:
    """Run a hook in its own process group; if pointsafe is interrupted or the hook times
    out, the whole group is killed (no orphaned children)."""
    proc = subprocess.Popen(cmd, shell=True, env={**os.environ, **env}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except BaseException as e:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        if isinstance(e, subprocess.TimeoutExpired):
            raise HookFailed(f"{what} {cmd!r} timed out after {timeout:.0f} s") from None
        raise
    if proc.returncode != 0:
        tail = (err or out).decode(errors="replace").strip().splitlines()
        detail = f": {tail[-1]}" if tail else ""
        raise HookFailed(f"{what} {cmd!r} failed with exit code {proc.returncode}{detail}")


def previous_point(safe: Safe, name: str, kind: str) -> Point | None:
    """The newest point of this name and kind (the one an incremental backup reads against).
    Points an agent sent to the safe server (``agent_id``) are another machine's files: never
    the base of a local backup, whatever their name."""
    return latest(p for p in safe.points() if p.name == name and p.kind == kind and "agent_id" not in p.extra)


def backup(safe: Safe, source: str, opts: BackupOptions,
           progress: Progress | Callable[[int], None] | None = None) -> BackupResult:
    """Back up ``source`` into a new point of ``safe`` (see the module's docstring for the
    order of work); UsageError, before anything is run or written, on bad input."""
    # The pre-hook runs before the source is checked: it may create it (a snapshot, a mount).
    name = source_name(source, opts.name)
    warn = Warnings()
    notes: list[str] = []
    hook_env = {"POINTSAFE_SOURCE": os.path.abspath(source), "POINTSAFE_NAME": name,
                "POINTSAFE_SAFE": str(safe.path)}
    started = utc_now_iso()
    with hooks_around(opts, hook_env, warn.list):
        path, st, kind = check_source(safe, source, opts.volume)
        opts = check_changed_blocks(opts, source, path, kind)
        if kind == "volume" and stat.S_ISREG(st.st_mode):
            from .qcow2 import is_qcow2, missing_tools
            why = missing_tools() if is_qcow2(path) else None
            if why:
                notes.append(f"{path} is a qcow2 image, stored as the file's bytes: storing the guest's disk "
                             f"needs {why}")
        provider = plan_point_in_time(opts, path, st, kind, name, safe.config.safe_id,
                                      _snapshot_of_last(safe, name, kind), notes)
        # Take the lock before touching databases, so that a busy safe fails fast.
        with safe.writer(f"backup {name}", space_check=opts.space_check) as w:
            check_packs_present(safe)
            with point_in_time(opts, provider, path, warn, hook_env, notes) as freeze:
                after_commit: list[Callable[[], None]] = []
                record, root, grafted = _read(safe, w, path, st, kind, name, started, opts, warn, progress, freeze,
                                              after_commit)
                settle_warnings(warn.list, freeze.active, path, grafted)
                point = commit_point(w, record, root, warn.list)
                for done in after_commit:
                    done()
                freeze.keep(path)
    return BackupResult(point, warn.list, notes)


def check_changed_blocks(opts: BackupOptions, source: str, path: Path, kind: str) -> BackupOptions:
    """UsageError for ``--changed-blocks`` with a tree; for ``--changed-blocks qemu:BITMAP``,
    UsageError unless SOURCE is a qcow2 image, the name is good and qemu-img, qemu-nbd and
    libnbd are at hand; returns the options to use (with a bitmap no snapshot: the bitmaps
    are edited in the image itself, which qemu-img locks)."""
    from .changes.qemu_bitmap import bitmap_base, check_base
    from .qcow2 import is_qcow2, missing_tools
    if opts.changed_blocks and kind != "volume":
        raise UsageError(f"{source}: --changed-blocks FILE applies to a volume (--volume or a block device)")
    base = bitmap_base(opts.changed_blocks)
    if base is None:
        return opts
    bad = check_base(base)
    if bad:
        raise UsageError(bad)
    if not is_qcow2(path):
        raise UsageError(f"{source}: --changed-blocks qemu:BITMAP needs a qcow2 image")
    missing = missing_tools()
    if missing:
        raise UsageError(f"--changed-blocks qemu:BITMAP needs {missing}")
    if opts.snapshot not in ("auto", "none"):
        raise UsageError(f"--changed-blocks qemu:BITMAP reads the image itself (its bitmaps are edited in place): "
                         f"it cannot be combined with --snapshot {opts.snapshot}")
    return replace(opts, snapshot="none")


def source_name(source: str, name: str | None) -> str:
    """The point name of a backup of ``source`` (``name``, or the source's base name); UsageError
    for an empty source or a name that cannot be one (see check_point_name)."""
    if not source:
        raise UsageError("the source is empty: name a directory, block device or disk image "
                         "(use '.' for the current directory)")
    name = name or default_name(Path(os.path.abspath(source)))
    check_point_name(name)
    return name


def check_point_name(name: str) -> None:
    """UsageError unless ``name`` can be a point's source name (not empty, no '@' or '/', UTF-8,
    no control characters)."""
    if "@" in name or "/" in name or not name.strip():
        raise UsageError(f"bad point name {name!r}: it must not be empty or contain '@' or '/'")
    if not _is_utf8(name):
        raise UsageError(f"bad point name {name!r}: it must be valid UTF-8")
    if any(_is_control(c) for c in name):
        raise UsageError(f"bad point name {name!r}: it must not contain control characters")


class Warnings:
    """The warnings of a run (``list``: dicts with ``path`` and ``message``); called as
    ``warn(path, message)``. A path under a snapshot's read path is shown as SOURCE's
    (``shown_as``: (read path, SOURCE path) pairs)."""

    def __init__(self) -> None:
        self.list: list[dict] = []
        self.shown_as: list[tuple[str, str]] = []

    def __call__(self, p: bytes | str, message: str) -> None:
        text = os.fsdecode(p) if isinstance(p, bytes) else p
        for read, live in self.shown_as:
            if text == read or text.startswith(read.rstrip("/") + "/"):
                text = live + text[len(read):]
        self.list.append({"path": text, "message": message})


@contextmanager
def hooks_around(opts: BackupOptions, env: dict, warnings: list[dict]) -> Iterator[None]:
    """Run the --pre-hook, then the body, then the --post-hook, always: POINTSAFE_STATUS error
    when the body (or the pre-hook) failed -- the failure is re-raised, the post-hook's own is
    not reported --, else ok or warning (``warnings`` not empty); a failing post-hook after a
    success becomes a warning."""
    try:
        if opts.pre_hook:
            run_hook(opts.pre_hook, env, "pre-hook")
        yield
    except BaseException:
        if opts.post_hook:
            try:
                run_hook(opts.post_hook, {**env, "POINTSAFE_STATUS": "error"}, "post-hook")
            except HookFailed:
                pass  # the backup's own error is the one to report
        raise
    if opts.post_hook:
        status = "warning" if warnings else "ok"
        try:
            run_hook(opts.post_hook, {**env, "POINTSAFE_STATUS": status}, "post-hook")
        except HookFailed as e:
            # The point is committed: a failing post-hook is a warning on the run, not an error.
            warnings.append({"path": "post-hook", "message": str(e)})


def plan_point_in_time(opts: BackupOptions, path: Path, st: os.stat_result, kind: str, name: str, safe_id: str,
                       last_snapshot: object, notes: list[str]) -> Provider | None:
    """The provider that will snapshot the source (``opts.snapshot``; None: read live), for the
    snapshots of ``safe_id`` (its first 16 characters name them). Under ``auto``, why it reads
    live goes to ``notes`` -- on the first point of a source and when it stops being a snapshot
    (``last_snapshot``: the previous point's record), not on every run of a source that never
    can be. SnapshotError when a method asked for by name does not apply."""
    provider, why_live = plan_snapshot(Request(opts.snapshot, path, st, kind, name, safe_id,
                                               opts.snapshot_size, opts.one_file_system))
    if why_live and last_snapshot != "none":
        notes.append(f"no snapshot, reading {path} live: {why_live}")
    return provider


@contextmanager
def point_in_time(opts: BackupOptions, provider: Provider | None, path: Path, warn: Warnings, env: dict,
                  notes: list[str]) -> Iterator[_Freeze]:
    """The freeze around a backup's read (steps 2-6 of the module's docstring, SIGTERM unwinding
    it): remove what killed backups left, freeze, take the snapshot, thaw; yield the freeze
    (read ``freeze.read_path(path)``, call ``freeze.thaw("ok")`` once read and
    ``freeze.keep(path)`` once the point is committed). Always, also on failure or SIGTERM: the
    --post-thaw hook (once), the integrations closed, the snapshot released."""
    with _sigterm_unwinds():
        if provider is not None:
            notes.extend(f"removed {x}, left by an interrupted backup" for x in provider.clear_stale())
        freeze = _Freeze(opts, provider, warn, env)
        try:
            freeze.begin(path)
            if freeze.taken is not None:
                warn.shown_as.append((str(freeze.taken.read_path), str(path)))
                notes.extend(freeze.taken.notes)
            yield freeze
        finally:
            try:
                freeze.thaw("error")     # no-op when it already ran
            finally:
                for c in freeze.active:
                    try:
                        c.close()
                    except Exception as e:  # noqa: BLE001 - report, never mask the main error
                        warn(c.name, f"closing the {c.name} connection failed: {e}")
                if provider is not None:
                    _release(provider, warn, path)


class Terminated(KeyboardInterrupt):
    """SIGTERM during a backup called as a library (the CLI has its own): unwind, clean up."""


class _sigterm_unwinds:
    """While a backup runs in the main thread and nobody handles SIGTERM, SIGTERM unwinds the
    backup (so that snapshots are removed and unmounted) instead of killing the process."""

    def __enter__(self) -> None:
        import threading
        self.old = None
        if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            def on_term(signum, frame):
                raise Terminated()
            self.old = signal.signal(signal.SIGTERM, on_term)

    def __exit__(self, *exc) -> None:
        if self.old is not None:
            signal.signal(signal.SIGTERM, self.old)


def _release(provider: Provider, warn: Warnings, path: Path) -> None:
    """Remove whatever the snapshot left (never masks the backup's own error)."""
    try:
        provider.release()
    except SafeError as e:
        warn(str(path), str(e))


class _Freeze:
    """The freeze around the snapshot (see the module's docstring, step 3): hooks, database
    integrations, the snapshot. ``held_s`` is how long it was held, from the --pre-freeze hook to
    the end of the --post-thaw hook."""

    def __init__(self, opts: BackupOptions, provider: Provider | None, warn, env: dict):
        self.opts, self.provider, self.warn, self.env = opts, provider, warn, env
        self.active: list = []
        self.taken: Taken | None = None
        self.held_s: float | None = None
        self.t0: float | None = None
        self.thawed = False

    def begin(self, source: Path | None = None) -> None:
        """Freeze; with a snapshot, take it and thaw at once. Before the freeze, the source's
        filesystem is synced: a snapshot writes out what is dirty when it is taken, and that is
        better done before the databases are locked than under the lock (measured: the first
        snapshot after loading 1 GiB held MariaDB's lock 0.78 s, the next ones 0.03 s)."""
        if self.provider is not None and source is not None:
            _syncfs(source)
        self.t0 = time.monotonic()
        if self.opts.pre_freeze:
            run_hook(self.opts.pre_freeze, self.env, "pre-freeze hook")
        if self.provider is not None:
            for c in self.opts.consistency:
                c.snapshot_mode = True
        self.active = _start_consistency(self.opts, self.warn)
        if self.provider is None:
            return
        try:
            self.taken = self.provider.take()
            for c in self.active:
                taken = getattr(c, "snapshot_taken", None)
                if taken is not None:
                    taken()
        finally:
            self.thaw("ok" if self.taken is not None else "error")

    def thaw(self, status: str) -> None:
        """Run the --post-thaw hook, once (also after a failed freeze); its failure is a
        warning on the point unless the backup is failing anyway."""
        if self.thawed or self.t0 is None:
            return
        self.thawed = True
        try:
            if self.opts.post_thaw:
                env = {**self.env, "POINTSAFE_STATUS": status,
                       "POINTSAFE_SNAPSHOT": self.taken.method if self.taken else "none"}
                try:
                    run_hook(self.opts.post_thaw, env, "post-thaw hook")
                except HookFailed as e:
                    if status == "ok":
                        self.warn("post-thaw hook", str(e))
        finally:
            self.held_s = time.monotonic() - self.t0

    def read_path(self, path: Path) -> Path:
        """What the backup reads: the snapshot's path, or ``path`` (the live source) without one."""
        return self.taken.read_path if self.taken is not None else path

    def walk_options(self, path: Path, opts: BackupOptions, excludes: list[str], skip: set[tuple[int, int]]) -> WalkOptions:
        """How a tree is walked: ``opts``' one-file-system, ``excludes``; never entered: ``skip``
        and pointsafe's own snapshots (live dev, ino: a snapshot's device is mapped to the live one)."""
        return WalkOptions(one_file_system=opts.one_file_system, excludes=excludes, skip=skip | own_dirs(path),
                           dev_map=dict(self.taken.dev_map) if self.taken is not None else {})

    def keep(self, path: Path) -> None:
        """The point is committed: keep what the provider keeps (its failure: a warning on the run)."""
        if self.provider is None:
            return
        try:
            self.provider.keep()
        except SafeError as e:
            self.warn(str(path), str(e))

    def record(self) -> dict | str:
        """What the point records under ``snapshot``."""
        t = self.taken
        if t is None:
            return "none"
        out: dict = {"method": t.method, "taken_at": t.taken_at, "held_s": round(self.held_s or 0.0, 4)}
        if t.kept:
            out["path"] = t.kept
        if t.method == "btrfs":
            # the snapshot's identity: the next incremental checks its base against it (issue 12)
            sub = subvol_record(t.read_path)
            if sub is not None:
                out["subvol"] = sub
        return out


def _syncfs(path: Path) -> None:
    """Write out the dirty data of the filesystem holding ``path`` (syncfs(2); sync(2) where it
    is missing); never fails the backup."""
    try:
        import ctypes
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            if ctypes.CDLL(None, use_errno=True).syncfs(fd) != 0:
                os.sync()
        finally:
            os.close(fd)
    except (OSError, AttributeError):
        os.sync()


def _start_consistency(opts: BackupOptions, warn) -> list:
    active = []
    for c in opts.consistency:
        try:
            c.start()
            active.append(c)
        except SafeError as e:
            try:
                c.close()   # the protocol: close() is always called, also after a failed start()
            except Exception:  # noqa: BLE001
                pass
            if not opts.allow_inconsistent:
                for a in active:
                    a.close()
                raise
            warn(c.name, f"{e}; backed up without {c.name} consistency (--allow-inconsistent)")
    return active


def _progress_of(progress) -> tuple[Callable[[int, int], None], Callable[[int | None, int | None], None]]:
    """(advance(nbytes, files), set_total(nbytes, files)) for a Progress or a plain callable."""
    if progress is None:
        return (lambda n, f=0: None), (lambda n, f=None: None)
    set_total = getattr(progress, "set_total", None)
    if set_total is None:
        return (lambda n, f=0: progress(n)), (lambda n, f=None: None)
    return progress, set_total


def _snapshot_of_last(safe: Safe, name: str, kind: str) -> object:
    """The ``snapshot`` record of the newest point of ``name`` (None when there is none)."""
    prev = previous_point(safe, name, kind)
    return None if prev is None else prev.snapshot


def _before_loss(safe: Safe, prev: Point) -> bool:
    """True when ``repair`` found objects lost after ``prev`` was taken (``meta.lost_at``)."""
    with safe.index.read() as t:
        v = t.get(b"lost_at", db=safe.index.db["meta"])
    if v is None:
        return False
    try:
        lost = parse_utc(v.decode())
    except ValueError:
        return True     # a damaged mark: reading the source whole is always correct
    taken = prev.started_at
    return taken is None or taken <= lost


def estimate(prev: Point | None, path: Path, st: os.stat_result, kind: str, block: int) -> tuple[int | None, int | None]:
    """(bytes, files) a backup of the source is expected to cover: for a tree, what the
    previous point of the same name held (None, None for a first backup); for a volume, the
    bytes that will be read (a disk image's data regions, a device's size)."""
    if kind == "tree":
        if prev is None:
            return None, None
        return prev.size, prev.stats.get("files")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None, None
    try:
        size = volume_size(fd)
        if not stat.S_ISREG(st.st_mode):
            return size, 1
        total = 0
        for start, length in data_extents(fd, size):   # as read_volume reads: whole blocks
            total += min(size, -(-(start + length) // block) * block) - (start - start % block)
        return total, 1
    except OSError:
        return None, None
    finally:
        os.close(fd)


def _read(safe: Safe, w: Writer, path: Path, st, kind: str, name: str, started: str,
          opts: BackupOptions, warn, progress, freeze: _Freeze,
          after_commit: list[Callable[[], None]]) -> tuple[dict, bytes | None, set[str]]:
    cfg = safe.config
    active = freeze.active
    taken = freeze.taken
    read_path = freeze.read_path(path)
    prev = previous_point(safe, name, kind)
    progress, set_total = _progress_of(progress)
    set_total(*estimate(prev, path, st, kind, cfg.block_size))
    if prev is not None and _before_loss(safe, prev):
        # repair found objects lost since that point: read the source whole, so that whatever
        # of it the safe lost is stored again (and counted again, cas/refcount.py)
        prev = None
    pipe = Pipeline(w, cfg.list_fanout, workers=opts.workers)
    record: dict = {"name": name, "kind": kind, "source": str(path), "host": socket.gethostname(),
                    "started": started}
    try:
        if kind == "tree":
            sst = os.stat(safe.path)
            wo = freeze.walk_options(path, opts, list(opts.excludes) + walk_excludes(active), {(sst.st_dev, sst.st_ino)})
            walked = walk_record(wo.excludes, wo.one_file_system)
            guide = None
            if taken is not None and taken.method == "btrfs":
                cs, guide = _tree_change_source(safe, prev, path, read_path, walked, taken, opts, bool(active), warn)
                record["change_source"] = cs
            root, record["root_meta"] = walk_tree(safe, pipe, read_path, prev.root if prev else None, wo, warn, progress,
                                                  guide=guide, full_read=opts.full_read)
            record["walk"] = walked
        else:
            sig = _source_stat(st, taken)
            root, size = back_up_volume(safe, w, pipe, read_path, path, st, sig, prev, opts, warn, progress,
                                        record, after_commit)
            record["size"] = size
            record["block_size"] = cfg.block_size
            if stat.S_ISREG(st.st_mode):
                record["source_stat"] = sig
    except BaseException:
        pipe.cancel()
        raise
    for c in active:
        c.files_read()
    freeze.thaw("ok")   # without a snapshot the freeze lasted the whole read (with one: done already)
    grafted: set[str] = set()
    if kind == "tree":
        root, grafted = graft_consistent_copies(safe, w, root, active, path, w.flush)
    if kind == "tree":
        record["size"] = pipe.stats.size
    if active:
        record["consistency"] = {c.name: c.info() for c in active}
    record["snapshot"] = freeze.record()
    record["finished"] = utc_now_iso()
    stats = pipe.stats.as_dict()
    record["stats"] = stats
    record["labels"] = dict(opts.labels)
    return record, root, grafted


def _tree_change_source(safe: Safe, prev: Point | None, path: Path, read_path: Path, walked: dict, taken: Taken,
                        opts: BackupOptions, integrations: bool, warn) -> tuple[dict, Guide | None]:
    """(the point's change_source, the Guide of a walk of only what changed or None) for a
    tree read from a btrfs snapshot; a change source that cannot be trusted is a warning."""
    if opts.full_read:
        return change_source("full", "--full-read"), None
    live_dev = next(iter(taken.dev_map.values()), None)
    p = plan_btrfs_walk(safe, prev, path, read_path, walked, live_dev, integrations)
    if p.guide is not None:
        return change_source("btrfs-send", p.detail), p.guide
    if p.fallback is not None:
        warn(os.fsencode(str(path)), FALLBACK + p.fallback)
    return change_source("full", p.detail, p.fallback), None


def back_up_volume(safe: Safe, w: Writer, pipe: Pipeline, read_path: Path, path: Path, st: os.stat_result,
                   sig: list[int], prev: Point | None, opts: BackupOptions, warn, progress, record: dict,
                   after_commit: list[Callable[[], None]], settle: Callable[[], None] | None = None,
                   ) -> tuple[bytes | None, int]:
    """Read a volume (the changed blocks, or whole) through ``pipe``, which this finishes;
    fill the volume fields of ``record``; returns (root, size). A qcow2 image is read as the
    guest sees it (ingest/qcow2). With ``--changed-blocks qemu:BITMAP`` the image's dirty
    bitmaps are rotated (ingest/changes/qemu_bitmap): the old ones are removed by a callable
    put in ``after_commit``, run once the point is committed. ``settle`` makes what ``w``
    wrote readable through ``safe.get`` (default ``w.flush``; an agent waits for its uploads)."""
    from .qcow2 import is_qcow2, missing_tools
    from .volume import open_volume
    block = safe.config.block_size
    fmt = "qcow2" if stat.S_ISREG(st.st_mode) and is_qcow2(read_path) and missing_tools() is None else None
    if prev is not None and prev.extra.get("source_format") != fmt:
        prev_fmt = prev.extra.get("source_format") or "raw"
        unusable = f"the previous point was read as {prev_fmt}, this one as {fmt or 'raw'}"
    else:
        unusable = None
    # The bitmaps are edited (qemu-img, which locks the image) before the export is opened.
    size = _size_of(str(read_path), fmt)
    cs, spans, rot = _changed_spans(prev, size, block, opts, unusable, str(read_path))
    if rot is not None:
        record["qemu_bitmap"] = rot.record()
        after_commit.append(lambda: _finish_rotation(rot, warn, path))
    if cs["fallback"]:
        warn(os.fsencode(str(path)), f"changed blocks not used, read whole: {cs['fallback']}")
    with open_volume(str(read_path), fmt) as vol:
        if vol.size != size:
            raise SafeError(f"{path}: the volume changed size while the backup started ({size} to {vol.size} bytes)")
        if spans is not None and prev is not None and not opts.full_read:
            from .changed_blocks import read_changed
            reader = BlobReader(prev.root, prev.size, safe.get, safe.kind)
            read_changed(vol.pread, size, pipe, block, reader, spans, path.name, progress)
            root, _ = pipe.finish()
        else:
            shortcut = None if opts.full_read or cs["kind"] != "full" or cs["fallback"] or unusable else prev
            root, size = walk_volume(pipe, read_path, st, sig, shortcut, block, warn, progress, path.name, vol=vol)
            if cs["kind"] != "full":
                cs = change_source("full", cs["detail"], cs["fallback"])
            if opts.full_read and spans is not None and prev is not None and root != prev.root:
                (settle or w.flush)()   # the blob just written is read back
                _verify_chain(safe, prev, root, size, block, spans, warn, path)
    record["change_source"] = cs
    if fmt:
        record["source_format"] = fmt
    return root, size


def _size_of(path: str, fmt: str | None) -> int:
    """The size of the volume at ``path`` (a qcow2 image's: the guest's disk)."""
    if fmt == "qcow2":
        from .qcow2 import virtual_size
        return virtual_size(path)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return volume_size(fd)
    finally:
        os.close(fd)


def _finish_rotation(rot: Rotation, warn, path: Path) -> None:
    for left in rot.finish():
        warn(os.fsencode(str(path)), f"old dirty bitmap not removed (the next backup removes it): {left}")


def _changed_spans(prev: Point | None, size: int, block: int, opts: BackupOptions, unusable: str | None,
                   image: str) -> tuple[dict, list[tuple[int, int]] | None, Rotation | None]:
    """(the point's change_source, the block-aligned spans the change source reports or None
    for a full read, the bitmap Rotation of a ``qemu:`` source or None). ``change_source``
    names a fallback (a reason for a full read) when the change source cannot be trusted; with
    --full-read the spans are still returned (when trusted), for :func:`_verify_chain`."""
    if not opts.changed_blocks:
        return change_source("full", "--full-read" if opts.full_read else ""), None, None
    from .changed_blocks import aligned, covers, parse_ranges
    from .changes import qemu_bitmap
    base = qemu_bitmap.bitmap_base(opts.changed_blocks)
    reason = unusable
    if prev is None:
        reason = "no previous point of that name"
    elif reason is None and prev.extra.get("block_size", block) != block:
        reason = "the previous point has another block size"
    elif reason is None and size < prev.size:
        reason = f"the volume shrank ({prev.size} to {size} bytes)"
    if base is not None:
        if reason is None and prev is not None and size != prev.size:
            reason = f"the disk's size changed ({prev.size} to {size} bytes)"
        rot = qemu_bitmap.start(image, base, prev, reason)
        detail, reason, ranges = opts.changed_blocks, rot.fallback, []
        if reason is None:
            ranges = rot.ranges()
    else:
        rot = None
        ranges = parse_ranges(Path(opts.changed_blocks))   # malformed user input: a clear error
        detail = str(opts.changed_blocks)
    kind = "qemu-bitmap" if base is not None else "ranges-file"
    spans = aligned(ranges, block, size)
    if reason is None and prev is not None and size > prev.size:
        tail = prev.size - prev.size % block
        if not covers(spans, prev.size, size):
            reason = f"the volume grew ({prev.size} to {size} bytes) beyond the changed ranges"
        else:
            spans = aligned([(a, b - a) for a, b in spans] + [(tail, size - tail)], block, size)
    if opts.full_read:
        return change_source("full", "--full-read"), (None if reason else spans), rot
    if reason is not None:
        return change_source(kind, detail, reason), None, rot
    return change_source(kind, detail), spans, rot


def _verify_chain(safe: Safe, prev: Point, root: bytes | None, size: int, block: int,
                  spans: list[tuple[int, int]], warn, path: Path) -> None:
    """A full read of a source whose changes are tracked: blocks that differ from the previous
    point outside the ``spans`` the change source reports were missed by it -- a warning.
    Compares the two blobs extent by extent (a run of equal holes is one step)."""
    kind = safe.kind
    old = BlobReader(prev.root, prev.size, safe.get, kind)
    new = BlobReader(root, size, safe.get, kind)
    differ = 0
    pos, end = 0, min(size, prev.size)
    for a, b in [s for s in spans if s[0] < end] + [(end, end)]:
        if a > pos:
            differ += _blocks_differing(list(old.extents(pos, a)), list(new.extents(pos, a)), pos, a, block)
        pos = max(pos, b)
    if differ:
        warn(os.fsencode(str(path)), f"full read found {differ} blocks that differ from the incremental chain "
                                     f"outside the reported changes: {MISSED_WRITES}")


def _blocks_differing(old: list, new: list, lo: int, hi: int, block: int) -> int:
    """How many ``block``-sized blocks of [lo, hi) have different keys in the extent lists
    ``old`` and ``new`` ((offset, length, key) each, covering the range)."""
    cuts = sorted({lo, hi} | {max(lo, min(hi, o)) for o, _, _ in old + new}
                  | {max(lo, min(hi, o + n)) for o, n, _ in old + new})
    differ, i, j = 0, 0, 0
    for a, b in zip(cuts, cuts[1:]):
        while i < len(old) and old[i][0] + old[i][1] <= a:
            i += 1
        while j < len(new) and new[j][0] + new[j][1] <= a:
            j += 1
        ko = old[i][2] if i < len(old) else None
        kn = new[j][2] if j < len(new) else None
        if ko != kn:
            differ += -(-(b - a) // block)
    return differ


def change_source(kind: str, detail: str = "", fallback: str | None = None) -> dict:
    """A point's ``change_source`` (docs/FORMAT.md): how the backup learnt what changed --
    ``kind`` ranges-file, qemu-bitmap, btrfs-send or full; ``detail`` what identifies that
    source (a file name, bitmap name and generation, a snapshot); ``fallback`` why a full read
    was made instead of the change source, or None."""
    return {"kind": kind, "detail": detail, "fallback": fallback}


def walk_tree(safe: Safe, pipe: Pipeline, read_path: Path, prev_root: bytes | None, wo: WalkOptions,
              warn: Callable[[bytes | str, str], None], progress: Callable[[int, int], None],
              guide: Guide | None = None, full_read: bool = False) -> tuple[bytes | None, dict]:
    """Read the tree at ``read_path`` through ``pipe`` (which this finishes), against the tree
    ``prev_root`` for change detection (``guide``: only what changed since, ingest/walk.py;
    ``full_read``: every file read); returns (root key, the point's ``root_meta``). ``safe``
    gives the chunking settings (``config``) and the previous trees (``get``): a Safe, or a
    remote one with the same two (pointsafe.server.client)."""
    cfg = safe.config
    walker = TreeWalker(safe, pipe, Cutter(None, cfg.chunk_min, cfg.chunk_avg, cfg.chunk_max), wo, warn, progress,
                        guide=guide, full_read=full_read)
    try:
        root_entry = walker.walk_root(os.fsencode(str(read_path)), prev_root)
    finally:
        walker.close()
    root, _ = pipe.finish()
    walker.add_kept(pipe.stats)
    return root, {"mode": root_entry.mode, "uid": root_entry.uid, "gid": root_entry.gid,
                  "mtime_ns": root_entry.mtime_ns, "atime_ns": root_entry.atime_ns,
                  "xattrs": [[n.hex(), v.hex()] for n, v in root_entry.xattrs]}


def walk_volume(pipe: Pipeline, read_path: Path, st: os.stat_result, sig: list[int], prev: Point | None, block_size: int,
                warn: Callable[[bytes | str, str], None], progress: Callable[..., None],
                name: str, vol=None) -> tuple[bytes | None, int]:
    """Read the volume at ``read_path`` (or ``vol``, from ingest.volume.open_volume: a qcow2
    image's guest view) through ``pipe`` (which this finishes) in blocks of ``block_size``;
    returns (root key, size). A disk image whose ``sig`` (``source_stat``) is the previous
    point's is not read again: its root is the previous one's."""
    if prev and stat.S_ISREG(st.st_mode) and prev.extra.get("source_stat") == tuple(sig):
        pipe.finish()
        pipe.stats.size = prev.size
        pipe.stats.files_unchanged = 1
        return prev.root, prev.size
    if vol is not None:
        size = vol.read_all(pipe, block_size, warn, progress, name)
    else:
        size = read_volume(str(read_path), pipe, block_size, warn, progress, name=name)
    root, _ = pipe.finish()
    return root, size


def _source_stat(st: os.stat_result, taken: Taken | None) -> list[int]:
    """What volume change detection compares: the live file's (device, inode, size, mtime,
    ctime) -- a reflink clone's stat is the live file's at the clone, a btrfs snapshot's file
    is the live inode with the snapshot's device mapped back."""
    if taken is not None and taken.live_stat is not None:
        st = taken.live_stat
    elif taken is not None and stat.S_ISREG(st.st_mode):
        s2 = os.stat(taken.read_path)
        return [taken.dev_map.get(s2.st_dev, s2.st_dev), s2.st_ino, s2.st_size, s2.st_mtime_ns, s2.st_ctime_ns]
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def commit_point(w: Writer, record: dict, root: bytes | None, warnings: list[dict]) -> Point:
    """Commit ``record`` with ``root`` and ``warnings`` through ``w`` (a Writer, which holds the
    safe's write lock); returns the committed Point. ``record`` itself is not changed.
    """
    record = dict(record)
    record["warnings"] = list(warnings)
    return w.add_point(record, root)


def graft_consistent_copies(safe: Safe, w: Writer, root: bytes | None, active: list, path: Path,
                            settle: Callable[[], None]) -> tuple[bytes | None, set[str]]:
    """Graft into the tree ``root`` the files the database integrations ``active`` hand back once
    the source is read (their ``extra_files``); returns (the new root, the grafted files' paths
    as in SOURCE). ``settle`` makes what ``w`` wrote readable through ``safe.get`` (grafting reads
    the tree just written, or just grafted, back): the local writer's flush, or the agent's wait
    for its uploads."""
    grafted: set[str] = set()
    for c in active:
        for rel, content in c.extra_files():
            settle()
            root = graft(safe, w, root, os.fsencode(rel), content)
            grafted.add(os.path.join(str(path), rel))
    return root, grafted


def settle_warnings(warnings: list[dict], active: list, path: Path, grafted: set[str]) -> None:
    """Edit a point's read warnings (in place) once its database integrations are done: the
    point holds the integrations' consistent copies of the files ``grafted``, so their read
    warnings (a live WAL segment or database file changing under the reader) no longer apply;
    nor do read warnings in the directories an integration covers (its recovery repairs them);
    and what the integrations found and dealt with is said."""
    covered = covered_roots(active, path)
    warnings[:] = [x for x in warnings if x.get("path") not in grafted and not is_covered_warning(x, covered)]
    warnings += [{"path": c.name, "message": m} for c in active for m in getattr(c, "warnings", list)()]


def graft(safe: Safe, w: Writer, root: bytes | None, relpath: bytes, data: bytes | str | os.PathLike[str]) -> bytes:
    """Return a new root tree in which ``relpath`` is a regular file holding ``data`` (bytes,
    or the path of a file to read in chunks).

    Used for files that exist only once reading is done (PostgreSQL's backup_label, WAL
    segments, consistent SQLite copies). Rewrites the directories along the path only.
    """
    parts = [p for p in relpath.split(b"/") if p and p != b"."]
    if not parts or b".." in parts:
        raise SafeError(f"cannot add {relpath!r} to the point: not a relative path")
    return _graft(safe, w, root, parts, data, None)


def _graft(safe: Safe, w: Writer, tree: bytes | None, parts: list[bytes], data: bytes | str | os.PathLike[str],
           parent_meta: Entry | None) -> bytes:
    entries = read_tree(safe.get, tree) if tree is not None else []
    byname = {e.name: e for e in entries}
    head = parts[0]
    old = byname.get(head)
    now = time.time_ns()
    template = parent_meta or (entries[0] if entries else Entry(b"", DIR, 0o755))
    if len(parts) == 1:
        ref, size = _store_content(safe, w, data)
        e = Entry(head, REG, old.mode if old and old.type == REG else 0o600,
                  old.uid if old else template.uid, old.gid if old else template.gid,
                  now, now, now, size, ref=ref)
    else:
        sub = old.ref if old is not None and old.type == DIR else None
        e = Entry(head, DIR, old.mode if old and old.type == DIR else 0o700,
                  old.uid if old else template.uid, old.gid if old else template.gid,
                  old.mtime_ns if old else now, old.atime_ns if old else now, now)
        if old is not None and old.type == DIR:
            e.xattrs = old.xattrs
        e.ref = _graft(safe, w, sub, parts[1:], data, e)
    byname[head] = e
    return build_tree(w.put_node, list(byname.values()))


def _store_content(safe: Safe, w: Writer, data: bytes | str | os.PathLike[str]) -> tuple[bytes | None, int]:
    """Store bytes or a file's content as a blob, with the safe's content-defined chunks (so a
    consistent copy of a database dedups against the live file read just before)."""
    cfg = safe.config
    cutter = Cutter(None, cfg.chunk_min, cfg.chunk_avg, cfg.chunk_max)
    bb = BlobBuilder(w.put_node, cfg.list_fanout)

    def add(items) -> None:
        for what, v in items:
            if what == "hole" or is_zero(v):
                bb.add(None, v if what == "hole" else len(v))
            else:
                bb.add(w.put(Kind.CHUNK, bytes(v)), len(v))

    if isinstance(data, (bytes, bytearray, memoryview)):
        mv = memoryview(data)
        add(("data", mv[c.offset:c.offset + c.length]) for c in cutter.content_defined().cut_buf(mv)) if len(mv) else None
    else:
        fd = os.open(data, os.O_RDONLY | os.O_CLOEXEC)
        try:
            add(cutter.chunks(fd, os.fstat(fd).st_size))
        finally:
            os.close(fd)
    return bb.finish(), bb.size
