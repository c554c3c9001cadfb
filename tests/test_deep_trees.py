"""Points of trees deeper than Python's recursion limit: ``ls -R``, ``diff``, ``gc``, ``defrag``
and ``show --fragmentation`` work on them through the CLI and give the right answers."""

from __future__ import annotations

import json
import os
from pathlib import Path

from conftest import Result, run_cli
from test_walk_faults import remove_tree

DEPTH = 2500                     # levels of directories below the source (recursion limit: 1000)
BOTTOM = "/".join(["d"] * DEPTH)  # the deepest directory, as a path inside a point


def _write(dir_fd: int, name: str, data: bytes) -> None:
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644, dir_fd=dir_fd)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def _bottom_fd(top: Path) -> int:
    """An open descriptor of the deepest directory (walked down by name, no long paths)."""
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(DEPTH):
        nfd = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = nfd
    return fd


def make_deep(top: Path) -> None:
    """top/d/d/.../d (DEPTH levels), a file ``top.bin`` at the top and ``f`` at the bottom."""
    top.mkdir()
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    _write(fd, "top.bin", os.urandom(200_000))
    for _ in range(DEPTH):
        os.mkdir("d", 0o755, dir_fd=fd)
        nfd = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = nfd
    _write(fd, "f", os.urandom(300_000))
    os.close(fd)


def cli_json(*args: object, safe: Path) -> object:
    r: Result = run_cli(*args, "--json", safe=safe)
    assert "Traceback" not in r.err and "internal error" not in r.err.lower(), r.err
    assert r.code == 0, r.err
    return json.loads(r.out)


def test_deep_tree_ls_diff_gc_defrag_and_fragmentation(safe_dir: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    try:
        make_deep(src)
        p1 = cli_json("backup", src, "--name", "deep", safe=safe_dir)
        assert p1["warnings"] == []

        # ls -R: every directory and both files, depth first (a directory before what it holds).
        listing = cli_json("ls", "-R", p1["id"], safe=safe_dir)
        paths = [e["path"] for e in listing]
        want = ["d/" * i + "d" for i in range(DEPTH)]
        assert paths == [want[0], *want[1:], BOTTOM + "/f", "top.bin"]
        assert listing[-2]["size"] == 300_000 and listing[-2]["type"] == listing[-1]["type"]

        # A change at the bottom: f rewritten, g added (the bottom directory's mtime changes).
        fd = _bottom_fd(src)
        try:
            _write(fd, "f", os.urandom(300_000))
            _write(fd, "g", b"new at the bottom\n")
        finally:
            os.close(fd)
        p2 = cli_json("backup", src, "--name", "deep", safe=safe_dir)
        assert p2["warnings"] == []

        changes = cli_json("diff", p1["id"], p2["id"], safe=safe_dir)
        assert [(c["change"], c["path"]) for c in changes] == [
            ("m", BOTTOM), ("M", BOTTOM + "/f"), ("+", BOTTOM + "/g")]
        assert cli_json("diff", p2["id"], p2["id"], safe=safe_dir) == []
        back = cli_json("diff", p2["id"], p1["id"], safe=safe_dir)
        assert [(c["change"], c["path"]) for c in back] == [
            ("m", BOTTOM), ("M", BOTTOM + "/f"), ("-", BOTTOM + "/g")]

        # Forget the first point, give its space back, defragment: the second is whole.
        cli_json("forget", p1["id"], safe=safe_dir)
        gc = cli_json("gc", safe=safe_dir)
        assert gc["bytes_reclaimed"] > 0, gc
        defrag = cli_json("defrag", safe=safe_dir)
        assert defrag["fragmentation_after"]["seeks"] <= defrag["fragmentation_before"]["seeks"]

        shown = cli_json("show", p2["id"], "--fragmentation", safe=safe_dir)
        frag = shown["fragmentation"]
        assert frag["minimum_seeks"] >= 1 and frag["seeks"] >= frag["minimum_seeks"], frag
        assert frag["seeks"] == defrag["fragmentation_after"]["seeks"], (frag, defrag)

        after = cli_json("ls", "-R", p2["id"], safe=safe_dir)
        assert [e["path"] for e in after] == [*want, BOTTOM + "/f", BOTTOM + "/g", "top.bin"]
        r = run_cli("verify", safe=safe_dir)
        assert r.code == 0, r.err + r.out
    finally:
        remove_tree(src)


def test_fragmentation_and_defrag_of_a_point_missing_an_object_are_one_error_line(safe_dir: Path,
                                                                                   tmp_path: Path) -> None:
    """A file's content missing from the index (a damaged safe): the walk in file order that
    ``show --fragmentation`` and ``defrag`` make says so in one line, no internal error."""
    from pointsafe.cas import Safe, resolve_point
    from pointsafe.ingest.browse import lookup
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(os.urandom(500_000))
    p = cli_json("backup", src, safe=safe_dir)
    with Safe.open(safe_dir) as safe:
        ref = lookup(safe, resolve_point(safe, p["id"]), "f").ref
        assert ref is not None
        with safe.index.write() as t:
            assert t.delete(ref, db=safe.index.db["objects"])
    for args in (("show", p["id"], "--fragmentation"), ("defrag",)):
        r = run_cli(*args, safe=safe_dir)
        assert r.code == 1, (args, r.err)
        assert r.err.startswith("pointsafe: error: ") and len(r.err.strip().splitlines()) == 1, r.err
        assert ref.hex()[:12] in r.err and "missing" in r.err, r.err
