"""The backup command."""

from __future__ import annotations

import sys

from pointsafe.cas import Point
from pointsafe.ingest import BackupOptions, backup
from pointsafe.ingest.snapshot import DEFAULT_COW_SIZE, MODES

from .common import EXIT_OK, EXIT_WARNINGS, add_common, emit_json, human_bytes, open_safe, progress, say

HELP = """\
Back up SOURCE into a new recovery point.

SOURCE is a directory tree, a block device, or (with --volume) a disk image file. A tree is
stored file by file with content-defined chunks; a volume is stored as fixed-size blocks (the
safe's block size). Every point is a complete image of its source; data the safe already holds
is stored once. Files whose inode, size, mtime and ctime match the previous point of the same
NAME are not read again.

A qcow2 image given with --volume is stored as the disk its guest sees (raw blocks, read
through a read-only qemu-nbd export; needs qemu-utils and python3-libnbd): a restore writes a
raw image ('qemu-img convert -f raw -O qcow2' turns it back), the mount shows NAME.img. With
--changed-blocks qemu:BITMAP only the ranges its persistent dirty bitmaps mark written are read;
the image must not be open in a running QEMU (qemu-img edits the bitmaps). Each backup of that
BITMAP starts the next bitmap before reading and removes the older ones once its point is
committed, so a failed or killed backup loses no change. A bitmap that cannot be trusted
(missing, in use, disabled) means a full read with a warning. Use one BITMAP per safe and NAME.

Problems while reading (unreadable files, I/O errors, files that keep changing) become warnings
on the point; the backup goes on and exits with code 3. A failing --pre-hook aborts the backup
before anything is read and creates no point; --post-hook always runs afterwards, with
POINTSAFE_STATUS set to ok, warning or error.

Point in time: by default (--snapshot auto) the backup reads a snapshot of SOURCE, not the
live files, wherever the machine can take one: a btrfs snapshot when SOURCE is on a btrfs
subvolume, an LVM snapshot when it is (or lies on) a logical volume, a reflink clone for a
single file (--volume) on XFS or btrfs; else it reads live. The point records which:
'snapshot: {method, taken_at, held_s}' or 'snapshot: none' ('pointsafe show'). Database
integrations (--mysql, --postgres) and the --pre-freeze/--post-thaw hooks then hold the
source still only for the instant the snapshot is taken, not for the whole read. The newest
btrfs snapshot of each source is kept in <subvolume>/.pointsafe-snapshots/ (the base of the
next backup); 'pointsafe snapshots' lists them.

Progress: on a terminal, a bar shows what is done of what the previous point of the same NAME
held (a first backup of a tree shows bytes and files done). Without a terminal (cron,
systemd), a progress line goes to the log (--log-file, --syslog; else stderr, unless -q)
every 30 seconds, or every $POINTSAFE_PROGRESS_INTERVAL seconds.
"""


def register(sub) -> None:
    """Add the ``backup`` command to the subparsers ``sub``."""
    p = sub.add_parser("backup", help="back up a directory, block device or disk image",
                       description=HELP, formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    add_common(p)
    p.add_argument("source", metavar="SOURCE", help="directory, block device or disk image")
    p.add_argument("--name", help="the point's source name (default: the source's base name)")
    p.add_argument("--volume", action="store_true", help="store SOURCE (a disk image file) as a volume of fixed blocks")
    p.add_argument("--changed-blocks", metavar="FILE",
                   help="with --volume: read only the byte ranges listed in FILE (a JSON list of [offset, length] "
                        "or lines 'offset length'), reusing the previous point's blocks elsewhere; "
                        "qemu:BITMAP for a qcow2 image: the ranges its persistent dirty bitmaps BITMAP.* mark "
                        "written (the first backup adds one and reads whole; each backup starts the next one "
                        "before reading and removes the old ones once the point is committed)")
    p.add_argument("--full-read", action="store_true",
                   help="read SOURCE whole: every file of a tree, every block of a volume, whatever the change "
                        "source (btrfs send stream, --changed-blocks) and the unchanged-file and unchanged-image "
                        "shortcuts say")
    p.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                   help="skip names or relative paths matching this shell pattern (repeatable)")
    p.add_argument("--one-file-system", action="store_true", help="do not descend into other filesystems")
    p.add_argument("--pre-hook", metavar="CMD", help="shell command run before reading; failure aborts")
    p.add_argument("--post-hook", metavar="CMD", help="shell command always run after the backup")
    g = p.add_argument_group("point in time")
    g.add_argument("--snapshot", metavar="MODE", default="auto", choices=MODES,
                   help="how to freeze SOURCE: auto (default: btrfs, then lvm, then reflink, whichever "
                        "applies, else read live), btrfs (a read-only snapshot of the subvolume holding "
                        "SOURCE), lvm (an LVM snapshot of the logical volume SOURCE is or lies on, mounted "
                        "read-only for a tree), reflink (a clone of a single file, with --volume, on XFS "
                        "or btrfs), none (read the live source). A MODE named explicitly that cannot be "
                        "used fails the backup with the reason and makes no point. A tree read from a btrfs "
                        "snapshot is an incremental of the previous point's retained snapshot: only what the "
                        "send stream between the two names is looked at, and of a modified file only its "
                        "written extents are read")
    g.add_argument("--snapshot-size", metavar="SIZE", default=DEFAULT_COW_SIZE,
                   help="copy-on-write space of an LVM snapshot: a size (2G, 512M) or extents (10%%ORIGIN, "
                        "20%%FREE); writes to the volume beyond it during the backup invalidate the "
                        "snapshot (default: %(default)s)")
    g.add_argument("--pre-freeze", metavar="CMD",
                   help="shell command run just before the snapshot (quiesce an application, fsfreeze); "
                        "failure aborts the backup (no point), --post-thaw still runs. Without a snapshot "
                        "it runs before the source is read")
    g.add_argument("--post-thaw", metavar="CMD",
                   help="shell command always run right after the snapshot, also when it failed "
                        "(POINTSAFE_STATUS ok or error, POINTSAFE_SNAPSHOT the method or none); without a "
                        "snapshot it runs once the source has been read. Its failure is a warning (exit 3)")
    p.add_argument("--label", action="append", default=[], metavar="KEY=VALUE", help="a label stored on the point")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar, no progress lines on stderr")
    from pointsafe.ingest.db import add_arguments as add_db_arguments
    add_db_arguments(p)  # --mysql, --postgres, --sqlite, --allow-inconsistent
    from .cmd_agent import add_server_options
    add_server_options(p)  # --server, --token-file: back up as an agent of 'pointsafe serve'
    p.set_defaults(func=cmd_backup, task_kind="backup")


