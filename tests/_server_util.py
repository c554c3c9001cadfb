"""Helpers for the server tests: a safe, agents, ``pointsafe serve`` in a subprocess on a free
loopback port, and the agent's CLI against it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import httpx

from conftest import CLI_ENV, PW, Result, run_cli
from pointsafe.cas import Safe
from _web_util import free_port


def make_safe(tmp: Path, *opts: str) -> Path:
    """A new safe made by ``pointsafe init`` (encrypted unless ``opts`` says otherwise)."""
    safe = tmp / "safe"
    run_cli("init", safe, *opts, check=True)
    return safe


def add_agent(safe: Path, name: str, *opts: str) -> str:
    """``pointsafe agent add NAME OPTS``; returns the token it printed."""
    r = run_cli("agent", "add", name, *opts, safe=safe)
    assert r.code == 0, r.err
    return r.out.strip().splitlines()[-1]


class Served:
    """A running ``pointsafe serve`` and its URL."""

    def __init__(self, proc: subprocess.Popen, url: str, log: Path, safe: Path) -> None:
        self.proc, self.url, self.log, self.safe = proc, url, log, safe

    def client(self, token: str | None) -> httpx.Client:
        """An HTTP client sending ``token`` (none when None)."""
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60, verify=False)


def serve_cmd(safe: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "pointsafe.cli", "--safe", str(safe), "serve", *args]


def start(safe: Path, port: int | None = None, *extra: str, scheme: str = "http", timeout: float = 30,
          host: str = "127.0.0.1", env: dict | None = None) -> Served:
    """Start ``pointsafe serve`` on ``host`` (a free port unless given) and wait until it listens
    (on 127.0.0.1 for 0.0.0.0, which includes it)."""
    port = port or free_port()
    log = safe.parent / f"serve-{port}-{time.monotonic_ns()}.log"
    env = {**{k: v for k, v in os.environ.items() if k != "POINTSAFE_SAFE"}, **CLI_ENV, **(env or {})}
    with open(log, "wb") as out:
        proc = subprocess.Popen(serve_cmd(safe, "--listen", f"{host}:{port}", *extra), stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"pointsafe serve exited {proc.returncode}: {log.read_text()}")
        try:
            socket.create_connection(("127.0.0.1" if host == "0.0.0.0" else host, port), timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline:
                stop(proc)
                raise AssertionError(f"pointsafe serve did not listen within {timeout}s: {log.read_text()}") from None
            time.sleep(0.05)
    return Served(proc, f"{scheme}://{'127.0.0.1' if host == '0.0.0.0' else host}:{port}", log, safe)


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> int:
    """Stop the server process (by its pid) and return its exit code."""
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        return proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait(timeout=20)


@contextmanager
def running(safe: Path, *extra: str, scheme: str = "http") -> Iterator[Served]:
    """``pointsafe serve`` until the block ends (stopped in finally)."""
    s = start(safe, None, *extra, scheme=scheme)
    try:
        yield s
    finally:
        stop(s.proc)


def agent_env(token: str | None) -> dict:
    """The environment of an agent's command: its token, and no safe password."""
    return {"POINTSAFE_TOKEN": token, "POINTSAFE_PASSWORD": None, "POINTSAFE_SAFE": None}


def agent(server: Served, token: str | None, *args, env: dict | None = None, timeout: float = 300) -> Result:
    """``pointsafe ARGS --server URL`` as an agent with ``token`` (from the environment)."""
    return run_cli(*args, "--server", server.url, env={**agent_env(token), **(env or {})}, timeout=timeout)


def agent_popen(server: Served, token: str, *args) -> subprocess.Popen:
    """The agent's command started in the background (stdout and stderr piped)."""
    env = {k: v for k, v in os.environ.items() if k not in ("POINTSAFE_SAFE", "POINTSAFE_PASSWORD")}
    env["POINTSAFE_TOKEN"] = token
    cmd = [sys.executable, "-m", "pointsafe.cli", *[str(a) for a in args], "--server", server.url]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)


def backup_json(server: Served, token: str, source: Path, *opts: str) -> dict:
    """A backup through the server with --json; its record (with ``upload`` counters)."""
    r = agent(server, token, "backup", source, "--json", "-q", *opts)
    assert r.code == 0, r.err
    return json.loads(r.out)


def safe_state(safe: Path) -> tuple[int, int, list[str]]:
    """(objects, bytes of records, point ids) of the safe, read beside the running server."""
    with Safe.open(safe, password=PW, write=False) as s:
        c = s.counters()
        return c.objects, c.pack_bytes, sorted(p.id for p in s.points())


def chunk_bytes(safe: Path) -> int:
    """The raw bytes of the chunks the safe holds (unique file data)."""
    with Safe.open(safe, password=PW, write=False) as s:
        return s.counters().chunk_raw_bytes


def self_signed(tmp: Path, ip: str = "127.0.0.1") -> tuple[Path, Path]:
    """A self-signed certificate for ``ip`` (as its subjectAltName, which clients check) and its key."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pointsafe test server")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    cp, kp = tmp / "cert.pem", tmp / "key.pem"
    cp.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    kp.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption()))
    return cp, kp
