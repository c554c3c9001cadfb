"""btrfs tree incrementals that walk only what changed (issue 12): the send stream between the
previous point's retained snapshot and the new one says what to look at; unchanged files are
neither stat'ed nor read, a modified file is read only around its written extents. The point
is the one a full read makes (same root key), restores to the source, and reads about the
written bytes; when the change source cannot be trusted, the backup walks the whole tree and
says why.

Scaled down from the issue (2 GiB file, 10,000 small files, 200 writes) to a 96 MiB file,
10,000 small files and 48 writes of 16 KiB, so that the whole file runs in well under a
minute. The safes use the default chunking (64 KiB on average, four times a write): the bytes
around a written extent, which the chunker must cut again until it resyncs, come from the
previous point's chunks in the safe, so that only the written extents are read from the source.
"""

from __future__ import annotations

import os
import random
import subprocess
from pathlib import Path

import pytest

from _backup_util import backup, restore
from _tree_util import snapshot, assert_trees_equal
from conftest import run_cli
from btrfs_util import btrfs_volume, make_subvolume
from pointsafe.cas import Safe

MiB = 1 << 20
BIG = 96 * MiB
WRITE = 16 * 1024
SNAPDIR = b".pointsafe-snapshots"


def _safe(path: Path) -> Path:
    Safe.init(path, pack_size=8 * MiB).close()
    return path


