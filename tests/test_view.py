"""``fusefs.View`` without FUSE: what a mount would show, checked against the source tree.

The safes are made by the real CLI (``run_cli backup``) on tmp_path; the view is then driven
the way the pyfuse3 adapter drives it (lookup, opendir/readdir, open/read, forget), with no
mount. Helpers here (``open_view``, ``resolve``, ``read_all``, ``listdir``) are shared by
tests/test_view_*.py.
"""

from __future__ import annotations

import json
import os
import random
import stat
from contextlib import contextmanager
from pathlib import Path

import pytest

from conftest import PW, run_cli
from pointsafe.cas import BlobReader, Point, Safe, tree_pages
from pointsafe.fusefs.view import (ROOT_INO, BadHandle, IsADir, NoAttr, Node, NotADir, NotALink, NotFound,
                                   ReadOnly, View)

MANY = 1500          # entries of the paged directory (stored paged above 512, docs/FORMAT.md)


# -- helpers (also used by tests/test_view_*.py) ---------------------------------------------------

def backup(safe: Path, src: Path, name: str, *extra) -> dict:
    """A new point of ``src`` made by the CLI; returns its record (``backup --json``)."""
    r = run_cli("backup", src, "--name", name, "--json", "-q", *extra, safe=safe)
    assert r.code == 0, r.err
    out = json.loads(r.out)
    return out if "id" in out else out["point"]


@contextmanager
def open_view(safe: Path, point: dict | Point | None = None, **kw):
    """A View of ``point`` (a record or a Point; or of the whole safe), closed afterwards."""
    s = Safe.open(safe, password=PW)
    v = View(s, Point.from_record(point) if isinstance(point, dict) else point, **kw)
    try:
        yield v
    finally:
        v.close()
        s.close()


def resolve(view: View, rel: bytes | str, start: int = ROOT_INO) -> Node:
    """The node at ``rel`` below inode ``start``, looked up one name at a time."""
    node = view.node(start)
    b = os.fsencode(rel)
    for part in b.split(b"/"):
        if part:
            node = view.lookup(node.ino, part)
    return node


def read_all(view: View, node: Node, step: int = 1 << 20) -> bytes:
    """A whole file read as a program would: ``step`` bytes at a time until EOF."""
    fh = view.open(node.ino, os.O_RDONLY)
    try:
        out, off = [], 0
        while True:
            b = view.read(fh, off, step)
            if not b:
                return b"".join(out)
            out.append(bytes(b))
            off += len(b)
    finally:
        view.release(fh)


def listdir(view: View, ino: int, start: int = 0) -> list[tuple[bytes, Node, int]]:
    """(name, node, next offset) of a directory from offset ``start``, dot entries included."""
    fh = view.opendir(ino)
    try:
        return [(name, node, nxt) for name, node, nxt, _ in view.readdir(fh, start)]
    finally:
        view.releasedir(fh)


def make_source(root: Path) -> None:
    """Files of every kind the view must show: multi-chunk, sparse, hardlinked, symlinks, xattrs,
    a FIFO, a non-UTF-8 name, an empty file and directory, and a directory of MANY entries."""
    root.mkdir(parents=True)
    (root / "hello.txt").write_bytes(b"hello\n")
    os.setxattr(root / "hello.txt", "user.comment", b"greeting")
    (root / "dir" / "deeper").mkdir(parents=True)
    os.setxattr(root / "dir", "user.empty", b"")
    (root / "dir" / "deeper" / "leaf").write_bytes(b"leaf data\n" * 10)
    os.link(root / "hello.txt", root / "dir" / "hello-hardlink")
    rnd = random.Random(7).randbytes(1_500_000)
    (root / "big.bin").write_bytes(rnd + b"text " * 100_000 + rnd[:54_321])   # raw and compressed chunks
    os.setxattr(root / "big.bin", "user.bin", bytes(range(256)))
    os.link(root / "big.bin", root / "dir" / "deeper" / "big-hardlink")
    with open(root / "sparse.img", "wb") as f:
        f.truncate(6 << 20)
        f.seek(2 << 20)
        f.write(random.Random(8).randbytes(100_000))
        f.seek(5 << 20)
        f.write(b"tail" * 1000)
    os.symlink("hello.txt", root / "link-rel")
    os.symlink("/nonexistent/target", root / "link-dangling")
    os.symlink("../../big.bin", root / "dir" / "deeper" / "link-up")
    os.mkfifo(root / "fifo")
    (root / "empty").write_bytes(b"")
    (root / "empty-dir").mkdir()
    (root / os.fsdecode(b"caf\xe9-latin1")).write_bytes(b"non-utf8 name\n")
    many = root / "many"
    many.mkdir()
    for i in range(MANY):
        (many / f"f{i:05d}").write_bytes(b"%d\n" % i)


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """(safe, source, point): one point of make_source's tree, made once for this module."""
    base = tmp_path_factory.mktemp("view")
    safe, src = base / "safe", base / "src"
    assert run_cli("init", safe).code == 0
    make_source(src)
    return safe, src, backup(safe, src, "www")


