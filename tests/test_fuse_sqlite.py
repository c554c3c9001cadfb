"""A SQLite database attached straight from the mount: it opens read-only, checks out intact and
holds the source's rows; and its page reads load the chunks they fall in, not a read-ahead
window (two or three adjacent pages are a B-tree page and its neighbour, not a sequential
reader)."""

from __future__ import annotations

import os
import random
import sqlite3
from pathlib import Path

import pytest

from _fuse_util import mounted, stats
from conftest import PW, fuse_skip_reason, run_cli

pytestmark = pytest.mark.skipif(fuse_skip_reason() is not None, reason=fuse_skip_reason() or "")

DB = "shop.sqlite"
PAGE = 4096
TABLES = ("customers", "orders", "attachments")


def _make_db(path: Path, rows: int) -> None:
    """Three tables (one with blobs larger than a page: overflow chains), rows inserted in random
    key order, two secondary indexes: pages of one table lie scattered through the file."""
    rnd = random.Random(3)
    words = [f"w{rnd.getrandbits(20):x}" for _ in range(2000)]
    con = sqlite3.connect(path)
    con.execute(f"PRAGMA page_size={PAGE}")
    con.execute("PRAGMA journal_mode=DELETE")
    con.execute("CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT, city TEXT)")
    con.execute("CREATE TABLE orders (id INTEGER PRIMARY KEY, customer INTEGER, total REAL, note TEXT)")
    con.execute("CREATE TABLE attachments (id INTEGER PRIMARY KEY, order_id INTEGER, body BLOB)")
    con.execute("CREATE INDEX orders_by_customer ON orders(customer, total)")
    con.execute("CREATE INDEX customers_by_city ON customers(city)")
    ids = list(range(1, rows + 1))
    rnd.shuffle(ids)
    for at in range(0, rows, 5000):
        batch = ids[at:at + 5000]
        con.executemany("INSERT INTO customers VALUES (?, ?, ?)",
                        [(i, " ".join(rnd.choices(words, k=2)), rnd.choice(words[:40])) for i in batch[::3]])
        con.executemany("INSERT INTO orders VALUES (?, ?, ?, ?)",
                        [(i, rnd.randrange(rows // 3), rnd.random() * 1000, " ".join(rnd.choices(words, k=10)))
                         for i in batch])
        con.executemany("INSERT INTO attachments VALUES (?, ?, ?)",
                        [(i, i, rnd.randbytes(rnd.randrange(100, 9000))) for i in batch[::40]])
        con.commit()
    con.close()


def _rows(con: sqlite3.Connection) -> dict[str, list[tuple]]:
    return {t: con.execute(f"SELECT * FROM {t} ORDER BY id").fetchall() for t in TABLES}  # noqa: S608 - fixed names


def _extents(safe: Path) -> list[tuple[int, int]]:
    """(offset, length) of every chunk of the database file as stored."""
    from pointsafe.cas import BlobReader, Kind, Safe, find_entry, resolve_point

    s = Safe.open(safe, write=False, password=PW)
    try:
        e = find_entry(s.get, resolve_point(s, "latest").root_entry().ref, DB.encode())
        assert e is not None

        def kind(k: bytes) -> int:
            ent = s.entry(k)
            assert ent is not None
            return Kind(ent.kind)

        return [(lo, n) for lo, n, k in BlobReader(e.ref, e.size, s.get, kind).extents() if k is not None]
    finally:
        s.close()


@pytest.fixture(scope="module")
def point(tmp_path_factory):
    """A safe holding one ~24 MB SQLite database; yields (safe, source database, its chunks)."""
    base = tmp_path_factory.mktemp("sqlite")
    src = base / "src"
    src.mkdir()
    _make_db(src / DB, 150_000)
    safe = base / "safe"
    run_cli("init", safe, check=True)
    run_cli("backup", src, "--name", "db", safe=safe, check=True, timeout=600)
    chunks = _extents(safe)
    assert len(chunks) > 100, "the database should span many chunks"
    return safe, src / DB, chunks


def test_database_opened_from_the_mount_is_intact(point, tmp_path):
    """SQLite opens the mounted database read-only (immutable: no locks, no journal), finds it
    intact, and every table holds exactly the source's rows."""
    safe, source, _ = point
    mp = tmp_path / "m"
    with mounted(safe, mp, "latest"):
        con = sqlite3.connect(f"file:{mp / DB}?mode=ro&immutable=1", uri=True)
        try:
            assert con.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
            got = _rows(con)
        finally:
            con.close()
    want_con = sqlite3.connect(f"file:{source}?mode=ro", uri=True)
    try:
        want = _rows(want_con)
    finally:
        want_con.close()
    assert {t: len(r) for t, r in got.items()} == {t: len(r) for t, r in want.items()}
    assert got == want


def test_runs_of_adjacent_pages_load_no_read_ahead(point, tmp_path):
    """Three adjacent 4 KiB pages read at scattered places of a cold mount (a B-tree page and
    its neighbours, a short overflow chain) load the chunks those pages lie in — about one
    each — and nothing ahead of them: a few pages in a row are not a sequential reader."""
    safe, source, chunks = point
    data = source.read_bytes()
    rnd = random.Random(8)
    places = rnd.sample([(lo, n) for lo, n in chunks if n >= 4 * PAGE], 25)
    offs = [((lo + n // 2) // PAGE * PAGE) + k * PAGE for lo, n in places for k in range(3)]
    touched = {lo for lo, n in chunks for off in offs if lo < off + PAGE and off < lo + n}
    mp = tmp_path / "m"
    with mounted(safe, mp, "latest"):
        fd = os.open(mp / DB, os.O_RDONLY)
        try:
            # the kernel's own read-ahead off: what is counted is what the mount chose to load
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
            os.pread(fd, 1, 0)                    # open and the size check: the root's LIST node
            before = stats(mp)["objects_read"]
            for off in offs:
                assert os.pread(fd, PAGE, off) == data[off:off + PAGE]
            used = stats(mp)["objects_read"] - before
        finally:
            os.close(fd)
    # the chunks the pages lie in, plus the file's leaf LIST nodes once (one per 256 chunks)
    lists = len(chunks) // 256 + 2
    assert used <= len(touched) + lists, f"{used} objects loaded for {len(offs)} page reads in {len(touched)} chunks"
