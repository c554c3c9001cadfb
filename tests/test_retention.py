"""Retention policy selection on synthetic timestamps: each keep rule, their union, per source."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone


from pointsafe.cas import Point, Safe
from pointsafe.gc.retention import Policy, bucket, plan, select


def _pt(i: int, when: datetime, name: str = "web") -> Point:
    return Point.from_record({"id": f"{i:064x}", "name": name, "started": when.strftime("%Y-%m-%dT%H:%M:%S.%fZ")})


def _hourly_points(n: int, start: datetime, step: timedelta, name: str = "web") -> list[Point]:
    return [_pt(i + (0 if name == "web" else 10_000), start + i * step, name) for i in range(n)]


T0 = datetime(2025, 1, 1, 0, 30, tzinfo=timezone.utc)   # a Wednesday


def _kept(points, policy):
    return {d.point.id for d in select(points, policy) if d.keep}


def test_keep_last_keeps_the_newest_n():
    pts = _hourly_points(10, T0, timedelta(hours=1))
    assert _kept(pts, Policy(last=3)) == {p.id for p in pts[-3:]}
    assert _kept(pts, Policy(last=50)) == {p.id for p in pts}


def test_keep_hourly_takes_the_newest_point_of_each_hour():
    pts = _hourly_points(12, T0.replace(minute=0), timedelta(minutes=20))   # 3 an hour, hours 0..3
    kept = [d.point for d in select(pts, Policy(hourly=2)) if d.keep]
    assert [p.id for p in kept] == [pts[11].id, pts[8].id]   # newest of hour 3, hour 2


def test_keep_daily_weekly_monthly_yearly_buckets():
    pts = _hourly_points(800, T0, timedelta(hours=13))      # ≈ 433 days, about 2 points a day
    newest = max(pts, key=lambda p: p.started)
    for rule, n in (("daily", 7), ("weekly", 4), ("monthly", 6), ("yearly", 2)):
        ds = select(pts, Policy(**{rule: n}))
        kept = [d for d in ds if d.keep]
        assert len(kept) == n, rule
        labels = [d.reasons[0].split(" ", 1)[1] for d in kept]
        assert len(set(labels)) == n, rule                     # one point per period
        assert kept[0].point is newest                          # the newest period first
        # each kept point is the newest of its period
        for d, label in zip(kept, labels):
            same = [p for p in pts if bucket(rule, datetime.fromisoformat(p.started[:-1] + "+00:00")) == label]
            assert d.point is max(same, key=lambda p: p.started), rule


def test_weekly_uses_iso_weeks():
    mon = datetime(2025, 1, 6, 12, tzinfo=timezone.utc)   # Monday of ISO week 2
    sun = datetime(2025, 1, 5, 12, tzinfo=timezone.utc)   # Sunday of ISO week 1
    assert bucket("weekly", mon) == "2025-W02" and bucket("weekly", sun) == "2025-W01"
    pts = [_pt(1, sun), _pt(2, mon)]
    assert _kept(pts, Policy(weekly=2)) == {pts[0].id, pts[1].id}
    assert _kept(pts, Policy(weekly=1)) == {pts[1].id}


def test_rules_union_and_reasons():
    pts = _hourly_points(60, T0, timedelta(hours=6))      # 15 days, 4 a day
    last = _kept(pts, Policy(last=5))
    daily = _kept(pts, Policy(daily=10))
    both = select(pts, Policy(last=5, daily=10))
    assert {d.point.id for d in both if d.keep} == last | daily
    assert len(last & daily) > 0 and len(last | daily) < len(last) + len(daily)
    newest = both[0]
    assert newest.keep and newest.reasons[0] == "last 1" and newest.reasons[1].startswith("daily ")
    gone = [d for d in both if not d.keep]
    assert gone and all(d.reasons == ["no keep rule matches"] for d in gone)


def test_each_source_on_its_own_and_name_filter():
    web = _hourly_points(5, T0, timedelta(hours=1), "web")
    db = _hourly_points(5, T0 + timedelta(minutes=5), timedelta(hours=1), "db")
    ds = plan(web + db, Policy(last=2))
    kept = {d.point.id for d in ds if d.keep}
    assert kept == {p.id for p in web[-2:] + db[-2:]}
    only_db = plan(web + db, Policy(last=2), name="db")
    assert {d.point.name for d in only_db} == {"db"}
    assert len([d for d in only_db if not d.keep]) == 3


def test_policy_empty_and_describe():
    assert Policy().empty and not Policy(daily=1).empty
    assert Policy(last=2, monthly=3).describe() == "keep-last 2, keep-monthly 3"


def _synthetic_safe(safe_dir, stamps: dict[str, list[datetime]]) -> dict[str, list[dict]]:
    """Points with chosen timestamps, built through the writer API (each its own chunk)."""
    from _cas_util import make_point
    out: dict[str, list[dict]] = {}
    with Safe.open(safe_dir) as safe, safe.writer("test") as w:
        for name, times in stamps.items():
            for t in times:
                rec = make_point(w, name, {b"f": [t.isoformat().encode() * 100]}).to_record()
                # rewrite the record's time: point records are JSON in the points table
                rec["started"] = rec["finished"] = t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
                w.flush(extra=lambda txn, r=rec: txn.put(bytes.fromhex(r["id"]), json.dumps(r, sort_keys=True).encode(),
                                                         db=safe.index.db["points"]))
                out.setdefault(name, []).append(rec)
    return out


def test_cli_policy_dry_run_lists_why_then_forgets(safe_dir, cli):
    days = [T0 + timedelta(days=d, hours=h) for d in range(10) for h in (1, 13)]
    pts = _synthetic_safe(safe_dir, {"web": days, "db": days[:4]})
    r = cli("forget", "--keep-daily", "3", "--keep-last", "1", "--name", "web", "--dry-run", safe=safe_dir)
    assert r.code == 0, r.err
    lines = r.out.splitlines()
    web = sorted(pts["web"], key=lambda p: p["started"], reverse=True)
    assert any(web[0]["id"][:12] in l and l.startswith("keep") and "last 1" in l and "daily 2025-01-10" in l for l in lines)
    assert any(web[2]["id"][:12] in l and l.startswith("keep") and "daily 2025-01-09" in l for l in lines)
    assert any(web[1]["id"][:12] in l and l.startswith("would forget") and "no keep rule matches" in l for l in lines)
    assert "dry run: 17 points would be forgotten, 3 kept" in r.out
    assert not any(p["id"][:12] in r.out for p in pts["db"])
    r = cli("forget", "--keep-daily", "3", "--keep-last", "1", "--name", "web", "--json", safe=safe_dir)
    assert r.code == 0, r.err
    assert json.loads(r.out)["points_dropped"] == 17
    with Safe.open(safe_dir) as safe:
        left = {p.id for p in safe.points()}
    assert left == {web[0]["id"], web[2]["id"], web[4]["id"]} | {p["id"] for p in pts["db"]}
    r = cli("forget", "--keep-last", "1", "--name", "nosuch", safe=safe_dir)
    assert r.code == 1 and "no points named 'nosuch'" in r.err
    r = cli("forget", "--keep-last", "-1", safe=safe_dir)
    assert r.code == 2
    r = cli("verify", safe=safe_dir)
    assert r.code == 0, r.out
