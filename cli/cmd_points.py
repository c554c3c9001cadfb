"""Commands that read points: points, show, ls, diff, restore."""

from __future__ import annotations

import stat
import sys
import time
from collections.abc import Mapping

from pointsafe.cas import Entry, resolve_point
from pointsafe.ingest.browse import children, diff, display_name, entry_json, lookup, root_entry
from pointsafe.ingest.restore import restore

from .cmd_agent import add_server_options
from .common import EXIT_OK, EXIT_WARNINGS, add_common, emit_json, human_bytes, open_safe, printable, progress, say

POINT_HELP = "POINT is an id prefix (4+ hex digits), 'latest', NAME@latest or NAME@TIME (UTC, ISO 8601)."


def register(sub) -> None:
    """Add the ``points``, ``show``, ``ls``, ``diff`` and ``restore`` commands to the subparsers ``sub``."""
    p = sub.add_parser("points", help="list recovery points", description="List the safe's points, oldest first.")
    add_common(p)
    p.add_argument("--name", help="only points of this source name")
    add_server_options(p)
    p.set_defaults(func=cmd_points)

    p = sub.add_parser("show", help="show one point", description="Show a point's record. " + POINT_HELP)
    add_common(p)
    p.add_argument("point", metavar="POINT")
    p.add_argument("--fragmentation", action="store_true",
                   help="measure how scattered this point's data is (seeks per GiB of a restore "
                        "in file order; reads the point's index entries)")
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("ls", help="list files in a point",
                       description="List a directory of a tree point (like ls -l). " + POINT_HELP)
    add_common(p)
    p.add_argument("point", metavar="POINT")
    p.add_argument("path", nargs="?", default="", metavar="PATH", help="directory or file inside the point")
    p.add_argument("-R", "--recursive", action="store_true", help="list everything below PATH")
    p.set_defaults(func=cmd_ls)

    p = sub.add_parser("diff", help="compare two points",
                       description="Show what changed from the first point to the second: + added, "
                                   "- removed, M content changed, m metadata changed, T type changed. "
                                   "Unchanged subtrees are skipped without being read. " + POINT_HELP)
    add_common(p)
    p.add_argument("a", metavar="POINT")
    p.add_argument("b", metavar="POINT")
    p.set_defaults(func=cmd_diff)

    p = sub.add_parser("restore", help="restore a point to a directory or image",
                       description="Write a point out: a tree point into TARGET (a new or empty "
                                   "directory), a volume point into an image file TARGET (or, with "
                                   "--force, a block device). Every stored field is restored: "
                                   "contents (sparse where the source was), hardlinks, symlinks, "
                                   "devices, FIFOs, owner, mode, times and xattrs. Each file is "
                                   "written under a temporary name (.pointsafe-restore.*) and "
                                   "renamed into place when complete; a file whose content is "
                                   "missing or damaged in the safe is not written and is named in a "
                                   "warning (exit 3). " + POINT_HELP)
    add_common(p)
    p.add_argument("point", metavar="POINT")
    p.add_argument("target", metavar="TARGET")
    p.add_argument("--path", help="restore only this path inside the point (kept at its place below TARGET)")
    p.add_argument("--force", action="store_true", help="restore into a non-empty target, replacing files")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    add_server_options(p)
    p.set_defaults(func=cmd_restore, task_kind="restore")


def cmd_points(args) -> int:
    """``pointsafe points``: the safe's points, oldest first (only --name's with it)."""
    if args.server:
        from .cmd_agent import remote_points
        pts = remote_points(args)
    else:
        with open_safe(args) as safe:
            pts = safe.points()
    if args.name:
        pts = [p for p in pts if p.name == args.name]
    if args.json:
        emit_json([p.to_record() for p in pts])
        return EXIT_OK
    if not pts:
        say(args, "no points")
        return EXIT_OK
    say(args, f"{'ID':12}  {'TIME (UTC)':20}  {'NAME':16} {'KIND':6} {'SIZE':>10} {'NEW':>10} {'STORED':>10}  "
              f"{'SNAPSHOT':8} WARN")
    for p in pts:
        st = p.stats
        say(args, f"{p.id[:12]}  {p.started[:19]:20}  {p.name[:16]:16} {p.kind:6} "
                  f"{human_bytes(p.size):>10} {human_bytes(st.get('bytes_new', 0)):>10} "
                  f"{human_bytes(st.get('bytes_stored', 0)):>10}  {snapshot_method(p):8} {len(p.warnings)}")
    return EXIT_OK


