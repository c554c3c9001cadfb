"""Running the server: where it may listen (TLS off loopback), and the uvicorn process."""

from __future__ import annotations

import os
from collections.abc import Callable

from pointsafe.cas import Safe, UsageError
from pointsafe.ops.listener import Listen, parse_listen, run_asgi

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


def serve(safes: Safe | list[Safe], listen: Listen, tls_cert: str | None = None, tls_key: str | None = None,
          announce: Callable[[], None] | None = None) -> None:
    """Serve the API of the open ``safes`` (one, or several on one listener: each request goes
    to the safe whose agent holds its token, server.router) until SIGINT or SIGTERM (one
    uvicorn process, as ``pointsafe web``; a SIGTERM is a clean stop: the safes are closed,
    nothing half-written)."""
    from .app import DEFAULT_RATE, TaskLog, create_app
    from .router import SafeRouter
    from .service import SESSION_IDLE, Service
    served = safes if isinstance(safes, list) else [safes]
    # $POINTSAFE_SERVER_RATE: requests a second per agent; $POINTSAFE_SERVER_IDLE: seconds after
    # which an agent's unfinished backup stops holding the safe (docs/SERVER.md)
    rate = number_from_env("POINTSAFE_SERVER_RATE", DEFAULT_RATE, "requests a second")
    idle = number_from_env("POINTSAFE_SERVER_IDLE", SESSION_IDLE, "seconds")
    services: list[Service] = []
    histories: list[TaskLog] = []
    try:
        for safe in served:
            services.append(Service(safe, idle))
            histories.append(TaskLog(safe))
        apps = [(s.safe, create_app(s, rate, h)) for s, h in zip(services, histories)]
        app = apps[0][1] if len(apps) == 1 else SafeRouter(apps)  # type: ignore[arg-type]  # Starlette is an ASGI app
        run_asgi(app, listen, tls_cert, tls_key, announce=announce, name="serve")
    finally:
        for history in histories:
            history.close()      # the requests' tasks still waiting are written before the safe closes
        for service in services:
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
