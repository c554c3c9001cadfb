"""`show --fragmentation` reports how scattered one point's data is."""

import json
import os

from conftest import run_cli


def test_show_reports_fragmentation(safe_dir, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(4):
        (src / f"f{i}").write_bytes(os.urandom(300_000))
    assert run_cli("backup", src, "-q", safe=safe_dir).code == 0
    r = run_cli("show", "latest", "--fragmentation", "--json", safe=safe_dir)
    assert r.code == 0, r.err
    f = json.loads(r.out)["fragmentation"]
    # 1.2 MB over 256 KiB packs: at least five packs to read, never fewer seeks than that
    assert f["minimum_seeks"] >= 5 and f["seeks"] >= f["minimum_seeks"] - 1   # the first read is no seek
    assert f["excess"] <= 1.5, "a fresh single backup reads nearly sequentially"
    human = run_cli("show", "latest", "--fragmentation", safe=safe_dir)
    assert "seeks/GiB" in human.out