def snapshot_method(p) -> str:
    """How the point's source was frozen: the snapshot method, "none" (read live), or "-" for
    a point from before snapshots were recorded."""
    snap = p.snapshot
    if isinstance(snap, Mapping):
        return str(snap.get("method", "?"))
    return str(snap) if isinstance(snap, str) else "-"


def snapshot_line(p) -> str:
    """The ``show`` line for the point's snapshot."""
    snap = p.snapshot
    if isinstance(snap, Mapping):
        held = snap.get("held_s")
        held_text = f", held {held:.3f} s" if isinstance(held, (int, float)) else ""
        where = f", {snap['path']}" if isinstance(snap.get("path"), str) else ""
        return f"{snap.get('method', '?')} taken {snap.get('taken_at', '?')}{held_text}{where}"
    if snap == "none":
        return "none (the live source was read: not a point in time)"
    return "- (not recorded)"


def cmd_show(args) -> int:
    """``pointsafe show POINT``: one point's record (and its fragmentation with --fragmentation)."""
    with open_safe(args) as safe:
        p = resolve_point(safe, args.point)
        rec = p.to_record()
        if args.fragmentation:
            from pointsafe.gc.fragmentation import measure
            frag = measure(safe, [p])
            rec["fragmentation"] = {k: frag[k] for k in ("seeks", "minimum_seeks", "seeks_per_gib",
                                                         "minimum_per_gib", "excess")}
    if args.json:
        emit_json(rec)
        return EXIT_OK
    def out(text: str) -> None:
        say(args, printable(text))
    st = p.stats
    rows = [("id", p.id), ("name", p.name), ("kind", p.kind), ("source", p.source),
            ("host", p.host), ("started", p.started), ("finished", p.finished),
            ("size", human_bytes(p.size)), ("files", st.get("files")),
            ("unchanged files", st.get("files_unchanged")), ("read", human_bytes(st.get("bytes_read", 0))),
            ("new", human_bytes(st.get("bytes_new", 0))), ("stored", human_bytes(st.get("bytes_stored", 0))),
            ("root", p.root.hex() if p.root else None), ("snapshot", snapshot_line(p))]
    for k, v in rows:
        out(f"{k:16} {v}")
    cs = p.extra.get("change_source")
    if cs:
        fb = cs.get("fallback")
        out(f"{'changes from':16} {cs.get('kind')}" + (f" ({cs.get('detail')})" if cs.get("detail") else "")
            + (f"; full read instead: {fb}" if fb else "")
            + (f"; scanned {human_bytes(st.get('bytes_scanned', 0))}" if "bytes_scanned" in st else ""))
    qb = p.extra.get("qemu_bitmap")
    if isinstance(qb, Mapping):
        say(args, f"{'dirty bitmap':16} {qb.get('name')} (generation {qb.get('generation')}: tracks writes since "
                  f"this point)")
    if p.extra.get("source_format"):
        say(args, f"{'read as':16} the guest's disk of a {p.extra['source_format']} image (raw blocks)")
    for name, info in (p.consistency or {}).items():
        shown = ", ".join(f"{k}={v}" for k, v in info.items()) if isinstance(info, Mapping) else info
        out(f"{name:16} {shown}")
    if "fragmentation" in rec:
        f = rec["fragmentation"]
        out(f"{'fragmentation':16} {f['seeks_per_gib']} seeks/GiB (floor {f['minimum_per_gib']}; "
                  f"{f['excess']}x the minimum; 'pointsafe defrag' brings it down)")
    for w in p.warnings:
        out(f"warning          {w['path']}: {w['message']}")
    return EXIT_OK


