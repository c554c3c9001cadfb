"""``pointsafe serve``: serve the safe to agents over HTTP(S) (pointsafe.server)."""

from __future__ import annotations

from .common import EXIT_OK, add_common, add_listen_options, announce_serving, open_safe


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
    p.set_defaults(func=cmd_serve)


def cmd_serve(args) -> int:
    """``pointsafe serve``: serve the open safe to agents until stopped."""
    from pointsafe.server.run import DEFAULT_LISTEN, check_listen, parse_listen, serve
    listen = parse_listen(args.listen or DEFAULT_LISTEN)
    check_listen(listen, args.tls_cert, args.tls_key)
    with open_safe(args, write=True) as safe:
        serve(safe, listen, args.tls_cert, args.tls_key,
              announce=announce_serving(f"{safe.path} to agents", listen, bool(args.tls_cert)))
    return EXIT_OK
