"""The typed point: its record round-trips byte for byte, one newest-first order in every room,
one UTC time codec, and one top directory for ls/restore/diff and the mount."""

from __future__ import annotations

import dataclasses
import json
import os
from datetime import UTC, datetime

import pytest
from _backup_util import backup, restore
from _fuse_util import mounted
from conftest import needs_fuse, run_cli
from pointsafe.cas import (
    Entry,
    Kind,
    Point,
    Safe,
    encode_tree,
    format_utc,
    newest_first,
    object_key,
    oldest_first,
    parse_time,
    parse_utc,
    parse_utc_ns,
    resolve_point,
)
from pointsafe.cas.nodes import decode_node, encode_node
from pointsafe.cas.timefmt import from_ns, to_ns
from pointsafe.cas.tree import REG


def _stored(safe: Safe, pid: str) -> bytes:
    """The ``points`` table value of ``pid``, as LMDB holds it."""
    with safe.index.read() as t:
        return bytes(t.get(bytes.fromhex(pid), db=safe.index.db["points"]))


def _add(w, record: dict, with_tree: bool = True) -> Point:
    """Commit ``record`` naming a one-file tree (or no root)."""
    root = None
    if with_tree:
        blob = w.put(Kind.CHUNK, b"hello\n")
        kids, payload = encode_tree([Entry(b"hello.txt", REG, 0o644, size=6, ref=blob, mtime_ns=1)])
        root = w.put_node(Kind.TREE, kids, payload)
    return w.add_point(record, root)


# -- the record -------------------------------------------------------------------------------

