"""The snapshots command: list (and prune) the snapshots the safe's backups keep or left."""

from __future__ import annotations

from pointsafe.ingest.snapshot.retained import Listed, list_snapshots, prune

from .common import EXIT_OK, EXIT_WARNINGS, add_common, emit_json, open_safe, say

HELP = """\
List the snapshots of this safe's sources that exist now, per source name.

retained: the newest btrfs snapshot of a source, kept in <subvolume>/.pointsafe-snapshots/ as
the base of that source's next backup (exactly one per source). stale: anything else -- a
snapshot, clone or LVM snapshot left by a backup that was killed, or an older one. The next
backup of a source removes its stale snapshots; --prune removes every stale one now (it
takes the safe's writer lock, so it waits for no running backup: it fails if one runs).
"""


def register(sub) -> None:
    """Add the ``snapshots`` command to the subparsers ``sub``."""
    p = sub.add_parser("snapshots", help="list the snapshots backups keep or left",
                       description=HELP, formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    add_common(p)
    p.add_argument("--prune", action="store_true", help="remove every stale snapshot (keeps the retained ones)")
    p.set_defaults(func=cmd_snapshots)


def cmd_snapshots(args) -> int:
    """``pointsafe snapshots [--prune]``: the snapshots, one a line (or JSON); exit 3 when some
    stale snapshot could not be removed."""
    problems: list[str] = []
    removed: list[Listed] = []
    with open_safe(args) as safe:
        if args.prune:
            with safe.writer("snapshots --prune"):
                removed, problems = prune(safe)
        items = list_snapshots(safe)
    if args.json:
        emit_json({"snapshots": [x.as_dict() for x in items], "removed": [x.as_dict() for x in removed],
                   "problems": problems})
    else:
        for x in removed:
            say(args, f"removed  {x.method:8} {x.name}  {x.path}")
        for x in items:
            say(args, f"{x.state:8} {x.method:8} {x.name}  {x.taken_at or '-'}  {x.path}"
                      + ("  (mounted)" if x.mounted else ""))
        if not items and not removed:
            say(args, "no snapshots")
        for pr in problems:
            say(args, f"warning: {pr}")
    return EXIT_WARNINGS if problems else EXIT_OK
