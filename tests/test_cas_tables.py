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


def test_a_table_created_by_one_thread_is_not_seen_by_another_before_it_exists(safe_dir):
    """Two server requests at once, the first of an agent: one creates the agents' table while
    another reads it. The reader must not get the new table's handle before the transaction
    that creates it has committed (LMDB would answer EINVAL: an internal error, HTTP 500)."""
    import threading

    with Safe.open(safe_dir) as safe:
        idx = safe.index
        opened, go_on = threading.Event(), threading.Event()
        real_write = idx.write

        class SlowCommit:
            def __enter__(self):
                self.txn = real_write().__enter__()
                return self.txn

            def __exit__(self, *exc):
                opened.set()           # the table is open in this transaction, not yet committed
                go_on.wait(10)
                return self.txn.__exit__(*exc)

        idx.write = lambda: SlowCommit()   # type: ignore[method-assign]
        creator = threading.Thread(target=idx.table, args=("someroom.new",))
        creator.start()
        assert opened.wait(10)
        seen = []
        reader = threading.Thread(target=lambda: seen.append(idx.db.get("someroom.new")))
        reader.start()
        reader.join(10)
        go_on.set()
        creator.join(10)
        assert seen == [None]          # not published while its creation is uncommitted
        t = idx.existing("someroom.new")
        assert t is not None
        with idx.read() as txn:       # and usable by anyone once it is
            assert txn.stat(t)["entries"] == 0