def consistency_hooks(args) -> list:
    """Database consistency integrations chosen on the command line (see ingest.db)."""
    try:
        from pointsafe.ingest.db import from_args
    except ImportError:
        return []
    return from_args(args)


def backup_options(args) -> BackupOptions:
    """The BackupOptions of the command line (a local backup's and an agent's alike)."""
    labels = {}
    for kv in args.label:
        k, _, v = kv.partition("=")
        labels[k] = v
    return BackupOptions(name=args.name, volume=args.volume, pre_hook=args.pre_hook, post_hook=args.post_hook,
                         excludes=args.exclude, one_file_system=args.one_file_system,
                         consistency=consistency_hooks(args),
                         allow_inconsistent=getattr(args, "allow_inconsistent", False), labels=labels,
                         space_check=getattr(args, "space_check", None), snapshot=args.snapshot,
                         snapshot_size=args.snapshot_size, pre_freeze=args.pre_freeze, post_thaw=args.post_thaw,
                         full_read=getattr(args, "full_read", False),
                         changed_blocks=getattr(args, "changed_blocks", None))


def _full_read_due(safe, opts: BackupOptions, source: str) -> bool:
    """Whether the safe's ``cbt.full_every`` setting makes this backup a full read (see
    :func:`full_read_due`)."""
    from pointsafe.ops import config
    return full_read_due(safe.points(), config.effective(config.load(safe.index)), opts, source)


def full_read_due(points: list[Point], settings: dict[str, str], opts: BackupOptions, source: str) -> bool:
    """Whether ``cbt.full_every`` (in ``settings``) makes this backup a full read: the source's
    ``points`` are a chain of incrementals (the newest took its changes from a change source: a
    ranges file, a QEMU bitmap, a btrfs send stream) and the setting's duration has passed
    since the last full read of the source. Also for an agent: ``points`` are its own, the
    setting the server's safe's."""
    from pointsafe.ingest.backup import source_name
    from pointsafe.ops import config
    from pointsafe.ops.clock import iso, now
    name = source_name(source, opts.name)
    mine = [p for p in points if p.name == name]
    if not mine or _change_kind(max(mine, key=lambda p: p.started)) == "full":
        return False   # no chain of incrementals (the first backup, a tree read live, a full read)
    full = [p for p in mine if _change_kind(p) == "full"]
    last = max(full, key=lambda p: p.started).started if full else None
    return config.full_read_due(settings, last, iso(now()))


def _change_kind(p: Point) -> str:
    return (p.extra.get("change_source") or {}).get("kind", "full")


def cmd_backup(args) -> int:
    """``pointsafe backup``: make a point of SOURCE and print it (exit 3 when it has warnings)."""
    opts = backup_options(args)
    if args.server:
        from .cmd_agent import backup_remote
        return backup_remote(args, opts)
    with open_safe(args) as safe:
        if (opts.changed_blocks or not opts.volume) and not opts.full_read:
            opts.full_read = _full_read_due(safe, opts, args.source)
        with progress(args, None, f"backing up {args.source}") as advance:
            res = backup(safe, args.source, opts, progress=advance)
    p = res.point
    _report_task(p)
    if args.json:
        emit_json(p.to_record())
    else:
        st = p.stats
        for w in res.warnings:
            print(f"warning: {w['path']}: {w['message']}", file=sys.stderr)
        for n in res.notes:
            say(args, f"note: {n}")
        say(args, f"point {p.id[:12]} ({p.name}, {p.kind}): {st['files']} files, "
                  f"{human_bytes(st['bytes_read'])} read, {human_bytes(st['bytes_new'])} new, "
                  f"{human_bytes(st['bytes_stored'])} stored"
                  + (f", {len(res.warnings)} warnings" if res.warnings else ""))
    return EXIT_WARNINGS if res.warnings else EXIT_OK


def _report_task(point: Point) -> None:
    """Hand the point to the task recorder, when the ops room is present."""
    try:
        from pointsafe.ops import tasks
    except ImportError:
        return
    report = getattr(tasks, "report", None)
    if report is None:
        return
    st = point.stats
    report(point=point.id, source=point.source, name=point.name,
           bytes=st.get("bytes_read", 0), bytes_stored=st.get("bytes_stored", 0), files=st.get("files", 0))
    add_warning = getattr(tasks, "add_warning", None)
    if add_warning is not None:
        for w in point.warnings:
            add_warning(w["path"], w["message"])
