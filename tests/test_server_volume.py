"""Volumes through pointsafe serve: a disk image backed up by an agent, unchanged and changed
again, restored byte for byte."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from _server_util import add_agent, agent, backup_json, make_safe, running
from conftest import PW
from pointsafe.cas import Safe
from pointsafe.cas.blob import BlobReader


def _image(path, size: int = 24 << 20) -> bytes:
    """A sparse disk image with data in a few places; returns its bytes."""
    with open(path, "wb") as f:
        f.truncate(size)
        for off in (0, 3 << 20, 17 << 20):
            f.seek(off)
            f.write(os.urandom(700_000))
    return path.read_bytes()


def test_a_disk_image_backed_up_through_the_server_restores_byte_for_byte_and_only_changed_blocks_travel(tmp_path):
    safe = make_safe(tmp_path)
    tok = add_agent(safe, "vm1", "--can-restore")
    img = tmp_path / "disk.img"
    original = _image(img)
    with running(safe) as server:
        first = backup_json(server, tok, img, "--volume")
        assert first["kind"] == "volume" and first["size"] == 24 << 20
        assert first["upload"]["bytes_uploaded"] > 2_000_000
        again = backup_json(server, tok, img, "--volume")          # unchanged image: not read again
        assert again["upload"]["objects_uploaded"] == 0 and again["stats"]["bytes_read"] == 0
        with open(img, "r+b") as f:                               # one block changes
            f.seek((3 << 20) + 100)
            f.write(b"changed")
        third = backup_json(server, tok, img, "--volume")
        up = third["upload"]
        # the changed block and the list nodes above it; the blocks that stayed are not sent again
        assert 0 < up["bytes_uploaded"] < 200_000 and third["stats"]["bytes_read"] > 2_000_000, up
        out = tmp_path / "restored.img"
        r = agent(server, tok, "restore", third["id"], out)
        assert r.code == 0, r.err
        assert out.read_bytes() == img.read_bytes()
        r = agent(server, tok, "restore", first["id"], tmp_path / "first.img")
        assert r.code == 0, r.err
        assert (tmp_path / "first.img").read_bytes() == original != img.read_bytes()
        r = agent(server, tok, "backup", tmp_path / "nothing", "--volume")
        assert r.code == 1 and "cannot access" in r.err, r.err
        r = agent(server, tok, "backup", img)
        assert r.code == 1 and "needs --volume" in r.err, r.err


def test_an_agent_reads_only_the_changed_blocks_a_ranges_file_names(tmp_path):
    safe = make_safe(tmp_path)
    tok = add_agent(safe, "vm1")              # no --can-restore: the previous point's lists are still readable
    img = tmp_path / "disk.img"
    _image(img)
    ranges = tmp_path / "changed.json"
    with running(safe) as server:
        first = backup_json(server, tok, img, "--volume")
        with open(img, "r+b") as f:
            for off in (1 << 20, 9 << 20):
                f.seek(off)
                f.write(os.urandom(5000))
        ranges.write_text(json.dumps([[1 << 20, 5000], [9 << 20, 5000]]))
        inc = backup_json(server, tok, img, "--volume", "--changed-blocks", str(ranges))
        assert inc["change_source"] == {"kind": "ranges-file", "detail": str(ranges), "fallback": None}
        block = first["block_size"]
        assert 0 < inc["stats"]["bytes_scanned"] <= 4 * block, inc["stats"]
        assert 0 < inc["upload"]["bytes_uploaded"] < 200_000
        # the same point a full read makes, object for object
        full = backup_json(server, tok, img, "--volume", "--full-read")
        assert full["root"] == inc["root"] and full["stats"]["bytes_scanned"] > 2_000_000
        assert full["change_source"]["kind"] == "full" and not full["warnings"]
        # a tree has no changed blocks: one line, nothing sent
        r = agent(server, tok, "backup", tmp_path, "--changed-blocks", str(ranges))
        assert r.code == 1 and "applies to a volume" in r.err, r.err
    with Safe.open(safe, password=PW, write=False) as s:
        pts = {p.id: p for p in s.points()}
        assert pts[inc["id"]].extra["change_source"]["kind"] == "ranges-file"
        assert BlobReader(pts[inc["id"]].root, pts[inc["id"]].size, s.get, s.kind).read(0, 24 << 20) \
            == img.read_bytes()


@pytest.mark.skipif(shutil.which("qemu-io") is None, reason="qemu-utils is not installed")
def test_an_agent_backs_up_a_qcow2_from_its_dirty_bitmap(tmp_path):
    from test_cbt_qemu import WRITES, _bitmaps, _guest, _qemu_io, _skip_reason, _touched
    from test_cbt_qemu import _image as qcow2_image
    if _skip_reason():
        pytest.skip(_skip_reason() or "")
    safe = make_safe(tmp_path)
    tok = add_agent(safe, "vm1", "--can-restore")
    img = qcow2_image(tmp_path)
    with running(safe) as server:
        r = agent(server, tok, "backup", img, "--volume", "--changed-blocks", "qemu:bk", "--json", "-q")
        assert r.code == 3, r.err
        first = json.loads(r.out)
        assert any("no previous point of that name" in w["message"] for w in first["warnings"]), first["warnings"]
        assert first["qemu_bitmap"]["generation"] == 1 and first["source_format"] == "qcow2"
        _qemu_io(img, *WRITES)
        inc = backup_json(server, tok, img, "--volume", "--changed-blocks", "qemu:bk")
        assert inc["change_source"]["kind"] == "qemu-bitmap" and inc["qemu_bitmap"]["generation"] == 2
        assert inc["stats"]["bytes_scanned"] == _touched(WRITES, first["block_size"])
        assert _bitmaps(img) == [inc["qemu_bitmap"]["name"]]       # rotated once the point committed
        out = tmp_path / "restored.img"
        r = agent(server, tok, "restore", inc["id"], out)
        assert r.code == 0, r.err
        assert out.read_bytes() == _guest(img, tmp_path)


def test_the_servers_full_every_setting_makes_an_agents_incremental_a_full_read(tmp_path):
    from conftest import run_cli
    safe = make_safe(tmp_path)
    tok = add_agent(safe, "vm1")
    img = tmp_path / "disk.img"
    _image(img)
    ranges = tmp_path / "changed.json"
    ranges.write_text("[]")
    run_cli("config", "set", "cbt.full_every", "2d", safe=safe, check=True)
    later = {"POINTSAFE_NOW": "2099-01-01T00:00:00Z"}
    with running(safe) as server:
        backup_json(server, tok, img, "--volume")                                   # a full read
        inc = backup_json(server, tok, img, "--volume", "--changed-blocks", str(ranges))
        assert inc["change_source"]["kind"] == "ranges-file" and inc["stats"]["bytes_scanned"] == 0
        r = agent(server, tok, "backup", img, "--volume", "--changed-blocks", str(ranges), "--json", "-q", env=later)
        assert r.code == 0, r.err
        due = json.loads(r.out)
        assert due["change_source"]["detail"] == "--full-read" and due["stats"]["bytes_scanned"] > 2_000_000
        assert due["root"] == inc["root"]
        # the next one follows that full read: incremental again; then, with the setting off,
        # the chain is never broken however old its last full read
        again = backup_json(server, tok, img, "--volume", "--changed-blocks", str(ranges))
        assert again["change_source"]["kind"] == "ranges-file"
        run_cli("config", "set", "cbt.full_every", "off", safe=safe, check=True)
        r = agent(server, tok, "backup", img, "--volume", "--changed-blocks", str(ranges), "--json", "-q", env=later)
        assert r.code == 0, r.err
        assert json.loads(r.out)["change_source"]["kind"] == "ranges-file"
