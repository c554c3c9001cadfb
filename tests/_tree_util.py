"""File trees for tests: a factory that builds every entry type, and a walker that compares two trees.

``assert_trees_equal(a, b)`` compares two directory trees field by field and raises one
AssertionError listing every difference (paths shown with backslash escapes). Compared:

- the set of names (raw bytes: names need not be UTF-8 and may hold newlines), recursively;
- type; bytes of regular files (read with O_NOATIME); size (not for directories, whose st_size
  depends on the filesystem's history); symlink targets (never followed);
- permission bits incl. setuid/setgid/sticky; uid/gid; mtime_ns; atime_ns (``check_atime``);
- device numbers of char/block devices;
- extended attributes, every namespace the kernel lists (user., trusted., security.,
  system.posix_acl_access / system.posix_acl_default);
- hardlinks: entries that share an inode in ``a`` share one in ``b`` and vice versa (the link
  structure, not st_nlink, so a slice of a system tree with links leaving it still compares);
- sparseness: a file that is sparse in ``a`` must not take more than its allocated size (plus
  ``sparse_slack``) in ``b``.
- the top directory's own metadata (mode, owner, times, xattrs) when ``check_root`` is true.

ctime and inode numbers are never compared: nothing can restore them.

Why atime can be compared at all. Under ``relatime`` (this machine's root filesystem) reading a
directory or a file moves its atime when the atime is not newer than its mtime and ctime, or is
older than 24 h. The walker lists directories and reads files through O_NOATIME descriptors, so
it moves nothing (and without that privilege it stats before it looks). pointsafe's backup does
the same, but readlink(2) has no O_NOATIME: a symlink's atime moves on its first backup (the
point records the atime the link has afterwards). So that trees compare exactly anyway:

- ``make_tree`` gives every entry an atime a few hours in the *future* and after its mtime (so
  newer than its mtime and its ctime, the time of our own utime call): relatime never touches it;
- for a tree we did not make (a system tree), call ``settle_atimes(path)`` once before the backup:
  it lists every directory and reads every link, so every atime relatime wants to move moves
  now, and stays put for a day.
"""

from __future__ import annotations

import errno
import os
import random
import stat
import struct
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

_O_NOATIME = getattr(os, "O_NOATIME", 0)


# -- snapshots and comparison ---------------------------------------------------------------

@dataclass
class Node:
    """What we know about one path in a tree (all raw bytes)."""
    path: bytes
    st: os.stat_result
    xattrs: dict[bytes, bytes]
    target: bytes | None = None
    digest: bytes | None = None        # blake2b of the content, for regular files
    children: list[bytes] = field(default_factory=list)


def _fmt(p: bytes) -> str:
    s = p.decode("utf-8", "backslashreplace") or "."
    return s.replace("\n", "\\n")


def read_xattrs(path: bytes) -> dict[bytes, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EPERM):
            return {}
        raise
    out = {}
    for n in names:
        try:
            out[os.fsencode(n)] = os.getxattr(path, n, follow_symlinks=False)
        except OSError as e:
            if e.errno != errno.ENODATA:
                raise
    return out


def _digest(path: bytes) -> bytes:
    import hashlib
    h = hashlib.blake2b(digest_size=32)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | _O_NOATIME)
    except PermissionError:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        while True:
            b = os.read(fd, 1 << 20)
            if not b:
                break
            h.update(b)
    finally:
        os.close(fd)
    return h.digest()


def _listdir(path: bytes) -> list[bytes]:
    """Sorted names, listed through an O_NOATIME descriptor so that the listing leaves the
    directory's atime alone (O_NOATIME needs ownership or CAP_FOWNER; else plain)."""
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags | _O_NOATIME)
    except PermissionError:
        fd = os.open(path, flags)
    try:
        return sorted(os.fsencode(n) for n in os.listdir(fd))
    finally:
        os.close(fd)


