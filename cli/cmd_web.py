"""The web dashboard command: ``pointsafe web`` serves it, ``pointsafe web passwd`` sets its password."""

from __future__ import annotations

import getpass
import sys

from pointsafe.cas import UsageError

from .common import EXIT_OK, add_common, add_listen_options, announce_serving, open_safe, say


def register(sub) -> None:
    """Add the ``web`` command (and ``web passwd``) to the subparsers ``sub``."""
    p = sub.add_parser("web", help="serve the web dashboard of the safe",
                       description="Serve a web dashboard of the safe: status, task history, alerts (to "
                                   "acknowledge), points, a file browser and downloads (files, directories as "
                                   ".tar or .zip, volume images), diffs. Every page asks for a login with the "
                                   "password set by 'pointsafe web passwd'; the login can read every file in "
                                   "the safe (root-equivalent). It listens on 127.0.0.1:8080 unless --listen "
                                   "says otherwise; an address that is not loopback needs --tls-cert and "
                                   "--tls-key. Stops on Ctrl-C or SIGTERM. See docs/WEB.md.")
    add_common(p)
    add_listen_options(p, "127.0.0.1:8080")
    p.set_defaults(func=cmd_web)
    wsub = p.add_subparsers(dest="web_cmd", metavar="passwd")
    s = wsub.add_parser("passwd", help="set the dashboard's login password",
                        description="Set the password of the safe's web dashboard (stored in the safe as an "
                                    "Argon2id hash). On a terminal it asks twice; otherwise it reads one line "
                                    "from standard input. Sessions opened under the old password end.")
    add_common(s)
    s.set_defaults(func=cmd_web_passwd)


def _read_password() -> str:
    if sys.stdin.isatty():
        first = getpass.getpass("new web password: ")
        if getpass.getpass("again: ") != first:
            raise UsageError("the two passwords differ; nothing changed")
        return first
    line = sys.stdin.readline()
    return line[:-1] if line.endswith("\n") else line


def cmd_web_passwd(args) -> int:
    """``pointsafe web passwd``: store a new dashboard password (hashed) in the safe."""
    from pointsafe.web.auth import set_password
    password = _read_password()
    with open_safe(args) as safe:
        set_password(safe.index, password)
    say(args, "web password set")
    return EXIT_OK


def cmd_web(args) -> int:
    """``pointsafe web``: serve the dashboard of the open safe until stopped."""
    from pointsafe.web.auth import password_hash
    from pointsafe.web.server import DEFAULT_LISTEN, check_listen, parse_listen, serve
    listen = parse_listen(args.listen or DEFAULT_LISTEN)
    with open_safe(args) as safe:
        check_listen(listen, args.tls_cert, args.tls_key, password_hash(safe.index) is not None)
        serve(safe, listen, args.tls_cert, args.tls_key,
              announce=announce_serving(str(safe.path), listen, bool(args.tls_cert)))
    return EXIT_OK
