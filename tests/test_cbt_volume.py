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