@pytest.fixture
def view(tree):
    safe, _, point = tree
    with open_view(safe, point) as v:
        yield v


# -- names, attributes, listings -------------------------------------------------------------------

def _source_paths(src: Path) -> list[bytes]:
    out = [b""]
    srcb = os.fsencode(src)
    for dirpath, dirnames, filenames in os.walk(srcb):
        for name in dirnames + filenames:
            out.append(os.path.relpath(os.path.join(dirpath, name), srcb))
    return out


def test_every_entry_matches_its_source(tree, view):
    """Lookup, attributes, symlink targets, xattrs, listings and contents of every path equal the source's."""
    _, src, _ = tree
    srcb = os.fsencode(src)
    for rel in _source_paths(src):
        p = os.path.join(srcb, rel) if rel else srcb
        st = os.lstat(p)
        node = resolve(view, rel)
        got = view.getattr(node.ino)
        assert (got.mode, got.uid, got.gid, got.mtime_ns) == (st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns), rel
        assert rel == b"" or not got.virtual      # a point's contents never change
        if stat.S_ISDIR(st.st_mode):
            names = [n for n, _, _ in listdir(view, node.ino)]
            assert names == [b".", b".."] + sorted(os.listdir(p)), rel
            continue
        assert (got.size, got.nlink) == (st.st_size, st.st_nlink), rel
        if stat.S_ISLNK(st.st_mode):
            assert view.readlink(node.ino) == os.readlink(p)
            continue
        want_x = sorted((os.fsencode(n), os.getxattr(p, n)) for n in os.listxattr(p))
        assert sorted(view.xattrs(node.ino)) == want_x, rel
        for n, v in want_x:
            assert view.getxattr(node.ino, n) == v
        if stat.S_ISREG(st.st_mode):
            with open(p, "rb") as f:
                assert read_all(view, node) == f.read(), rel


def test_dot_and_dotdot(view):
    deeper = resolve(view, "dir/deeper")
    assert view.lookup(deeper.ino, b".").ino == deeper.ino
    assert view.lookup(deeper.ino, b"..").ino == resolve(view, "dir").ino
    assert view.lookup(ROOT_INO, b"..").ino == ROOT_INO
    (dot, n1, o1), (dotdot, n2, o2) = listdir(view, deeper.ino)[:2]
    assert (dot, n1.ino, o1) == (b".", deeper.ino, 1)
    assert (dotdot, n2.ino, o2) == (b"..", resolve(view, "dir").ino, 2)


def test_missing_names_are_not_found(view):
    for name in (b"nope", b"a", b"zzzz", b"hello.tx", b"hello.txt2"):
        with pytest.raises(NotFound):
            view.lookup(ROOT_INO, name)
    with pytest.raises(NotADir):
        view.lookup(resolve(view, "hello.txt").ino, b"x")


def test_hardlinks_have_one_inode_and_numbers_are_stable(view):
    a, b = resolve(view, "hello.txt"), resolve(view, "dir/hello-hardlink")
    assert a.ino == b.ino and view.getattr(a.ino).nlink == 2
    c, d = resolve(view, "big.bin"), resolve(view, "dir/deeper/big-hardlink")
    assert c.ino == d.ino and c.ino != a.ino
    every = [n.ino for name, n, _ in listdir(view, ROOT_INO)[2:]]
    assert len(set(every)) == len(every)          # distinct files, distinct numbers
    # readdir gives the same numbers as lookup, and a forgotten node comes back under its number
    by_name = {name: n.ino for name, n, _ in listdir(view, ROOT_INO)[2:]}
    assert by_name[b"hello.txt"] == a.ino
    view.forget(a.ino, 2)            # looked up twice (hello.txt, dir/hello-hardlink)
    with pytest.raises(NotFound):
        view.node(a.ino)
    assert resolve(view, "hello.txt").ino == a.ino