def _populate(src: Path, rng: random.Random) -> None:
    with open(src / "big", "wb") as f:
        for _ in range(BIG // (8 * MiB)):
            f.write(rng.randbytes(8 * MiB))
    for d in range(100):
        (src / f"d{d:02}").mkdir()
        for i in range(100):
            (src / f"d{d:02}" / f"f{i:02}").write_bytes(rng.randbytes(100 + (d * 100 + i) % 1900))
    (src / "dir1" / "inner").mkdir(parents=True)
    (src / "dir1" / "inner" / "x").write_bytes(b"x" * 5000)
    (src / "dir1" / "inner" / "keep").write_bytes(rng.randbytes(3 * MiB))
    (src / "rmme" / "sub").mkdir(parents=True)
    (src / "rmme" / "sub" / "y").write_bytes(b"y")
    for n in ("gone", "lk", "a", "b"):
        (src / n).write_bytes(n.encode() * 3000)
    (src / "app").write_bytes(rng.randbytes(300_000))
    os.symlink("big", src / "sym")
    os.mkfifo(src / "fifo")
    os.setxattr(src / "d01" / "f01", "user.old", b"1")
    os.link(src / "d08" / "f08", src / "hlink")     # d08 has no other change
    with open(src / "sparse", "wb") as f:
        f.truncate(8 * MiB)
        f.seek(MiB)
        f.write(rng.randbytes(64 * 1024))
    (src / "trunc").write_bytes(rng.randbytes(200_000))
    (src / "odd").write_bytes(rng.randbytes(500_000))


def _change(src: Path, rng: random.Random) -> tuple[int, int]:
    """Scattered writes, renames, deletions, a new hardlink, xattr and mode changes; returns
    (the bytes written into files kept in place, the bytes of the files that are read whole
    by design: new, truncated, sparse, hardlinked, or below a renamed directory)."""
    written = whole = 0
    with open(src / "big", "r+b") as f:
        for k in range(48):
            off = (k * (BIG // 48) + rng.randrange(0, BIG // 48 - WRITE)) // 4096 * 4096
            f.seek(off)
            f.write(rng.randbytes(WRITE))
            written += WRITE
    with open(src / "app", "ab") as f:
        f.write(rng.randbytes(40_000))
        written += 40_000
    (src / "dir1" / "inner" / "x").write_bytes(b"z" * 7000)
    whole += 7000
    os.rename(src / "dir1", src / "dir2")          # its unchanged files are not read again
    os.rename(src / "d03" / "f01", src / "d04" / "moved")
    subprocess.run(["rm", "-r", str(src / "rmme")], check=True)
    os.unlink(src / "gone")
    os.link(src / "lk", src / "d05" / "lk2")
    os.setxattr(src / "d05" / "f05", "user.k", b"v")
    os.removexattr(src / "d01" / "f01", "user.old")
    os.chmod(src / "d06" / "f06", 0o600)
    os.chown(src / "d07" / "f07", 1234, 5678)
    (src / "newdir" / "deep").mkdir(parents=True)
    (src / "newdir" / "deep" / "n").write_bytes(b"new" * 100)
    whole += 300 + 2 * 1999       # the new file, the moved one, and the two swapped names below
    os.rename(src / "a", src / "t")
    os.rename(src / "b", src / "a")
    os.rename(src / "t", src / "b")
    os.unlink(src / "sym")
    os.symlink("app", src / "sym")
    with open(src / "hlink", "ab") as f:            # the other name, d08/f08, changes with it
        f.write(b"more")
        whole += 2000
    with open(src / "sparse", "r+b") as f:          # holes: cut per data region, read whole
        f.seek(5 * MiB)
        f.write(rng.randbytes(WRITE))
        whole += 64 * 1024 + WRITE
    os.truncate(src / "trunc", 50_000)
    whole += 50_000
    with open(src / "odd", "r+b") as f:             # 100 bytes: btrfs reports the 4 KiB around them
        f.seek(123_457)
        f.write(rng.randbytes(100))
        written += 4096
    return written, whole


def _source(src: Path) -> dict:
    """The source as the point must hold it: pointsafe's own snapshots are never in a point."""
    nodes = {k: v for k, v in snapshot(src).items() if k != SNAPDIR and not k.startswith(SNAPDIR + b"/")}
    nodes[b""].children = [c for c in nodes[b""].children if c != SNAPDIR]
    return nodes


def _restored(safe: Path, point: dict, out: Path) -> Path:
    r = restore(safe, point["id"], out)
    assert r["warnings"] == []
    return out


def test_incremental_reads_only_what_changed_and_equals_a_full_read(tmp_path: Path) -> None:
    rng = random.Random(12)
    with btrfs_volume(tmp_path, size="400M") as mnt:
        src = make_subvolume(mnt, "data")
        _populate(src, rng)
        inc, full = _safe(tmp_path / "inc"), _safe(tmp_path / "full")
        first = backup(inc, src, "--snapshot", "btrfs", name="data")
        assert first["change_source"] == {"kind": "full", "detail": "", "fallback": None}
        backup(full, src, "--snapshot", "btrfs", name="data")

        written, whole = _change(src, rng)
        p = backup(inc, src, "--snapshot", "btrfs", name="data")
        q = backup(full, src, "--snapshot", "btrfs", "--full-read", name="data")
        assert p["warnings"] == [] and q["warnings"] == []
        assert p["change_source"] == {"kind": "btrfs-send", "detail": first["snapshot"]["path"], "fallback": None}
        assert q["change_source"]["kind"] == "full"

        # object for object the point a full read makes
        assert p["root"] == q["root"]
        for k in ("files", "dirs", "other", "size"):
            assert p["stats"][k] == q["stats"][k], k
        assert p["size"] == q["size"]
        # and it reads about what was written: not the 96 MiB file, not the 10,000 small files
        scanned = p["stats"]["bytes_scanned"]
        assert q["stats"]["bytes_scanned"] >= BIG
        print(f"incremental scanned {scanned} B for {written} B written and {whole} B read whole; "
              f"full read {q['stats']['bytes_scanned']} B")
        # only what was written, and the files read whole
        assert scanned <= written + whole + 64 * 1024, (scanned, written, whole)
        assert p["stats"]["files_unchanged"] >= 9_990

        before = _source(src)
        assert_trees_equal(before, _restored(inc, p, tmp_path / "out"))


def test_untrusted_change_source_walks_the_whole_tree_with_a_warning(tmp_path: Path) -> None:
    rng = random.Random(15)
    with btrfs_volume(tmp_path) as mnt:
        src = make_subvolume(mnt, "data")
        for d in range(5):
            (src / f"d{d}").mkdir()
            for i in range(20):
                (src / f"d{d}" / f"f{i}").write_bytes(rng.randbytes(3000 + i))
        (src / "big").write_bytes(rng.randbytes(4 * MiB))
        safe = _safe(tmp_path / "safe")
        first = backup(safe, src, "--snapshot", "btrfs", name="data")

        # the retained snapshot is gone
        subprocess.run(["btrfs", "subvolume", "delete", first["snapshot"]["path"]], check=True, capture_output=True)
        (src / "d1" / "f1").write_bytes(b"changed")
        p = backup(safe, src, "--snapshot", "btrfs", name="data", expect=3)
        assert p["change_source"]["kind"] == "full" and "gone" in p["change_source"]["fallback"]
        assert [w for w in p["warnings"] if "btrfs send not used" in w["message"] and "gone" in w["message"]]
        assert_trees_equal(_source(src), _restored(safe, p, tmp_path / "out1"))

        # the retained snapshot was edited since its point (its ctransid moved)
        snap = p["snapshot"]["path"]
        subprocess.run(["btrfs", "property", "set", "-ts", snap, "ro", "false"], check=True)
        Path(snap, "d2", "f2").write_bytes(b"edited in the snapshot")
        subprocess.run(["btrfs", "property", "set", "-ts", snap, "ro", "true"], check=True)
        subprocess.run(["sync"], check=True)
        with open(src / "big", "r+b") as f:
            f.seek(MiB)
            f.write(rng.randbytes(WRITE))
        q = backup(safe, src, "--snapshot", "btrfs", name="data", expect=3)
        assert "changed since that point" in q["change_source"]["fallback"]
        assert [w for w in q["warnings"] if "btrfs send not used" in w["message"]]
        assert q["stats"]["bytes_scanned"] >= 4 * MiB
        assert_trees_equal(_source(src), _restored(safe, q, tmp_path / "out2"))

        # a point that fell back is a good base: the next one is incremental again
        (src / "d3" / "new").write_bytes(b"n")
        r = backup(safe, src, "--snapshot", "btrfs", name="data")
        assert r["change_source"]["kind"] == "btrfs-send" and r["warnings"] == []
        assert r["stats"]["bytes_scanned"] < 64 * 1024
        assert_trees_equal(_source(src), _restored(safe, r, tmp_path / "out3"))


def test_full_read_and_first_backup_need_no_warning(tmp_path: Path) -> None:
    with btrfs_volume(tmp_path) as mnt:
        src = make_subvolume(mnt, "data")
        (src / "f").write_bytes(b"hello" * 1000)
        safe = _safe(tmp_path / "safe")
        a = backup(safe, src, "--snapshot", "btrfs", name="data")
        b = backup(safe, src, "--snapshot", "btrfs", "--full-read", name="data")
        assert a["warnings"] == b["warnings"] == []
        assert b["change_source"] == {"kind": "full", "detail": "--full-read", "fallback": None}
        assert b["stats"]["bytes_scanned"] == 5000 and a["root"] == b["root"]
        c = backup(safe, src, "--snapshot", "btrfs", name="data")
        assert c["change_source"]["kind"] == "btrfs-send" and c["stats"]["bytes_scanned"] == 0
        assert c["root"] == a["root"]
        # cbt.full_every: once the last full read is that old, the next backup reads everything
        run_cli("config", "set", "cbt.full_every", "2d", safe=safe, check=True)
        d = backup(safe, src, "--snapshot", "btrfs", name="data")
        assert d["change_source"]["kind"] == "btrfs-send"          # the last full read (b) is recent
        e = backup(safe, src, "--snapshot", "btrfs", name="data", env={"POINTSAFE_NOW": "2099-01-01T00:00:00Z"})
        assert e["change_source"]["detail"] == "--full-read" and e["stats"]["bytes_scanned"] == 5000
        assert e["root"] == a["root"] and e["warnings"] == []


def test_a_directory_of_the_subvolume_as_source(tmp_path: Path) -> None:
    rng = random.Random(3)
    with btrfs_volume(tmp_path) as mnt:
        src = make_subvolume(mnt, "data")
        sub = src / "www" / "site"
        (sub / "img").mkdir(parents=True)
        (sub / "img" / "logo").write_bytes(rng.randbytes(2 * MiB))
        (sub / "index").write_bytes(b"hello")
        (src / "outside").write_bytes(b"o")
        safe = _safe(tmp_path / "safe")
        full = _safe(tmp_path / "full")
        backup(safe, sub, "--snapshot", "btrfs", name="site")
        backup(full, sub, "--snapshot", "btrfs", name="site")
        with open(sub / "img" / "logo", "r+b") as f:
            f.seek(MiB)
            f.write(rng.randbytes(WRITE))
        (src / "outside").write_bytes(b"changed outside the source")
        os.rename(sub / "index", sub / "index.html")
        p = backup(safe, sub, "--snapshot", "btrfs", name="site")
        q = backup(full, sub, "--snapshot", "btrfs", "--full-read", name="site")
        assert p["change_source"]["kind"] == "btrfs-send" and p["warnings"] == []
        assert p["root"] == q["root"]
        assert p["stats"]["bytes_scanned"] <= 2 * WRITE + 4096
        assert_trees_equal(snapshot(sub), _restored(safe, p, tmp_path / "out"))


@pytest.fixture(autouse=True)
def _root_only() -> None:
    if os.geteuid() != 0:
        pytest.skip("btrfs send needs root")
