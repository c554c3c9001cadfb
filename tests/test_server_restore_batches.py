"""Restores through ``pointsafe serve`` fetch in batches: a volume restored onto a block device
asks for its blocks a group at a time (as into an image), and a tree restore reads its
directories' trees many to a request. Real server on loopback; the restores write every byte
and attribute (the CLI's, compared with the source) and the request counts come from the
agent's restorer run in this process against the same server."""

from __future__ import annotations

import os
import random
import re
import subprocess
from pathlib import Path

import pytest

from _server_util import add_agent, agent, backup_json, make_safe, running
from _tree_util import assert_trees_equal
from pointsafe.cas import ObjectMissing, SafeError
from pointsafe.server.client import Remote, resolve
from pointsafe.server.remote_restore import RemoteRestorer, RemoteSource

MiB = 1 << 20


def _restorer(server, tok: str) -> tuple[RemoteRestorer, RemoteSource, Remote]:
    remote = Remote(server.url, tok)
    src = RemoteSource(remote)
    return RemoteRestorer(src, force=True), src, remote


def test_a_volume_restored_onto_a_block_device_through_the_server_fetches_its_blocks_in_groups(tmp_path):
    if os.geteuid() != 0 or not os.path.exists("/dev/loop-control"):
        pytest.skip("a loop device needs root and /dev/loop-control")
    rng = random.Random(5)
    img = tmp_path / "disk.img"
    with open(img, "wb") as f:                      # data, holes between, data at the end
        f.truncate(24 * MiB)
        for off in (0, 9 * MiB, 20 * MiB):
            f.seek(off)
            f.write(rng.randbytes(4 * MiB - 4096))
    dev_img = tmp_path / "target.img"
    dev_img.write_bytes(b"\xa5" * (24 * MiB))       # not zeros: the holes must be written
    safe = make_safe(tmp_path)
    tok = add_agent(safe, "vm1", "--can-restore")
    dev = subprocess.run(["losetup", "-f", "--show", str(dev_img)], capture_output=True, text=True)
    if dev.returncode != 0:
        pytest.skip(f"losetup failed: {dev.stderr.strip()}")
    loop = dev.stdout.strip()
    try:
        with running(safe) as server:
            p = backup_json(server, tok, img, "--volume")
            r = agent(server, tok, "restore", p["id"], loop)
            assert r.code == 1 and "--force" in r.err, r.err       # a device is overwritten only with --force
            r = agent(server, tok, "restore", p["id"], loop, "--force")
            assert r.code == 0, r.err
            with open(loop, "rb") as f:
                assert f.read(24 * MiB) == img.read_bytes()
            with open(loop, "r+b") as f:             # again, in this process, counting requests
                f.write(b"\xa5" * (24 * MiB))
            rs, src, remote = _restorer(server, tok)
            stats = rs.restore_volume(resolve(remote, p["id"]), Path(loop))
            with open(loop, "rb") as f:
                assert f.read(24 * MiB) == img.read_bytes()
            assert stats.bytes_written == 24 * MiB
            blocks = 12 * MiB // remote.info()["block_size"]
            print(f"device restore: {src.requests} requests for {blocks} data blocks")
            assert src.requests <= blocks // 8, (src.requests, blocks)

            # the server stops giving objects part way: the message says how much of the device
            # was written, and those bytes are the volume's first ones
            class Failing(RemoteSource):
                def fetch(self, keys):
                    if self.requests >= 6:
                        raise ObjectMissing("gone")
                    return super().fetch(keys)
            with open(loop, "r+b") as f:
                f.write(b"\xa5" * (24 * MiB))
            fs = Failing(remote)
            with pytest.raises(SafeError) as err:
                RemoteRestorer(fs, force=True).restore_volume(resolve(remote, p["id"]), Path(loop))
            m = re.search(r"holds only its first (\d+) bytes", str(err.value))
            assert m and 0 < int(m.group(1)) < 24 * MiB, str(err.value)
            n = int(m.group(1))
            with open(loop, "rb") as f:
                assert f.read(n) == img.read_bytes()[:n]
    finally:
        subprocess.run(["losetup", "-d", loop], capture_output=True)


def test_a_tree_restore_through_the_server_reads_many_directories_to_a_request(tmp_path):
    rng = random.Random(9)
    tree = tmp_path / "src"
    for a in range(30):
        for b in range(10):
            d = tree / f"a{a:02}" / f"b{b}"
            d.mkdir(parents=True)
            (d / "f").write_bytes(rng.randbytes(200 + a * 10 + b))
    os.utime(tree / "a03", ns=(1_600_000_000_000_000_000, 1_600_000_000_000_000_000))
    dirs = 30 * 10 + 30 + 1
    safe = make_safe(tmp_path)
    tok = add_agent(safe, "web1", "--can-restore")
    with running(safe) as server:
        p = backup_json(server, tok, tree)
        r = agent(server, tok, "restore", p["id"], tmp_path / "out")
        assert r.code == 0, r.err
        assert_trees_equal(tree, tmp_path / "out")
        rs, src, remote = _restorer(server, tok)
        stats = rs.restore_tree(resolve(remote, p["id"]), tmp_path / "out2")
        assert stats.warnings == []
        assert_trees_equal(tree, tmp_path / "out2")
        print(f"tree restore: {src.requests} requests for {dirs} directories and 300 files")
        assert src.requests < dirs // 4, (src.requests, dirs)
