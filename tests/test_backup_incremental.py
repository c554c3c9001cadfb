"""Virtual fulls at incremental cost: what an incremental reads and writes grows with what
changed, not with the size of the source; unchanged data is stored once; an insertion in the
middle of a large file re-stores only the chunks around it."""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import pytest

from _backup_util import backup, restore
from _tree_util import assert_trees_equal, diff_snapshots, snapshot
from conftest import run_cli


def make_source(top: Path, files: int, seed: int, flat: bool = False) -> None:
    """``files`` small files, 50 to a directory, ten top-level directories (a fixed depth, so
    that the path from the root to a file has the same length whatever the size); or, ``flat``,
    all of them in ``top03/sub000``."""
    rng = random.Random(seed)
    per_top = files // 10
    for i in range(files):
        t, rest = divmod(i, per_top)
        sub, n = divmod(rest, 50)
        d = top / f"top{t:02}" / f"sub{sub:03}"
        name = f"file{n:03}.txt"
        if flat:
            d, name = top / "top03" / "sub000", f"file{i:03}.txt"
        d.mkdir(parents=True, exist_ok=True)
        (d / name).write_bytes(f"{seed}:{i}:".encode() + rng.randbytes(600))


def change_one(top: Path, seed: int) -> None:
    p = top / "top03" / "sub000" / "file007.txt"
    p.write_bytes(b"changed " + random.Random(seed).randbytes(20_000))


@pytest.mark.parametrize("layout", [
    "nested",
    "flat",   # large directories are paged (docs/FORMAT.md), so this holds there too
])
def test_incremental_cost_does_not_grow_with_the_source(safe_dir, tmp_path, layout):
    results = {}
    for files in (500, 5000):
        src = tmp_path / f"src{files}"
        make_source(src, files, seed=files, flat=layout == "flat")
        full = backup(safe_dir, src, "-q", name=f"s{files}")
        assert full["stats"]["files"] == files
        change_one(src, seed=files)
        inc = backup(safe_dir, src, "-q", name=f"s{files}")
        st = inc["stats"]
        assert st["files"] == files
        assert st["files_unchanged"] == files - 1, st
        assert st["bytes_read"] == 20_008, "only the changed file is read again"
        results[files] = (full["stats"], st)
    (f1, small), (f2, big) = results[500], results[5000]
    print(f"\nincremental after one changed file ({layout}): 500 files -> objects_new {small['objects_new']}, "
          f"bytes_stored {small['bytes_stored']}; 5000 files -> objects_new {big['objects_new']}, "
          f"bytes_stored {big['bytes_stored']} (fulls stored {f1['bytes_stored']} and {f2['bytes_stored']})")
    assert f2["bytes_stored"] > 8 * f1["bytes_stored"], "the sources really are of very different sizes"
    # the incremental writes the file and the few tree nodes on its path: the same for both
    # (plus, in a flat directory, the index of the paged 5,000-entry directory)
    assert small["objects_new"] <= big["objects_new"] <= small["objects_new"] + 1, (small, big)
    assert big["objects_new"] <= 10
    assert big["bytes_stored"] <= small["bytes_stored"] * 1.25 + 2048, (small, big)
    assert big["bytes_stored"] < 60_000


def test_unchanged_rebackup_reads_and_writes_nothing(safe_dir, tmp_path):
    """A tree made the ordinary way (atime == mtime, so relatime moves an atime on the first
    listing or read): backing it up twice reads nothing and writes nothing the second time, and
    backing up leaves the source's atimes alone -- except a symlink's, which readlink(2) moves
    (there is no O_NOATIME for it); the point records the atime the link has afterwards."""
    src = tmp_path / "src"
    make_source(src, 200, seed=1)
    (src / "top01" / "link").symlink_to("sub000/file001.txt")
    os.mkfifo(src / "top01" / "fifo")
    time.sleep(0.05)
    before = snapshot(src)
    p1 = backup(safe_dir, src, "-q", name="same")
    after = snapshot(src)
    moved = diff_snapshots(before, after)
    assert all(m.startswith("top01/link: atime_ns") for m in moved), moved
    p2 = backup(safe_dir, src, "-q", name="same")
    st = p2["stats"]
    assert st["bytes_read"] == 0 and st["bytes_new"] == 0, st
    assert st["objects_new"] == 0 and st["bytes_stored"] == 0, st
    assert p2["root"] == p1["root"]
    d = run_cli("diff", p1["id"], p2["id"], "--json", safe=safe_dir)
    assert d.code == 0 and d.out.strip() == "[]", d
    restore(safe_dir, p1["id"], tmp_path / "out", "-q")
    assert_trees_equal(after, tmp_path / "out")


def test_same_data_under_two_names_is_stored_once(safe_dir, tmp_path):
    src = tmp_path / "a"
    make_source(src, 300, seed=5)
    a = backup(safe_dir, src, "-q", name="a")
    os.rename(src, tmp_path / "b")   # same inodes, another name: no change detection to lean on
    b = backup(safe_dir, tmp_path / "b", "-q", name="b")
    assert b["stats"]["files_unchanged"] == 0
    assert b["stats"]["bytes_read"] == a["stats"]["bytes_read"]
    assert b["stats"]["bytes_new"] == 0, "every chunk is already in the safe"
    assert b["stats"]["bytes_stored"] < a["stats"]["bytes_stored"] / 5


def test_insertion_in_a_large_file_restores_only_nearby_chunks(safe_dir, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    rng = random.Random(11)
    data = rng.randbytes(24 << 20)
    f = src / "large.bin"
    f.write_bytes(data)
    p1 = backup(safe_dir, src, "-q", name="large")
    assert p1["stats"]["bytes_new"] == len(data)
    mid = len(data) // 2 + 12345
    inserted = b"INSERTED" + rng.randbytes(1000)
    f.write_bytes(data[:mid] + inserted + data[mid:])
    p2 = backup(safe_dir, src, "-q", name="large")
    st = p2["stats"]
    print(f"\ninsertion of {len(inserted)} bytes into a {len(data) >> 20} MiB file: "
          f"bytes_new {st['bytes_new']}, objects_new {st['objects_new']}, bytes_stored {st['bytes_stored']}")
    assert st["bytes_read"] == len(data) + len(inserted)
    # content-defined chunks: only the chunk(s) around the insertion are new (max chunk 256 KiB)
    assert st["bytes_new"] <= 4 * 256 * 1024, st
    assert st["bytes_new"] < len(data) / 20
    out = tmp_path / "out"
    restore(safe_dir, p2["id"], out)
    assert (out / "large.bin").read_bytes() == data[:mid] + inserted + data[mid:]
