"""Reading points back: points/show/ls/diff with and without --json, restore of a whole point,
of a subdirectory and of a single file, restore targets that are not empty, and a hostile safe
whose trees hold names that would escape the target."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from _backup_util import backup, one_error_line, restore
import _tree_util as tu
from _tree_util import assert_trees_equal, snapshot
from conftest import needs_root, run_cli
from pointsafe.cas import BlobBuilder, Entry, Kind, Safe, encode_tree, utc_now_iso
from pointsafe.cas.tree import DIR, LNK, REG

BAD = b"caf\xe9\nline"    # not UTF-8, and a newline


@pytest.fixture(scope="module")
def points_safe(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("points") / "safe"
    Safe.init(path, pack_size=256 * 1024).close()
    return path


@pytest.fixture(scope="module")
def two_points(points_safe):
    """Two points of one source (made once for the module; the tests only read them): a,
    sub/deep/f, a non-UTF-8 name; then a changed, b added, the odd file removed, sub/deep/f's
    mode changed."""
    safe_dir = points_safe
    src = points_safe.parent / "src"
    (src / "sub" / "deep").mkdir(parents=True)
    (src / "a.txt").write_text("one\n")
    (src / "sub" / "deep" / "f").write_bytes(b"deep file\n" * 100)
    (src / "sub" / "keep").write_text("kept\n")
    (src / "link").symlink_to("a.txt")
    odd = os.path.join(os.fsencode(src), BAD)
    with open(odd, "wb") as f:
        f.write(b"odd\n")
    p1 = backup(safe_dir, src, "-q", name="docs")
    (src / "a.txt").write_text("two, longer\n")
    (src / "b.txt").write_text("new\n")
    os.unlink(odd)
    os.chmod(src / "sub" / "deep" / "f", 0o600)
    p2 = backup(safe_dir, src, "-q", name="docs")
    return src, p1, p2


def test_points_and_show(points_safe, two_points):
    src, p1, p2 = two_points
    r = run_cli("points", "--json", safe=points_safe)
    assert r.code == 0
    pts = json.loads(r.out)
    assert [p["id"] for p in pts] == [p1["id"], p2["id"]]
    for p in pts:
        for k in ("id", "name", "kind", "source", "host", "started", "finished", "root", "warnings", "stats"):
            assert k in p, k
        for k in ("files", "bytes_read", "bytes_new", "bytes_stored"):
            assert isinstance(p["stats"][k], int), k
        assert p["started"].endswith("Z") and p["finished"] >= p["started"]
        assert p["source"] == str(src)
    r = run_cli("points", safe=points_safe)
    assert r.code == 0 and p1["id"][:12] in r.out and p2["id"][:12] in r.out and "docs" in r.out
    for spec in (p2["id"][:8], "latest", "docs@latest", "docs@" + p2["finished"]):
        r = run_cli("show", spec, "--json", safe=points_safe)
        assert r.code == 0, r.err
        assert json.loads(r.out)["id"] == p2["id"], spec
    r = run_cli("show", "docs@" + p1["finished"], "--json", safe=points_safe)
    assert json.loads(r.out)["id"] == p1["id"]
    r = run_cli("show", p1["id"][:10], safe=points_safe)
    assert r.code == 0 and p1["id"] in r.out and "docs" in r.out


def test_ls_json_and_text(points_safe, two_points):
    src, p1, p2 = two_points
    r = run_cli("ls", p1["id"], "--json", safe=points_safe)
    assert r.code == 0, r.err
    items = json.loads(r.out)
    by_b64 = {base64.b64decode(i["path_b64"]) if "path_b64" in i else i["path"].encode(): i for i in items}
    assert set(by_b64) == {b"a.txt", b"sub", b"link", BAD}
    assert by_b64[b"sub"]["type"] == "dir"
    assert by_b64[b"link"]["type"] == "symlink" and by_b64[b"link"]["target"] == "a.txt"
    assert by_b64[BAD]["size"] == 4 and "path_b64" in by_b64[BAD]
    assert by_b64[b"a.txt"]["size"] == 4 and by_b64[b"a.txt"]["mode"] == 0o644
    r = run_cli("ls", p1["id"], "sub/deep", "--json", safe=points_safe)
    assert [i["path"] for i in json.loads(r.out)] == ["sub/deep/f"]
    r = run_cli("ls", p1["id"], "-R", "--json", safe=points_safe)
    assert len(json.loads(r.out)) == 7
    r = run_cli("ls", p1["id"], safe=points_safe)
    assert r.code == 0
    lines = r.out.splitlines()
    assert len(lines) == 4, "a name with a newline still takes one line"
    assert any(l.endswith("link -> a.txt") for l in lines)
    assert any("caf\\xe9\\nline" in l for l in lines), lines
    one_error_line(run_cli("ls", p1["id"], "nope", safe=points_safe), "nope", "not found")


def test_diff_json_and_text(points_safe, two_points):
    src, p1, p2 = two_points
    r = run_cli("diff", p1["id"], p2["id"], "--json", safe=points_safe)
    assert r.code == 0, r.err
    ch = {(c["change"], base64.b64decode(c["path_b64"]) if "path_b64" in c else c["path"].encode())
          for c in json.loads(r.out)}
    assert ch == {("M", b"a.txt"), ("+", b"b.txt"), ("-", BAD), ("m", b"sub/deep/f")}, ch
    r = run_cli("diff", p1["id"], p2["id"], safe=points_safe)
    assert r.code == 0
    assert sorted(r.out.splitlines()) == sorted(["M a.txt", "+ b.txt", "- caf\\xe9\\nline", "m sub/deep/f"])
    r = run_cli("diff", p2["id"], p2["id"], "--json", safe=points_safe)
    assert json.loads(r.out) == []


def test_restore_path_of_a_directory_and_of_a_file(points_safe, two_points, tmp_path):
    src, p1, p2 = two_points
    out = tmp_path / "o1"
    restore(points_safe, p2["id"], out, "--path", "sub/deep")
    assert sorted(os.listdir(out)) == ["sub"] and os.listdir(out / "sub") == ["deep"]
    assert_trees_equal(src / "sub" / "deep", out / "sub" / "deep")
    out = tmp_path / "o2"
    restore(points_safe, p2["id"], out, "--path", "/sub/deep/f")
    assert os.listdir(out / "sub" / "deep") == ["f"]
    s, d = snapshot(src / "sub" / "deep"), snapshot(out / "sub" / "deep")
    assert d[b"f"].digest == s[b"f"].digest
    assert os.stat(out / "sub" / "deep" / "f").st_mode & 0o7777 == 0o600
    assert os.stat(out / "sub" / "deep" / "f").st_mtime_ns == os.stat(src / "sub" / "deep" / "f").st_mtime_ns
    # the directories on the way get their stored metadata too
    assert os.stat(out / "sub").st_mtime_ns == os.stat(src / "sub").st_mtime_ns
    out = tmp_path / "o3"
    restore(points_safe, p1["id"], out, "--path", os.fsdecode(BAD))
    assert os.listdir(os.fsencode(out)) == [BAD]
    one_error_line(run_cli("restore", p1["id"], tmp_path / "o4", "--path", "sub/nope", safe=points_safe), "not found")
    one_error_line(run_cli("restore", p1["id"], tmp_path / "o5", "--path", "../etc", safe=points_safe), "..")


def test_restore_target_not_empty_needs_force(points_safe, two_points, tmp_path):
    src, p1, p2 = two_points
    out = tmp_path / "busy"
    out.mkdir()
    (out / "a.txt").write_text("mine")
    (out / "other").write_text("untouched")
    one_error_line(run_cli("restore", p2["id"], out, safe=points_safe), "not empty", "--force")
    assert (out / "a.txt").read_text() == "mine"
    restore(points_safe, p2["id"], out, "--force")
    assert (out / "a.txt").read_text() == "two, longer\n"
    assert (out / "other").read_text() == "untouched"
    assert (out / "sub" / "deep" / "f").read_bytes() == b"deep file\n" * 100
    # twice with --force: files and links that exist are replaced
    restore(points_safe, p2["id"], out, "--force")
    assert os.readlink(out / "link") == "a.txt"
    f = tmp_path / "plainfile"
    f.write_text("x")
    one_error_line(run_cli("restore", p2["id"], f, safe=points_safe), "not a directory")


# -- bad input --------------------------------------------------------------------------------

def _all_one_line(cases: list[tuple[tuple, Path | None, tuple[str, ...]]]) -> None:
    """Run independent failing commands side by side (each is ~0.4 s of CPU, mostly start-up)."""
    with ThreadPoolExecutor(max_workers=3) as pool:
        results = list(pool.map(lambda c: run_cli(*c[0], safe=c[1]), cases))
    for (args, _, words), r in zip(cases, results):
        try:
            one_error_line(r, *words)
        except AssertionError as e:
            raise AssertionError(f"pointsafe {' '.join(map(str, args))}: {e}") from None


def test_bad_input_is_one_line(safe_dir, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("x")
    (tmp_path / "empty").mkdir()
    os.symlink(safe_dir, tmp_path / "sneaky")
    _all_one_line([
        (("backup", tmp_path / "missing"), safe_dir, ("missing", "no such")),
        (("backup", safe_dir), safe_dir, ("inside the safe",)),
        (("backup", safe_dir / "packs"), safe_dir, ("inside the safe",)),
        (("backup", tmp_path / "sneaky"), safe_dir, ("inside the safe",)),
        (("backup", src / "f"), safe_dir, ("file",)),
        (("backup", src, "--name", "a@b"), safe_dir, ("name",)),
        (("backup", src), tmp_path / "nosafe", ("no such safe",)),
        (("backup", src), tmp_path / "empty", ("not a pointsafe safe",)),
        (("points",), src / "f", ("not a pointsafe safe",)),
        (("points",), None, ("no safe given",)),
        (("show", "latest"), safe_dir, ("no points",)),
    ])
    assert os.listdir(tmp_path / "empty") == [], "a failed command must not write into a foreign dir"
    assert not (tmp_path / "nosafe").exists()
    assert json.loads(run_cli("points", "--json", safe=safe_dir).out) == [], "failed backups make no point"
    p = backup(safe_dir, src, "-q")
    _all_one_line([
        (("restore", p["id"], safe_dir, "--force"), safe_dir, ("inside the safe",)),
        (("restore", p["id"], safe_dir / "packs" / "x"), safe_dir, ("inside the safe",)),
    ])
    assert not (safe_dir / "packs" / "x").exists() and not (safe_dir / "f").exists()
    _all_one_line([(args, safe_dir, ("point",)) for args in (
        ("show", "deadbeef"), ("show", "nosuch@latest"), ("show", "xyz"), ("ls", "deadbeef"),
        ("diff", p["id"], "deadbeef"), ("restore", "deadbeef", tmp_path / "t"), ("show", "src@1999-01-01"))])
    assert not (tmp_path / "t").exists(), "an unknown point creates no restore target"


def test_restic_repository_is_not_a_safe(tmp_path):
    if shutil.which("restic") is None:
        pytest.skip("restic is not installed")
    repo = tmp_path / "restic"
    subprocess.run(["restic", "init", "-q", "--repo", str(repo)], env={**os.environ, "RESTIC_PASSWORD": "x"},
                   check=True, capture_output=True, timeout=120)
    before = sorted(os.listdir(repo))
    src = tmp_path / "src"
    src.mkdir()
    one_error_line(run_cli("points", safe=repo), "not a pointsafe safe", "restic")
    one_error_line(run_cli("backup", src, safe=repo), "not a pointsafe safe")
    assert sorted(os.listdir(repo)) == before


def test_safe_inside_the_source_is_skipped(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "data").write_text("data")
    safe = src / "safe"
    Safe.init(safe, pack_size=256 * 1024).close()
    p = backup(safe, src, "-q")
    r = run_cli("ls", p["id"], "--json", safe=safe)
    assert [i["path"] for i in json.loads(r.out)] == ["data"]


# -- a hostile safe ---------------------------------------------------------------------------

def _hostile_point(safe_dir: Path, outside: Path, symlink_first: bool) -> str:
    """A point whose root holds '..', '.', 'a/b', '' and a symlink 'x' -> outside plus a
    directory 'x' (in either order), a '..' directory holding 'pwned', and one good file."""
    with Safe.open(safe_dir) as safe, safe.writer("hostile test") as w:
        def blob(data: bytes) -> bytes:
            bb = BlobBuilder(w.put_node, safe.config.list_fanout)
            bb.add(w.put(Kind.CHUNK, data), len(data))
            return bb.finish()

        def f(name: bytes, data: bytes) -> Entry:
            return Entry(name, REG, 0o644, size=len(data), ref=blob(data))

        def tree(entries: list[Entry]) -> bytes:
            children, payload = encode_tree(entries)
            return w.put_node(Kind.TREE, children, payload)

        pwned = tree([f(b"pwned", b"escaped!")])
        link = Entry(b"x", LNK, 0o777, size=len(os.fsencode(outside)), target=os.fsencode(outside))
        xdir = Entry(b"x", DIR, 0o755, ref=pwned)
        pair = [link, xdir] if symlink_first else [xdir, link]
        entries = [f(b"..", b"dotdot"), f(b".", b"dot"), f(b"a/b", b"slash"), f(b"", b"empty name"),
                   Entry(b"..", DIR, 0o755, ref=pwned), f(b"../up", b"up"),
                   f(os.fsencode(outside / "abs"), b"absolute"), *pair, f(b"good", b"fine")]
        root = tree(entries)
        now = utc_now_iso()
        rec = w.add_point({"name": "hostile", "kind": "tree", "source": "/evil", "host": "evil",
                           "started": now, "finished": now, "size": 0, "warnings": [],
                           "stats": {"files": 0, "bytes_read": 0, "bytes_new": 0, "bytes_stored": 0},
                           "root_meta": {"mode": 0o755, "uid": 0, "gid": 0, "mtime_ns": 0,
                                         "atime_ns": 0, "xattrs": []}}, root)
        return rec.id


@pytest.mark.parametrize("symlink_first", [True, False])
def test_hostile_safe_cannot_write_outside_the_target(safe_dir, tmp_path, symlink_first):
    box = tmp_path / "box"              # the target and its parent, watched for strays
    outside = tmp_path / "outside"
    outside.mkdir()
    box.mkdir()
    pid = _hostile_point(safe_dir, outside, symlink_first)
    target = box / "target"
    r = run_cli("restore", pid, target, "--json", safe=safe_dir)
    assert r.code == 3, (r.code, r.err)
    assert "Traceback" not in r.err
    warned = {w["path"] for w in json.loads(r.out)["warnings"]}
    assert {"..", ".", "a/b", "../up"} <= warned, warned
    assert os.listdir(outside) == [], "restore wrote outside the target"
    assert os.listdir(box) == ["target"], "restore wrote next to the target"
    assert (target / "good").read_text() == "fine"
    assert not (target / "a").exists()
    names = set(os.listdir(target))
    assert names == {"good", "x"}, names
    if symlink_first:
        assert os.readlink(target / "x") == str(outside)
    else:
        assert (target / "x" / "pwned").read_text() == "escaped!"   # inside the target: harmless
    # again, into the now non-empty target, with --force: still nothing outside
    r = run_cli("restore", pid, target, "--force", "--json", safe=safe_dir)
    assert r.code == 3 and "Traceback" not in r.err, r.err
    assert os.listdir(outside) == [] and os.listdir(box) == ["target"]


@needs_root
def test_force_does_not_follow_symlinks_left_in_the_target(points_safe, two_points, tmp_path):
    """A target that already holds symlinks where the point has a directory and a file:
    --force replaces the file's link and refuses to descend through the directory's."""
    src, p1, p2 = two_points
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim").write_text("keep me")
    target = tmp_path / "t"
    target.mkdir()
    os.symlink(outside, target / "sub")
    os.symlink(outside / "victim", target / "a.txt")
    r = run_cli("restore", p2["id"], target, "--force", "--json", safe=points_safe)
    assert "Traceback" not in r.err
    assert r.code in (1, 3), (r.code, r.err)
    assert sorted(os.listdir(outside)) == ["victim"]
    assert (outside / "victim").read_text() == "keep me"
    if r.code == 3:
        assert (target / "a.txt").read_text() == "two, longer\n"
        assert any(w["path"].startswith("sub") for w in json.loads(r.out)["warnings"])


@needs_root
def test_restore_without_dac_override_keeps_nested_directory_metadata(safe_dir, tmp_path):
    """Directories that shut their owner out (mode 0000, 0600) are given their mode last, after
    everything below them: a restore without CAP_DAC_OVERRIDE (setpriv drops it; an ordinary
    user restoring their own files is in the same place) still sets the inner metadata."""
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is missing")
    spec = tu.Spec(tu.DIR, mode=0o755, mtime_ns=10**18, children={
        b"locked": tu.Spec(tu.DIR, mode=0o000, mtime_ns=10**18 + 1, children={
            b"inner": tu.Spec(tu.DIR, mode=0o751, mtime_ns=10**18 + 2, children={
                b"f": tu.Spec(tu.REG, content=[(0, b"x")], mode=0o640, mtime_ns=10**18 + 3)}),
            b"private": tu.Spec(tu.DIR, mode=0o600, mtime_ns=10**18 + 4, children={
                b"deeper": tu.Spec(tu.DIR, mode=0o700, mtime_ns=10**18 + 5)})}),
    })
    src = tu.make_tree(tmp_path / "src", spec)
    before = snapshot(src)
    p = backup(safe_dir, src, "-q")
    r = subprocess.run(["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--", sys.executable,
                        "-m", "pointsafe.cli", "--safe", str(safe_dir), "restore", p["id"], str(tmp_path / "out"),
                        "--json"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert_trees_equal(before, tmp_path / "out")


def test_malformed_tree_is_a_clear_error_not_a_traceback(safe_dir, tmp_path):
    """A hostile or damaged safe: a directory whose node is a data chunk, a file whose blob root
    is a tree node. ls says so in one line; restore restores the rest and warns (exit 3)."""
    with Safe.open(safe_dir) as safe, safe.writer("malformed test") as w:
        chunk = w.put(Kind.CHUNK, b"not a tree at all, just bytes")
        ch, pl = encode_tree([Entry(b"f", REG, 0o644, size=10, ref=chunk)])
        subtree = w.put_node(Kind.TREE, ch, pl)
        bb = BlobBuilder(w.put_node, safe.config.list_fanout)
        bb.add(w.put(Kind.CHUNK, b"fine"), 4)
        ch, pl = encode_tree([Entry(b"d", DIR, 0o755, ref=chunk), Entry(b"e", REG, 0o644, size=100, ref=subtree),
                              Entry(b"good", REG, 0o644, size=4, ref=bb.finish())])
        root = w.put_node(Kind.TREE, ch, pl)
        now = utc_now_iso()
        pid = w.add_point({"name": "bad", "kind": "tree", "source": "/x", "host": "h", "started": now,
                           "finished": now, "warnings": [], "stats": {}}, root).id
    one_error_line(run_cli("ls", pid, "d", safe=safe_dir), "not a tree")
    one_error_line(run_cli("ls", pid, "-R", safe=safe_dir), "not a tree")
    r = run_cli("restore", pid, tmp_path / "out", "--json", safe=safe_dir)
    assert r.code == 3 and "Traceback" not in r.err, r.err
    warned = [w["path"] for w in json.loads(r.out)["warnings"]]
    assert len(warned) == 2 and warned[0] == "d" and warned[1].endswith("e"), warned
    assert (tmp_path / "out" / "good").read_text() == "fine"
