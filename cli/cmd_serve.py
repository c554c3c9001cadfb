"""``pointsafe serve``: serve the safe to agents over HTTP(S) (pointsafe.server)."""

from __future__ import annotations

from .common import EXIT_OK, add_common, add_listen_options, announce_serving


def register(sub) -> None:
    """Add the ``serve`` command to the subparsers ``sub``."""
    p = sub.add_parser("serve", help="serve the safe to backup agents over HTTPS",
                       description="Serve the safe to agents ('pointsafe agent add' makes their tokens): they back "
                                   "up with 'pointsafe backup SOURCE --server URL', list and restore their own "
                                   "points with --server. Listens on 127.0.0.1:8443 unless --listen says "
                                   "otherwise; an address that is not loopback needs --tls-cert and --tls-key. "
                                   "The API is described in docs/SERVER.md and at /api/openapi.json. Stops on "
                                   "Ctrl-C or SIGTERM.")
    add_common(p)
    add_listen_options(p, "127.0.0.1:8443")
    p.add_argument("more", nargs="*", metavar="SAFE",
                   help="more safes to serve on the same address, beside --safe: each request goes to the safe "
                        "whose agent holds its token (agents are added to each safe with "
                        "'pointsafe --safe SAFE agent add'); every safe is unlocked with the same password")
    p.set_defaults(func=cmd_serve)


def cmd_serve(args) -> int:
    """``pointsafe serve``: serve the open safe(s) to agents until stopped."""
    from contextlib import ExitStack
    from pathlib import Path

    from pointsafe.cas import UsageError
    from pointsafe.server.run import DEFAULT_LISTEN, check_listen, parse_listen, serve

    from . import password
    from .common import safe_path
    listen = parse_listen(args.listen or DEFAULT_LISTEN)
    check_listen(listen, args.tls_cert, args.tls_key)
    paths = [safe_path(args)] + [Path(m) for m in args.more]
    real = [p.resolve() for p in paths]
    if len(set(real)) != len(real):
        raise UsageError("the same safe is named twice: each safe is served once")
    with ExitStack() as stack:
        safes = [stack.enter_context(password.open_safe(args, p, write=True)) for p in paths]
        names = ", ".join(str(s.path) for s in safes)
        serve(safes, listen, args.tls_cert, args.tls_key,
              announce=announce_serving(f"{names} to agents", listen, bool(args.tls_cert)))
    return EXIT_OK