def snapshot(root: str | os.PathLike | bytes, contents: bool = True) -> dict[bytes, Node]:
    """Every entry below ``root`` (and root itself as b""), keyed by relative path.

    Directories are listed and files read through O_NOATIME descriptors (as root, or as the
    owner), so taking a snapshot changes no atime; without that privilege, each directory is
    still stat'ed before it is listed and all stats come before any read, so the snapshot
    records the atimes from before it looked.
    """
    top = os.fsencode(os.fspath(root))
    nodes: dict[bytes, Node] = {}

    def visit(rel: bytes, st: os.stat_result) -> None:
        full = os.path.join(top, rel) if rel else top
        n = Node(rel, st, read_xattrs(full))
        nodes[rel] = n
        if stat.S_ISLNK(st.st_mode):
            n.target = os.readlink(full)
        elif stat.S_ISDIR(st.st_mode):
            names = _listdir(full)
            n.children = names
            sts = [(nm, os.lstat(os.path.join(full, nm))) for nm in names]
            for nm, cst in sts:
                visit(os.path.join(rel, nm) if rel else nm, cst)

    visit(b"", os.lstat(top))
    if contents:
        for rel, n in nodes.items():
            if stat.S_ISREG(n.st.st_mode):
                n.digest = _digest(os.path.join(top, rel) if rel else top)
    return nodes


def settle_atimes(root: str | os.PathLike | bytes) -> None:
    """List every directory and read every symlink below ``root`` once, so that relatime moves
    now the atimes it will move; after this they stay put for a day (each is then newer than
    its mtime and ctime), whoever looks."""
    for top, dirs, files in os.walk(os.fsencode(os.fspath(root))):
        for f in files + dirs:
            p = os.path.join(top, f)
            if os.path.islink(p):
                os.readlink(p)


def _link_groups(nodes: dict[bytes, Node]) -> set[frozenset[bytes]]:
    by_ino: dict[tuple[int, int], set[bytes]] = {}
    for rel, n in nodes.items():
        if not stat.S_ISDIR(n.st.st_mode):
            by_ino.setdefault((n.st.st_dev, n.st.st_ino), set()).add(rel)
    return {frozenset(v) for v in by_ino.values() if len(v) > 1}


def diff_snapshots(a: dict[bytes, Node], b: dict[bytes, Node], check_atime: bool = True,
                   check_root: bool = True, check_owner: bool = True, check_sparse: bool = True,
                   check_links: bool = True, sparse_slack: int = 64 * 1024) -> list[str]:
    """Human-readable differences between two snapshots (empty when equal)."""
    out: list[str] = []
    for rel in sorted(a.keys() - b.keys()):
        out.append(f"{_fmt(rel)}: missing in the second tree")
    for rel in sorted(b.keys() - a.keys()):
        out.append(f"{_fmt(rel)}: only in the second tree")
    for rel in sorted(a.keys() & b.keys()):
        x, y = a[rel], b[rel]
        sx, sy = x.st, y.st
        p = _fmt(rel)
        if stat.S_IFMT(sx.st_mode) != stat.S_IFMT(sy.st_mode):
            out.append(f"{p}: type {stat.filemode(sx.st_mode)[0]!r} != {stat.filemode(sy.st_mode)[0]!r}")
            continue
        if rel == b"" and not check_root:
            continue
        is_dir = stat.S_ISDIR(sx.st_mode)

        def cmp(what: str, u, v) -> None:
            if u != v:
                out.append(f"{p}: {what} {u!r} != {v!r}")

        cmp("mode", oct(stat.S_IMODE(sx.st_mode)), oct(stat.S_IMODE(sy.st_mode)))
        if check_owner:
            cmp("uid", sx.st_uid, sy.st_uid)
            cmp("gid", sx.st_gid, sy.st_gid)
        cmp("mtime_ns", sx.st_mtime_ns, sy.st_mtime_ns)
        if check_atime:
            cmp("atime_ns", sx.st_atime_ns, sy.st_atime_ns)
        cmp("xattrs", x.xattrs, y.xattrs)
        if not is_dir:
            cmp("size", sx.st_size, sy.st_size)
        if stat.S_ISLNK(sx.st_mode):
            cmp("symlink target", x.target, y.target)
        if stat.S_ISCHR(sx.st_mode) or stat.S_ISBLK(sx.st_mode):
            cmp("device", (os.major(sx.st_rdev), os.minor(sx.st_rdev)),
                (os.major(sy.st_rdev), os.minor(sy.st_rdev)))
        if stat.S_ISREG(sx.st_mode):
            if x.digest is not None and y.digest is not None and x.digest != y.digest:
                out.append(f"{p}: contents differ")
            if (check_sparse and sx.st_blocks * 512 < sx.st_size
                    and sy.st_blocks * 512 > sx.st_blocks * 512 + sparse_slack):
                out.append(f"{p}: not restored sparse: {sy.st_blocks * 512} bytes allocated, "
                           f"source had {sx.st_blocks * 512} for {sx.st_size} bytes")
    ga, gb = (_link_groups(a), _link_groups(b)) if check_links else (set(), set())
    for g in sorted(ga - gb, key=sorted):
        out.append(f"hardlinks {[_fmt(r) for r in sorted(g)]} are not one inode in the second tree")
    for g in sorted(gb - ga, key=sorted):
        out.append(f"hardlinks {[_fmt(r) for r in sorted(g)]} are one inode only in the second tree")
    return out


