"""A full disk gives one clear error, leaves a safe that verifies, and a later writer works."""

from __future__ import annotations

import json
import os

import pytest

from conftest import needs_root
from pointsafe.cas import DiskFull, Kind, Safe, verify

from _cas_util import check_object, check_point, fill_disk, make_point, tmpfs

pytestmark = needs_root


def _one_line_disk_full(r, quota_ok: bool = False) -> None:
    """Exit 1 with one line. ``quota_ok``: backups may instead be stopped by the safe's hard
    quota (ops/quota.py), which keeps a share of the disk free before it fills."""
    assert r.code == 1, r.out + r.err
    lines = r.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pointsafe: error:"), r.err
    assert "disk full" in lines[0] or (quota_ok and "quota" in lines[0]), r.err


def test_full_disk_while_writing_packs(tmp_path, cli):
    with tmpfs(tmp_path / "mnt", "8m") as mnt:
        safe_dir = mnt / "safe"
        Safe.init(safe_dir, pack_size=1 << 20).close()
        with Safe.open(safe_dir) as safe:
            with safe.writer() as w:
                p1 = make_point(w, "before", {b"f": [os.urandom(40_000)]})
        fill_disk(mnt, leave=3 << 20)

        committed: list[bytes] = []
        with Safe.open(safe_dir) as safe:
            with pytest.raises(DiskFull) as ei:
                with safe.writer() as w:
                    batch = []
                    for i in range(200):         # 12 MiB of incompressible chunks into 3 MiB
                        batch.append(w.put(Kind.CHUNK, os.urandom(65_536)))
                        if i % 4 == 3:
                            w.flush()
                            committed += batch   # only once the flush has returned
                            batch = []
            assert "disk full" in str(ei.value) and "\n" not in str(ei.value)
            assert len(committed) >= 8
            rep = verify(safe, data=True)
            assert rep.ok, rep.errors
            for k in committed:
                check_object(safe, k)
            check_point(safe, safe.points()[0])

        # Through the CLI: one line, exit 1, and the safe still verifies.
        src = tmp_path / "src"
        src.mkdir()
        (src / "big").write_bytes(os.urandom(4 << 20))
        _one_line_disk_full(cli("backup", src, "--name", "full", safe=safe_dir), quota_ok=True)
        r = cli("verify", "--data", "--json", safe=safe_dir)
        assert r.code == 0, r.out + r.err
        assert json.loads(r.out)["points"] == 1

        # Once space is freed, a later writer works.
        os.unlink(mnt / "filler")
        (src / "big").write_bytes(os.urandom(2 << 20))
        r = cli("backup", src, "--name", "after", safe=safe_dir)
        assert r.code == 0, r.out + r.err
        r = cli("verify", "--data", safe=safe_dir)
        assert r.code == 0, r.out + r.err
        with Safe.open(safe_dir) as safe:
            assert [p.name for p in safe.points()] == ["before", "after"]
            for p in safe.points():
                check_point(safe, p)
            for k in committed:
                check_object(safe, k)
        assert p1.id


def test_full_disk_while_committing_the_index(tmp_path, cli):
    with tmpfs(tmp_path / "mnt", "4m") as mnt:
        safe_dir = mnt / "safe"
        Safe.init(safe_dir).close()
        with Safe.open(safe_dir) as safe:
            with safe.writer() as w:
                keep = [w.put(Kind.CHUNK, os.urandom(1000)) for _ in range(3)]
        fill_disk(mnt, leave=4096)      # room for small pack appends, not for new index pages
        with Safe.open(safe_dir) as safe:
            with pytest.raises(DiskFull) as ei:
                with safe.writer() as w:
                    for _ in range(2000):
                        w.put(Kind.CHUNK, os.urandom(300))
                        w.flush()
            assert "\n" not in str(ei.value)
            rep = verify(safe, data=True)
            assert rep.ok, rep.errors
            for k in keep:
                check_object(safe, k)
        os.unlink(mnt / "filler")
        with Safe.open(safe_dir) as safe:
            with safe.writer() as w:
                k = w.put(Kind.CHUNK, b"room again")
            assert safe.get(k) == b"room again"
        assert cli("verify", "--data", safe=safe_dir).code == 0


def test_init_on_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, cli):
    with tmpfs(tmp_path / "mnt", "4m") as mnt:
        fill_disk(mnt, leave=8192)
        _one_line_disk_full(cli("init", mnt / "safe"))
        assert not (mnt / "safe").exists()
        os.unlink(mnt / "filler")
        r = cli("init", mnt / "safe")          # and a retry after freeing space just works
        assert r.code == 0, r.err
        assert cli("verify", safe=mnt / "safe").code == 0
