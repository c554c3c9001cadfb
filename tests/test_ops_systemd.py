"""The shipped systemd units: valid for systemd, and their commands run against a real safe."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from _ops_util import task_list
from conftest import ROOT

UNITS = ROOT / "scripts" / "systemd"
BIN = "/usr/local/bin/pointsafe"


def _env_file(path: Path) -> dict[str, str]:
    env = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            k, _, v = line.partition("=")
            env[k.strip()] = v.strip()
    return env


def _exec_lines(unit: Path, instance: str, env: dict[str, str]) -> list[list[str]]:
    """ExecStart= lines as argv, expanded the way systemd does ($VAR splits, ${VAR} does not)."""
    out = []
    for line in unit.read_text().splitlines():
        if not line.startswith("ExecStart="):
            continue
        words = []
        for w in shlex.split(line[len("ExecStart="):].replace("%i", instance)):
            m = re.fullmatch(r"\$(\w+)", w)
            if m:
                words += shlex.split(env.get(m.group(1), ""))
            else:
                words.append(re.sub(r"\$\{(\w+)\}", lambda m: env.get(m.group(1), ""), w))
        out.append(words)
    return out


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_units_verify(tmp_path):
    names = []
    for f in sorted(UNITS.iterdir()):
        if f.suffix in (".service", ".timer"):
            text = f.read_text().replace(BIN, sys.executable)
            name = f.name.replace("@.", "@www.")
            (tmp_path / name).write_text(text)
            names.append(name)
    assert {"pointsafe-backup@www.service", "pointsafe-backup@www.timer", "pointsafe-gc.timer",
            "pointsafe-defrag.timer", "pointsafe-verify.timer", "pointsafe-report.timer"} <= set(names)
    r = subprocess.run(["systemd-analyze", "verify", "--man=no", *names], cwd=tmp_path,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "Unknown key" not in r.stderr and "bad" not in r.stderr.lower(), r.stderr


def test_unit_commands_run(safe_dir, tmp_path):
    src = tmp_path / "www"
    src.mkdir()
    (src / "index.html").write_text("<h1>hello</h1>\n")
    env = _env_file(UNITS / "pointsafe.env")
    env.update(_env_file(UNITS / "backup-example.env"))
    env.update(POINTSAFE_SAFE=str(safe_dir), SOURCE=str(src), POINTSAFE_ARGS=f"--log-file {tmp_path / 'log'}")
    order = ["pointsafe-backup@.service", "pointsafe-verify.service", "pointsafe-gc.service",
             "pointsafe-defrag.service", "pointsafe-report.service"]
    ran = []
    for unit in order:
        for argv in _exec_lines(UNITS / unit, "www", env):
            assert argv[0] == BIN
            cmd = [sys.executable, "-m", "pointsafe.cli", *argv[1:]]
            e = dict(os.environ, POINTSAFE_SAFE=str(safe_dir))
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=e)
            assert r.returncode in (0, 3), f"{unit}: {' '.join(argv)}: {r.stderr}"
            ran.append(next(a for a in argv[1:] if a in ("backup", "verify", "forget", "gc", "defrag", "report")))
    assert ran == ["backup", "verify", "forget", "gc", "defrag", "report"]
    kinds = [t["kind"] for t in task_list(safe_dir)]
    assert kinds[:2] == ["backup", "verify"] and kinds[-1] == "report"
