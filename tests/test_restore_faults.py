"""Restore under faults (issue 10): a target owner racing the restore with symlinks, paths longer
than PATH_MAX, objects missing from the safe (a lost pack, a removed index entry), an aborted
restore, tree entries whose size does not match their blob, and the smaller ones (messages with
bytes reprs, --path that does not exist, a directory in the way with --force)."""

from __future__ import annotations

import json
import os
import pwd
import random
import resource
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from _backup_util import backup, one_error_line, restore
from conftest import needs_root, run_cli
from pointsafe.cas import (
    BlobBuilder,
    BlobReader,
    Entry,
    Kind,
    Point,
    Safe,
    encode_tree,
    utc_now_iso,
)
from pointsafe.cas.tree import DIR, LNK, REG
from pointsafe.ingest.browse import children, lookup

TMP_PREFIX = ".pointsafe-restore."


# -- helpers ----------------------------------------------------------------------------------

def _all_names(top: Path) -> list[str]:
    """Every path below ``top`` (relative, as text), walked without following symlinks."""
    out = []
    for dirpath, dirnames, filenames in os.walk(top):
        for n in dirnames + filenames:
            out.append(os.path.relpath(os.path.join(dirpath, n), top))
    return out


def _temp_files(top: Path) -> list[str]:
    return [p for p in _all_names(top) if os.path.basename(p).startswith(TMP_PREFIX)]


class _Points:
    """Write crafted points straight through the cas API (as backup does)."""

    def __init__(self, safe: Safe, w):
        self.safe, self.w = safe, w

    def blob(self, *chunks: bytes) -> bytes:
        bb = BlobBuilder(self.w.put_node, self.safe.config.list_fanout)
        for c in chunks:
            bb.add(self.w.put(Kind.CHUNK, c), len(c))
        return bb.finish()

    def file(self, name: bytes, data: bytes, size: int | None = None, **kw) -> Entry:
        return Entry(name, REG, kw.pop("mode", 0o644), size=len(data) if size is None else size,
                     ref=self.blob(data) if data else None, **kw)

    def tree(self, entries: list[Entry]) -> bytes:
        children, payload = encode_tree(entries)
        return self.w.put_node(Kind.TREE, children, payload)

    def point(self, name: str, root: bytes) -> str:
        now = utc_now_iso()
        rec = self.w.add_point({"name": name, "kind": "tree", "source": "/crafted", "host": "h",
                                "started": now, "finished": now, "size": 0, "warnings": [],
                                "stats": {"files": 0, "bytes_read": 0, "bytes_new": 0, "bytes_stored": 0},
                                "root_meta": {"mode": 0o755, "uid": 0, "gid": 0, "mtime_ns": 0,
                                              "atime_ns": 0, "xattrs": []}}, root)
        return rec.id


def _warnings(r) -> dict[str, str]:
    return {w["path"]: w["message"] for w in json.loads(r.out)["warnings"]}


def _drop_index_entry(safe_dir: Path, key: bytes) -> None:
    """What a repair that lost an object leaves: the index no longer knows ``key``."""
    with Safe.open(safe_dir) as safe, safe.index.write() as txn:
        assert txn.delete(key, db=safe.index.db["objects"])


# -- 1. the restore race ----------------------------------------------------------------------

def _attacker(target: Path, outside: Path, uid: int, gid: int, deadline: float) -> int:
    """Fork a process running as ``uid`` that keeps replacing every directory it finds at the
    top of ``target`` by a symlink to ``outside`` (the directory itself is moved aside)."""
    pid = os.fork()
    if pid:
        return pid
    try:
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)
        n = 0
        while time.monotonic() < deadline:
            try:
                names = os.listdir(target)
            except OSError:
                continue
            for name in names:
                if not name.startswith("d"):
                    continue
                p = os.path.join(target, name)
                try:
                    if stat.S_ISDIR(os.lstat(p).st_mode):
                        os.rename(p, os.path.join(target, f"moved-{n}"))
                        n += 1
                        os.symlink(outside, p)
                except OSError:
                    pass
    finally:
        os._exit(0)


