"""Running the server: where it may listen (TLS off loopback), and the uvicorn process."""

from __future__ import annotations

from collections.abc import Callable

from pointsafe.cas import Safe, UsageError
from pointsafe.web.server import Listen, parse_listen
from pointsafe.web.server import serve as serve_asgi

DEFAULT_LISTEN = "127.0.0.1:8443"

__all__ = ["DEFAULT_LISTEN", "check_listen", "parse_listen", "serve"]


def check_listen(listen: Listen, tls_cert: str | None, tls_key: str | None) -> None:
    """Refuse (UsageError, one line) half a TLS setting, or an address other than loopback
    without TLS (agent tokens and every file backed up would cross the network in clear)."""
    if bool(tls_cert) != bool(tls_key):
        raise UsageError("give both --tls-cert and --tls-key (or neither)")
    if not listen.loopback and not tls_cert:
        raise UsageError(f"refusing to listen on {listen.host}, which is not a loopback address, without TLS: "
                         "give --tls-cert and --tls-key (agent tokens and every file would cross the network in clear)")


def serve(safe: Safe, listen: Listen, tls_cert: str | None = None, tls_key: str | None = None,
          announce: Callable[[], None] | None = None) -> None:
    """Serve the API of the open ``safe`` until SIGINT or SIGTERM (one uvicorn process, as
    ``pointsafe web``; a SIGTERM is a clean stop: the safe is closed, nothing half-written)."""
    from .app import create_app, rate_from_env
    from .service import Service
    serve_asgi(safe, listen, tls_cert, tls_key, announce=announce, app=create_app(Service(safe), rate_from_env()))
