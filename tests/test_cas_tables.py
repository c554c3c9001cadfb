"""Other rooms' tables in the safe's index: cas keeps them through repair without knowing
their names, and rebuilds only its own."""

from __future__ import annotations

from pointsafe.cas import Safe, repair
from pointsafe.cas.index import TABLES

from conftest import run_cli


def test_repair_keeps_every_table_it_does_not_own(safe_dir, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"x" * 5000)
    assert run_cli("backup", src, "--name", "src", safe=safe_dir).code == 0   # ops records a task
    with Safe.open(safe_dir) as safe:
        t = safe.index.table("someroom.notes")        # a room cas has never heard of
        with safe.index.write() as txn:
            txn.put(b"k1", b"v1", db=t)
            txn.put(b"k2", b"v2" * 1000, db=t)
        tasks = safe.index.table("tasks")
        with safe.index.read() as txn:
            tasks_before = list(txn.cursor(db=tasks))
    assert tasks_before
    repair(safe_dir)
    with Safe.open(safe_dir) as safe:
        assert "tasks" not in TABLES and "alerts" not in TABLES
        notes, tasks = safe.index.existing("someroom.notes"), safe.index.existing("tasks")
        assert notes is not None and tasks is not None
        with safe.index.read() as txn:
            assert list(txn.cursor(db=notes)) == [(b"k1", b"v1"), (b"k2", b"v2" * 1000)]
            assert list(txn.cursor(db=tasks)) == tasks_before
            # cas's own tables are rebuilt from the packs, not copied: no queued drops survive.
            assert txn.stat(safe.index.db["release"])["entries"] == 0
        assert len(safe.points()) == 1
