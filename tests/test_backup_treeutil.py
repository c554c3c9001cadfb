"""The tree walker used by the round-trip tests notices every field it claims to compare
(so a green round trip means something)."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from _tree_util import all_types_tree, assert_trees_equal, make_tree, snapshot
from conftest import needs_root

pytestmark = needs_root


def _perturbations(t):
    """(what the message must mention, how to change tree t)."""
    j = lambda *p: os.path.join(os.fsencode(t), *p)  # noqa: E731
    return [
        ("contents differ", lambda: open(j(b"plain"), "r+b").write(b"J")),
        ("mode", lambda: os.chmod(j(b"setuid"), 0o755)),
        ("uid", lambda: os.chown(j(b"big"), 1235, -1)),
        ("gid", lambda: os.chown(j(b"fifo"), -1, 7, follow_symlinks=False)),
        ("mtime_ns", lambda: os.utime(j(b"old"), ns=(os.stat(j(b"old")).st_atime_ns, 1))),
        ("atime_ns", lambda: os.utime(j(b"plain"), ns=(5, os.stat(j(b"plain")).st_mtime_ns))),
        ("xattrs", lambda: os.setxattr(j(b"xattr"), b"user.k", b"w")),
        ("xattrs", lambda: subprocess.run(["setfacl", "-m", "u:1234:r", j(b"acl")], check=True)),
        ("symlink target", lambda: (os.unlink(j(b"link")), os.symlink(b"plainX", j(b"link")))),
        ("device", lambda: (os.unlink(j(b"chr")), os.mknod(j(b"chr"), 0o20666, os.makedev(1, 5)))),
        ("type", lambda: (os.unlink(j(b"fifo")), open(j(b"fifo"), "w").close())),
        ("missing in the second tree", lambda: os.unlink(j(b"new\nline"))),
        ("only in the second tree", lambda: open(j(b"bad\xffname2"), "w").close()),
        ("not one inode", lambda: (os.unlink(j(b"sub", b"hard2")), shutil.copy2(j(b"hard1"), j(b"sub", b"hard2")))),
        ("not restored sparse", lambda: _fill(j(b"sparse"))),
        ("size", lambda: os.truncate(j(b"empty"), 1)),
    ]


def _fill(path: bytes) -> None:
    st = os.stat(path)
    data = open(path, "rb").read()
    with open(path, "wb") as f:   # same bytes, every block allocated
        f.write(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_walker_notices_every_field(tmp_path):
    spec = all_types_tree(seed=1)
    a = make_tree(tmp_path / "a", spec)
    before = snapshot(a)
    assert_trees_equal(before, a)
    for i in range(len(_perturbations(a))):
        b = make_tree(tmp_path / f"b{i}", spec)
        word, change = _perturbations(b)[i]
        # make_tree draws fresh future atimes: copy a's so that only the perturbation differs
        for rel, n in before.items():
            p = os.path.join(os.fsencode(b), rel) if rel else os.fsencode(b)
            os.utime(p, ns=(n.st.st_atime_ns, n.st.st_mtime_ns), follow_symlinks=False)
        assert_trees_equal(before, b)
        change()
        # the change itself may have moved the parent's mtime: put it back
        for rel in (b"", b"sub"):
            n = before[rel]
            os.utime(os.path.join(os.fsencode(b), rel) if rel else os.fsencode(b),
                     ns=(n.st.st_atime_ns, n.st.st_mtime_ns))
        with pytest.raises(AssertionError) as exc:
            assert_trees_equal(before, b)
        assert word in str(exc.value), (word, str(exc.value))
