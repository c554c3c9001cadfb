"""Opening something that is not a safe fails with one clear line; init/verify/repair via the CLI."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import zlib

import pytest

from conftest import PW
from pointsafe.cas import FORMAT_VERSION, NotASafe, Safe, UnsupportedVersion
from pointsafe.cas.header import MAGIC


def _one_line_error(r, *words: str) -> str:
    assert r.code == 1, (r.out, r.err)
    lines = r.err.strip().splitlines()
    assert len(lines) == 1, r.err
    assert lines[0].startswith("pointsafe: error: ") and "Traceback" not in r.err
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


def _header_with_version(version: int) -> bytes:
    body = json.dumps({"safe_id": "x", "created": "2026-01-01T00:00:00.000000Z"}).encode()
    head = struct.pack("<8sII", MAGIC, version, len(body)) + body
    return head + struct.pack("<I", zlib.crc32(head))


def test_empty_directory(tmp_path, cli):
    d = tmp_path / "empty"
    d.mkdir()
    _one_line_error(cli("verify", safe=d), "not a pointsafe safe", "empty", "pointsafe init")
    with pytest.raises(NotASafe):
        Safe.open(d)


def test_missing_path_and_plain_file(tmp_path, cli):
    _one_line_error(cli("verify", safe=tmp_path / "nope"), "no such safe")
    f = tmp_path / "file"
    f.write_bytes(b"hello")
    _one_line_error(cli("verify", safe=f), "not a directory")
    _one_line_error(cli("repair", safe=f), "not a directory")


@pytest.mark.skipif(shutil.which("restic") is None, reason="restic is not installed")
def test_restic_repository(tmp_path, cli):
    repo = tmp_path / "restic"
    subprocess.run(["restic", "init", "-q", "-r", str(repo)], check=True,
                   env={**os.environ, "RESTIC_PASSWORD": "pw"}, capture_output=True)
    _one_line_error(cli("verify", safe=repo), "restic repository")
    _one_line_error(cli("repair", safe=repo), "restic repository")
    with pytest.raises(NotASafe):
        Safe.open(repo)
    assert sorted(os.listdir(repo)) == ["config", "data", "index", "keys", "locks", "snapshots"]


@pytest.mark.skipif(shutil.which("borg") is None, reason="borg is not installed")
def test_borg_repository(tmp_path, cli):
    repo = tmp_path / "borg"
    subprocess.run(["borg", "init", "-e", "none", str(repo)], check=True, capture_output=True,
                   env={**os.environ, "BORG_PASSPHRASE": ""})
    _one_line_error(cli("verify", safe=repo), "BorgBackup repository")
    with pytest.raises(NotASafe):
        Safe.open(repo)
    # init refuses to write into it.
    _one_line_error(cli("init", repo), "not empty")


def test_newer_format_version(safe_dir, cli):
    (safe_dir / "header").write_bytes(_header_with_version(FORMAT_VERSION + 1))
    msg = _one_line_error(cli("verify", safe=safe_dir), "newer", "upgrade pointsafe")
    assert f"version {FORMAT_VERSION + 1}" in msg
    with pytest.raises(UnsupportedVersion):
        Safe.open(safe_dir)
    _one_line_error(cli("repair", safe=safe_dir), "newer")


@pytest.mark.parametrize("keep", [0, 5, 12, 30, -1])
def test_truncated_header(safe_dir, cli, keep):
    (safe_dir / "header.copy").unlink()   # with the copy, readers use it (tests/test_cas_faults.py)
    data = (safe_dir / "header").read_bytes()
    (safe_dir / "header").write_bytes(data[:keep] if keep >= 0 else data[:-1])
    word = "truncated"
    _one_line_error(cli("verify", safe=safe_dir), word)
    with pytest.raises(NotASafe, match=word):
        Safe.open(safe_dir)


def test_corrupt_header(safe_dir, cli):
    (safe_dir / "header.copy").unlink()   # with the copy, readers use it (tests/test_cas_faults.py)
    data = bytearray((safe_dir / "header").read_bytes())
    data[20] ^= 1
    (safe_dir / "header").write_bytes(bytes(data))
    _one_line_error(cli("verify", safe=safe_dir), "corrupt")


def test_foreign_file_called_header(tmp_path, cli):
    d = tmp_path / "d"
    d.mkdir()
    (d / "header").write_bytes(b"#!/bin/sh\necho hi\n" * 3)
    _one_line_error(cli("verify", safe=d), "bad magic")


def test_no_safe_given(cli):
    _one_line_error(cli("verify"), "--safe")


def test_init_verify_repair_json(tmp_path, cli):
    d = tmp_path / "s"
    r = cli("init", d, "--compression", "zstd:19", "--json")
    assert r.code == 0, r.err
    info = json.loads(r.out)
    assert info["compression"] == "zstd:19" and info["safe"] == str(d) and len(info["safe_id"]) == 32
    with Safe.open(d, password=PW) as safe:
        assert safe.config.zstd_level == 19 and safe.config.safe_id == info["safe_id"]

    r = cli("verify", "--json", safe=d)
    assert r.code == 0
    rep = json.loads(r.out)
    assert rep["ok"] is True and rep["errors"] == [] and rep["packs"] == 0

    r = cli("repair", "--json", safe=d)
    assert r.code == 0, r.err
    assert json.loads(r.out)["damaged"] == []

    # --safe after the command and $POINTSAFE_SAFE work as well.
    assert cli("verify", "--safe", d).code == 0
    assert cli("verify", env={"POINTSAFE_SAFE": str(d)}).code == 0
    r = cli("verify", "--data", env={"POINTSAFE_SAFE": str(d)})
    assert r.code == 0 and r.out.startswith("ok:") and "re-hashed" in r.out


def test_init_refuses_bad_arguments(tmp_path, cli):
    _one_line_error(cli("init", tmp_path / "a", "--compression", "lz4"), "compression")
    _one_line_error(cli("init", tmp_path / "b", "--compression", "zstd:23"), "1 to 22")
    _one_line_error(cli("init", tmp_path / "c", "--block-size", "3000"), "power of two")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    _one_line_error(cli("init", tmp_path / "full"), "not empty")
    for name in "abc":
        assert not (tmp_path / name).exists()


def test_init_modes(tmp_path, cli):
    for comp, expect in [("none", "none"), ("zstd", "zstd:1"), ("3", "zstd:3")]:
        r = cli("init", tmp_path / comp, "--compression", comp, "--json")
        assert r.code == 0, r.err
        assert json.loads(r.out)["compression"] == expect
    r = cli("init", tmp_path / "again", "--block-size", "1M")
    assert r.code == 0 and "1.0 MiB" in r.out
