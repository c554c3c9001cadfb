"""Helpers for the ops tests: JSON from the CLI, a small loop-mounted ext4, a syslog socket."""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
from contextlib import contextmanager
from pathlib import Path

from conftest import run_cli


def cli_json(*args, safe: Path, env: dict | None = None, ok_codes=(0,)):
    r = run_cli(*args, "--json", safe=safe, env=env)
    assert r.code in ok_codes, f"pointsafe {' '.join(map(str, args))} exited {r.code}: {r.err}"
    return json.loads(r.out), r


def task_list(safe: Path, *extra) -> list[dict]:
    return cli_json("tasks", *extra, safe=safe)[0]


def open_alerts(safe: Path, env: dict | None = None) -> list[dict]:
    return cli_json("alerts", safe=safe, env=env)[0]


@contextmanager
def loop_ext4(tmp_path: Path, size_mib: int = 64):
    """A fresh ext4 filesystem of ``size_mib`` MiB on a loop device, mounted; unmounted after."""
    img = tmp_path / "fs.img"
    mnt = tmp_path / "fs"
    mnt.mkdir()
    with open(img, "wb") as f:
        f.truncate(size_mib << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", str(img)], check=True, timeout=60)
    subprocess.run(["mount", "-o", "loop", str(img), str(mnt)], check=True, timeout=60)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], timeout=60)


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def fill_until_free_pct(fs: Path, pct: float, name: str = "filler") -> Path:
    """Write a real file on ``fs`` until its free space is about ``pct`` percent."""
    st = os.statvfs(fs)
    total = st.f_blocks * st.f_frsize
    target = int(total * pct / 100)
    filler = fs / name
    with open(filler, "ab") as f:
        while True:
            free = free_bytes(fs)
            if free <= target:
                break
            n = min(1 << 20, free - target)
            try:
                f.write(b"\xa5" * max(n, 4096))
                f.flush()
                os.fsync(f.fileno())
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
                break
    return filler


class SyslogReceiver:
    """A unix datagram socket standing in for /dev/log: what pointsafe sends, we read."""

    def __init__(self, path: Path):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(5)

    def messages(self) -> list[str]:
        out = []
        self.sock.setblocking(False)
        try:
            while True:
                out.append(self.sock.recv(65536).decode(errors="replace"))
        except BlockingIOError:
            pass
        return out

    def close(self) -> None:
        self.sock.close()
