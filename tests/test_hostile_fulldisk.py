"""Repair on a full disk: one clear line, and the safe stays as it was."""

from __future__ import annotations

import os

from _cas_util import fill_disk, tmpfs
from conftest import needs_root, run_cli


@needs_root
def test_repair_on_a_full_disk_fails_cleanly_and_keeps_the_safe(tmp_path):
    with tmpfs(tmp_path / "fs", "24m") as fs:
        safe_dir = fs / "safe"
        run_cli("init", safe_dir, check=True)
        src = tmp_path / "src"
        src.mkdir()
        (src / "f").write_bytes(os.urandom(2_000_000))
        run_cli("backup", src, safe=safe_dir, check=True)
        fill_disk(fs)
        r = run_cli("repair", safe=safe_dir)
        assert r.code == 1, (r.code, r.err)          # was SIGBUS (-7) inside LMDB
        assert "internal error" not in r.err
        assert r.err.strip().splitlines()[-1].startswith("pointsafe: error: disk full"), r.err
        assert not (safe_dir / "index.rebuild").exists()
        run_cli("verify", safe=safe_dir, check=True)
        (fs / "filler").unlink()
        run_cli("repair", safe=safe_dir, check=True)
        out = tmp_path / "out"
        run_cli("restore", "latest", out, safe=safe_dir, check=True)
        assert (out / "f").read_bytes() == (src / "f").read_bytes()
