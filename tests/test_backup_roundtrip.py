"""Every entry type and every stored field round-trips through `pointsafe backup` and `restore`.

Trees come from hypothesis (all entry types, odd names, setuid/sticky modes, owners, times in ns
before 1970 and after 2038, xattrs, POSIX ACLs, hardlinks across directories, sparse files) and
from the system (/usr/share/doc). Each is compared after restore by tests/_tree_util.py's walker.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from _backup_util import backup, restore
from _tree_util import (BLK, CHR, DIR, FIFO, HARDLINK, LNK, REG, SOCK, Spec, all_types_tree,
                        assert_trees_equal, make_tree, settle_atimes, snapshot)
from conftest import needs_root, run_cli
from pointsafe.cas import Safe

pytestmark = needs_root

# -- strategies ------------------------------------------------------------------------------

_name_bytes = st.lists(st.integers(1, 255).filter(lambda c: c != 0x2F), min_size=1, max_size=12).map(bytes)
names = st.one_of(
    _name_bytes.filter(lambda b: b not in (b".", b"..")),
    st.sampled_from([b"new\nline", b"\xff\xfe\xfd", b"caf\xc3\xa9", b"caf\xe9", b" lead", b"-rf",
                     b".hidden", b"...", b"x" * 255, b"\t\r\x01", b"\\"]),
)
modes = st.one_of(st.integers(0, 0o7777), st.sampled_from([0o4755, 0o2755, 0o1777, 0o6711, 0o644]))
ids = st.one_of(st.sampled_from([0, 1, 1000, 65534, 2**31, 2**32 - 2]), st.integers(0, 70000))
# ext4 with 256-byte inodes keeps ns from 1901-12-14 to 2446; stay inside it.
times = st.integers(-(2**31 - 1) * 10**9, (2**33) * 10**9 + 999_999_999)
acl_entries = st.sampled_from(["u:1234:rw", "g:77:r", "u:0:x", "g:65534:rwx", "u:4000000000:r"])
xattr_names = st.text("abcdefghij0123456789._", min_size=1, max_size=10).map(lambda s: s.encode())
xattr_values = st.binary(max_size=120)


@st.composite
def regular(draw) -> Spec:
    shape = draw(st.sampled_from(["small", "empty", "big", "sparse", "allhole", "zeros"]))
    seed = draw(st.integers(0, 2**32))
    rng = random.Random(seed)
    content: list = []
    size = None
    if shape == "small":
        content = [(0, draw(st.binary(min_size=1, max_size=2000)))]
    elif shape == "big":
        content = [(0, rng.randbytes(draw(st.integers(50_000, 600_000))))]
    elif shape == "zeros":
        content = [(0, bytes(draw(st.integers(1, 300_000))))]
    elif shape == "sparse":
        # data after a hole, maybe a second extent, maybe a trailing hole
        a = draw(st.integers(0, 8)) << 20
        content = [(a, rng.randbytes(draw(st.integers(1, 100_000))))]
        if draw(st.booleans()):
            content.append((a + (2 << 20), rng.randbytes(5000)))
        end = max(o + len(d) for o, d in content)
        size = end + draw(st.sampled_from([0, 1, 4096, 3 << 20]))
    elif shape == "allhole":
        size = draw(st.integers(1, 16 << 20))
    return Spec(REG, content=content, size=size, **draw(meta(xattrs=True, acl=True)))


@st.composite
def meta(draw, xattrs: bool, acl: bool, user_ns: bool = True) -> dict:
    d = {"mode": draw(modes), "uid": draw(ids), "gid": draw(ids), "mtime_ns": draw(times)}
    if xattrs:
        ns = ["trusted."] + (["user."] if user_ns else [])
        d["xattrs"] = draw(st.dictionaries(st.builds(lambda p, n: p.encode() + n, st.sampled_from(ns), xattr_names),
                                           xattr_values, max_size=3))
    if acl:
        d["acl"] = draw(st.lists(acl_entries, unique=True, max_size=3))
    return d


def leaf(kind: str):
    if kind == REG:
        return regular()
    m = meta(xattrs=True, acl=False, user_ns=False)   # user.* is for files and directories only
    if kind == LNK:
        return st.builds(lambda t, d: Spec(LNK, target=t, **d),
                         st.binary(min_size=1, max_size=200).map(lambda b: b.replace(b"\0", b"0")), m)
    if kind in (CHR, BLK):
        return st.builds(lambda ma, mi, d: Spec(kind, rdev=(ma, mi), **d),
                         st.integers(0, 4095), st.integers(0, 2**20 - 1), m)
    return st.builds(lambda d: Spec(kind, **d), m)


@st.composite
def directory(draw, depth: int = 0) -> Spec:
    kinds = [REG, REG, REG, LNK, FIFO, CHR, BLK, SOCK] + ([DIR, DIR] if depth < 3 else [])
    children: dict[bytes, Spec] = {}
    for _ in range(draw(st.integers(0, 7 if depth == 0 else 4))):
        name = draw(names)
        if name in children:
            continue
        kind = draw(st.sampled_from(kinds))
        children[name] = draw(directory(depth + 1)) if kind == DIR else draw(leaf(kind))
    d = draw(meta(xattrs=True, acl=True))
    if draw(st.booleans()):
        d["acl"] = d["acl"] + ["d:u:99:rx", "d:g:5:r"]    # default ACLs on directories
    return Spec(DIR, children=children, **d)


@st.composite
def trees(draw) -> Spec:
    root = draw(directory())
    root.mode |= 0o700   # the top directory itself: keep it usable (restore writes into it)
    files: list[bytes] = []
    dirs: list[tuple[bytes, Spec]] = [(b"", root)]

    def collect(prefix: bytes, s: Spec) -> None:
        for n, c in s.children.items():
            p = prefix + b"/" + n if prefix else n
            if c.kind == REG:
                files.append(p)
            elif c.kind == DIR:
                dirs.append((p, c))
                collect(p, c)

    collect(b"", root)
    if files:
        for _ in range(draw(st.integers(0, 4))):
            to = draw(st.sampled_from(files))
            _, where = draw(st.sampled_from(dirs))
            name = draw(names)
            if name not in where.children:
                where.children[name] = Spec(HARDLINK, link_to=to)
    return root


# -- tests -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def shared_safe(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("rt") / "safe"
    Safe.init(path, pack_size=1 << 20).close()
    return path


# POINTSAFE_HYPOTHESIS_EXAMPLES=200 for a longer hunt; CI runs 10 (about 3 s each here).
@settings(max_examples=int(os.environ.get("POINTSAFE_HYPOTHESIS_EXAMPLES", "10")), deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.function_scoped_fixture])
@given(tree=trees())
def test_generated_trees_round_trip(shared_safe, tree):
    """Any tree of every entry type restores exactly; an unchanged re-backup reads nothing."""
    work = Path(tempfile.mkdtemp(dir=shared_safe.parent))
    try:
        src = make_tree(work / "src", tree)
        before = snapshot(src)
        name = work.name
        p1 = backup(shared_safe, src, name=name)
        assert p1["warnings"] == []
        assert p1["kind"] == "tree" and p1["name"] == name
        restore(shared_safe, p1["id"], work / "out")
        assert_trees_equal(before, work / "out")
        # the source itself was not changed by being backed up (atimes included)
        assert_trees_equal(before, src)
        p2 = backup(shared_safe, src, name=name)
        assert p2["stats"]["bytes_read"] == 0, p2["stats"]
        assert p2["stats"]["bytes_new"] == 0, p2["stats"]
        assert p2["root"] == p1["root"], "nothing changed, so the root tree key must be the same"
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_all_types_round_trip_and_ls(any_safe, tmp_path):
    """The hand-made tree with one of everything: restore, then ls --json shows the odd names
    (in a local safe and in a bucket)."""
    safe_dir = any_safe
    src = make_tree(tmp_path / "src", all_types_tree())
    before = snapshot(src)
    p = backup(safe_dir, src)
    assert p["warnings"] == []
    st = p["stats"]
    # files: every regular file incl. the hardlink's second name; size: logical bytes
    assert st["files"] == 16
    assert st["bytes_read"] < 400_000, "holes of the sparse files must not be read as data"
    assert st["bytes_stored"] < 400_000, "holes must not be stored"
    r = restore(safe_dir, p["id"], tmp_path / "out")
    assert r["warnings"] == []
    assert_trees_equal(before, tmp_path / "out")
    sparse = os.stat(tmp_path / "out" / "sparse")
    assert sparse.st_size == 8 << 20 and sparse.st_blocks * 512 <= 64 * 1024


@pytest.mark.parametrize("system_dir", ["/usr/share/zoneinfo", "/usr/share/i18n"])
def test_system_tree_round_trip(safe_dir, tmp_path, system_dir):
    """Real trees: tzdata (1,300 entries, a third symlinks, binary files) and the locale sources
    (17 MB of text); a few seconds each, where all of /usr/share/doc takes half a minute here."""
    src = Path(system_dir)
    if not src.is_dir() or not any(src.iterdir()):
        pytest.skip(f"{system_dir} is missing or empty on this machine")
    settle_atimes(src)
    before = snapshot(src)
    p = backup(safe_dir, src, "-q")
    assert p["warnings"] == []
    files = sum(1 for n in before.values() if n.digest is not None)
    assert p["stats"]["files"] == files
    restore(safe_dir, p["id"], tmp_path / "out", "-q")
    assert_trees_equal(before, tmp_path / "out")
    assert_trees_equal(before, src)   # and backing up did not touch the source's atimes


def test_large_directory_round_trip(any_safe, tmp_path):
    """A directory of 3,000 entries (stored in pages): restore, ls and --path find every name,
    and a change to one file shows in diff alone (in a local safe and in a bucket)."""
    safe_dir = any_safe
    src = tmp_path / "src"
    big = src / "big"
    big.mkdir(parents=True)
    for i in range(3000):
        (big / f"f{i:05}").write_bytes(b"%d\n" % i)
    (big / "zz-sub").mkdir()
    (big / "zz-sub" / "inner").write_text("inner\n")
    os.symlink("f00001", big / "link")
    settle_atimes(src)   # readlink moves a new link's atime once (see tests/_tree_util.py)
    before = snapshot(src)
    p1 = backup(safe_dir, src, "-q", name="big")
    assert p1["stats"]["files"] == 3001
    restore(safe_dir, p1["id"], tmp_path / "out", "-q")
    assert_trees_equal(before, tmp_path / "out")
    r = run_cli("ls", p1["id"], "big", "--json", safe=safe_dir)
    names = [i["path"] for i in json.loads(r.out)]
    assert len(names) == 3002 and names == sorted(names) and names[-1] == "big/zz-sub"
    for name in ("big/f00000", "big/f01777", "big/f02999", "big/zz-sub/inner"):
        r = run_cli("ls", p1["id"], name, "--json", safe=safe_dir)
        assert r.code == 0 and [i["path"] for i in json.loads(r.out)] == [name], r.err
    restore(safe_dir, p1["id"], tmp_path / "one", "--path", "big/f02222")
    assert os.listdir(tmp_path / "one" / "big") == ["f02222"]
    (big / "f01500").write_text("changed\n")
    p2 = backup(safe_dir, src, "-q", name="big")
    assert p2["stats"]["bytes_read"] == len("changed\n")
    r = run_cli("diff", p1["id"], p2["id"], "--json", safe=safe_dir)
    assert [(c["change"], c["path"]) for c in json.loads(r.out)] == [("M", "big/f01500")]
