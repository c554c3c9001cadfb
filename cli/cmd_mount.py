"""mount and umount: browse recovery points through a read-only FUSE filesystem."""

from __future__ import annotations

import argparse
from pathlib import Path

from . import password
from .cmd_agent import add_server_options
from .common import parse_size, EXIT_OK, add_common, emit_json, safe_path, say

MOUNT_DESCRIPTION = """\
Mount the safe's recovery points read-only at MOUNTPOINT (an existing, empty directory) and
return once the mount is ready; a background process keeps serving it until
'pointsafe umount MOUNTPOINT'. Copy files out with cp -a, attach restored database files, or
loop-mount a volume's image (mount -o loop,ro IMAGE DIR).

Without POINT the root holds one folder per point named by its start time in UTC
(2026-11-25T14:36:24Z; a second point in the same second gets '.2'), one folder per point
name holding that name's points, a 'latest' symlink in each of those, and a 'latest' symlink
at the root naming the newest point. With POINT (an id prefix, 'latest', NAME@latest or
NAME@TIME) the root is that point. A directory-tree point shows its files with their stored
modes, owners, times, xattrs and ACLs; a volume point shows one image file, NAME.img.

Everything is loaded lazily: mounting reads only the point list, opening a directory reads
that directory. By default the kernel enforces the stored permissions and only the mounting
user can enter the mount; --allow-other lets other users in (still under the stored
permissions). Damaged data reads as an I/O error, never as wrong bytes, and is logged.
The mount's counters are readable as: getfattr -n user.pointsafe.stats MOUNTPOINT

With --server URL an agent mounts its own points from 'pointsafe serve' (its token from
$POINTSAFE_TOKEN or --token-file; it needs --can-restore): objects are fetched as they are
looked into and read, checked against their ids, and kept in the same bounded caches; a read
the server cannot answer is an I/O error (docs/SERVER.md, "Mounting through the server")."""


def register(sub) -> None:
    """Add the ``mount`` and ``umount`` commands to the subparsers ``sub``."""
    p = sub.add_parser("mount", help="mount points read-only (FUSE)", description=MOUNT_DESCRIPTION,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common(p)
    p.add_argument("mountpoint", metavar="MOUNTPOINT", help="an existing, empty directory")
    p.add_argument("point", metavar="POINT", nargs="?",
                   help="show only this point (id prefix, latest, NAME@latest, NAME@TIME)")
    p.add_argument("--foreground", "-f", action="store_true",
                   help="stay attached; Ctrl-C unmounts (logs go to stderr unless --log)")
    p.add_argument("--allow-other", action="store_true",
                   help="let other users in (the stored permissions still apply)")
    p.add_argument("--no-default-permissions", action="store_true",
                   help="do not let the kernel enforce the stored permissions (anyone who can "
                        "enter the mount reads every file)")
    p.add_argument("--cache-size", type=parse_size, default=256 << 20, metavar="SIZE",
                   help="memory for file data (decompressed chunks), default 256M")
    p.add_argument("--dir-cache-size", type=parse_size, default=64 << 20, metavar="SIZE",
                   help="memory for decoded directories, default 64M")
    p.add_argument("--threads", type=int, default=8,
                   help="worker threads reading and decompressing (default 8)")
    p.add_argument("--read-ahead", type=parse_size, default=4 << 20, metavar="SIZE",
                   help="the kernel's read-ahead for the mount, default 4M (0: leave it)")
    p.add_argument("--log", type=Path, metavar="FILE",
                   help="where the mount process logs (default ~/.local/state/pointsafe/mount.log; "
                        "stderr with --foreground)")
    add_server_options(p)
    p.set_defaults(func=cmd_mount)

    p = sub.add_parser("umount", help="unmount a pointsafe mount",
                       description="Unmount a pointsafe mount made with 'pointsafe mount'. Refuses "
                                   "anything that is not a pointsafe mount.")
    add_common(p)
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.add_argument("--lazy", "-z", action="store_true",
                   help="detach now even when busy; the mount goes away once unused")
    p.set_defaults(func=cmd_umount, needs_key=False)


def cmd_mount(args) -> int:
    """``pointsafe mount``: mount the safe (or one point) read-only; returns once the mount answers,
    or when it ends with --foreground. With --server: this agent's points on the server."""
    from pointsafe.fusefs.runner import MountOptions, mount

    common = dict(mountpoint=Path(args.mountpoint), point=args.point, foreground=args.foreground,
                  allow_other=args.allow_other, default_permissions=not args.no_default_permissions,
                  chunk_cache_bytes=args.cache_size, dir_cache_bytes=args.dir_cache_size,
                  threads=max(1, args.threads), read_ahead_kb=args.read_ahead // 1024, log_file=args.log)
    if args.server:
        o = _server_options(args, common)
    else:
        safe = safe_path(args)
        o = MountOptions(safe=safe, **common,
                         master_key=password.unlock(args, safe))   # the daemon gets it by fork
    m = mount(o)
    if args.foreground:
        return EXIT_OK
    if args.json:
        emit_json({"mountpoint": str(o.mountpoint), "pid": m.pid, "point": m.point_id,
                   "log": str(o.log_file) if o.log_file else None})
    else:
        what = f"point {m.point_id[:12]}" if m.point_id else "every point"
        say(args, f"mounted {what} at {o.mountpoint} (process {m.pid}, log {o.log_file}); "
                  f"unmount with: pointsafe umount {o.mountpoint}")
    return EXIT_OK


def _server_options(args, common: dict):
    """MountOptions for this agent's points on --server: its rights and the point are checked
    here (one line when it may not); the mount process fetches through a connection of its own."""
    from pointsafe.fusefs.runner import MountOptions
    from pointsafe.server.client import read_token
    from pointsafe.server.remote_view import mount_remote, mount_source, open_agent

    url, token, cache = args.server, read_token(args.token_file), args.cache_size
    common["point"], _ = open_agent(mount_remote(url, token), args.point)
    return MountOptions(safe=Path("."), **common, source=lambda: mount_source(url, token, cache),
                        source_name=url)


def cmd_umount(args) -> int:
    """``pointsafe umount``: unmount a pointsafe mount (refusing any other mount)."""
    from pointsafe.fusefs.runner import umount

    umount(Path(args.mountpoint), lazy=args.lazy)
    if args.json:
        emit_json({"mountpoint": str(Path(args.mountpoint).absolute()), "unmounted": True})
    else:
        say(args, f"unmounted {args.mountpoint}")
    return EXIT_OK
