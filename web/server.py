"""Running the dashboard: where it may listen, and the uvicorn server.

It listens on loopback by default. Any other address is refused unless the server speaks TLS
(``--tls-cert``/``--tls-key``) and a web password is set: a login over plain HTTP on a network
would hand the password and the session cookie, and so every file in the safe, to anyone
on the path. Whatever the address, no page is served without a login (``pointsafe web passwd``).
"""

from __future__ import annotations

from collections.abc import Callable

from pointsafe.cas import Safe, UsageError
from pointsafe.ops.listener import Listen, bind, parse_listen, run_asgi

__all__ = ["DEFAULT_LISTEN", "Listen", "bind", "check_listen", "parse_listen", "serve"]

DEFAULT_LISTEN = "127.0.0.1:8080"


def check_listen(listen: Listen, tls_cert: str | None, tls_key: str | None, has_password: bool) -> None:
    """Refuse (UsageError, one line) what must not run: a password not set, half a TLS
    setting, or an address other than loopback without TLS and a password."""
    if bool(tls_cert) != bool(tls_key):
        raise UsageError("give both --tls-cert and --tls-key (or neither)")
    if not has_password:
        raise UsageError("no web password is set for this safe: set one with 'pointsafe web passwd' "
                         "(the dashboard always asks for a login)")
    if not listen.loopback and not tls_cert:
        raise UsageError(f"refusing to listen on {listen.host}, which is not a loopback address, without TLS: "
                         "give --tls-cert and --tls-key (the login and every file would cross the network in clear)")


def serve(safe: Safe, listen: Listen, tls_cert: str | None = None, tls_key: str | None = None,
          announce: Callable[[], None] | None = None) -> None:
    """Serve the dashboard of the open ``safe`` until SIGINT or SIGTERM (uvicorn, one process);
    ``announce`` is called once the TLS files loaded and the socket listens."""
    from .app import create_app
    run_asgi(create_app(safe, tls=bool(tls_cert)), listen, tls_cert, tls_key, announce=announce, name="web")
