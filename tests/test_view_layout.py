"""``fusefs.View`` of a whole safe, without FUSE: point folders, per-name folders, ``latest``
links, point list changes while the view is open, and volume points (the image file)."""

from __future__ import annotations

import json
import os
import random

import pytest

from conftest import run_cli
from pointsafe.fusefs.view import ROOT_INO, STATS_XATTR, ReadOnly, View
from test_view import backup, extents, listdir, open_view, read_all, resolve


def _names(view: View, ino: int) -> list[bytes]:
    return [n for n, _, _ in listdir(view, ino)[2:]]


def _newest(points: list[dict]) -> dict:
    return max(points, key=lambda p: (p["started"], p["id"]))


@pytest.fixture(scope="module")
def safe3(tmp_path_factory):
    """A safe with two points named www, one named db, and one volume named disk."""
    base = tmp_path_factory.mktemp("view-layout")
    safe, src, db = base / "safe", base / "www", base / "db"
    assert run_cli("init", safe).code == 0
    src.mkdir()
    (src / "index.html").write_text("<h1>one</h1>\n")
    os.link(src / "index.html", src / "same.html")
    os.setxattr(src, "user.top", b"top of www")
    os.utime(src, ns=(1_600_000_000_000_000_000, 1_600_000_000_000_000_000))
    first = backup(safe, src, "www")
    (src / "added.txt").write_text("second point only\n")
    os.utime(src, ns=(1_600_000_000_000_000_000, 1_600_000_000_000_000_000))
    second = backup(safe, src, "www")
    db.mkdir()
    (db / "table").write_bytes(b"rows\n" * 1000)
    third = backup(safe, db, "db")
    img = base / "disk.img"
    rng = random.Random(5)
    with open(img, "wb") as f:
        f.write(rng.randbytes(300_000))
        f.write(bytes(1 << 20))                     # zeros: recorded as holes
        f.write(rng.randbytes(123_457))
    vol = backup(safe, img, "disk", "--volume")
    return safe, src, img, [first, second, third, vol]


def test_root_has_a_folder_per_point_a_folder_per_name_and_latest(safe3):
    safe, src, _, points = safe3
    with open_view(safe) as v:
        names = _names(v, ROOT_INO)
        folders = [n for n in names if n[:1].isdigit()]
        assert sorted(names) == sorted(folders + [b"www", b"db", b"disk", b"latest"])
        assert len(folders) == len(points)
        for n in folders:                   # named by the start time in UTC, oldest first
            assert n.decode()[:20].endswith("Z")
        assert folders == sorted(folders)
        by_start = sorted(points, key=lambda p: (p["started"], p["id"]))
        for n, p in zip(folders, by_start):
            assert n.decode().startswith(p["started"][:19])
        newest = folders[by_start.index(_newest(points))]
        latest = v.lookup(ROOT_INO, b"latest")
        assert v.readlink(latest.ino) == newest
        assert v.getattr(latest.ino).virtual and v.getattr(v.lookup(ROOT_INO, b"www").ino).virtual

        www = v.lookup(ROOT_INO, b"www")
        kids = _names(v, www.ino)
        assert kids == sorted(folders[by_start.index(p)] for p in points[:2]) + [b"latest"]
        assert v.readlink(v.lookup(www.ino, b"latest").ino) == folders[by_start.index(_newest(points[:2]))]

        # a point's folder shows its tree, with the source directory's attributes and xattrs
        p2 = v.lookup(ROOT_INO, folders[by_start.index(points[1])])
        assert _names(v, p2.ino) == [b"added.txt", b"index.html", b"same.html"]
        st = v.getattr(p2.ino)
        assert st.mtime_ns == os.stat(src).st_mtime_ns and st.mode == os.stat(src).st_mode
        assert (b"user.top", b"top of www") in v.xattrs(p2.ino)
        assert read_all(v, v.lookup(p2.ino, b"added.txt")) == b"second point only\n"
        assert not v.getattr(v.lookup(p2.ino, b"index.html").ino).virtual
        # the same point under its name's folder
        also = v.lookup(www.ino, folders[by_start.index(points[1])])
        assert _names(v, also.ino) == _names(v, p2.ino)

        # hardlinks are one inode within a point, not across points
        p1 = v.lookup(ROOT_INO, folders[by_start.index(points[0])])
        a, b = v.lookup(p1.ino, b"index.html"), v.lookup(p1.ino, b"same.html")
        assert a.ino == b.ino
        assert v.lookup(p2.ino, b"index.html").ino not in (a.ino, ROOT_INO)
        stats = json.loads(v.getxattr(ROOT_INO, STATS_XATTR))
        assert stats["lookups"] > 0 and stats["inodes"] > 1


def test_new_and_forgotten_points_show_without_renaming_others(safe3, tmp_path):
    safe = safe3[0]
    with open_view(safe, refresh_seconds=0) as v:
        before = _names(v, ROOT_INO)
        extra = tmp_path / "extra"
        extra.mkdir()
        (extra / "f").write_text("x\n")
        new = backup(safe, extra, "www")
        after = _names(v, ROOT_INO)
        added = sorted(set(after) - set(before))
        assert len(added) == 1 and added[0].decode().startswith(new["started"][:19])
        assert v.readlink(v.lookup(ROOT_INO, b"latest").ino) == added[0]
        www = v.lookup(ROOT_INO, b"www")
        assert v.readlink(v.lookup(www.ino, b"latest").ino) == added[0]
        r = run_cli("forget", new["id"], safe=safe)
        assert r.code == 0, r.err
        assert _names(v, ROOT_INO) == before


def test_a_volume_point_is_one_image_file(safe3):
    safe, _, img, points = safe3
    vol = points[3]
    data = img.read_bytes()
    with open_view(safe, vol) as v:
        assert _names(v, ROOT_INO) == [b"disk.img"]
        node = v.lookup(ROOT_INO, b"disk.img")
        st = v.getattr(node.ino)
        assert st.size == len(data) and st.mode == 0o100444 and not st.virtual
        assert any(k is None for _, _, k in extents(v, node)), "the zeros were not stored as holes"
        fh = v.open(node.ino, os.O_RDONLY)
        rng = random.Random(2)
        try:
            for _ in range(150):
                off, size = rng.randrange(len(data) + 10), rng.choice([1, 512, 4096, 65_536, 200_000])
                assert bytes(v.read(fh, off, size)) == data[off:off + size], (off, size)
        finally:
            v.release(fh)
        assert read_all(v, node) == data
    with open_view(safe) as v:            # the same image inside the whole-safe layout
        node = resolve(v, b"disk/latest")
        assert v.readlink(node.ino)[:4].isdigit()
        folder = v.lookup(v.lookup(ROOT_INO, b"disk").ino, v.readlink(node.ino))
        assert _names(v, folder.ino) == [b"disk.img"]
        assert read_all(v, v.lookup(folder.ino, b"disk.img")) == data


def test_a_volume_image_has_no_xattrs_and_cannot_be_written(safe3):
    safe, _, _, points = safe3
    with open_view(safe, points[3]) as v:
        node = v.lookup(ROOT_INO, b"disk.img")
        assert v.xattrs(node.ino) == []
        with pytest.raises(ReadOnly):
            v.open(node.ino, os.O_RDWR)
