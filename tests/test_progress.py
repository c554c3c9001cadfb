"""Progress of long commands (issue 10): the backup bar has a total (estimated from the
previous point of the same name) and speaks the binary units of the summary; without a
terminal (cron, systemd), backup, restore and verify log a progress line every
$POINTSAFE_PROGRESS_INTERVAL seconds (30 by default) to the log."""

from __future__ import annotations

import json
import os
import pty
import re
import subprocess
import sys
import threading
from pathlib import Path

from _backup_util import backup
from conftest import run_cli

MIB = 1 << 20
FILES = 3
FILE_SIZE = 16 * MIB
FAST = {"POINTSAFE_PROGRESS_INTERVAL": "0.02"}


def fill(src: Path) -> None:
    """FILES files of random bytes (new ones each time: the next backup reads them all)."""
    src.mkdir(exist_ok=True)
    for i in range(FILES):
        (src / f"f{i}").write_bytes(os.urandom(FILE_SIZE))


def progress_lines(log: Path) -> list[dict]:
    lines = [json.loads(x) for x in log.read_text().splitlines() if x.strip()]
    return [x for x in lines if x.get("kind") == "progress"]


def test_a_backup_without_a_terminal_logs_progress_lines(safe_dir, tmp_path):
    src = tmp_path / "src"
    fill(src)
    log1 = tmp_path / "first.log"
    backup(safe_dir, src, "-q", "--log-file", log1, env=FAST)
    first = progress_lines(log1)
    assert first, "no progress line in the log"
    assert all(x["total_bytes"] is None for x in first)     # a first backup: nothing to go by
    assert all(x["message"].startswith(f"backing up {src}: ") and x["command"] == "backup" for x in first)

    fill(src)
    log2 = tmp_path / "second.log"
    backup(safe_dir, src, "-q", "--log-file", log2, env=FAST)
    second = progress_lines(log2)
    assert second, "no progress line in the log"
    assert {x["total_bytes"] for x in second} == {FILES * FILE_SIZE}   # the previous point's size
    assert {x["total_files"] for x in second} == {FILES}
    assert "of about 48.0 MiB" in second[-1]["message"], second[-1]["message"]
    done = [x["done_bytes"] for x in second]
    assert done == sorted(done) and done[-1] <= FILES * FILE_SIZE


def test_a_volume_backup_knows_its_total_from_the_start(safe_dir, tmp_path):
    """A disk image: the total is what will be read (its data, not its holes), first time too."""
    img = tmp_path / "disk.img"
    with open(img, "wb") as f:
        f.write(os.urandom(32 * MIB))
        f.truncate(64 * MIB)                  # a 32 MiB hole at the end
    log = tmp_path / "volume.log"
    backup(safe_dir, img, "--volume", "-q", "--log-file", log, env=FAST)
    lines = progress_lines(log)
    assert lines, "no progress line in the log"
    assert {x["total_bytes"] for x in lines} == {32 * MIB}
    assert "of about 32.0 MiB" in lines[-1]["message"], lines[-1]["message"]


def test_restore_and_verify_without_a_terminal_log_progress_lines(safe_dir, tmp_path):
    src = tmp_path / "src"
    fill(src)
    point = backup(safe_dir, src, "-q")
    for args in (["restore", point["id"], tmp_path / "out"], ["verify", "--data"]):
        log = tmp_path / f"{args[0]}.log"
        r = run_cli(*args, "-q", "--log-file", log, safe=safe_dir, env=FAST) if args[0] == "restore" \
            else run_cli(*args, "--log-file", log, safe=safe_dir, env=FAST)
        assert r.code == 0, r.err
        lines = progress_lines(log)
        assert lines, f"{args[0]}: no progress line in the log"
        assert all("MiB" in x["message"] or "KiB" in x["message"] or " B" in x["message"] for x in lines)


def test_without_a_log_the_progress_lines_go_to_stderr_unless_quiet(safe_dir, tmp_path):
    src = tmp_path / "src"
    fill(src)
    r = run_cli("backup", src, safe=safe_dir, env=FAST)
    assert r.code == 0, r.err
    assert re.search(rf"^pointsafe: backing up {re.escape(str(src))}: \d", r.err, re.MULTILINE), r.err
    fill(src)
    r = run_cli("backup", src, "-q", safe=safe_dir, env=FAST)
    assert r.code == 0 and r.err == "", r.err


def run_on_a_terminal(*args: str | Path, safe: Path) -> tuple[int, str]:
    """``pointsafe ARGS`` with stderr on a pseudo-terminal; (exit code, what it showed there)."""
    master, slave = pty.openpty()
    env = {k: v for k, v in os.environ.items() if k != "POINTSAFE_SAFE"}
    env.update(COLUMNS="200", LINES="40", TERM="xterm-256color")
    env.pop("NO_COLOR", None)
    p = subprocess.Popen([sys.executable, "-m", "pointsafe.cli", "--safe", str(safe), *map(str, args)],
                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave, env=env)
    os.close(slave)
    shown = bytearray()

    def pump() -> None:
        while True:
            try:
                b = os.read(master, 65536)
            except OSError:          # EIO: the last writer closed the terminal
                return
            if not b:
                return
            shown.extend(b)

    t = threading.Thread(target=pump, daemon=True)
    t.start()
    try:
        p.communicate(timeout=300)
    finally:
        t.join(timeout=30)
        os.close(master)
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", shown.decode(errors="replace"))
    return p.returncode, text


def test_the_backup_bar_has_a_total_in_binary_units(safe_dir, tmp_path):
    src = tmp_path / "src"
    fill(src)
    backup(safe_dir, src, "-q")
    fill(src)
    code, shown = run_on_a_terminal("backup", src, safe=safe_dir)
    assert code == 0, shown
    assert "backing up" in shown, shown
    assert re.search(r"/ ~48\.0 MiB", shown), f"no total on the bar: {shown!r}"
    assert re.search(r"/ ~3 files", shown), shown
    assert not re.search(r"\d (kB|MB|GB)\b", shown), f"decimal units on the bar: {shown!r}"
