"""The totals cas keeps for ``status`` (cas/counters.py) stay equal to a full recount through
backups, forget, gc, defrag and orphans, and old indexes without them get them."""

from __future__ import annotations

import random

from pointsafe.cas import Kind, Safe
from pointsafe.cas import counters
from pointsafe.gc.collect import run_gc
from pointsafe.gc.defrag import defrag
from pointsafe.gc.forget import forget, plan_forget

from conftest import run_cli
from _gc_util import backup, mutate, write_source


def _recount(safe: Safe) -> counters.SafeCounters:
    with safe.index.read() as t:
        return counters.compute(safe.index, t)


def test_totals_follow_every_job(tmp_path):
    rng = random.Random(7)
    src = tmp_path / "src"
    write_source(src, rng, files=8, size=200_000)
    path = tmp_path / "safe"
    Safe.init(path, pack_size=1 << 20).close()
    with Safe.open(path) as safe:
        recs = []
        for _ in range(5):
            recs.append(backup(safe, src, "src"))
            mutate(src, rng, 0.3, new_file=30_000)
            assert safe.counters() == _recount(safe)
        with safe.writer("test") as w:       # an orphan: written, never linked
            w.put(Kind.CHUNK, rng.randbytes(5000))
        assert safe.counters() == _recount(safe)
        forget(safe, plan_forget(safe, [r.id for r in recs[:3]]))
        assert safe.counters() == _recount(safe)
        assert safe.counters().dead_bytes > 0
        run_gc(safe, threshold=0.0)
        assert safe.counters() == _recount(safe)
        assert safe.counters().dead_bytes == 0
        defrag(safe)
        c = safe.counters()
        assert c == _recount(safe)
        assert c.packs == len(safe.pack_entries()) and c.objects > 0


def test_an_index_without_totals_gets_them_from_the_next_writer(safe_dir, tmp_path):
    src = tmp_path / "src"
    write_source(src, random.Random(3), files=3, size=50_000)
    with Safe.open(safe_dir) as safe:
        backup(safe, src, "src")
        want = safe.counters()
        with safe.index.write() as t:          # as an older pointsafe left it
            t.delete(counters.META_KEY, db=safe.index.db["meta"])
        assert safe.counters() == want          # computed by a scan meanwhile
        with safe.writer("test"):
            pass
        with safe.index.read() as t:
            assert t.get(counters.META_KEY, db=safe.index.db["meta"]) is not None
        assert safe.counters() == want
    r = run_cli("status", "--json", safe=safe_dir)
    assert r.code in (0, 2), r.err