# -- paged directories and readdir offsets ---------------------------------------------------------

def test_paged_directory_lists_pages_and_resumes_at_any_offset(tree, view):
    _, src, _ = tree
    many = resolve(view, "many")
    pages = tree_pages(view.safe.get(many.entry.ref))
    assert pages is not None and len(pages) > 1, "the directory is not stored paged"
    want = sorted(os.fsencode(n) for n in os.listdir(src / "many"))
    full = listdir(view, many.ino)
    assert [n for n, _, _ in full] == [b".", b".."] + want
    assert [o for _, _, o in full] == list(range(1, MANY + 3))
    rng = random.Random(3)
    fh = view.opendir(many.ino)
    try:
        for start in [0, 1, 2, 3, MANY, MANY + 1] + rng.sample(range(MANY + 2), 30):
            got = [(n, node.ino, o) for n, node, o, _ in view.readdir(fh, start)]
            assert got == [(n, node.ino, o) for n, node, o in full[start:]], start
        assert list(view.readdir(fh, MANY + 2)) == []
        assert list(view.readdir(fh, MANY + 50)) == []
        # a reply that filled up: the kernel asks again from the last offset it was given
        seen, start = [], 0
        while True:
            batch = []
            for name, _, nxt, _ in view.readdir(fh, start):
                batch.append(name)
                start = nxt
                if len(batch) == 97:
                    break
            if not batch:
                break
            seen += batch
        assert seen == [b".", b".."] + want
    finally:
        view.releasedir(fh)
    for name in rng.sample(want, 50) + [want[0], want[-1]] + [p[2] for p in pages]:
        node = view.lookup(many.ino, name)
        assert read_all(view, node) == (src / "many" / os.fsdecode(name)).read_bytes()
    for name in (b"f", b"f00010x", b"g", b"e"):
        with pytest.raises(NotFound):
            view.lookup(many.ino, name)


def test_readdir_children_are_counted_lookups(view):
    """What readdir hands out, once remembered, is known until forgotten (as for lookup)."""
    dirn = resolve(view, "dir")
    fh = view.opendir(dirn.ino)
    kids = [n for _, n, _, counted in view.readdir(fh, 0) if counted]
    view.releasedir(fh)
    assert {n.name for n in kids} == {b"deeper", b"hello-hardlink"}
    deeper = next(n for n in kids if n.name == b"deeper")
    with pytest.raises(NotFound):
        view.node(deeper.ino)           # handed out but not remembered: the kernel does not hold it
    view.remember_many(kids)
    assert view.node(deeper.ino).entry.name == b"deeper"
    assert view.lookup(deeper.ino, b"leaf").name == b"leaf"
    view.forget(deeper.ino, 1)
    with pytest.raises(NotFound):
        view.node(deeper.ino)


# -- file contents ---------------------------------------------------------------------------------

def extents(view: View, node: Node) -> list[tuple[int, int, bytes | None]]:
    """(offset, length, chunk key or None for a hole) of a file's blob, read from the safe directly."""
    s = view.safe
    blob = BlobReader(node.entry.ref, node.entry.size, s.get, lambda k: s.entry(k).kind)
    return list(blob.extents())


def test_reads_across_chunk_boundaries_match_the_source(tree, view):
    _, src, _ = tree
    data = (src / "big.bin").read_bytes()
    node = resolve(view, "big.bin")
    cuts = [lo for lo, _, _ in extents(view, node)][1:]
    assert len(cuts) > 10
    rng = random.Random(11)
    ranges = [(c - d, n) for c in cuts for d, n in ((1, 2), (0, 1), (100, 200), (5000, 70_000))]
    ranges += [(rng.randrange(len(data)), rng.choice([1, 4096, 65_536, 131_072, 1 << 20, 3 << 20]))
               for _ in range(200)]
    ranges += [(0, len(data)), (len(data) - 1, 10), (len(data), 10), (len(data) + 5, 10), (0, 0)]
    fh = view.open(node.ino, os.O_RDONLY)
    try:
        for off, size in ranges:
            assert bytes(view.read(fh, off, size)) == data[off:off + size], (off, size)
        # what was just read is served from the caches without loading
        assert bytes(view.read(fh, cuts[3] - 10, 20, cached_only=True)) == data[cuts[3] - 10:cuts[3] + 10]
    finally:
        view.release(fh)


