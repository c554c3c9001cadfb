"""gc and defrag without a terminal (cron, systemd) log progress as backup does: a line for each
phase and one every $POINTSAFE_PROGRESS_INTERVAL seconds, with the bytes moved into new packs so
far, so that a long gc in the night is seen working (tests/test_progress.py has backup's)."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import run_cli
from test_gc import _history

FAST = {"POINTSAFE_PROGRESS_INTERVAL": "0.02"}


def progress_lines(log: Path, command: str) -> list[dict]:
    lines = [json.loads(x) for x in log.read_text().splitlines() if x.strip()]
    return [x for x in lines if x.get("kind") == "progress" and x.get("command") == command]


def test_gc_without_a_terminal_logs_its_phases_and_the_bytes_moved(tmp_path):
    path, hist = _history(tmp_path, 3, files=6)
    run_cli("forget", hist[0][0].id, safe=path, check=True)
    log = tmp_path / "gc.log"
    r = run_cli("gc", "--threshold", "0", "--json", "--log-file", log, safe=path, env=FAST)
    assert r.code == 0, r.err
    rep = json.loads(r.out)
    assert rep["bytes_moved"] > 0 and rep["packs_rewritten"], rep
    lines = progress_lines(log, "gc")
    msgs = [x["message"] for x in lines]
    assert msgs[0].startswith("gc: planning: "), msgs
    assert any(m.startswith(f"gc: freeing {rep['objects_freed']} dead objects") for m in msgs), msgs
    assert msgs[-1].startswith("gc: finished"), msgs
    done = [x["done_bytes"] for x in lines]
    assert done == sorted(done)
    # The last line has every moved byte (the new packs hold the moved records and their headers).
    assert done[-1] >= rep["bytes_moved"], (done[-1], rep["bytes_moved"])
    assert lines[-1]["total_bytes"] == rep["plan"]["bytes_moved"]
    assert "MiB" in msgs[-1] or "KiB" in msgs[-1], msgs[-1]


def test_defrag_without_a_terminal_logs_progress_lines(tmp_path):
    path, _ = _history(tmp_path, 6, files=8, size=384 * 1024)
    log = tmp_path / "defrag.log"
    r = run_cli("defrag", "--json", "--log-file", log, safe=path, env=FAST)
    assert r.code == 0, r.err
    rep = json.loads(r.out)
    assert rep["objects_moved"] > 0, rep
    lines = progress_lines(log, "defrag")
    msgs = [x["message"] for x in lines]
    assert msgs[0].startswith("defrag: ") and msgs[-1].startswith("defrag: finished"), msgs
    assert lines[-1]["done_bytes"] >= rep["bytes_moved"] > 0, (lines[-1], rep["bytes_moved"])


def test_gc_progress_lines_only_when_asked_and_phase_lines_only_in_the_log(tmp_path):
    path, hist = _history(tmp_path, 2, files=4)
    run_cli("forget", hist[0][0].id, safe=path, check=True)
    log = tmp_path / "off.log"
    r = run_cli("gc", "--dry-run", "--log-file", log, safe=path, env={"POINTSAFE_PROGRESS_INTERVAL": "0"})
    assert r.code == 0 and r.err == "", r.err            # 0: no progress at all
    assert progress_lines(log, "gc") == []
    # A quick gc from cron with no log (default interval): its phases do not fill stderr (the mail).
    r = run_cli("gc", safe=path)
    assert r.code == 0 and r.err == "", r.err
    assert r.out.splitlines()[0].startswith("plan: "), r.out
