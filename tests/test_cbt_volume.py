"""Changed-block tracking for volumes (issue 12): the groundwork -- a point's change_source,
stats.bytes_scanned, backup --full-read and the cbt.full_every setting."""
import json
import os

from pointsafe.cas import Safe
from pointsafe.ops.config import check, full_read_due

from conftest import PW, run_cli


def _points(safe_dir):
    s = Safe.open(safe_dir, PW)
    try:
        return sorted(s.points(), key=lambda p: p.started)
    finally:
        s.close()


def test_full_read_records_change_source_and_bytes_scanned(tmp_path, safe_dir):
    img = tmp_path / "disk.img"
    img.write_bytes(os.urandom(300_000) + bytes(200_000))
    run_cli("backup", "--volume", img, safe=safe_dir, check=True)
    # unchanged image: the source_stat shortcut reads nothing ...
    run_cli("backup", "--volume", img, safe=safe_dir, check=True)
    # ... unless --full-read asks to read it whole
    run_cli("backup", "--volume", "--full-read", img, safe=safe_dir, check=True)
    p1, p2, p3 = _points(safe_dir)
    assert p1.extra["change_source"] == {"kind": "full", "detail": "", "fallback": None}
    assert p1.stats["bytes_scanned"] == p1.stats["bytes_read"] == 500_000
    assert p2.stats["bytes_scanned"] == 0
    assert p3.stats["bytes_scanned"] == 500_000
    assert p3.extra["change_source"]["detail"] == "--full-read"
    assert p1.root == p2.root == p3.root
    shown = run_cli("show", p3.id, safe=safe_dir, check=True).out
    assert "changes from" in shown and "full" in shown
    rec = json.loads(run_cli("show", "--json", p3.id, safe=safe_dir, check=True).out)
    assert rec["change_source"]["kind"] == "full" and rec["stats"]["bytes_scanned"] == 500_000


def test_full_every_setting():
    assert check("cbt.full_every", "30d") == "30d"
    s = {"cbt.full_every": "30d"}
    assert full_read_due(s, None, "2026-12-02T00:00:00Z")
    assert not full_read_due(s, "2026-11-20T00:00:00Z", "2026-12-02T00:00:00Z")
    assert full_read_due(s, "2026-10-20T00:00:00Z", "2026-12-02T00:00:00Z")
    assert not full_read_due({"cbt.full_every": "off"}, None, "2026-12-02T00:00:00Z")


def _block(safe_dir) -> int:
    s = Safe.open(safe_dir, PW)
    try:
        return s.config.block_size
    finally:
        s.close()


def _content(safe_dir, p) -> bytes:
    from pointsafe.cas.blob import BlobReader
    s = Safe.open(safe_dir, PW)
    try:
        r = BlobReader(p.root, p.size, s.get, lambda k: s.entry(k).kind)
        return r.read(0, p.size)
    finally:
        s.close()


def _image(tmp_path, bs):
    img = tmp_path / "disk.img"
    data = bytearray(os.urandom(bs * 40) + bytes(bs * 20) + os.urandom(bs * 3 + 123))
    img.write_bytes(data)
    return img, data


def test_ranges_file_incremental_equals_full_read(tmp_path, safe_dir):
    bs = _block(safe_dir)
    img, data = _image(tmp_path, bs)
    run_cli("backup", "--volume", img, safe=safe_dir, check=True)
    # change: inside one block, across a block boundary, zeros over data (a new hole), data in the hole
    changes = [(5 * bs + 10, 100), (9 * bs - 7, 20), (12 * bs, bs), (45 * bs + 3, 50)]
    for off, n in changes:
        data[off:off + n] = bytes(n) if n == bs else os.urandom(n)
    with open(img, "r+b") as f:
        f.write(data)
    rf = tmp_path / "ranges.json"
    rf.write_text(json.dumps([list(c) for c in changes]))
    run_cli("backup", "--volume", "--changed-blocks", rf, img, safe=safe_dir, check=True)
    run_cli("backup", "--volume", "--full-read", img, safe=safe_dir, check=True)
    _, inc, full = _points(safe_dir)
    assert inc.extra["change_source"] == {"kind": "ranges-file", "detail": str(rf), "fallback": None}
    assert inc.root == full.root and inc.size == full.size == len(data)
    assert _content(safe_dir, inc) == bytes(data)
    assert inc.stats["bytes_scanned"] <= 6 * bs     # 1 + 2 + 1 + 1 blocks touched
    assert inc.stats["bytes_read"] == len(data)
    assert not inc.warnings
    run_cli("verify", "--data", safe=safe_dir, check=True)    # reference counts hold the reused blocks
    first = _points(safe_dir)[0]
    run_cli("forget", first.id, safe=safe_dir, check=True)
    run_cli("gc", "--threshold", "0", safe=safe_dir, check=True)
    assert _content(safe_dir, inc) == bytes(data)
    run_cli("verify", "--data", safe=safe_dir, check=True)


