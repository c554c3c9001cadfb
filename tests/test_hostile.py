"""Hostile use of the CLI: bad input must give one clear error line, never an internal error."""

from __future__ import annotations

import os
import stat

from conftest import needs_root, run_cli


def _no_bug(r) -> None:
    assert "internal error" not in r.err and "Traceback" not in r.err, r.err


def test_backup_source_with_non_utf8_base_name_gets_a_storable_name(tmp_path, safe_dir):
    src = os.path.join(os.fsencode(tmp_path), b"\xff\xfe dir")
    os.mkdir(src)
    with open(os.path.join(src, b"f"), "wb") as f:
        f.write(b"data")
    r = run_cli("backup", os.fsdecode(src), safe=safe_dir)
    _no_bug(r)
    assert r.code == 0, r.err
    out = tmp_path / "out"
    run_cli("restore", "latest", out, safe=safe_dir, check=True)
    assert (out / "f").read_bytes() == b"data"


def test_backup_name_that_is_not_utf8_is_a_usage_error(tmp_path, safe_dir):
    (tmp_path / "src").mkdir()
    r = run_cli("backup", "--name", os.fsdecode(b"x\xff"), tmp_path / "src", safe=safe_dir)
    _no_bug(r)
    assert r.code == 1
    assert r.err.count("\n") == 1 and r.err.startswith("pointsafe: error: bad point name")
    assert "usage" in run_cli("tasks", safe=safe_dir, check=True).out


def test_header_copy_and_index_all_deleted_points_to_repair(tmp_path):
    import shutil
    safe_dir = tmp_path / "safe"
    # a plain safe: an encrypted one whose header is lost everywhere cannot be rebuilt (its key
    # slots are bound to the header's safe id; tests/test_cli_encryption.py)
    run_cli("init", "--encryption", "none", safe_dir, check=True)
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(os.urandom(100_000))
    run_cli("backup", src, safe=safe_dir, check=True)
    (safe_dir / "header").unlink()
    (safe_dir / "header.copy").unlink()
    shutil.rmtree(safe_dir / "index")
    r = run_cli("verify", safe=safe_dir)
    _no_bug(r)
    assert r.code == 1 and "'pointsafe repair'" in r.err, r.err
    run_cli("repair", safe=safe_dir, check=True)
    out = tmp_path / "out"
    run_cli("restore", "latest", out, safe=safe_dir, check=True)
    assert (out / "f").read_bytes() == (src / "f").read_bytes()


def test_restore_to_an_empty_target_is_refused_not_the_current_directory(tmp_path, safe_dir):
    src = tmp_path / "src"
    src.mkdir()
    (src / "keep").write_bytes(b"from the point")
    run_cli("backup", src, safe=safe_dir, check=True)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    (cwd / "keep").write_bytes(b"the user's file")
    import subprocess
    import sys
    p = subprocess.run([sys.executable, "-m", "pointsafe.cli", "--safe", str(safe_dir), "restore",
                        "--force", "latest", ""], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert p.returncode == 1, p.stderr
    assert p.stderr.startswith("pointsafe: error: the target is empty"), p.stderr
    assert (cwd / "keep").read_bytes() == b"the user's file"


def test_point_names_print_on_one_line(tmp_path, safe_dir):
    src = tmp_path / "a\nb"
    src.mkdir()
    (src / "f").write_bytes(b"x")
    r = run_cli("backup", "--name", "x\ny", src, safe=safe_dir)
    _no_bug(r)
    assert r.code == 1 and r.err.startswith("pointsafe: error: bad point name"), r.err
    run_cli("backup", src, safe=safe_dir, check=True)           # the default name is cleaned
    out = run_cli("points", safe=safe_dir, check=True).out
    assert len(out.strip().splitlines()) == 2, out               # the heading and one point
    assert "a?b" in out


def test_ls_escapes_terminal_control_characters_in_file_names(tmp_path, safe_dir):
    src = tmp_path / "src"
    src.mkdir()
    (src / "esc\x1b[2Jx").write_bytes(b"")
    (src / "del\x7fy").write_bytes(b"")
    run_cli("backup", src, safe=safe_dir, check=True)
    out = run_cli("ls", "latest", safe=safe_dir, check=True).out
    assert "\x1b" not in out and "\x7f" not in out, repr(out)
    assert "esc\\x1b[2Jx" in out and "del\\x7fy" in out, out


def test_restore_again_after_a_killed_restore_removes_its_temporary_files(tmp_path, safe_dir):
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "f").write_bytes(b"content")
    run_cli("backup", src, safe=safe_dir, check=True)
    out = tmp_path / "out"
    (out / "d").mkdir(parents=True)
    # What a SIGKILLed restore leaves: half-written files under temporary names.
    (out / ".pointsafe-restore.0badf00d.1").write_bytes(b"half")
    (out / "d" / ".pointsafe-restore.0badf00d.2").write_bytes(b"half")
    (out / "d" / ".pointsafe-restore-not-ours").write_bytes(b"user")
    run_cli("restore", "--force", "latest", out, safe=safe_dir, check=True)
    assert sorted(p.name for p in out.iterdir()) == ["d"]
    assert sorted(p.name for p in (out / "d").iterdir()) == [".pointsafe-restore-not-ours", "f"]
    assert (out / "d" / "f").read_bytes() == b"content"


@needs_root
def test_volume_restore_with_force_never_replaces_a_character_device_or_fifo(tmp_path, safe_dir):
    img = tmp_path / "disk.img"
    img.write_bytes(os.urandom(200_000))
    run_cli("backup", "--volume", img, safe=safe_dir, check=True)
    dev = tmp_path / "null"
    os.mknod(dev, 0o600 | stat.S_IFCHR, os.makedev(1, 3))     # a private /dev/null node
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for target in (dev, fifo):
        r = run_cli("restore", "--force", "latest", target, safe=safe_dir, timeout=60)
        assert r.code == 1 and "is not a regular file" in r.err, r.err
    assert stat.S_ISCHR(os.lstat(dev).st_mode) and stat.S_ISFIFO(os.lstat(fifo).st_mode)


def test_repair_keeps_the_header_the_index_agrees_with_when_header_files_differ(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    run_cli("init", "--compression", "zstd:7", a, check=True)
    run_cli("init", b, check=True)
    own = (a / "header").read_bytes()
    (a / "header").write_bytes((b / "header").read_bytes())   # a header from another safe
    r = run_cli("verify", safe=a)
    assert r.code == 1 and "differs" in r.out + r.err
    run_cli("repair", safe=a, check=True)
    assert (a / "header").read_bytes() == own and (a / "header.copy").read_bytes() == own
    run_cli("verify", safe=a, check=True)
