"""``pointsafe agent``: the agents a served safe accepts; and the agent's side of backup, points
and restore with ``--server URL`` (pointsafe.server.client)."""

from __future__ import annotations

import sys

from pointsafe.cas import UsageError

from .common import EXIT_OK, EXIT_WARNINGS, add_common, emit_json, human_bytes, open_safe, progress, say


def register(sub) -> None:
    """Add the ``agent`` command (add, list, remove, rotate) to the subparsers ``sub``."""
    p = sub.add_parser("agent", help="manage the agents that back up through 'pointsafe serve'",
                       description="The agents 'pointsafe serve' accepts. Each has a token (printed once by "
                                   "'add' and 'rotate'; the safe keeps only its SHA-256), the sources it may "
                                   "back up, and whether it may read its own points back (--can-restore). An "
                                   "agent never sees another agent's points or objects. See docs/SERVER.md.")
    add_common(p)
    asub = p.add_subparsers(dest="agent_cmd", metavar="add|set|list|remove|rotate")
    s = asub.add_parser("add", help="add an agent and print its token (once)")
    add_common(s)
    s.add_argument("name", metavar="NAME")
    s.add_argument("--sources", nargs="+", default=[], metavar="PATH",
                   help="absolute paths (on the agent) it may back up, and what lies below them (default: any)")
    s.add_argument("--can-restore", action="store_true", help="it may read its own points' files (restore)")
    _quota_options(s)
    s.add_argument("--admin", action="store_true",
                   help="an admin token instead: it may call the admin routes over HTTP (list agents, forget "
                        "points) and nothing else")
    s.set_defaults(func=cmd_agent_add)
    s = asub.add_parser("set", help="change an agent's sources, rights or quotas (its token stays)")
    add_common(s)
    s.add_argument("name", metavar="NAME")
    s.add_argument("--sources", nargs="+", metavar="PATH", help="the paths it may back up ('/' for any)")
    s.add_argument("--can-restore", dest="can_restore", action="store_const", const=True, default=None,
                   help="it may read its own points' files")
    s.add_argument("--no-can-restore", dest="can_restore", action="store_const", const=False,
                   help="it may not read files back")
    _quota_options(s)
    s.set_defaults(func=cmd_agent_set)
    s = asub.add_parser("list", help="list the agents, their points, bytes stored and quotas")
    add_common(s)
    s.add_argument("--recount", action="store_true",
                   help="count every agent's bytes stored again, in full (after gc; reads every object's entry)")
    s.set_defaults(func=cmd_agent_list)
    s = asub.add_parser("remove", help="remove an agent (its token stops working; its points stay)")
    add_common(s)
    s.add_argument("name", metavar="NAME")
    s.set_defaults(func=cmd_agent_remove)
    s = asub.add_parser("rotate", help="give an agent a new token (the old one stops working)")
    add_common(s)
    s.add_argument("name", metavar="NAME")
    s.set_defaults(func=cmd_agent_rotate)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _quota_options(s) -> None:
    s.add_argument("--quota-soft", metavar="SIZE",
                   help="bytes stored (e.g. 50G) beyond which the server raises an alert, or off")
    s.add_argument("--quota-hard", metavar="SIZE",
                   help="bytes stored beyond which its uploads are refused (507), or off")


def _quotas(args) -> dict:
    """The quota fields the options give (parsed; absent options are left out)."""
    from pointsafe.server import agents
    return {f"quota_{w}": agents.parse_quota(v, f"--quota-{w}")
            for w in ("soft", "hard") if (v := getattr(args, f"quota_{w}")) is not None}


def add_server_options(p) -> None:
    """--server and --token-file, for a command an agent runs against 'pointsafe serve'."""
    p.add_argument("--server", metavar="URL",
                   help="work through 'pointsafe serve' at URL as an agent (token: $POINTSAFE_TOKEN or --token-file)")
    p.add_argument("--token-file", metavar="FILE", help="read the agent token from the first line of FILE")


def _print_token(args, rec: dict, token: str, what: str) -> None:
    if args.json:
        emit_json({**rec, "token": token})
        return
    say(args, f"agent {rec['name']} {what}; its token (shown once, keep it secret):")
    print(token, flush=True)


def cmd_agent_add(args) -> int:
    """``pointsafe agent add NAME``: a new agent; prints its token once."""
    from pointsafe.server import agents
    quotas = _quotas(args)
    with open_safe(args, write=True) as safe:
        a, token = agents.add(safe, args.name, args.sources, args.can_restore, admin=args.admin, **quotas)
    _print_token(args, a.to_record(with_hash=False), token, "added")
    return EXIT_OK


def cmd_agent_set(args) -> int:
    """``pointsafe agent set NAME [--sources ...] [--[no-]can-restore] [--quota-soft|hard SIZE]``."""
    from pointsafe.server import agents
    changes = _quotas(args)
    if args.sources is not None:
        changes["sources"] = [] if args.sources == ["/"] else args.sources
    if args.can_restore is not None:
        changes["can_restore"] = args.can_restore
    if not changes:
        raise UsageError("nothing to change: give --sources, --can-restore, --no-can-restore, --quota-soft or --quota-hard")
    with open_safe(args, write=True) as safe:
        a = agents.update(safe, args.name, changes)
    if args.json:
        emit_json(a.to_record(with_hash=False))
    else:
        say(args, f"agent {a.name}: sources {', '.join(a.sources) or '(any)'}, restore "
                  f"{'yes' if a.can_restore else 'no'}, quotas {_size(a.quota_soft)} soft, {_size(a.quota_hard)} hard")
    return EXIT_OK


