"""Volumes through pointsafe serve: a disk image backed up by an agent, unchanged and changed
again, restored byte for byte."""

from __future__ import annotations

import os

from _server_util import add_agent, agent, backup_json, make_safe, running


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