def _ls_line(path: bytes, e) -> str:
    mode = stat.filemode(e.st_mode)
    t = time.strftime("%Y-%m-%d %H:%M", time.gmtime(e.mtime_ns / 1e9))
    tail = f" -> {display_name(e.target)}" if e.target else ""
    return f"{mode} {e.uid:>5} {e.gid:>5} {e.size:>12} {t} {display_name(path)}{tail}"


def cmd_ls(args) -> int:
    """``pointsafe ls POINT [PATH]``: the entries of a directory in a tree point (recursive with -R)."""
    from pointsafe.cas import UsageError
    from pointsafe.ingest.browse import walk
    with open_safe(args) as safe:
        p = resolve_point(safe, args.point)
        if p.kind != "tree":
            raise UsageError(f"point {p.id[:12]} is a volume; mount it or restore it to read its files")
        e = lookup(safe, p, args.path)
        prefix = args.path.strip("/").encode("utf-8", "surrogateescape")
        if e.type != 2:
            items = [(prefix, e)]
        elif args.recursive:
            items = list(walk(safe, e, prefix))
        else:
            items = [((prefix + b"/" + c.name) if prefix else c.name, c) for c in children(safe, e)]
    if args.json:
        emit_json([entry_json(path, c) for path, c in items])
    else:
        for path, c in items:
            print(_ls_line(path, c))
    return EXIT_OK


def cmd_diff(args) -> int:
    """``pointsafe diff A B``: the paths added, removed or changed from point A to point B."""
    from pointsafe.cas import UsageError
    with open_safe(args) as safe:
        a = resolve_point(safe, args.a)
        b = resolve_point(safe, args.b)
        if a.kind != "tree" or b.kind != "tree":
            raise UsageError("diff compares tree points; for volumes compare restored images")
        changes = list(diff(safe, root_entry(a), root_entry(b)))
    if args.json:
        emit_json([{"change": c, **entry_json(path, _either(new, old))} for c, path, old, new in changes])
    else:
        for c, path, _old, _new in changes:
            print(f"{c} {display_name(path)}")
        say(args, f"{len(changes)} changes") if not changes else None
    return EXIT_OK


def cmd_restore(args) -> int:
    """``pointsafe restore POINT TARGET``: write the point (or --path in it) to TARGET, with progress;
    exit 3 when some files could not be restored."""
    if args.server:
        from .cmd_agent import restore_remote
        p, st = restore_remote(args)
    else:
        with open_safe(args) as safe:
            p = resolve_point(safe, args.point)
            with progress(args, p.size, f"restoring {p.id[:12]}") as advance:
                st = restore(safe, p, args.target, subpath=args.path, force=args.force, progress=advance)
    try:
        from pointsafe.ops import tasks
        if hasattr(tasks, "report"):
            tasks.report(point=p.id, name=p.name, bytes=st.bytes_written, files=st.files)
    except ImportError:
        pass
    if args.json:
        emit_json({"point": p.id, "target": args.target, **st.as_dict()})
    else:
        for w in st.warnings:
            print(f"warning: {w['path']}: {w['message']}", file=sys.stderr)
        say(args, f"restored point {p.id[:12]} to {args.target}: {st.files} files, {st.dirs} dirs, "
                  f"{human_bytes(st.bytes_written)} written"
                  + (f", {len(st.warnings)} warnings" if st.warnings else ""))
    return EXIT_WARNINGS if st.warnings else EXIT_OK


def _either(new: Entry | None, old: Entry | None) -> Entry:
    """The entry a diff line shows: the new one, or the old one when the path went away."""
    e = new if new is not None else old
    assert e is not None    # ingest.browse.diff gives at least one of them
    return e
