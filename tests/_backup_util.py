"""Helpers for the backup/restore tests: run the CLI, parse its JSON, check error lines."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import Result, run_cli


def backup(safe: Path, source, *extra, expect: int = 0, name: str | None = None, env=None) -> dict:
    """``pointsafe backup SOURCE --json``; returns the new point, asserting the exit code."""
    args = ["backup", str(source), "--json", *extra]
    if name:
        args += ["--name", name]
    r = run_cli(*args, safe=safe, env=env)
    assert r.code == expect, f"backup exited {r.code} (wanted {expect}): {r.err}"
    assert "Traceback" not in r.err, r.err
    return json.loads(r.out)


def restore(safe: Path, point: str, target, *extra, expect: int = 0) -> dict:
    r = run_cli("restore", point, str(target), "--json", *extra, safe=safe)
    assert r.code == expect, f"restore exited {r.code} (wanted {expect}): {r.err}"
    assert "Traceback" not in r.err, r.err
    return json.loads(r.out)


def one_error_line(r: Result, *words: str) -> str:
    """Assert the command failed with exactly one line on stderr, no traceback; return it."""
    lines = r.err.strip().splitlines()
    assert r.code != 0, f"exited 0: {r.out}"
    assert "Traceback" not in r.err, r.err
    assert len(lines) == 1, f"want one error line, got {len(lines)}:\n{r.err}"
    assert lines[0].startswith("pointsafe: error: "), lines[0]
    low = lines[0].lower()
    for w in words:
        assert w.lower() in low, f"{w!r} not in {lines[0]!r}"
    return lines[0]