@needs_root
def test_target_owner_cannot_redirect_restore_with_symlinks(safe_dir, tmp_path):
    """The owner of the restore target swaps its directories for symlinks to a root-owned
    directory while root restores: nothing may be written outside the target."""
    try:
        user = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user 'nobody' to race the restore with")
    src = tmp_path / "src"
    for i in range(12):
        d = src / f"d{i:02}"
        (d / "sub").mkdir(parents=True)
        for j in range(120):
            (d / f"f{j:03}").write_bytes(b"x" * (j + 1))
        (d / "sub" / "inner").write_text("inner")
        os.symlink("f000", d / "link")
        os.mkfifo(d / "fifo")
    p = backup(safe_dir, src, "-q")
    base = Path(tempfile.mkdtemp(prefix="pointsafe-race-"))
    try:
        os.chmod(base, 0o755)           # the user can reach the target; not write next to it
        outside = base / "outside"      # root's: only root can have written here
        outside.mkdir(mode=0o755)
        swapped = 0
        for attempt in range(3):
            target = base / f"t{attempt}"
            target.mkdir()
            os.chown(target, user.pw_uid, user.pw_gid)
            pid = _attacker(target, outside, user.pw_uid, user.pw_gid, time.monotonic() + 120)
            try:
                r = run_cli("restore", p["id"], target, "--json", safe=safe_dir)
            finally:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            strays = os.listdir(outside)
            assert strays == [], f"restore wrote {len(strays)} entries outside the target: {sorted(strays)[:5]}"
            assert "Traceback" not in r.err, r.err
            assert r.code in (0, 3), (r.code, r.err)
            swapped += sum(1 for n in os.listdir(target) if n.startswith("moved-"))
            assert _temp_files(target) == []
        assert swapped, "the race never happened: the test proved nothing"
    finally:
        shutil.rmtree(base)


# -- 2. paths longer than PATH_MAX -------------------------------------------------------------

def _open_below(top: Path, names: list[bytes]) -> int:
    """A descriptor of the directory ``top/names...``, reached one name at a time (the path
    itself may be longer than PATH_MAX)."""
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    for n in names:
        nfd = os.open(n, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
        os.close(fd)
        fd = nfd
    return fd


def _read_at(dir_fd: int, name: bytes) -> bytes:
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=dir_fd)
    try:
        return os.read(fd, 1 << 20)
    finally:
        os.close(fd)