def assert_trees_equal(a, b, check_atime: bool = True, check_root: bool = True,
                       check_owner: bool = True, check_sparse: bool = True,
                       check_links: bool = True) -> None:
    """Raise AssertionError naming every field that differs between trees ``a`` and ``b``.

    ``a`` and ``b`` are paths or snapshots (dicts from :func:`snapshot`). See the module
    docstring for what is compared and why atimes are stable. Switches, for views that cannot
    show a field (a FUSE mount, say): ``check_sparse`` (b's st_blocks), ``check_links`` (b's
    inode sharing), ``check_root`` (the top directory's own metadata), ``check_owner``.
    """
    sa = a if isinstance(a, dict) else snapshot(a)
    sb = b if isinstance(b, dict) else snapshot(b)
    d = diff_snapshots(sa, sb, check_atime=check_atime, check_root=check_root, check_owner=check_owner,
                       check_sparse=check_sparse, check_links=check_links)
    if d:
        more = f"\n... and {len(d) - 40} more" if len(d) > 40 else ""
        raise AssertionError(f"trees differ ({len(d)} differences):\n" + "\n".join(d[:40]) + more)


# -- the factory --------------------------------------------------------------------------

REG, DIR, LNK, FIFO, CHR, BLK, SOCK, HARDLINK = "reg", "dir", "lnk", "fifo", "chr", "blk", "sock", "link"


@dataclass
class Spec:
    """One entry to create. ``content`` is a list of (offset, bytes) pieces for regular files;
    ``size`` past the last piece is a hole. For HARDLINK, ``link_to`` is the relative path of an
    earlier regular file. ``acl`` is a list of setfacl specs (``u:1234:rw``, ``d:g:5:r``)."""
    kind: str
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    mtime_ns: int = 0
    atime_ns: int | None = None     # None: a few hours in the future (see the module docstring)
    content: list[tuple[int, bytes]] = field(default_factory=list)
    size: int | None = None
    target: bytes = b""
    rdev: tuple[int, int] = (0, 0)
    xattrs: dict[bytes, bytes] = field(default_factory=dict)
    acl: list[str] = field(default_factory=list)
    link_to: bytes = b""
    children: dict[bytes, "Spec"] = field(default_factory=dict)


def future_atime(rng: random.Random | None = None) -> int:
    """An atime 1-20 hours ahead: newer than mtime and ctime, so relatime leaves it alone."""
    r = rng or random
    return time.time_ns() + 3600 * 10**9 + r.randrange(19 * 3600 * 10**9)


def _setfacl(path: bytes, specs: list[str]) -> None:
    if not specs:
        return
    subprocess.run(["setfacl", "-m", ",".join(specs), os.fsdecode(path)], check=True,
                   capture_output=True)


def _meta(path: bytes, s: Spec, dir_fd=None) -> None:
    """Owner, xattrs and ACLs (after chown: it drops security.capability), mode (after chown:
    it clears setuid), then times."""
    os.chown(path, s.uid, s.gid, follow_symlinks=False)
    for n, v in s.xattrs.items():
        os.setxattr(path, n, v, follow_symlinks=False)
    if s.kind != LNK:
        _setfacl(path, s.acl)
    if s.kind != LNK:
        os.chmod(path, s.mode)
    at = s.atime_ns if s.atime_ns is not None else max(future_atime(), s.mtime_ns + 10**9)
    os.utime(path, ns=(at, s.mtime_ns), follow_symlinks=False)


def make_tree(root: str | os.PathLike, spec: Spec) -> Path:
    """Create ``spec`` (a DIR) at ``root`` (which must not exist, or be an empty dir).

    Needs root for chown, device nodes and trusted.* xattrs. Hardlinks are made after every
    other entry; directory metadata last, deepest first, so that nothing touches a directory
    after its times are set.
    """
    top = os.fsencode(os.fspath(root))
    os.makedirs(top, exist_ok=True)
    links: list[tuple[bytes, bytes]] = []
    dirs: list[tuple[bytes, Spec]] = []

    def build(path: bytes, s: Spec) -> None:
        for name, c in s.children.items():
            p = os.path.join(path, name)
            if c.kind == DIR:
                os.mkdir(p)
                build(p, c)
                dirs.append((p, c))
            elif c.kind == HARDLINK:
                links.append((p, os.path.join(top, c.link_to)))
            else:
                _make_leaf(p, c)

    build(top, spec)
    for p, to in links:
        os.link(to, p, follow_symlinks=False)
    # Hardlinks changed their inode's ctime only; re-set the files' times is not needed, but
    # the directories holding them changed: set directory metadata now, deepest first.
    for p, s in dirs:
        _meta(p, s)
    _meta(top, spec)
    return Path(os.fsdecode(top))