def _size(n: int | None) -> str:
    return "off" if n is None else human_bytes(n)


def cmd_agent_rotate(args) -> int:
    """``pointsafe agent rotate NAME``: a new token for the agent; prints it once."""
    from pointsafe.server import agents
    with open_safe(args, write=True) as safe:
        a, token = agents.rotate(safe, args.name)
    _print_token(args, a.to_record(with_hash=False), token, "has a new token")
    return EXIT_OK


def cmd_agent_remove(args) -> int:
    """``pointsafe agent remove NAME``: the agent's token stops working."""
    from pointsafe.server import agents
    with open_safe(args, write=True) as safe:
        a = agents.remove(safe, args.name)
    if args.json:
        emit_json(a.to_record(with_hash=False))
    else:
        say(args, f"agent {a.name} removed (its points stay in the safe)")
    return EXIT_OK


def cmd_agent_list(args) -> int:
    """``pointsafe agent list [--recount]``: every agent, with its sources, rights, points,
    bytes stored and quotas (never a token)."""
    from pointsafe.server import agents
    with open_safe(args, write=True if args.recount else None) as safe:
        rows = agents.listing(safe, recount_first=args.recount)
    if args.json:
        emit_json(rows)
        return EXIT_OK
    if not rows:
        say(args, "no agents")
        return EXIT_OK
    say(args, f"{'NAME':20} {'RESTORE':7} {'POINTS':>6}  {'LAST CONTACT (UTC)':20} {'STORED':>10} {'SOFT':>10} "
              f"{'HARD':>10}  SOURCES")
    for a in rows:
        rights = "admin" if a["admin"] else ("yes" if a["can_restore"] else "no")
        say(args, f"{a['name'][:20]:20} {rights:7} {a['points']:>6}  {(a['last_contact'] or 'never')[:19]:20} "
                  f"{human_bytes(a['stored_bytes']):>10} {_size(a['quota_soft']):>10} {_size(a['quota_hard']):>10}  "
                  f"{', '.join(a['sources']) or '(any)'}")
    return EXIT_OK


# -- the agent's side ------------------------------------------------------------------------

def _remote(args):
    from pointsafe.server.client import Remote, read_token
    return Remote(args.server, read_token(getattr(args, "token_file", None)))


def backup_remote(args, opts) -> int:
    """``pointsafe backup SOURCE --server URL``: back up through the server as an agent, with
    ``opts`` (ingest's BackupOptions, as a local backup's: snapshot, hooks)."""
    from pointsafe.server.client import remote_backup
    remote = _remote(args)
    if not opts.full_read and (opts.changed_blocks or not opts.volume):
        opts.full_read = _full_read_due(remote, opts, args.source)
    with progress(args, None, f"backing up {args.source} to {args.server}") as advance:
        p, warnings, sent, notes = remote_backup(remote, args.source, opts, progress=advance)
    if args.json:
        emit_json({**p.to_record(), "upload": sent})
    else:
        for w in warnings:
            print(f"warning: {w['path']}: {w['message']}", file=sys.stderr)
        for n in notes:
            say(args, f"note: {n}")
        st = p.stats
        say(args, f"point {p.id[:12]} ({p.name}, {p.kind}) on {args.server}: {st.get('files', 0)} files, "
                  f"{human_bytes(st.get('bytes_read', 0))} read, {sent['objects_uploaded']} of "
                  f"{sent['objects_offered']} objects uploaded ({human_bytes(sent['bytes_uploaded'])})"
                  + (f", {len(warnings)} warnings" if warnings else ""))
    return EXIT_WARNINGS if warnings else EXIT_OK


def _full_read_due(remote, opts, source: str) -> bool:
    """Whether the server's ``cbt.full_every`` makes this agent's incremental a full read (as
    for a local backup: cmd_backup.full_read_due over the agent's own points). A server that
    does not say, or says something that is not a duration, makes none."""
    from pointsafe.cas import UsageError
    from pointsafe.ops import config

    from .cmd_backup import full_read_due
    every = remote.info().get("cbt_full_every")
    if not isinstance(every, str):
        return False
    try:
        config.check("cbt.full_every", every)
    except UsageError:
        return False
    return full_read_due(remote.points(), {"cbt.full_every": every}, opts, source)


def remote_points(args) -> list:
    """The points of this agent on ``--server`` (``pointsafe points --server URL``)."""
    return _remote(args).points()


def restore_remote(args) -> tuple:
    """``pointsafe restore POINT TARGET --server URL``: restore one of this agent's points;
    returns (the point, ingest's RestoreStats)."""
    from pointsafe.server.client import remote_restore, resolve
    remote = _remote(args)
    p = resolve(remote, args.point)
    with progress(args, p.size, f"restoring {p.id[:12]} from {args.server}") as advance:
        st = remote_restore(remote, p, args.target, subpath=args.path, force=args.force, progress=advance)
    return p, st
