"""A damaged LMDB index file: every command says so in one line; repair rebuilds it."""

from __future__ import annotations

import os

import pytest

from conftest import run_cli


@pytest.fixture
def backed_up(tmp_path, safe_dir):
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(os.urandom(700_000))
    run_cli("backup", src, safe=safe_dir, check=True)
    return src


def _one_error_line(r, *words: str) -> None:
    assert r.code == 1, (r.code, r.err)
    assert "internal error" not in r.err and "Traceback" not in r.err, r.err
    assert r.err.count("\n") == 1 and r.err.startswith("pointsafe: error: "), r.err
    for w in words:
        assert w in r.err, r.err


def _repair_and_restore(tmp_path, safe_dir, src) -> None:
    run_cli("repair", safe=safe_dir, check=True)
    run_cli("verify", safe=safe_dir, check=True)
    out = tmp_path / "out"
    run_cli("restore", "latest", out, safe=safe_dir, check=True)
    assert (out / "f").read_bytes() == (src / "f").read_bytes()


def test_truncated_index_file_is_reported_not_a_crash(tmp_path, safe_dir, backed_up):
    os.truncate(safe_dir / "index" / "data.mdb", 8192)
    for cmd in (["points"], ["verify"], ["backup", backed_up]):
        _one_error_line(run_cli(*cmd, safe=safe_dir), "index is damaged", "pointsafe repair")
    _repair_and_restore(tmp_path, safe_dir, backed_up)


def test_emptied_index_file_is_not_an_empty_safe(tmp_path, safe_dir, backed_up):
    packs = sorted(os.listdir(safe_dir / "packs"))
    os.truncate(safe_dir / "index" / "data.mdb", 0)
    _one_error_line(run_cli("verify", safe=safe_dir), "index is damaged")
    other = tmp_path / "other"
    other.mkdir()
    (other / "g").write_bytes(b"new")
    _one_error_line(run_cli("backup", other, safe=safe_dir), "index is damaged")
    assert sorted(os.listdir(safe_dir / "packs")) == packs     # no pack was taken for litter
    _repair_and_restore(tmp_path, safe_dir, backed_up)
