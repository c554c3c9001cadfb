"""The whole-safe mount's folder names (no FUSE needed): sortable, unique, stable while mounted."""

from __future__ import annotations

from pointsafe.cas import Point
from pointsafe.fusefs.layout import Layout


def _p(pid: str, started: str, name: str = "www") -> Point:
    return Point.from_record({"id": pid, "started": started, "name": name, "kind": "tree"})


def test_names_are_time_sortable_unique_and_grouped():
    pts = [_p("bb", "2026-11-25T14:36:24.900000Z"), _p("aa", "2026-11-25T14:36:24.100000Z"),
           _p("cc", "2026-11-25T15:00:00.000000Z", "db")]
    lay = Layout.build(pts)
    assert [n for n, _ in lay.folders] == [b"2026-11-25T14:36:24Z", b"2026-11-25T14:36:24Z.2", b"2026-11-25T15:00:00Z"]
    assert lay.by_id["aa"] == b"2026-11-25T14:36:24Z"
    assert sorted(lay.groups) == [b"db", b"www"]
    assert lay.latest_name() == b"2026-11-25T15:00:00Z"
    assert lay.latest_name(b"www") == b"2026-11-25T14:36:24Z.2"


def test_a_shown_name_survives_forgetting_its_older_twin():
    first = Layout.build([_p("aa", "2026-11-25T14:36:24.1Z"), _p("bb", "2026-11-25T14:36:24.9Z")])
    after_forget = Layout.build([_p("bb", "2026-11-25T14:36:24.9Z")], keep=first.by_id)
    assert after_forget.by_id["bb"] == b"2026-11-25T14:36:24Z.2"
    newcomer = Layout.build([_p("bb", "2026-11-25T14:36:24.9Z"), _p("dd", "2026-11-25T14:36:24.95Z")],
                            keep=after_forget.by_id)
    assert newcomer.by_id["dd"] == b"2026-11-25T14:36:24Z"      # unique, never a name already shown


def test_point_names_that_clash_with_folder_names_get_a_suffix():
    lay = Layout.build([_p("aa", "2026-11-25T14:36:24Z", "latest"), _p("bb", "2026-11-25T14:37:00Z", "a/b")])
    assert set(lay.groups) == {b"latest.points", b"a_b"}
