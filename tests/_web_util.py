"""Helpers for the web tests: run ``pointsafe web`` in a subprocess on a free loopback port,
and log in with an HTTP client."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import httpx

PASSWORD = "correct horse battery"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 just now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def web_cmd(safe: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "pointsafe.cli", "--safe", str(safe), "web", *args]


def set_password(safe: Path, password: str = PASSWORD) -> None:
    """``pointsafe web passwd`` with the password on standard input."""
    p = subprocess.run(web_cmd(safe, "passwd"), input=(password + "\n").encode(), capture_output=True, timeout=60)
    assert p.returncode == 0, p.stderr.decode()


class Server:
    """A running ``pointsafe web`` process and its base URL."""

    def __init__(self, proc: subprocess.Popen, url: str, log: Path) -> None:
        self.proc, self.url, self.log = proc, url, log


@contextmanager
def running(safe: Path, *extra: str, scheme: str = "http", timeout: float = 30) -> Iterator[Server]:
    """``pointsafe web --listen 127.0.0.1:PORT`` until the block ends (terminated in finally)."""
    port = free_port()
    log = safe.parent / f"web-{port}.log"
    env = {k: v for k, v in os.environ.items() if k != "POINTSAFE_SAFE"}
    with open(log, "wb") as out:
        proc = subprocess.Popen(web_cmd(safe, "--listen", f"127.0.0.1:{port}", *extra), stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"pointsafe web exited {proc.returncode}: {log.read_text()}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise AssertionError(f"pointsafe web did not listen within {timeout}s: {log.read_text()}") from None
                time.sleep(0.05)
        yield Server(proc, f"{scheme}://127.0.0.1:{port}", log)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)


def login_token(client: httpx.Client) -> str:
    """The token of the login form."""
    r = client.get("/login")
    return re.search(r'name="token" value="([^"]+)"', r.text).group(1)


def login(server: Server, password: str = PASSWORD, **kw) -> httpx.Client:
    """An HTTP client logged in to ``server`` (AssertionError when the login fails)."""
    c = httpx.Client(base_url=server.url, follow_redirects=False, timeout=60, **kw)
    r = c.post("/login", data={"password": password, "token": login_token(c), "next": "/"})
    assert r.status_code == 303, (r.status_code, r.text[:500])
    return c


def csrf_of(html: str) -> str:
    """The CSRF token in a page's forms."""
    return re.search(r'name="csrf" value="([^"]+)"', html).group(1)