def _make_leaf(p: bytes, s: Spec) -> None:
    if s.kind == REG:
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            for off, data in s.content:
                os.pwrite(fd, data, off)
            end = max((o + len(d) for o, d in s.content), default=0)
            if s.size is not None and s.size != end:
                os.ftruncate(fd, s.size)
        finally:
            os.close(fd)
    elif s.kind == LNK:
        os.symlink(s.target, p)
    elif s.kind in (FIFO, CHR, BLK, SOCK):
        fmt = {FIFO: stat.S_IFIFO, CHR: stat.S_IFCHR, BLK: stat.S_IFBLK, SOCK: stat.S_IFSOCK}[s.kind]
        os.mknod(p, fmt | 0o600, os.makedev(*s.rdev) if s.kind in (CHR, BLK) else 0)
    else:
        raise ValueError(s.kind)
    _meta(p, s)


def all_types_tree(seed: int = 0) -> Spec:
    """A fixed tree with one of everything (the same as the hypothesis trees, hand-made)."""
    rng = random.Random(seed)
    now = time.time_ns()
    big = rng.randbytes(300_000)
    return Spec(DIR, mode=0o755, mtime_ns=now - 10**12, children={
        b"plain": Spec(REG, content=[(0, b"hello\n")], mtime_ns=now - 5 * 10**9 + 123),
        b"empty": Spec(REG, content=[]),
        b"big": Spec(REG, content=[(0, big)], mode=0o640, uid=1234, gid=4321),
        b"sparse": Spec(REG, content=[(5 << 20, b"tail")], size=(8 << 20)),
        b"allhole": Spec(REG, size=3 << 20),
        b"setuid": Spec(REG, content=[(0, b"#!/bin/sh\n")], mode=0o4755, uid=0, gid=0),
        b"setgid": Spec(REG, content=[(0, b"x")], mode=0o2750, uid=1000, gid=1000),
        b"acl": Spec(REG, content=[(0, b"acl")], mode=0o640, acl=["u:1234:rw", "g:77:r"]),
        b"xattr": Spec(REG, content=[(0, b"x")], xattrs={b"user.k": b"v", b"user.empty": b"",
                                                          b"trusted.bin": bytes(range(256))}),
        # file capabilities (cap_net_raw+ep, vfs_cap_data v2): chown drops them, so order matters
        b"capable": Spec(REG, content=[(0, b"\x7fELF")], mode=0o755, uid=0, gid=0,
                         xattrs={b"security.capability": struct.pack("<IIIII", 0x02000001, 1 << 13, 0, 0, 0)}),
        b"link": Spec(LNK, target=b"plain"),
        b"dangling": Spec(LNK, target=b"/nonexistent/\xff\nx"),
        b"dirlink": Spec(LNK, target=b"sub", xattrs={b"trusted.l": b"1"}),
        b"fifo": Spec(FIFO, mode=0o620, uid=5, gid=6),
        b"chr": Spec(CHR, rdev=(1, 3), mode=0o666),
        b"blk": Spec(BLK, rdev=(259, 70000), mode=0o660, gid=6),
        b"sock": Spec(SOCK, mode=0o755),
        b"bad\xffname": Spec(REG, content=[(0, b"latin1")]),
        b"new\nline": Spec(REG, content=[(0, b"nl")]),
        b"hard1": Spec(REG, content=[(0, b"shared inode")], mode=0o600, uid=7),
        b"old": Spec(REG, content=[(0, b"1960")], mtime_ns=-300_000_000_123_456_789),
        b"sub": Spec(DIR, mode=0o1777, uid=3, gid=4, acl=["u:99:rwx", "d:u:99:rx"], children={
            b"hard2": Spec(HARDLINK, link_to=b"hard1"),
            b"emptydir": Spec(DIR, mode=0o2755, children={}),
            b"deep": Spec(DIR, mode=0o700, children={b"f": Spec(REG, content=[(0, big[:1000])])}),
        }),
    })