def test_paths_longer_than_path_max_restore(safe_dir, tmp_path):
    """Two chains: 30 directories with 200-byte names (a 6 KB path) and 2,500 directories
    named 'd' (5 KB, and deeper than Python's recursion limit), each ending in a file, a
    symlink and a directory with its own mode and time. Every level of the deep chain also
    holds a file 'z', written after its subdirectory: the restore must come back to each
    level, with a limit of 1024 open files (so not one descriptor per level)."""
    wide = [bytes([0x61 + i % 26]) * 200 for i in range(30)]
    deep = [b"d"] * 2500
    with Safe.open(safe_dir) as safe, safe.writer("long paths") as w:
        pts = _Points(safe, w)
        tops = []
        for names, data in ((wide, b"wide bottom\n"), (deep, b"deep bottom\n")):
            ref = pts.tree([pts.file(b"f", data, mode=0o640, mtime_ns=10**18),
                            Entry(b"l", LNK, 0o777, size=1, target=b"f", mtime_ns=10**18 + 1)])
            for i, n in enumerate(reversed(names)):
                level = [Entry(n, DIR, 0o750 if i == 0 else 0o755, mtime_ns=10**18 + 2 + i, ref=ref)]
                if names is deep:
                    level.append(pts.file(b"z", b"level %d\n" % (len(names) - i)))
                ref = pts.tree(level)
            tops.append(ref)
        pid = pts.point("long", pts.tree([Entry(b"wide", DIR, 0o755, ref=tops[0]),
                                          Entry(b"deep", DIR, 0o755, ref=tops[1])]))
    out = tmp_path / "out"

    def low_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))

    try:
        r = subprocess.run([sys.executable, "-m", "pointsafe.cli", "--safe", str(safe_dir), "restore", pid,
                            str(out), "--json"], check=False, capture_output=True, text=True, timeout=600,
                           preexec_fn=low_limit)
        assert "Traceback" not in r.stderr, r.stderr[-2000:]
        assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
        for top, names, data in ((b"wide", wide, b"wide bottom\n"), (b"deep", deep, b"deep bottom\n")):
            assert len(b"/".join([top, *names, b"f"])) > 4096
            fd = _open_below(out, [top, *names])
            try:
                assert _read_at(fd, b"f") == data
                st = os.stat(b"f", dir_fd=fd)
                assert (stat.S_IMODE(st.st_mode), st.st_mtime_ns) == (0o640, 10**18)
                assert os.readlink(b"l", dir_fd=fd) == b"f"
                st = os.stat(fd)   # the innermost directory got its own metadata too
                assert (stat.S_IMODE(st.st_mode), st.st_mtime_ns) == (0o750, 10**18 + 2)
            finally:
                os.close(fd)
        fd = os.open(out / "deep", os.O_RDONLY | os.O_DIRECTORY)
        try:
            for level in range(1, len(deep) + 1):
                assert _read_at(fd, b"z") == b"level %d\n" % level
                nfd = os.open(b"d", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
                os.close(fd)
                fd = nfd
        finally:
            os.close(fd)
    finally:
        subprocess.run(["rm", "-rf", str(out)], check=False, timeout=120)


# -- 3. and 4. missing objects, partial files -------------------------------------------------

def _file_keys(safe: Safe, e: Entry) -> set[bytes]:
    """Every object a file's content needs (its list nodes and chunks)."""
    if e.ref is None:
        return set()
    keys = {e.ref}
    if safe.entry(e.ref).kind != Kind.CHUNK:
        r = BlobReader(e.ref, e.size, safe.get, lambda k: safe.entry(k).kind)
        keys |= {k for _, _, k in r.extents() if k is not None}
        stack = [e.ref]
        while stack:
            k = stack.pop()
            if safe.entry(k).kind == Kind.LIST:
                kids = safe.children(k)
                keys |= set(kids)
                stack.extend(kids)
    return keys


def test_missing_objects_fail_only_their_files(safe_dir, tmp_path):
    """A lost pack, a file's chunk and a directory's tree node gone from the index (as repair
    leaves them): those files and that directory are warnings naming them (exit 3); everything
    else is restored byte for byte, and nothing half-written is left behind."""
    rng = random.Random(7)
    src = tmp_path / "src"
    (src / "big").mkdir(parents=True)
    (src / "keep").mkdir()
    (src / "lost" / "below").mkdir(parents=True)
    for i in range(12):                      # incompressible: a few files per 256 KiB pack
        (src / "big" / f"f{i:02}").write_bytes(rng.randbytes(90_000 + i * 1000))
    for i in range(20):
        (src / "keep" / f"k{i:02}.txt").write_text(f"kept {i}\n" * (i + 1))
    (src / "keep" / "gone.txt").write_text("this chunk goes\n")
    (src / "keep" / "h1").write_text("hardlinked, chunk goes\n")
    os.link(src / "keep" / "h1", src / "keep" / "h2")
    (src / "lost" / "x").write_text("under a lost tree node\n")
    (src / "lost" / "below" / "y").write_text("deeper\n")
    p = backup(safe_dir, src, "-q")
    with Safe.open(safe_dir) as safe:
        files = {}
        tree_packs = set()
        stack = [(b"", lookup(safe, Point.from_record(p), ""))]
        while stack:
            rel, d = stack.pop()
            tree_packs.add(safe.entry(d.ref).pack)
            tree_packs |= {safe.entry(k).pack for k in safe.children(d.ref)
                           if safe.entry(k).kind == Kind.TREE}
            for c in children(safe, d):
                crel = rel + b"/" + c.name if rel else c.name
                if c.type == DIR:
                    stack.append((crel, c))
                elif c.type == REG:
                    files[crel.decode()] = _file_keys(safe, c)
        packs = {k: safe.entry(k).pack for keys in files.values() for k in keys}
        candidates = sorted({pk for pk in packs.values() if pk not in tree_packs})
        assert candidates, "every pack holds a tree node: make the files bigger"
        lost_pack = candidates[len(candidates) // 2]
        gone = {k for k, pk in packs.items() if pk == lost_pack}
        small_keys = files["keep/gone.txt"] | files["keep/h1"]
        lost_tree = lookup(safe, Point.from_record(p), "lost").ref
        pack_path = safe.pack_path(lost_pack)
    failed = {path for path, keys in files.items() if keys & (gone | small_keys)}
    assert any(f.startswith("big/") for f in failed) and {"keep/gone.txt", "keep/h1", "keep/h2"} <= failed
    os.unlink(pack_path)
    for k in small_keys:
        _drop_index_entry(safe_dir, k)
    _drop_index_entry(safe_dir, lost_tree)

    out = tmp_path / "out"
    r = run_cli("restore", p["id"], out, "--json", safe=safe_dir)
    assert "Traceback" not in r.err, r.err
    assert r.code == 3, (r.code, r.err)
    warned = _warnings(r)
    for f in failed:
        assert f in warned, (f, warned)
        assert not (out / f).exists(), f"{f} was written although its content is missing"
    assert "missing" in warned["keep/gone.txt"]
    assert "lost" in warned and "missing" in warned["lost"], warned
    assert os.listdir(out / "lost") == []
    assert _temp_files(out) == []
    for f in files:
        if f not in failed and not f.startswith("lost/"):
            assert (out / f).read_bytes() == (src / f).read_bytes(), f
    r = run_cli("restore", p["id"], tmp_path / "out2", safe=safe_dir)   # the text form
    assert r.code == 3 and "warning: keep/gone.txt: " in r.err and "b'" not in r.err, r.err


def _big_point(safe_dir: Path, mib: int) -> tuple[str, bytes]:
    """A point holding 'big': ``mib`` MiB made of one stored 1 MiB chunk repeated."""
    chunk = random.Random(3).randbytes(1 << 20)
    with Safe.open(safe_dir) as safe, safe.writer("big") as w:
        pts = _Points(safe, w)
        key = w.put(Kind.CHUNK, chunk)
        bb = BlobBuilder(w.put_node, safe.config.list_fanout)
        for _ in range(mib):
            bb.add(key, len(chunk))
        big = Entry(b"big", REG, 0o644, size=mib << 20, ref=bb.finish())
        return pts.point("big", pts.tree([big, pts.file(b"small", b"small\n")])), chunk


def test_killed_restore_leaves_no_partial_file_under_its_name(safe_dir, tmp_path):
    """SIGKILL in the middle of a big file: whatever is left is under a temporary name."""
    mib = 384
    pid, chunk = _big_point(safe_dir, mib)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "pointsafe.cli", "--safe", str(safe_dir), "restore", pid, str(out), "-q"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killed_at = None
    deadline = time.monotonic() + 120
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                sizes = [os.lstat(out / n).st_size for n in os.listdir(out) if n != "small"]
            except OSError:
                continue
            if any(0 < s < (mib << 20) for s in sizes):
                proc.kill()
                killed_at = sizes
                break
            time.sleep(0.002)
    finally:
        proc.kill()
        proc.wait(timeout=60)
    assert killed_at is not None, "the restore ended before it could be killed mid-way"
    names = os.listdir(out)
    if "big" in names:
        st = os.lstat(out / "big")
        assert st.st_size == mib << 20, f"a partial 'big' ({st.st_size} bytes) is left under its real name"
        with open(out / "big", "rb") as f:
            f.seek(st.st_size - len(chunk))
            assert f.read() == chunk
    assert all(n in ("big", "small") or n.startswith(TMP_PREFIX) for n in names), names


# -- 5. a size that does not match the blob ---------------------------------------------------

def test_size_that_does_not_match_the_blob_is_reported(safe_dir, tmp_path):
    """Crafted entries whose size is bigger or smaller than their blob (one chunk or a list)
    are warnings naming them (exit 3), never padded or cut files under their names."""
    rng = random.Random(5)
    one = b"0123456789" * 10
    parts = [rng.randbytes(100_000) for _ in range(3)]
    with Safe.open(safe_dir) as safe, safe.writer("sizes") as w:
        pts = _Points(safe, w)
        lst = pts.blob(*parts)
        total = sum(map(len, parts))
        entries = [
            pts.file(b"padded", one, size=150),
            pts.file(b"cut", one, size=50),
            Entry(b"list-padded", REG, 0o644, size=total + 1000, ref=lst),
            Entry(b"list-cut", REG, 0o644, size=total - 5000, ref=lst),
            Entry(b"list-small", REG, 0o644, size=1000, ref=lst),
            pts.file(b"empty-with-content", one, size=0),
            Entry(b"size-without-content", REG, 0o644, size=4096, ref=None),
            pts.file(b"good", one),
            Entry(b"good-list", REG, 0o644, size=total, ref=lst),
        ]
        pid = pts.point("sizes", pts.tree(entries))
    out = tmp_path / "out"
    r = run_cli("restore", pid, out, "--json", safe=safe_dir)
    assert "Traceback" not in r.err, r.err
    assert r.code == 3, (r.code, r.err)
    warned = _warnings(r)
    bad = {"padded", "cut", "list-padded", "list-cut", "list-small", "empty-with-content", "size-without-content"}
    assert set(warned) == bad, warned
    for name in bad:
        assert "does not match" in warned[name], warned[name]
    assert sorted(os.listdir(out)) == ["good", "good-list"]
    assert (out / "good").read_bytes() == one
    assert (out / "good-list").read_bytes() == b"".join(parts)


# -- 6. the smaller ones ----------------------------------------------------------------------

def test_bad_path_creates_no_target(safe_dir, tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "f").write_text("f")
    p = backup(safe_dir, src, "-q")
    for bad in ("nope", "sub/nope", "sub/f/deeper"):
        target = tmp_path / "new" / "target"
        one_error_line(run_cli("restore", p["id"], target, "--path", bad, safe=safe_dir), "not found")
        assert not (tmp_path / "new").exists(), f"--path {bad} created the target"
    restore(safe_dir, p["id"], tmp_path / "new" / "target", "--path", "sub/f")
    assert (tmp_path / "new" / "target" / "sub" / "f").read_text() == "f"


def test_force_with_entries_in_the_way_warns_for_those_entries(safe_dir, tmp_path):
    """With --force a directory where the point has a file, and a file where it has a
    directory, are warnings for those entries (as text, relative to the point); the rest is
    restored."""
    src = tmp_path / "src"
    (src / "d0" / "inner").mkdir(parents=True)
    (src / "d0" / "inner" / "x").write_text("x")
    (src / "d1").mkdir()
    (src / "d1" / "f").write_text("file in the point")
    (src / "d1" / "l").symlink_to("f")
    (src / "d1" / "other").write_text("other")
    (src / "top").write_text("top")
    p = backup(safe_dir, src, "-q")
    out = tmp_path / "out"
    (out / "d0" / "inner").mkdir(parents=True)
    (out / "d0" / "inner" / "x").write_text("not a directory in the point... a file: fine")
    os.rename(out / "d0" / "inner", out / "tmp-inner")
    (out / "d0" / "inner").write_text("a file where the point has a directory")
    (out / "d1" / "f" / "busy").mkdir(parents=True)   # a directory where the point has a file
    (out / "d1" / "l").mkdir()                        # ... and where it has a symlink
    r = run_cli("restore", p["id"], out, "--force", "--json", safe=safe_dir)
    assert "Traceback" not in r.err, r.err
    assert r.code == 3, (r.code, r.err)
    warned = _warnings(r)
    assert set(warned) == {"d0/inner", "d1/f", "d1/l"}, warned
    assert "not a directory" in warned["d0/inner"]
    assert "directory is in the way" in warned["d1/f"] and "directory is in the way" in warned["d1/l"]
    assert (out / "d1" / "other").read_text() == "other" and (out / "top").read_text() == "top"
    assert os.listdir(out / "d1" / "f") == ["busy"]
    assert _temp_files(out) == []
    r = run_cli("restore", p["id"], out, "--force", safe=safe_dir)
    assert r.code == 3 and "warning: d0/inner: " in r.err and "b'" not in r.err and str(out) not in r.err, r.err


def test_volume_with_missing_objects_is_a_clear_error(safe_dir, tmp_path):
    """A volume whose chunk (or root) is gone: one error line, no traceback, no image left."""
    img = tmp_path / "disk.img"
    img.write_bytes(random.Random(9).randbytes(1 << 20))
    p = backup(safe_dir, img, "--volume", "-q")
    with Safe.open(safe_dir) as safe:
        root = bytes.fromhex(p["root"])
        chunks = safe.children(root)
    _drop_index_entry(safe_dir, chunks[len(chunks) // 2])
    out = tmp_path / "out"
    out.mkdir()
    r = run_cli("restore", p["id"], out / "restored.img", safe=safe_dir)
    assert os.listdir(out) == [], "a partial image was left behind"
    one_error_line(r, "cannot restore the volume", "object", "safe", "nothing was written")
    _drop_index_entry(safe_dir, root)
    r = run_cli("restore", p["id"], out / "restored.img", safe=safe_dir)
    assert os.listdir(out) == []
    one_error_line(r, "cannot restore the volume", "object", "safe", "nothing was written")


def test_force_over_an_earlier_restore_keeps_hardlinks(safe_dir, tmp_path):
    """Restoring twice into the same target with --force: files and their hardlinks are
    replaced through temporary names, and stay one inode."""
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    (src / "a" / "h1").write_text("linked\n")
    os.link(src / "a" / "h1", src / "h2")
    (src / "a" / "l").symlink_to("h1")
    os.mkfifo(src / "a" / "p")
    p = backup(safe_dir, src, "-q")
    out = tmp_path / "out"
    restore(safe_dir, p["id"], out)
    (out / "h2").unlink()
    (out / "h2").write_text("stale copy\n")
    restore(safe_dir, p["id"], out, "--force")
    assert os.stat(out / "a" / "h1").st_ino == os.stat(out / "h2").st_ino
    assert (out / "h2").read_text() == "linked\n"
    assert os.readlink(out / "a" / "l") == "h1" and stat.S_ISFIFO(os.lstat(out / "a" / "p").st_mode)
    assert _temp_files(out) == []


def test_damaged_chunk_leaves_no_file_behind(safe_dir, tmp_path):
    """One flipped byte in a file's stored chunk: that file is a warning and is not left
    behind empty or half-written (not under its name, not under a temporary one)."""
    src = tmp_path / "src"
    src.mkdir()
    rng = random.Random(11)
    for n in ("a", "b", "c"):
        (src / n).write_bytes(rng.randbytes(20_000))
    (src / "big").write_bytes(rng.randbytes(3_000_000))
    p = backup(safe_dir, src, "-q")
    with Safe.open(safe_dir) as safe:
        victims = []
        for name in ("b", "big"):
            e = lookup(safe, Point.from_record(p), name)
            key = e.ref if safe.entry(e.ref).kind == Kind.CHUNK else sorted(_file_keys(safe, e) - {e.ref})[1]
            oe = safe.entry(key)
            victims.append((safe.pack_path(oe.pack), oe.offset + 64 + oe.stored_len // 2))
    for path, off in victims:
        with open(path, "r+b") as f:
            f.seek(off)
            byte = f.read(1)
            f.seek(off)
            f.write(bytes([byte[0] ^ 0xFF]))
    out = tmp_path / "out"
    r = run_cli("restore", p["id"], out, "--json", safe=safe_dir)
    assert "Traceback" not in r.err, r.err
    assert r.code == 3, (r.code, r.err)
    assert set(_warnings(r)) == {"b", "big"}, _warnings(r)
    assert sorted(os.listdir(out)) == ["a", "c"]
    for n in ("a", "c"):
        assert (out / n).read_bytes() == (src / n).read_bytes()


def test_a_target_that_is_a_symlink_is_refused_with_its_reason(safe_dir, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("x\n")
    p = backup(safe_dir, src, "-q")
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real)
    r = run_cli("restore", p["id"], link, safe=safe_dir)
    assert r.code == 1 and "is a symbolic link" in r.err and str(real) in r.err, r.err
    assert list(real.iterdir()) == []
