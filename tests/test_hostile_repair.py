"""Repair after gc: records of dead nodes that gc left in packs it did not compact."""

from __future__ import annotations

import os

from conftest import run_cli


def _write(src, name: str, size: int) -> None:
    (src / name).write_bytes(os.urandom(size))


def test_repair_after_gc_leaves_a_safe_that_verifies(tmp_path, safe_dir):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(4):
        _write(src, f"f{i}", 600_000)
    run_cli("backup", src, safe=safe_dir, check=True)
    for _ in range(3):
        _write(src, "f0", 600_000)      # the old f0 and the old trees die when forgotten
        run_cli("backup", src, safe=safe_dir, check=True)
    run_cli("forget", "--keep-last", "1", safe=safe_dir, check=True)
    run_cli("gc", safe=safe_dir, check=True)
    run_cli("verify", safe=safe_dir, check=True)
    r = run_cli("repair", safe=safe_dir)
    assert r.code == 0, r.out + r.err
    assert "missing" not in r.out
    r = run_cli("verify", safe=safe_dir)
    assert r.code == 0, r.out + r.err
    # The safe keeps working: gc, a new backup, a restore of every file.
    run_cli("gc", safe=safe_dir, check=True)
    run_cli("backup", src, safe=safe_dir, check=True)
    run_cli("verify", safe=safe_dir, check=True)
    out = tmp_path / "out"
    run_cli("restore", "latest", out, safe=safe_dir, check=True)
    for i in range(4):
        assert (out / f"f{i}").read_bytes() == (src / f"f{i}").read_bytes()


def test_backup_refuses_a_safe_with_a_missing_pack_and_heals_after_repair(tmp_path, safe_dir):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        _write(src, f"f{i}", 300_000)
    run_cli("backup", src, safe=safe_dir, check=True)
    packs = sorted((safe_dir / "packs").iterdir())
    packs[-1].unlink()        # the newest pack: the nodes and the point written last
    r = run_cli("backup", "--name", "again", src, safe=safe_dir)
    assert r.code == 1 and "is missing" in r.err and "'pointsafe repair'" in r.err, r.err
    run_cli("repair", safe=safe_dir)                  # exits 1: objects were lost
    run_cli("backup", "--name", "again", src, safe=safe_dir, check=True)
    run_cli("gc", safe=safe_dir, check=True)
    run_cli("verify", safe=safe_dir, check=True)
    out = tmp_path / "out"
    run_cli("restore", "again@latest", out, safe=safe_dir, check=True)
    for i in range(3):
        assert (out / f"f{i}").read_bytes() == (src / f"f{i}").read_bytes()