def test_a_backup_record_round_trips_byte_identically(safe_dir, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("a\n")
    made = backup(safe_dir, src, "--label", "env=test", name="www")
    with Safe.open(safe_dir) as safe:
        raw = _stored(safe, made["id"])
        p = safe.point(made["id"])
        assert json.dumps(p.to_record(), sort_keys=True).encode() == raw
        assert p == Point.from_json(raw)
        # the payload its id hashes: the record without "id", naming the root
        node = safe.get(bytes.fromhex(p.id))
        assert bytes(decode_node(node)[1]) == p.payload()
        assert object_key(Kind.POINT, encode_node([p.root], p.payload())).hex() == p.id
    assert p.name == "www" and p.kind == "tree" and p.source == str(src) and p.labels == {"env": "test"}
    assert p.started_at is not None and p.finished_at is not None and p.started_at <= p.finished_at
    assert p.stats["files"] == 1 and p.warnings == () and p.root_meta["mode"] == 0o755 & os.stat(src).st_mode
    assert made == p.to_record()          # backup --json prints the stored record


def test_an_older_or_unusual_record_keeps_every_field(safe):
    odd = {"name": "old", "kind": "tree", "started": "2020-01-01T00:00:00Z", "finished": None,
           "size": "12", "stats": None, "future_field": {"a": [1, 2.5, None]}, "warnings": [{"path": "x", "message": "m"}]}
    with safe.writer("test") as w:
        made = _add(w, odd)
    raw = _stored(safe, made.id)
    p = safe.point(made.id)
    assert json.dumps(p.to_record(), sort_keys=True).encode() == raw
    assert json.loads(raw) == dict(odd, root=made.root.hex(), id=made.id)
    # missing fields take defaults; the wrong-typed and unknown ones stay in extra
    assert p.size == 0 and p.stats == {} and p.source == "" and p.finished is None and p.root_meta is None
    assert p.extra == {"size": "12", "stats": None, "future_field": {"a": [1, 2.5, None]}}
    assert p.warnings[0]["path"] == "x"
    assert p.started_at == datetime(2020, 1, 1, tzinfo=UTC)


def test_points_and_show_json_are_the_stored_records(safe_dir, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("a\n")
    first = backup(safe_dir, src, name="www")
    second = backup(safe_dir, src, name="www")
    with Safe.open(safe_dir) as safe:
        stored = [json.loads(_stored(safe, p["id"])) for p in (first, second)]
    r = run_cli("points", "--json", safe=safe_dir, check=True)
    assert json.loads(r.out) == stored                       # oldest first, as documented
    r = run_cli("show", first["id"][:8], "--json", safe=safe_dir, check=True)
    assert json.loads(r.out) == stored[0]


def test_a_point_is_immutable(safe):
    with safe.writer("test") as w:
        p = _add(w, {"name": "n", "kind": "tree", "started": "2026-01-01T00:00:00.000000Z", "stats": {"files": 1}})
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.name = "other"                        # type: ignore[misc]
    with pytest.raises(TypeError):
        p.stats["files"] = 2                    # type: ignore[index]
    assert hash(p) == hash(safe.point(p.id)) and p == safe.point(p.id)


# -- one order --------------------------------------------------------------------------------

def _www(w, started: str, finished: str) -> Point:
    return _add(w, {"name": "www", "kind": "tree", "source": "/www", "host": "h", "started": started,
                    "finished": finished, "size": 6, "stats": {"files": 1}, "warnings": []})


def test_every_room_agrees_on_the_newest_point(safe_dir):
    """Start times of another precision or zone and overlapping backups: one order everywhere.

    Before: ``latest``, the mount and retention compared start times as text (``11:00:00Z``
    sorted after ``11:00:00.500000Z``), status and alerts took the latest *finish*."""
    from pointsafe.fusefs.layout import Layout
    from pointsafe.gc.retention import Policy, select
    from pointsafe.gc.walk import newest_points
    from pointsafe.ingest.backup import previous_point
    from pointsafe.ops.alerts import source_points
    with Safe.open(safe_dir) as safe, safe.writer("test") as w:
        long_one = _www(w, "2026-11-25T10:00:00.000000Z", "2026-11-25T12:00:00.000000Z")
        coarse = _www(w, "2026-11-25T11:00:00Z", "2026-11-25T11:10:00Z")
        newest = _www(w, "2026-11-25T11:00:00.500000Z", "2026-11-25T11:20:00.000000Z")
        zoned = _www(w, "2026-11-25T11:30:00+01:00", "2026-11-25T10:40:00+00:00")   # 10:30 UTC
    with Safe.open(safe_dir) as safe:
        pts = safe.points()
        assert [p.id for p in pts] == [long_one.id, zoned.id, coarse.id, newest.id]
        assert [p.id for p in newest_first(pts)] == [p.id for p in reversed(oldest_first(pts))]
        assert resolve_point(safe, "latest").id == newest.id
        assert resolve_point(safe, "www@latest").id == newest.id
        assert resolve_point(safe, "www@2026-11-25T10:45").id == zoned.id
        assert previous_point(safe, "www", "tree").id == newest.id
        assert newest_points(safe) == [newest]
        assert select(pts, Policy(last=1))[0].point == newest
        assert source_points(safe.index)["www"].id == newest.id
        lay = Layout.build(pts)
        assert lay.latest_name() == lay.by_id[newest.id] == b"2026-11-25T11:00:00Z.2"
        assert lay.by_id[zoned.id] == b"2026-11-25T10:30:00Z"       # the folder name is in UTC
    status = json.loads(run_cli("status", "--json", safe=safe_dir).out)    # exit 2: www is stale
    www = {s["name"]: s for s in status["sources"]}["www"]
    assert www["last_point"]["id"] == newest.id and www["last_point"]["finished"] == newest.finished
    r = run_cli("show", "latest", "--json", safe=safe_dir, check=True)
    assert json.loads(r.out)["id"] == newest.id


# -- one time codec ---------------------------------------------------------------------------

def test_the_time_codec():
    dt = datetime(2026, 11, 25, 14, 36, 24, 123457, tzinfo=UTC)
    assert format_utc(dt) == "2026-11-25T14:36:24.123457Z"
    for text in ("2026-11-25T14:36:24.123457Z", "2026-11-25T15:36:24.123457+01:00", "2026-11-25T14:36:24.123457"):
        assert parse_utc(text) == dt, text
    assert format_utc(datetime(2026, 11, 25, 14, 36, 24, 123457)) == "2026-11-25T14:36:24.123457Z"   # naive is UTC
    ns = to_ns(dt)
    assert ns == 1795617384123457000 and from_ns(ns) == dt
    assert parse_utc_ns("2026-11-25T14:36:24.123457Z") == ns
    assert parse_utc_ns("not a time") == 0 and parse_utc_ns(None, 5) == 5
    assert parse_time("2026-11-25 15:36+01:00") == "2026-11-25T14:36:00.000000Z"
    with pytest.raises(ValueError):
        parse_utc("yesterday")


# -- one top directory ------------------------------------------------------------------------

def _attrs(st: os.stat_result) -> tuple:
    return st.st_mode & 0o7777, st.st_uid, st.st_gid, st.st_mtime_ns


def _entry_attrs(e: Entry) -> tuple:
    return e.mode, e.uid, e.gid, e.mtime_ns, e.atime_ns, e.ctime_ns, e.nlink, e.xattrs, e.ref


def test_ls_restore_and_the_view_show_one_root(safe_dir, tmp_path):
    """A real backup: lookup (what ls, diff and restore read) and the mount's view give the
    top directory the same attributes (before: ctime 0 and 1 link for ls, mtime and 2 for the view)."""
    from pointsafe.fusefs.view import ROOT_INO, View
    from pointsafe.ingest.browse import lookup
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("x\n")
    os.chmod(src, 0o750)
    os.chown(src, 1234, 5678)
    os.setxattr(src, "user.note", b"top")
    os.utime(src, ns=(1_500_000_000_123_456_000, 1_600_000_000_654_321_000))
    made = backup(safe_dir, src, name="www")
    with Safe.open(safe_dir) as safe:
        p = safe.point(made["id"])
        view = View(safe, p)
        try:
            mounted_root = view.node(ROOT_INO).entry
        finally:
            view.close()
        ls_root = lookup(safe, p, "")
    assert _entry_attrs(ls_root) == _entry_attrs(mounted_root) == _entry_attrs(p.root_entry())
    assert (ls_root.mode, ls_root.uid, ls_root.gid, ls_root.mtime_ns) == _attrs(os.stat(src))
    assert ls_root.nlink == 2 and ls_root.ctime_ns == ls_root.mtime_ns
    assert ls_root.xattrs == [(b"user.note", b"top")]
    out = tmp_path / "out"
    restore(safe_dir, made["id"], out)
    assert _attrs(os.stat(out)) == _attrs(os.stat(src))


@needs_fuse
def test_a_record_without_root_times_restores_and_mounts_alike(safe_dir, tmp_path):
    """root_meta without times (an older or hand-made record): restore used to date the top
    directory 1970 while the mount showed the point's finish time; both show the finish time."""
    finished = "2026-11-25T14:36:24.500000Z"
    with Safe.open(safe_dir) as safe, safe.writer("test") as w:
        p = _add(w, {"name": "old", "kind": "tree", "source": "/old", "host": "h",
                     "started": "2026-11-25T14:30:00.000000Z", "finished": finished, "size": 6,
                     "root_meta": {"mode": 0o710, "uid": 7, "gid": 8}, "stats": {}, "warnings": []})
    want = (0o710, 7, 8, parse_utc_ns(finished))
    out = tmp_path / "out"
    restore(safe_dir, p.id, out)
    assert _attrs(os.stat(out)) == want
    assert (out / "hello.txt").read_text() == "hello\n"
    mp = tmp_path / "mnt"
    with mounted(safe_dir, mp, p.id):
        assert _attrs(os.stat(mp)) == want
    r = run_cli("ls", p.id, "--json", safe=safe_dir, check=True)
    assert [e["path"] for e in json.loads(r.out)] == ["hello.txt"]


def test_odd_root_meta_values_do_not_break_the_view_or_ls(safe_dir):
    """A root_meta field of the wrong type takes its default in both, instead of a crash."""
    from pointsafe.fusefs.view import ROOT_INO, View
    from pointsafe.ingest.browse import lookup
    with Safe.open(safe_dir) as safe, safe.writer("test") as w:
        p = _add(w, {"name": "odd", "kind": "tree", "started": "2026-11-25T14:30:00.000000Z",
                     "root_meta": {"mode": "rwx", "uid": 3, "xattrs": [["zz", "00"], ["61", "62"]]}})
    with Safe.open(safe_dir) as safe:
        view = View(safe, p)
        try:
            e = view.node(ROOT_INO).entry
        finally:
            view.close()
        assert _entry_attrs(e) == _entry_attrs(lookup(safe, p, ""))
    assert (e.mode, e.uid, e.gid, e.xattrs) == (0o755, 3, 0, [(b"a", b"b")])
    assert e.mtime_ns == parse_utc_ns("2026-11-25T14:30:00Z")
    r = run_cli("ls", p.id, safe=safe_dir, check=True)
    assert "hello.txt" in r.out


def test_point_time_helpers():
    p = Point.from_record({"id": "ab", "started": "2026-11-25T14:30:00.000000Z"})
    assert p.taken == p.started and p.finished_at is None
    assert p.taken_ns == to_ns(datetime(2026, 11, 25, 14, 30, tzinfo=UTC))
    later = Point.from_record({"id": "aa", "started": "2026-11-25T14:30:00.000001Z"})
    same = Point.from_record({"id": "ac", "started": "2026-11-25T14:30:00Z"})
    assert [x.id for x in newest_first([p, later, same])] == ["aa", "ac", "ab"]   # ties: the larger id
    assert Point.from_record({"id": "x"}).order_key == (0, "x")


def test_an_unchanged_image_is_recognised_from_the_previous_point(safe_dir, tmp_path):
    """The previous point's ``source_stat`` (an unknown field, kept in ``extra``) still
    tells backup that an image file is unchanged: nothing is read again."""
    img = tmp_path / "disk.img"
    img.write_bytes(os.urandom(300_000))
    first = backup(safe_dir, img, "--volume", name="disk")
    second = backup(safe_dir, img, "--volume", name="disk")
    assert first["stats"]["files_unchanged"] == 0 and second["stats"]["files_unchanged"] == 1
    assert second["stats"]["bytes_read"] == 0 and second["root"] == first["root"]
    assert second["source_stat"] == first["source_stat"]