def test_holes_read_as_zeros(tree, view):
    _, src, _ = tree
    data = (src / "sparse.img").read_bytes()
    node = resolve(view, "sparse.img")
    holes = [(lo, n) for lo, n, k in extents(view, node) if k is None]
    assert holes and sum(n for _, n in holes) > 4 << 20, "the holes were not recorded as holes"
    fh = view.open(node.ino, os.O_RDONLY)
    try:
        for lo, n in holes:
            assert bytes(view.read(fh, lo, n)) == bytes(n)
            a, b = max(0, lo - 3), lo + n + 3
            assert bytes(view.read(fh, a, b - a)) == data[a:b]
    finally:
        view.release(fh)
    assert read_all(view, node, step=300_000) == data


# -- handles, forget, errors ----------------------------------------------------------------------

def test_forget_drops_nodes_and_released_handles_are_gone(view):
    base = view.stats()["inodes"]
    d = view.lookup(ROOT_INO, b"dir")
    deeper = view.lookup(d.ino, b"deeper")
    leaf = view.lookup(deeper.ino, b"leaf")
    assert view.stats()["inodes"] == base + 3
    assert view.lookup(deeper.ino, b"leaf") is leaf   # the table's node, counted twice now
    view.forget(leaf.ino, 1)
    assert view.node(leaf.ino) is leaf                # one lookup left
    view.forget(leaf.ino, 1)
    with pytest.raises(NotFound):
        view.node(leaf.ino)
    assert view.stats()["inodes"] == base + 2
    view.forget(deeper.ino, 1)
    view.forget(d.ino, 1)
    assert view.stats()["inodes"] == base
    view.forget(ROOT_INO, 100)                        # the root is never forgotten
    assert view.node(ROOT_INO).ino == ROOT_INO
    view.forget(123456789, 1)                         # an unknown inode: nothing happens

    hello = resolve(view, "hello.txt")
    fh = view.open(hello.ino, os.O_RDONLY)
    assert bytes(view.read(fh, 0, 100)) == b"hello\n"
    view.release(fh)
    view.release(fh)                                  # twice: no error
    with pytest.raises(BadHandle):
        view.read(fh, 0, 100)
    dfh = view.opendir(ROOT_INO)
    with pytest.raises(BadHandle):
        view.read(dfh, 0, 100)                        # a directory handle is not a file handle
    fh2 = view.open(hello.ino, os.O_RDONLY)
    with pytest.raises(BadHandle):
        view.readdir(fh2, 0)
    view.releasedir(dfh)
    with pytest.raises(BadHandle):
        view.readdir(dfh, 0)
    view.release(fh2)
    assert fh2 != fh and dfh not in (fh, fh2)          # numbers are not reused


def test_what_cannot_be_done_is_refused(view):
    hello = resolve(view, "hello.txt")
    for flags in (os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC, os.O_RDONLY | os.O_APPEND,
                  os.O_RDONLY | os.O_CREAT):
        with pytest.raises(ReadOnly):
            view.open(hello.ino, flags)
    with pytest.raises(IsADir):
        view.open(resolve(view, "dir").ino, os.O_RDONLY)
    with pytest.raises(NotFound):
        view.open(resolve(view, "fifo").ino, os.O_RDONLY)
    with pytest.raises(NotALink):
        view.readlink(hello.ino)
    with pytest.raises(NoAttr):
        view.getxattr(hello.ino, b"user.none")
    with pytest.raises(NotADir):
        view.opendir(hello.ino)
    with pytest.raises(NotFound):
        view.getattr(987654321)


def test_the_view_is_lazy(tree):
    """Making the view reads nothing; a lookup reads the directories on its way, once."""
    safe, _, point = tree
    with open_view(safe, point) as v:
        def reads() -> int:
            return v.stats()["objects_read"]
        assert reads() == 0
        resolve(v, "hello.txt")
        assert reads() == 1                          # the point's top directory
        resolve(v, "empty")
        v.getattr(resolve(v, "dir").ino)
        assert reads() == 1
        resolve(v, "dir/deeper/leaf")
        assert reads() == 3                          # dir, dir/deeper
        many = resolve(v, "many")
        n_pages = len(tree_pages(v.safe.get(many.entry.ref)))
        v.safe.objects_read = 3                       # (that read was the test's)
        listdir(v, many.ino)
        assert reads() == 3 + 1 + n_pages            # the index node and its pages
        listdir(v, many.ino)
        assert reads() == 3 + 1 + n_pages            # cached
