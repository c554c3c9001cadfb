"""The btrfs send stream parser and replay (issue 12, btrfs part): real streams from a
loop-mounted btrfs, changes keyed to the new snapshot's names; a bad CRC, a truncated stream
and an edited parent are refused."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from btrfs_util import btrfs_volume, make_subvolume
from pointsafe.ingest.changes.btrfs_send import (SendStreamError, parse, replay, send_changes,
                                                 subvol_info)

MiB = 1 << 20


def _sh(*cmd: str) -> None:
    subprocess.run(list(cmd), check=True, capture_output=True)


def _snap(src: Path, dst: Path) -> Path:
    subprocess.run(["sync"], check=True)
    _sh("btrfs", "subvolume", "snapshot", "-r", str(src), str(dst))
    return dst


def _stream(parent: Path, new: Path, proto: int = 1) -> bytes:
    return subprocess.run(["btrfs", "send", "-q", "--no-data", "--proto", str(proto), "-p", str(parent),
                           str(new)], check=True, capture_output=True).stdout


def _populate(src: Path) -> None:
    with open(src / "big", "wb") as f:
        f.write(os.urandom(64 * MiB))
    for d in range(20):
        (src / f"d{d:02}" / "sub").mkdir(parents=True)
        for i in range(100):
            (src / f"d{d:02}" / "sub" / f"f{i:03}").write_bytes(os.urandom(200 + i))
    (src / "dir1" / "inner").mkdir(parents=True)
    (src / "dir1" / "inner" / "x").write_bytes(b"x" * 5000)
    (src / "rmme").mkdir()
    (src / "rmme" / "y").write_bytes(b"y")
    (src / "gone").write_bytes(b"gone")
    (src / "lk").write_bytes(b"link me")
    (src / "a").write_bytes(b"a" * 9000)
    (src / "b").write_bytes(b"b" * 9000)


def _change(src: Path) -> list[tuple[int, int]]:
    writes = [(3 * MiB + 123, 16384), (40 * MiB, 16384), (63 * MiB + 7, 16384)]
    with open(src / "big", "r+b") as f:
        for off, n in writes:
            f.seek(off)
            f.write(os.urandom(n))
    (src / "dir1" / "inner" / "x").write_bytes(b"z" * 7000)
    os.rename(src / "dir1", src / "dir2")
    os.rename(src / "d03" / "sub" / "f001", src / "d04" / "moved")
    _sh("rm", "-r", str(src / "rmme"))
    os.unlink(src / "gone")
    os.link(src / "lk", src / "lk2")
    os.setxattr(src / "d05" / "sub" / "f005", "user.k", b"v")
    os.chmod(src / "d06" / "sub" / "f006", 0o600)
    (src / "newdir" / "deep").mkdir(parents=True)
    (src / "newdir" / "deep" / "n").write_bytes(b"new")
    os.rename(src / "a", src / "t")
    os.rename(src / "b", src / "a")
    os.rename(src / "t", src / "b")
    return writes


@pytest.fixture(scope="module")
def snaps(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("cbt")
    with btrfs_volume(tmp) as mnt:
        src = make_subvolume(mnt, "data")
        (mnt / "snaps").mkdir()
        _populate(src)
        a = _snap(src, mnt / "snaps" / "A")
        writes = _change(src)
        b = _snap(src, mnt / "snaps" / "B")
        yield mnt, src, a, b, writes


@pytest.mark.parametrize("proto", [1, 2])
def test_replay_names_every_change_in_the_new_snapshot(snaps, proto: int) -> None:
    mnt, src, a, b, writes = snaps
    ch = replay(parse(_stream(a, b, proto))[1], a)
    info = subvol_info(a)
    assert ch.clone_uuid is not None and ch.clone_uuid.hex() == info.uuid
    assert ch.clone_ctransid == info.ctransid
    for p in ("big", "dir2", "dir2/inner/x", "d04/moved", "lk", "lk2", "d05/sub/f005", "d06/sub/f006",
              "newdir", "newdir/deep", "newdir/deep/n", "a", "b"):
        assert p in ch.changed, p
        assert (b / p).exists() or (b / p).is_symlink()
    assert all(os.path.lexists(b / p) for p in ch.changed)
    assert "d07/sub/f007" not in ch.changed and "dir2/inner" not in ch.changed
    assert len(ch.deleted_inos) >= 3   # gone, rmme, rmme/y
    ext = ch.extents["big"]
    for off, n in writes:
        assert any(o <= off and off + n <= o + ln for o, ln in ext), (off, ext)
    assert sum(ln for _, ln in ext) <= 2 * sum(n for _, n in writes) + 3 * 8192
    assert "newdir/deep/n" in ch.whole


def test_bad_crc_and_truncated_stream_are_refused(snaps) -> None:
    mnt, src, a, b, writes = snaps
    s = _stream(a, b)
    parse(s)
    bad = bytearray(s)
    bad[40] ^= 0xFF
    with pytest.raises(SendStreamError, match="CRC"):
        parse(bytes(bad))
    with pytest.raises(SendStreamError):
        parse(s[:-10])
    with pytest.raises(SendStreamError, match="no end"):
        parse(_drop_end(s))
    with pytest.raises(SendStreamError):
        parse(b"not a stream")


def _drop_end(s: bytes) -> bytes:
    _, cmds = parse(s)
    assert cmds[-1].name == "end"
    return s[:-10]   # end has an empty body: its header is the last 10 bytes


def test_subvol_info_sees_an_edited_parent(snaps, tmp_path: Path) -> None:
    mnt, src, a, b, writes = snaps
    c = _snap(a, mnt / "snaps" / "C")
    before = subvol_info(c)
    assert before.readonly and before.uuid != subvol_info(a).uuid
    assert subvol_info(b).parent_uuid == subvol_info(src).uuid
    _sh("btrfs", "property", "set", "-ts", str(c), "ro", "false")
    (c / "edited").write_bytes(b"e")
    _sh("btrfs", "property", "set", "-ts", str(c), "ro", "true")
    subprocess.run(["sync"], check=True)
    after = subvol_info(c)
    assert after.uuid == before.uuid and after.ctransid != before.ctransid


def test_missing_parent_raises(snaps) -> None:
    mnt, src, a, b, writes = snaps
    with pytest.raises(SendStreamError, match="btrfs send failed"):
        send_changes(mnt / "snaps" / "NOPE", b)
    assert send_changes(a, b).extents["big"]


def test_parent_check_refuses_an_edited_or_foreign_parent(snaps) -> None:
    from pointsafe.ingest.changes.btrfs_send import parent_mismatch, subvol_record
    mnt, src, a, b, writes = snaps
    rec = subvol_record(a / "d01" / "sub")
    assert rec is not None and rec["uuid"] == subvol_info(a).uuid
    ch = send_changes(a, b)
    assert parent_mismatch(rec, a, b, ch) is None
    assert "changed" in (parent_mismatch({**rec, "ctransid": rec["ctransid"] + 1}, a, b, ch) or "")
    assert "cannot be read" in (parent_mismatch(rec, mnt / "snaps" / "NOPE", b, ch) or "")
    assert parent_mismatch(None, a, b, ch)
    other = make_subvolume(mnt, "other")
    o = _snap(other, mnt / "snaps" / "O")
    assert "same subvolume" in (parent_mismatch(subvol_record(o), o, b) or "")
    assert "not made against" in (parent_mismatch(rec, a, b, send_changes(o, b)) or "")


def test_btrfs_point_records_its_snapshot_identity(tmp_path: Path, safe_dir: Path) -> None:
    from _backup_util import backup as cli_backup
    with btrfs_volume(tmp_path) as mnt:
        src = make_subvolume(mnt, "data")
        (src / "f").write_bytes(b"hello")
        snap = cli_backup(safe_dir, src, "--snapshot", "btrfs")["snapshot"]
        assert snap["subvol"]["parent_uuid"] == subvol_info(src).uuid
        assert snap["subvol"]["ctransid"] == subvol_info(Path(snap["path"])).ctransid
