"""A version-2 safe made by the old pointsafe (commit 6c8065c, /work/wt-old) and written to by
both: the totals ``status`` shows must follow what the old one wrote."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from conftest import run_cli

OLD = Path("/work/wt-old/.venv/bin/pointsafe")
needs_old = pytest.mark.skipif(not OLD.exists(), reason="the old pointsafe (commit 6c8065c) is not installed")


def _old(*args) -> None:
    subprocess.run([str(OLD), *map(str, args)], check=True, capture_output=True, timeout=300)


def _totals(safe_dir: Path) -> tuple[int, int]:
    st = json.loads(run_cli("--json", "status", safe=safe_dir).out)["safe"]
    return st["packs"], st["pack_bytes"]


@needs_old
def test_status_totals_follow_writes_of_an_older_pointsafe(tmp_path):
    safe_dir = tmp_path / "safe"
    _old("init", safe_dir)
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(os.urandom(300_000))
    _old("--safe", safe_dir, "backup", src)
    run_cli("backup", "--name", "new", src, safe=safe_dir, check=True)   # stores the totals
    (src / "b").write_bytes(os.urandom(3_000_000))
    _old("--safe", safe_dir, "backup", src)                            # changes them, unknowing
    v = json.loads(run_cli("--json", "verify", safe=safe_dir, check=True).out)
    packs, pack_bytes = _totals(safe_dir)
    assert packs == v["packs"]
    assert pack_bytes >= v["bytes_checked"] > pack_bytes - 64 * packs, (pack_bytes, v)
    run_cli("backup", "--name", "new", src, safe=safe_dir, check=True)   # the writer stores them again
    v = json.loads(run_cli("--json", "verify", safe=safe_dir, check=True).out)
    packs, pack_bytes = _totals(safe_dir)
    assert pack_bytes >= v["bytes_checked"] > pack_bytes - 64 * packs, (pack_bytes, v)
