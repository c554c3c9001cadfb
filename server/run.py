"""Running the server: where it may listen (TLS off loopback), and the uvicorn process."""

from __future__ import annotations

import os
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
    from .app import DEFAULT_RATE, TaskLog, create_app
    from .service import SESSION_IDLE, Service
    # $POINTSAFE_SERVER_RATE: requests a second per agent; $POINTSAFE_SERVER_IDLE: seconds after
    # which an agent's unfinished backup stops holding the safe (docs/SERVER.md)
    rate = number_from_env("POINTSAFE_SERVER_RATE", DEFAULT_RATE, "requests a second")
    service = Service(safe, number_from_env("POINTSAFE_SERVER_IDLE", SESSION_IDLE, "seconds"))
    history = TaskLog(safe)
    try:
        serve_asgi(safe, listen, tls_cert, tls_key, announce=announce, app=create_app(service, rate, history))
    finally:
        history.close()      # the requests' tasks still waiting are written before the safe closes
        service.close()


def number_from_env(name: str, default: float, unit: str) -> float:
    """The positive number in $``name`` (``unit`` says what it counts, for the error), or
    ``default`` when it is not set; UsageError for anything else."""
    text = os.environ.get(name, "")
    try:
        value = float(text) if text else default
    except ValueError:
        raise UsageError(f"bad {name} {text!r}: a number of {unit}") from None
    if value <= 0:
        raise UsageError(f"bad {name} {text!r}: it must be more than 0")
    return value