def test_ranges_file_lines_and_growth_covered(tmp_path, safe_dir):
    bs = _block(safe_dir)
    img, data = _image(tmp_path, bs)
    run_cli("backup", "--volume", img, safe=safe_dir, check=True)
    old = len(data)
    data += os.urandom(2 * bs)
    img.write_bytes(data)
    rf = tmp_path / "ranges.txt"
    rf.write_text(f"{old} {2 * bs}\n")
    run_cli("backup", "--volume", "--changed-blocks", rf, img, safe=safe_dir, check=True)
    run_cli("backup", "--volume", "--full-read", img, safe=safe_dir, check=True)
    _, inc, full = _points(safe_dir)
    assert inc.extra["change_source"]["fallback"] is None
    assert inc.root == full.root and _content(safe_dir, inc) == bytes(data)
    assert inc.stats["bytes_scanned"] <= 4 * bs


def _fallback(tmp_path, safe_dir, change, ranges, reason):
    bs = _block(safe_dir)
    img, data = _image(tmp_path, bs)
    if change is not None:
        run_cli("backup", "--volume", img, safe=safe_dir, check=True)
        data = change(data, bs)
        img.write_bytes(data)
    rf = tmp_path / "ranges.json"
    rf.write_text(json.dumps(ranges))
    r = run_cli("backup", "--volume", "--changed-blocks", rf, img, safe=safe_dir)
    assert r.code == 3 and "changed blocks not used" in r.err    # 3: done, with warnings
    p = _points(safe_dir)[-1]
    cs = p.extra["change_source"]
    assert cs["kind"] == "full" and reason in cs["fallback"]
    assert any("changed blocks not used" in w["message"] for w in p.warnings)
    assert _content(safe_dir, p) == bytes(data)
    assert p.stats["bytes_scanned"] == len(data)


def test_fallback_no_previous_point(tmp_path, safe_dir):
    _fallback(tmp_path, safe_dir, None, [[0, 10]], "no previous point")


def test_fallback_shrunk(tmp_path, safe_dir):
    _fallback(tmp_path, safe_dir, lambda d, bs: d[:-2 * bs], [[0, 10]], "shrank")


def test_fallback_growth_not_covered(tmp_path, safe_dir):
    _fallback(tmp_path, safe_dir, lambda d, bs: d + os.urandom(bs), [[0, 10]], "grew")


def test_malformed_ranges_file_is_one_error_line(tmp_path, safe_dir):
    img, _ = _image(tmp_path, _block(safe_dir))
    rf = tmp_path / "bad.json"
    rf.write_text('[[0, "x"]]')
    r = run_cli("backup", "--volume", "--changed-blocks", rf, img, safe=safe_dir)
    assert r.code == 1 and "malformed changed-blocks file" in r.err and len(r.err.strip().splitlines()) == 1


def test_full_read_finds_missed_changes(tmp_path, safe_dir):
    """A full read with the change source at hand: blocks that changed outside the reported
    ranges are counted in a warning; the point holds the full read."""
    bs = _block(safe_dir)
    img, data = _image(tmp_path, bs)
    run_cli("backup", "--volume", img, safe=safe_dir, check=True)
    data[2 * bs:2 * bs + 10] = os.urandom(10)       # reported
    data[30 * bs:30 * bs + 10] = os.urandom(10)     # missed by the change source
    img.write_bytes(data)
    rf = tmp_path / "ranges.json"
    rf.write_text(json.dumps([[2 * bs, 10]]))
    r = run_cli("backup", "--volume", "--full-read", "--changed-blocks", rf, img, safe=safe_dir)
    assert r.code == 3
    p = _points(safe_dir)[-1]
    assert any("found 1 blocks that differ" in w["message"] for w in p.warnings)
    assert _content(safe_dir, p) == bytes(data)
    # ... and a critical alert says the chain before it may lack those writes
    al = json.loads(run_cli("alerts", "--json", safe=safe_dir, check=True).out)
    al = al if isinstance(al, list) else al.get("alerts", [])
    assert [a for a in al if a["severity"] == "critical" and a["kind"] == "verify" and "missed writes" in a["message"]]


def test_full_every_due_reads_whole(tmp_path, safe_dir):
    bs = _block(safe_dir)
    img, data = _image(tmp_path, bs)
    run_cli("backup", "--volume", img, safe=safe_dir, check=True)
    run_cli("config", "set", "cbt.full_every", "2d", safe=safe_dir, check=True)
    rf = tmp_path / "ranges.json"
    rf.write_text("[]")
    run_cli("backup", "--volume", "--changed-blocks", rf, img, safe=safe_dir, check=True)
    assert _points(safe_dir)[-1].stats["bytes_scanned"] == 0       # not due: nothing read
    later = {"POINTSAFE_NOW": "2099-01-01T00:00:00Z"}
    run_cli("backup", "--volume", "--changed-blocks", rf, img, safe=safe_dir, check=True, env=later)
    p = _points(safe_dir)[-1]
    assert p.extra["change_source"]["kind"] == "full" and p.stats["bytes_scanned"] == len(data)


def test_changed_blocks_needs_a_volume(tmp_path, safe_dir):
    (tmp_path / "tree").mkdir()
    rf = tmp_path / "ranges.json"
    rf.write_text("[]")
    r = run_cli("backup", "--changed-blocks", rf, tmp_path / "tree", safe=safe_dir)
    assert r.code == 1 and "applies to a volume" in r.err and len(r.err.strip().splitlines()) == 1
