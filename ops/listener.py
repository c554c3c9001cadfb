"""Listening for HTTP(S): the address (``--listen``), the socket, TLS files and one uvicorn
process, shared by the dashboard (``pointsafe web``, web/) and the safe server (``pointsafe
serve``, server/), which each add their own rules of where they may listen."""

from __future__ import annotations

import ipaddress
import logging
import signal
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass

from pointsafe.cas import UsageError

__all__ = ["Listen", "bind", "check_tls", "log_config", "parse_listen", "run_asgi"]


@dataclass(frozen=True)
class Listen:
    """A host and port to listen on, and whether every address of the host is loopback."""

    host: str
    port: int
    loopback: bool


def parse_listen(text: str) -> Listen:
    """``HOST:PORT``, ``[V6]:PORT`` or ``PORT`` (on 127.0.0.1); UsageError otherwise."""
    t = text.strip()
    if t.isdigit():
        host, port_text = "127.0.0.1", t
    elif t.startswith("["):
        host, sep, port_text = t[1:].partition("]:")
        if not sep:
            raise UsageError(f"bad --listen {text!r}: use [ADDRESS]:PORT for IPv6")
    else:
        host, sep, port_text = t.rpartition(":")
        if not sep or not host:
            raise UsageError(f"bad --listen {text!r}: use HOST:PORT, e.g. 127.0.0.1:8080")
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise UsageError(f"bad --listen {text!r}: the port must be a number from 1 to 65535")
    return Listen(host, int(port_text), _is_loopback(host))


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        raise UsageError(f"bad --listen host {host!r}: it does not resolve") from None
    return bool(infos) and all(ipaddress.ip_address(i[4][0]).is_loopback for i in infos)


def check_tls(cert: str, key: str) -> None:
    """UsageError (one line) when the certificate and key cannot be loaded together."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as e:
        raise UsageError(f"cannot use --tls-cert {cert} / --tls-key {key}: {e}") from None


def bind(listen: Listen) -> socket.socket:
    """A listening socket on the address (OSError, e.g. the port is in use, when it cannot)."""
    family = socket.AF_INET6 if ":" in listen.host else socket.AF_INET
    try:
        addr = socket.getaddrinfo(listen.host, listen.port, family, socket.SOCK_STREAM)[0][4]
    except OSError:
        raise UsageError(f"bad --listen host {listen.host!r}: it does not resolve") from None
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Connections accepted from it inherit TCP_NODELAY (Linux). uvicorn sets it only on sockets
    # it binds itself; without it every answer after the first on a kept-alive connection
    # waited ~40 ms for the browser's delayed ACK (Nagle).
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        s.bind(addr)
        s.listen(128)
    except OSError as e:
        s.close()
        raise UsageError(f"cannot listen on {listen.host}:{listen.port}: {e.strerror or e}") from None
    s.set_inheritable(True)
    return s


class OneLine(logging.Formatter):
    """Server log lines on one line, ``pointsafe NAME: ...``: an error's message without a
    traceback; a bug (ops.logs.is_bug) names the crash log that holds its traceback, as the
    CLI does."""

    def __init__(self, prefix: str = "pointsafe web") -> None:
        super().__init__()
        self.prefix = prefix

    def format(self, record: logging.LogRecord) -> str:
        from pointsafe.ops import logs
        msg = " ".join(record.getMessage().split())
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None:
            if logs.is_bug(exc):
                try:
                    where = logs.record_bug(exc)
                except Exception:
                    where = None
                msg = f"{msg}: {logs.bug_line(exc, where)}"
            else:
                msg = f"{msg}: {' '.join(str(exc).split())}"
        return f"{self.prefix}: {msg}"


def log_config(name: str) -> dict:
    """uvicorn's logging: one line per message on stderr, ``pointsafe NAME: ...``."""
    return {
        "version": 1, "disable_existing_loggers": False,
        "formatters": {"one": {"()": OneLine, "prefix": f"pointsafe {name}"}},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "one", "stream": "ext://sys.stderr"}},
        "loggers": {"uvicorn": {"handlers": ["stderr"], "level": "WARNING", "propagate": False},
                    "uvicorn.error": {"handlers": ["stderr"], "level": "WARNING", "propagate": False},
                    "uvicorn.access": {"handlers": [], "level": "WARNING", "propagate": False},
                    "pointsafe.web": {"handlers": ["stderr"], "level": "INFO"}},
    }


def _server_class():
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, but a stop asked for by SIGINT or SIGTERM is a clean exit (the
        command returns 0 after closing the safe) instead of dying by the signal afterwards."""

        def handle_exit(self, sig, frame) -> None:
            super().handle_exit(sig, frame)
            captured = getattr(self, "_captured_signals", None)
            if isinstance(captured, list):
                captured.clear()

    return Server


def run_asgi(app: Callable[..., object], listen: Listen, tls_cert: str | None = None, tls_key: str | None = None,
             announce: Callable[[], None] | None = None, name: str = "web") -> None:
    """Serve the ASGI ``app`` on ``listen`` until SIGINT or SIGTERM (uvicorn, one process; the
    stop is a clean return); ``announce`` is called once the TLS files loaded and the socket
    listens. Log lines read ``pointsafe NAME: ...``."""
    import uvicorn

    _Server = _server_class()
    if tls_cert and tls_key:
        check_tls(tls_cert, tls_key)
    # A stop asked for before uvicorn installs its own handlers (from the moment the socket
    # listens, a client can see the server and signal it) ends the run cleanly too.
    server = None
    stop: list[int] = []

    def early_stop(sig: int, frame: object) -> None:
        stop.append(sig)
        if server is not None:
            server.should_exit = True

    previous = {s: signal.signal(s, early_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        sock = bind(listen)
        if announce is not None:
            announce()
        config = uvicorn.Config(app, host=listen.host, port=listen.port,
                                ssl_certfile=tls_cert, ssl_keyfile=tls_key, log_config=log_config(name),
                                log_level="warning", access_log=False, lifespan="off", server_header=False,
                                proxy_headers=False)
        server = _Server(config)
        if not stop:
            server.run(sockets=[sock])
        sock.close()
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
