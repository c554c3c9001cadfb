"""``pointsafe mount --server URL``: an agent mounts its own points through ``pointsafe serve``.

Real server processes on loopback, real FUSE mounts (unmounted in ``finally`` with
``fusermount3 -u -z``, the mount process waited for with a timeout), the agent's CLI in
subprocesses.
"""

from __future__ import annotations

import errno
import os
import random
from pathlib import Path

import pytest

from _fuse_util import MOUNT_TIMEOUT, is_mounted, mounted, stats, unmount, wait_gone
from _server_util import Served, add_agent, agent, agent_env, backup_json, make_safe, running, start, stop
from _tree_util import all_types_tree, assert_trees_equal, make_tree
from conftest import needs_fuse, run_cli
from pointsafe.fusefs.view import ROOT_INO

pytestmark = [needs_fuse, pytest.mark.fuse]

BIG = 12 << 20          # bytes of the file read at random offsets


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A served safe with two agents' points ("web1": a tree with every entry type and a big
    file, backed up twice; "other": its own tree) and an agent without --can-restore."""
    base = tmp_path_factory.mktemp("server-mount")
    safe = make_safe(base)
    tokens = {n: add_agent(safe, n, "--can-restore") for n in ("web1", "other")}
    tokens["writeonly"] = add_agent(safe, "writeonly")
    src = base / "www"
    make_tree(src, all_types_tree(7))
    rng = random.Random(17)
    (src / "big.bin").write_bytes(rng.randbytes(BIG // 2) + b"pointsafe " * (BIG // 20))
    os.utime(src / "big.bin", ns=(1_900_000_000_000_000_000, 1_700_000_000_000_000_000))
    other_src = base / "other"
    make_tree(other_src, all_types_tree(8))
    server = start(safe)
    try:
        points = {"first": backup_json(server, tokens["web1"], src, "--name", "www")}
        points["second"] = backup_json(server, tokens["web1"], src, "--name", "www")
        points["other"] = backup_json(server, tokens["other"], other_src, "--name", "www")
        points["writeonly"] = backup_json(server, tokens["writeonly"], other_src, "--name", "wo")
        yield server, tokens, points, src, base
    finally:
        stop(server.proc)


def agent_mount(monkeypatch, server: Served, token: str, mp: Path, *args):
    """``pointsafe mount MP ARGS --server URL`` as the agent (``_fuse_util.mounted``: in the
    background, yields its --json answer, always unmounts and waits for the mount process)."""
    monkeypatch.setenv("POINTSAFE_TOKEN", token)
    return mounted(None, mp, *args, "--server", server.url)


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pointsafe: error: ") and "Traceback" not in err, err
    return lines[0]


def test_a_point_mounted_through_the_server_shows_every_file_as_the_source(served, tmp_path, monkeypatch):
    server, tokens, points, src, _ = served
    mp = tmp_path / "mnt"
    with agent_mount(monkeypatch, server, tokens["web1"], mp, "www") as info:
        assert info["point"] == points["second"]["id"]
        # the mount opened without fetching the point: nothing but the point list so far
        assert stats(mp)["objects_read"] == 0
        assert_trees_equal(src, mp, check_sparse=False)
        assert stats(mp)["objects_read"] > 0
        assert os.statvfs(mp).f_namemax == 255          # df answers (with no sizes: they are the server's)


def test_random_reads_at_many_offsets_equal_the_sources_and_the_cache_stays_in_its_bound(served, tmp_path, monkeypatch):
    server, tokens, points, src, _ = served
    want = (src / "big.bin").read_bytes()
    mp = tmp_path / "mnt"
    cache = 2 << 20
    with agent_mount(monkeypatch, server, tokens["web1"], mp, points["first"]["id"][:10], "--cache-size", str(cache)):
        rng = random.Random(5)
        fd = os.open(mp / "big.bin", os.O_RDONLY)
        try:
            for _ in range(400):
                off = rng.randrange(len(want) + 1000)
                size = rng.choice([1, 17, 4096, 65536, 300_000])
                assert os.pread(fd, size, off) == want[off:off + size], (off, size)
        finally:
            os.close(fd)
        with open(mp / "big.bin", "rb") as f:          # and once through, sequentially
            assert f.read() == want
        st = stats(mp)
        assert 0 < st["chunk_cache_bytes"] <= cache + (1 << 20)    # one chunk over the bound at most


def test_the_all_points_browser_shows_the_agents_own_points_only(served, tmp_path, monkeypatch):
    server, tokens, points, src, _ = served
    mp = tmp_path / "mnt"
    with agent_mount(monkeypatch, server, tokens["web1"], mp) as info:
        assert info["point"] is None
        group = sorted(os.listdir(mp / "www"))
        assert len(group) == 3 and "latest" in group     # web1's two points, not other's
        assert os.readlink(mp / "latest")
        assert (mp / "www" / "latest" / "big.bin").read_bytes() == (src / "big.bin").read_bytes()


def test_a_volume_point_mounts_as_its_image(served, tmp_path, monkeypatch):
    server, tokens, _, _, _ = served
    img = tmp_path / "disk.img"
    img.write_bytes(random.Random(3).randbytes(3 << 20) + bytes(1 << 20))
    p = backup_json(server, tokens["web1"], img, "--volume", "--name", "disk")
    mp = tmp_path / "mnt"
    with agent_mount(monkeypatch, server, tokens["web1"], mp, "disk@latest") as info:
        assert info["point"] == p["id"]
        (image,) = os.listdir(mp)
        assert (mp / image).read_bytes() == img.read_bytes()


def test_another_agents_point_cannot_be_mounted(served, tmp_path):
    server, tokens, points, _, _ = served
    mp = tmp_path / "mnt"
    mp.mkdir()
    try:
        r = agent(server, tokens["web1"], "mount", mp, points["other"]["id"], timeout=MOUNT_TIMEOUT)
        assert r.code == 1
        assert "no point" in one_error_line(r.err) and "of this agent" in r.err
        assert not is_mounted(mp)
    finally:
        unmount(mp)


def test_an_agent_without_can_restore_cannot_mount(served, tmp_path):
    server, tokens, points, _, _ = served
    mp = tmp_path / "mnt"
    mp.mkdir()
    try:
        for args in ([points["writeonly"]["id"]], []):
            r = agent(server, tokens["writeonly"], "mount", mp, *args, timeout=MOUNT_TIMEOUT)
            assert r.code == 1
            assert "may not read file contents" in one_error_line(r.err)
            assert not is_mounted(mp)
    finally:
        unmount(mp)


def test_without_a_token_mount_says_so(served, tmp_path):
    server, _, _, _, _ = served
    (tmp_path / "mnt").mkdir()
    r = run_cli("mount", tmp_path / "mnt", "--server", server.url, env=agent_env(None))
    assert r.code == 1 and "no agent token" in one_error_line(r.err)


def test_the_server_stopped_while_mounted_gives_eio_for_uncached_data_and_the_mount_unmounts(served, tmp_path, monkeypatch):
    _, tokens, points, src, base = served
    server = start(base / "safe")          # a server of its own on the same safe, to stop
    want = (src / "big.bin").read_bytes()
    mp = tmp_path / "mnt"
    log = tmp_path / "mnt.log"
    stopped = False
    try:
        with agent_mount(monkeypatch, server, tokens["web1"], mp, points["second"]["id"]) as info:
            fd = os.open(mp / "big.bin", os.O_RDONLY)
            try:
                assert os.pread(fd, 4096, 0) == want[:4096]           # fetched while it runs
                assert stop(server.proc) == 0
                stopped = True
                with pytest.raises(OSError) as e:
                    os.pread(fd, 4096, len(want) - 8192)              # never fetched: EIO, not zeros
                assert e.value.errno == errno.EIO
                assert os.pread(fd, 4096, 0) == want[:4096]           # what was fetched stays right
            finally:
                os.close(fd)
            with pytest.raises(OSError) as e:
                (mp / "plain").read_bytes()                           # a file never opened
            assert e.value.errno == errno.EIO
            assert "cannot fetch from the server" in log.read_text()
            r = run_cli("umount", mp)
            assert r.code == 0, r.err
            assert wait_gone(info["pid"]), "the mount process did not exit after unmounting"
            assert not is_mounted(mp)
    finally:
        if not stopped:
            stop(server.proc)


def test_a_listing_fetches_its_subdirectories_trees_in_one_request_and_reads_fetch_chunks_in_batches(tmp_path):
    # The view of the mount over the server, in this process (no FUSE): its fetch requests counted.
    from pointsafe.cas import resolve_point
    from pointsafe.fusefs.view import View
    from pointsafe.server.remote_view import mount_source

    safe = make_safe(tmp_path)
    tok = add_agent(safe, "wide", "--can-restore")
    src = tmp_path / "wide"
    for i in range(150):
        (src / f"d{i:03}").mkdir(parents=True)
        (src / f"d{i:03}" / "f").write_bytes(b"%d\n" % i)
    data = random.Random(2).randbytes(8 << 20)
    (src / "big").write_bytes(data)
    with running(safe) as server:
        p = backup_json(server, tok, src)
        objects, chunks = mount_source(server.url, tok, 64 << 20)
        view = View(objects, resolve_point(objects, p["id"]), chunks=chunks)
        try:
            root = view.node(ROOT_INO)
            names = view.listing(root).names
            assert len(names) == 151 and objects.requests <= 2    # its tree (and maybe, already, its subdirectories')
            for name in names[1:]:
                sub = view.lookup(ROOT_INO, name)
                assert view.listing(sub).names == [b"f"]
            assert names[0] == b"big" and objects.requests == 2      # the 150 subdirectories' trees: one request
            fh = view.open(view.lookup(ROOT_INO, b"big").ino, os.O_RDONLY)
            before = objects.requests
            got = b"".join(bytes(view.read(fh, off, 128 << 10)) for off in range(0, len(data), 128 << 10))
            assert got == data
            n_chunks = view.stats()["chunk_cache_misses"]
            assert n_chunks > 64 and objects.requests - before < n_chunks // 4, (objects.requests - before, n_chunks)
        finally:
            view.close()
            objects.close()
