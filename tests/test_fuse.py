"""The recovery point browser through real FUSE mounts (as root).

Every mount goes through ``_fuse_util.mounted``, which unmounts with ``fusermount3 -u -z``
in ``finally`` and waits (bounded) for the mount process to exit.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from _fuse_util import make_tree, mounted, stats, unmount, walk
from conftest import PW, needs_fuse, run_cli

pytestmark = [needs_fuse, pytest.mark.fuse]


def backup(safe: Path, src: Path, name: str, *extra) -> dict:
    r = run_cli("backup", src, "--name", name, "--json", *extra, safe=safe)
    assert r.code == 0, r.err
    return json.loads(r.out)


@pytest.fixture(scope="module")
def tree_safe(tmp_path_factory):
    """A safe with two points of a tree holding every entry type (built once for this module)."""
    base = tmp_path_factory.mktemp("fuse-tree")
    safe = base / "safe"
    assert run_cli("init", safe).code == 0
    src = base / "src"
    make_tree(src)
    first = backup(safe, src, "www")
    (src / "added-later").write_text("second point only\n")
    os.utime(src, ns=(1_600_000_000_000_000_000, 1_600_000_000_000_000_000))
    second = backup(safe, src, "www")
    return safe, src, first, second


def point_id(p: dict) -> str:
    return p.get("id") or p["point"]["id"]


def test_point_mount_matches_source_and_restore(tree_safe, tmp_path):
    safe, src, _, second = tree_safe
    pid = point_id(second)
    want = walk(src)
    with mounted(safe, tmp_path / "mnt", pid) as info:
        mp = tmp_path / "mnt"
        assert info["point"] == pid
        got = walk(mp)
        assert got == want
        # hardlinks: one inode number, the stored link count
        a, b = os.lstat(mp / "hello.txt"), os.lstat(mp / "dir" / "hello-hardlink")
        assert a.st_ino == b.st_ino and a.st_nlink == b.st_nlink == 2
        # sparse: the hole reads as zeros
        with open(mp / "sparse.img", "rb") as f:
            assert f.read(1 << 20) == bytes(1 << 20)
        # POSIX ACLs come through as xattrs and getfacl reads them
        acl = subprocess.run(["getfacl", "-n", "-p", str(mp / "hello.txt")], capture_output=True, text=True)
        assert "user:1234:r--" in acl.stdout
        st = os.statvfs(mp)
        assert st.f_bsize > 0 and st.f_blocks > 0
        # cp -a out of the mount gives the same tree as restore
        copied = tmp_path / "copied"
        subprocess.run(["cp", "-a", f"{mp}/.", str(copied)], check=True)
    restored = tmp_path / "restored"
    r = run_cli("restore", pid, restored, safe=safe)
    assert r.code == 0, r.err
    assert walk(copied) == walk(restored)


def test_whole_safe_layout(tree_safe, tmp_path):
    safe, src, first, second = tree_safe
    mp = tmp_path / "mnt"
    with mounted(safe, mp) as info:
        assert info["point"] is None
        names = sorted(os.listdir(mp))
        times = [n for n in names if n[:1].isdigit()]
        assert len(times) == 2 and times == sorted(times)
        assert all(n.endswith("Z") or ".2" in n for n in times)
        assert set(names) == set(times) | {"www", "latest"}
        assert os.readlink(mp / "latest") == times[-1]
        assert sorted(os.listdir(mp / "www")) == times + ["latest"]
        assert os.readlink(mp / "www" / "latest") == times[-1]
        assert (mp / "latest" / "added-later").read_text() == "second point only\n"
        assert not (mp / times[0] / "added-later").exists()
        assert (mp / "www" / times[0] / "hello.txt").read_text() == "hello\n"
        assert walk(mp / "www" / times[-1]) == walk(src)


def test_writes_fail_with_erofs(tree_safe, tmp_path):
    safe, _, _, second = tree_safe
    mp = tmp_path / "mnt"
    with mounted(safe, mp, point_id(second)):
        f = mp / "hello.txt"
        attempts = {
            "open for writing": lambda: open(f, "r+b"),
            "truncate": lambda: os.truncate(f, 0),
            "create": lambda: open(mp / "new-file", "xb"),
            "mkdir": lambda: os.mkdir(mp / "newdir"),
            "rename": lambda: os.rename(f, mp / "renamed"),
            "unlink": lambda: os.unlink(f),
            "rmdir": lambda: os.rmdir(mp / "empty-dir"),
            "chmod": lambda: os.chmod(f, 0o777),
            "chown": lambda: os.chown(f, 1, 1),
            "utime": lambda: os.utime(f, (0, 0)),
            "setxattr": lambda: os.setxattr(f, "user.x", b"1"),
            "removexattr": lambda: os.removexattr(f, "user.comment"),
            "symlink": lambda: os.symlink("x", mp / "newlink"),
            "link": lambda: os.link(f, mp / "newhard"),
            "mknod": lambda: os.mkfifo(mp / "newfifo"),
        }
        for what, op in attempts.items():
            with pytest.raises(OSError) as e:
                op()
            assert e.value.errno == errno.EROFS, f"{what}: {e.value}"
        assert f.read_text() == "hello\n"


TEST_USER = "psfusetest"


def _ensure_user() -> None:
    if subprocess.run(["id", "-u", TEST_USER], capture_output=True).returncode != 0:
        subprocess.run(["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", TEST_USER],
                       check=True, capture_output=True)


def _as_user(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(["runuser", "-u", TEST_USER, "--", *cmd], capture_output=True, text=True, timeout=30)


def test_stored_permissions_are_enforced(tree_safe, tmp_path):
    if shutil.which("runuser") is None or shutil.which("useradd") is None:
        pytest.skip("runuser/useradd are not installed")
    _ensure_user()
    safe, _, _, second = tree_safe
    base = Path(tempfile.mkdtemp(prefix="ps-fuse-perm-", dir="/tmp"))   # reachable by the test user
    os.chmod(base, 0o755)
    try:
        _check_permissions(safe, point_id(second), base)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _check_permissions(safe: Path, pid: str, tmp_path: Path) -> None:
    mp = tmp_path / "mnt"
    with mounted(safe, mp, pid, "--allow-other"):
        ok = _as_user("cat", str(mp / "hello.txt"))
        assert ok.returncode == 0 and ok.stdout == "hello\n", ok.stderr
        refused = _as_user("cat", str(mp / "secret"))
        assert refused.returncode != 0 and "Permission denied" in refused.stderr
        # root (the owner could share it with root) still reads it
        assert (mp / "secret").read_text() == "owner only\n"
    mp2 = tmp_path / "mnt2"
    with mounted(safe, mp2, pid):
        # without --allow-other, other users cannot enter the mount at all
        r = _as_user("ls", str(mp2))
        assert r.returncode != 0 and "Permission denied" in r.stderr


def test_volume_point_loop_mounts(safe_dir, tmp_path):
    content = tmp_path / "content"
    make_tree(content)
    img = tmp_path / "disk.img"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(content), str(img), "24M"], check=True)
    p = backup(safe_dir, img, "disk", "--volume")
    mp = tmp_path / "mnt"
    loop, orig = tmp_path / "loop", tmp_path / "orig"
    loop.mkdir()
    orig.mkdir()
    with mounted(safe_dir, mp, point_id(p)):
        image = mp / "disk.img"
        assert os.listdir(mp) == ["disk.img"]
        assert image.stat().st_size == img.stat().st_size
        assert subprocess.run(["cmp", str(image), str(img)]).returncode == 0
        try:
            for what, where in ((image, loop), (img, orig)):
                subprocess.run(["mount", "-o", "loop,ro", str(what), str(where)], check=True, capture_output=True,
                               timeout=60)
            got = walk(loop)
            assert b"dir/deeper/leaf" in got and got[b"hello.txt"]["size"] == 6
            assert got == walk(orig)
        finally:
            for where in (loop, orig):
                subprocess.run(["umount", "-l", str(where)], capture_output=True, timeout=60)


def _chunk_keys_of(safe_path: Path, point: dict, name: bytes) -> list[bytes]:
    from pointsafe.cas import BlobReader, Safe, decode_tree
    with Safe.open(safe_path, password=PW) as s:
        p = s.point(point_id(point))
        entries = {e.name: e for e in decode_tree(s.get(p.root))}
        e = entries[name]
        r = BlobReader(e.ref, e.size, s.get, lambda k: s.entry(k).kind)
        return [k for _, _, k in r.extents() if k is not None]


def _damage(safe_path: Path, key: bytes) -> None:
    from pointsafe.cas import Safe
    with Safe.open(safe_path, password=PW) as s:
        e = s.entry(key)
        path = s.pack_path(e.pack)
    with open(path, "r+b") as f:
        f.seek(e.offset + 64 + e.stored_len // 2)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0xFF]))


def test_damaged_object_reads_as_eio_and_is_logged(safe_dir, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    data = os.urandom(600_000)
    (src / "victim.bin").write_bytes(data)
    (src / "fine.txt").write_text("still readable\n")
    p = backup(safe_dir, src, "dmg")
    keys = _chunk_keys_of(safe_dir, p, b"victim.bin")
    assert len(keys) > 2
    _damage(safe_dir, keys[len(keys) // 2])
    mp = tmp_path / "mnt"
    log = tmp_path / "mount.log"
    with mounted(safe_dir, mp, point_id(p), log=log):
        with open(mp / "victim.bin", "rb") as f:
            head = f.read(4096)
            assert head == data[:4096]
            f.seek(0)
            with pytest.raises(OSError) as e:
                f.read()
            assert e.value.errno == errno.EIO
        assert (mp / "fine.txt").read_text() == "still readable\n"
    text = log.read_text()
    assert "/victim.bin" in text and "damaged" in text


def test_root_listing_is_lazy_on_200k_files(safe_dir, tmp_path):
    """A point of 200,000 files: mounting and listing its root reads the root only."""
    from pointsafe.cas import Entry, Kind, Safe, encode_tree, utc_now_iso
    from pointsafe.cas.tree import DIR, REG
    dirs, per_dir = 200, 1000
    with Safe.open(safe_dir, password=PW) as s, s.writer("test") as w:
        blob = w.put(Kind.CHUNK, b"same content\n")
        top = []
        for d in range(dirs):
            files = [Entry(b"file-%06d" % i, REG, 0o644, size=13, ref=blob) for i in range(per_dir)]
            kids, payload = encode_tree(files)
            sub = w.put_node(Kind.TREE, kids, payload)
            top.append(Entry(b"dir-%03d" % d, DIR, 0o755, ref=sub, nlink=2))
        kids, payload = encode_tree(top)
        root = w.put_node(Kind.TREE, kids, payload)
        now = utc_now_iso()
        big = w.add_point({"name": "big", "kind": "tree", "source": "/big", "host": "test", "started": now,
                           "finished": now, "size": dirs * per_dir * 13,
                           "root_meta": {"mode": 0o755, "uid": 0, "gid": 0, "mtime_ns": 0, "atime_ns": 0,
                                         "xattrs": []}}, root)
    mp = tmp_path / "mnt"
    # 2 MiB: room for the root and one 1,000-entry directory as the cache counts them (≈ 1 KiB
    # an entry, what a decoded entry costs in resident memory), not for 20 of them
    with mounted(safe_dir, mp, big.id, "--dir-cache-size", "2M"):
        before = stats(mp)["objects_read"]
        names = os.listdir(mp)
        assert len(names) == dirs
        after_root = stats(mp)["objects_read"]
        assert after_root - before == 1           # the root directory's TREE node, nothing below
        assert len(os.listdir(mp / "dir-007")) == per_dir
        assert stats(mp)["objects_read"] - after_root == 1
        assert (mp / "dir-007" / "file-000999").read_text() == "same content\n"
        for d in range(0, dirs, 10):                 # 20 directories of 1000 entries each
            assert len(os.listdir(mp / ("dir-%03d" % d))) == per_dir
        assert stats(mp)["dir_cache_bytes"] <= 2 << 20   # decoded directories stay within the bound
    mp2 = tmp_path / "mnt2"
    with mounted(safe_dir, mp2):
        before = stats(mp2)["objects_read"]
        assert len(os.listdir(mp2)) == 3          # the point's folder, "big", "latest"
        assert stats(mp2)["objects_read"] == before   # the point list only


def test_bad_input_is_one_clear_line(tree_safe, tmp_path):
    safe, src, _, second = tree_safe

    def err(*args, **kw) -> str:
        r = run_cli(*args, safe=safe, **kw)
        assert r.code == 1, (args, r)
        lines = r.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("pointsafe: error: "), r.err
        return lines[0]

    assert "does not exist" in err("mount", tmp_path / "missing")
    assert "not empty" in err("mount", src)
    (tmp_path / "m").mkdir()
    assert "no point" in err("mount", tmp_path / "m", "ffff0000")
    assert "unknown point" in err("mount", tmp_path / "m", "not-a-point")
    env = {"PATH": "/nonexistent"}
    assert "FUSE is not available" in err("mount", tmp_path / "m", env=env)
    assert "not a pointsafe mount" in err("umount", "/proc")
    assert "not mounted" in err("umount", tmp_path / "m")
    mp = tmp_path / "mnt"
    with mounted(safe, mp):
        assert "already mounted" in err("mount", mp)
        r = run_cli("umount", mp, safe=safe)
        assert r.code == 0, r.err
        assert not os.path.ismount(mp)
    unmount(mp)


def test_reads_stay_correct_during_backup_forget_gc_defrag(safe_dir, tmp_path):
    """Readers of a kept point see the right bytes while gc and defrag move its objects."""
    import threading
    import time
    src = tmp_path / "src"
    src.mkdir()
    files = {f"f{i:02d}.bin": os.urandom(150_000) for i in range(24)}
    for n, d in files.items():
        (src / n).write_bytes(d)
    backup(safe_dir, src, "s")
    for i, n in enumerate(sorted(files)):
        if i % 2:
            files[n] = os.urandom(150_000)
            (src / n).write_bytes(files[n])
    backup(safe_dir, src, "s")
    other = tmp_path / "other"
    other.mkdir()
    (other / "x.bin").write_bytes(os.urandom(400_000))
    mp = tmp_path / "mnt"
    errors: list[str] = []
    rounds = [0]
    stop = threading.Event()
    with mounted(safe_dir, mp, "--cache-size", "256K") as _:
        folder = [n for n in os.listdir(mp / "s") if n != "latest"]
        assert len(folder) == 2
        kept_dir = mp / "s" / os.readlink(mp / "s" / "latest")

        def reader() -> None:
            while not stop.is_set():
                for n, want in files.items():
                    try:
                        fd = os.open(kept_dir / n, os.O_RDONLY)
                        try:
                            got = b"".join(iter(lambda: os.read(fd, 1 << 17), b""))
                            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)   # next round asks the mount again
                        finally:
                            os.close(fd)
                        if got != want:
                            errors.append(f"{n}: wrong bytes")
                    except OSError as e:
                        errors.append(f"{n}: {e}")
                rounds[0] += 1

        threads = [threading.Thread(target=reader) for _ in range(2)]
        for t in threads:
            t.start()
        try:
            steps = [("backup", other, "--name", "other"), ("forget", "--keep-last", "1", "--name", "s"),
                     ("gc", "--threshold", "1"), ("defrag",)]
            moved = 0
            for step in steps:
                r = run_cli(*step, "--json", safe=safe_dir)
                assert r.code in (0, 3), (step, r.err)
                if step[0] == "gc":
                    moved += json.loads(r.out).get("objects_moved", 0)
            assert moved > 0, "gc moved nothing: the test would not test moves"
            start = rounds[0]
            deadline = time.monotonic() + 20
            while rounds[0] < start + 2 and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=60)
        assert not errors, errors[:5]
        assert rounds[0] >= 2
        assert stats(mp)["chunk_cache_bytes"] <= 256 * 1024
        time.sleep(1.1)                              # the point list is re-read after a second
        assert "other" in os.listdir(mp)
        assert (mp / "other" / "latest" / "x.bin").stat().st_size == 400_000
