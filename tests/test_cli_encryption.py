"""Encryption at rest through the CLI: init, the password sources, wrong passwords, and every
command on an encrypted safe (end to end, real FUSE), as a user runs them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import TEST_PASSWORD, needs_fuse, run_cli
from _fuse_util import mounted
from _tty_util import run_tty

from pointsafe.cas.crypto import default_cipher

NO_PASSWORD = {"POINTSAFE_PASSWORD": None}
MARK = "zebra-quartz-7781"          # a distinctive name, to look for in the raw files


def files_of(safe: Path) -> dict[str, bytes]:
    """Every file of the safe and its bytes."""
    out = {}
    for dirpath, _, names in os.walk(safe):
        for n in names:
            p = Path(dirpath) / n
            out[str(p.relative_to(safe))] = p.read_bytes()
    return out


def one_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one line, got: {err!r}"
    assert "Traceback" not in err
    return lines[0]


def make_src(root: Path) -> Path:
    src = root / "src"
    (src / MARK).mkdir(parents=True)
    (src / MARK / "notes.txt").write_text(f"the {MARK} plan, in the clear\n" * 200)
    (src / "big.bin").write_bytes(os.urandom(300_000))
    return src


def init(safe: Path, *extra, env=None) -> dict:
    r = run_cli("init", safe, "--json", *extra, env=env)
    assert r.code == 0, r.err
    return json.loads(r.out)


def backup(safe: Path, src: Path, *extra, env=None) -> dict:
    r = run_cli("backup", src, "--name", "data", "--json", *extra, safe=safe, env=env)
    assert r.code == 0, r.err
    return json.loads(r.out)


# -- init ----------------------------------------------------------------------------------


def test_init_encrypts_by_default_with_the_faster_cipher(tmp_path):
    info = init(tmp_path / "safe")
    assert info["encryption"] == default_cipher()
    assert len(info["key_slots"]) == 1
    slots = list((tmp_path / "safe" / "keys").iterdir())
    assert [p.name for p in slots] == [info["key_slots"][0] + ".json"]
    assert slots[0].stat().st_mode & 0o077 == 0
    r = run_cli("init", tmp_path / "other", env={"POINTSAFE_PASSWORD": "x"})
    assert r.code == 0 and "keep the password" in r.out


@pytest.mark.parametrize("cipher", ["aes-256-gcm", "chacha20-poly1305", "none"])
def test_each_cipher_round_trips_and_hides_the_data(tmp_path, cipher):
    safe = tmp_path / "safe"
    info = init(safe, "--encryption", cipher, "--compression", "none")
    assert info["encryption"] == cipher
    assert (safe / "keys").is_dir() == (cipher != "none")
    src = make_src(tmp_path)
    backup(safe, src)
    run_cli("restore", "data@latest", tmp_path / "out", safe=safe, check=True)
    assert (tmp_path / "out" / MARK / "notes.txt").read_bytes() == (src / MARK / "notes.txt").read_bytes()
    assert (tmp_path / "out" / "big.bin").read_bytes() == (src / "big.bin").read_bytes()
    assert run_cli("verify", "--data", safe=safe).code == 0
    packs = b"".join(p.read_bytes() for p in (safe / "packs").rglob("*") if p.is_file())
    # the file's text and its name are in the packs of a plain safe, in no pack of an encrypted one
    assert (MARK.encode() in packs) == (cipher == "none")
    assert (b"in the clear" in packs) == (cipher == "none")


def test_init_asks_twice_on_a_terminal_and_refuses_two_that_differ(tmp_path):
    code, out = run_tty("init", tmp_path / "a", answers=["pw one", "pw two"])
    assert code == 1 and "differ" in out
    assert not (tmp_path / "a" / "keys").exists()
    code, out = run_tty("init", tmp_path / "b", answers=["sesame 1", "sesame 1"])
    assert code == 0, out
    assert out.count("password") >= 1 and "again" in out
    r = run_cli("points", "--json", safe=tmp_path / "b", env={"POINTSAFE_PASSWORD": "sesame 1"})
    assert r.code == 0 and json.loads(r.out) == []


def test_init_without_a_password_and_no_terminal_says_the_three_ways(tmp_path):
    r = run_cli("init", tmp_path / "safe", env=NO_PASSWORD, input=b"")
    assert r.code == 1
    line = one_line(r.err)
    for way in ("POINTSAFE_PASSWORD", "--password-file", "--password-command", "--encryption none"):
        assert way in line
    assert not (tmp_path / "safe").exists()


# -- the password sources ------------------------------------------------------------------


@pytest.fixture
def enc_safe(tmp_path) -> tuple[Path, Path]:
    """An encrypted safe (the test password) holding one point 'data' of a small tree."""
    safe = tmp_path / "safe"
    init(safe)
    src = make_src(tmp_path)
    backup(safe, src)
    return safe, src


def test_password_file_before_or_after_the_command(enc_safe, tmp_path):
    safe, _ = enc_safe
    f = tmp_path / "pw"
    f.write_text(TEST_PASSWORD + "\n")
    r = run_cli("--password-file", f, "points", "--json", safe=safe, env=NO_PASSWORD)
    assert r.code == 0, r.err
    assert len(json.loads(r.out)) == 1
    r = run_cli("points", "--password-file", f, "--json", safe=safe, env=NO_PASSWORD)
    assert r.code == 0, r.err
    # the file wins over the environment
    r = run_cli("points", "--password-file", f, safe=safe, env={"POINTSAFE_PASSWORD": "wrong"})
    assert r.code == 0, r.err
    r = run_cli("points", "--password-file", tmp_path / "missing", safe=safe, env=NO_PASSWORD)
    assert r.code == 1 and "cannot read" in one_line(r.err)


def test_password_command(enc_safe, tmp_path):
    safe, _ = enc_safe
    f = tmp_path / "pw"
    f.write_text(TEST_PASSWORD + "\n")
    r = run_cli("points", "--password-command", f"cat {f}", safe=safe, env=NO_PASSWORD)
    assert r.code == 0, r.err
    r = run_cli("points", "--password-command", "echo wrong; exit 0", safe=safe, env=NO_PASSWORD)
    assert r.code == 1 and "wrong password" in one_line(r.err)
    r = run_cli("points", "--password-command", "exit 7", safe=safe, env=NO_PASSWORD)
    assert r.code == 1
    line = one_line(r.err)
    assert "--password-command" in line and "7" in line


def test_password_from_the_environment_and_the_terminal(enc_safe):
    safe, _ = enc_safe
    assert run_cli("points", safe=safe).code == 0           # POINTSAFE_PASSWORD (conftest)
    code, out = run_tty("--safe", safe, "points", answers=[TEST_PASSWORD])
    assert code == 0, out
    assert "password of" in out and "data" in out
    assert TEST_PASSWORD not in out                          # not echoed
    code, out = run_tty("--safe", safe, "points", answers=["not it"])
    assert code == 1 and "wrong password" in out


def test_no_password_and_no_terminal_is_one_line(enc_safe):
    safe, _ = enc_safe
    for cmd in (["points"], ["backup", "/etc/hostname"], ["tasks"], ["status"]):
        r = run_cli(*cmd, safe=safe, env=NO_PASSWORD, input=b"")
        assert r.code == 1, (cmd, r.err)
        line = one_line(r.err)
        assert "is encrypted" in line and "POINTSAFE_PASSWORD" in line and "--password-file" in line


def test_wrong_password_writes_nothing(enc_safe, tmp_path):
    safe, src = enc_safe
    before = files_of(safe)
    wrong = {"POINTSAFE_PASSWORD": "not the password"}
    (tmp_path / "out").mkdir()
    for cmd in (["backup", src, "--name", "data"], ["points"], ["ls", "data@latest"], ["tasks"],
                ["restore", "data@latest", tmp_path / "out" / "r"], ["verify"], ["gc"], ["repair"],
                ["forget", "data@latest"], ["config", "set", "quota.soft", "30%"], ["status"],
                ["key", "add"], ["key", "export"], ["mount", tmp_path / "out"]):
        r = run_cli(*cmd, safe=safe, env=wrong | {"POINTSAFE_NEW_PASSWORD": "x"})
        assert r.code == 1, (cmd, r.err)
        assert "wrong password" in one_line(r.err), cmd
    assert files_of(safe) == before
    assert not (tmp_path / "out" / "r").exists()


# -- every command on an encrypted safe ----------------------------------------------------


def test_every_command_on_an_encrypted_safe(enc_safe, tmp_path):
    safe, src = enc_safe
    assert MARK in run_cli("ls", "data@latest", safe=safe, check=True).out
    (src / MARK / "notes.txt").write_text("changed\n")
    second = backup(safe, src)
    r = run_cli("diff", "data@latest", second["id"][:12], safe=safe)
    assert r.code == 0, r.err
    pts = json.loads(run_cli("points", "--json", safe=safe, check=True).out)
    assert len(pts) == 2
    r = run_cli("diff", pts[0]["id"], pts[1]["id"], safe=safe, check=True)
    assert "notes.txt" in r.out
    run_cli("restore", pts[0]["id"], tmp_path / "old", safe=safe, check=True)
    assert "in the clear" in (tmp_path / "old" / MARK / "notes.txt").read_text()
    assert run_cli("verify", "--data", safe=safe).code == 0
    r = run_cli("repair", safe=safe)
    assert r.code == 0, r.err
    assert run_cli("verify", "--data", safe=safe).code == 0
    run_cli("forget", pts[0]["id"], safe=safe, check=True)
    r = run_cli("gc", "--json", safe=safe)
    assert r.code == 0, r.err
    assert run_cli("verify", "--data", safe=safe).code == 0
    r = run_cli("status", "--json", safe=safe)
    assert r.code in (0, 2), r.err
    assert json.loads(r.out)["safe"]["points"] == 1
    r = run_cli("tasks", "--json", safe=safe, check=True)
    kinds = [t["kind"] for t in json.loads(r.out)]
    for k in ("backup", "restore", "verify", "repair", "forget", "gc"):
        assert k in kinds
    run_cli("restore", "data@latest", tmp_path / "new", safe=safe, check=True)
    assert (tmp_path / "new" / MARK / "notes.txt").read_text() == "changed\n"


@needs_fuse
def test_mount_an_encrypted_safe(enc_safe, tmp_path):
    safe, src = enc_safe
    with mounted(safe, tmp_path / "mnt") as info:
        got = (tmp_path / "mnt" / "data" / "latest" / MARK / "notes.txt").read_bytes()
        assert got == (src / MARK / "notes.txt").read_bytes()
        assert (tmp_path / "mnt" / "data" / "latest" / "big.bin").read_bytes() == (src / "big.bin").read_bytes()
        # the daemon was not given the password or the key through its arguments or environment
        cmdline = Path(f"/proc/{info['pid']}/cmdline").read_bytes()
        environ = Path(f"/proc/{info['pid']}/environ").read_bytes()
        assert b"password" not in cmdline.lower()
        assert b"POINTSAFE_MASTER" not in environ


@needs_fuse
def test_mount_with_the_password_from_a_file_only(enc_safe, tmp_path):
    safe, src = enc_safe
    f = tmp_path / "pw"
    f.write_text(TEST_PASSWORD + "\n")
    mp = tmp_path / "mnt"
    mp.mkdir()
    r = run_cli("mount", mp, "--password-file", f, "--json", "--log", tmp_path / "m.log", safe=safe, env=NO_PASSWORD)
    try:
        assert r.code == 0, r.err
        pid = json.loads(r.out)["pid"]
        assert b"POINTSAFE_PASSWORD" not in Path(f"/proc/{pid}/environ").read_bytes()
        assert (mp / "data" / "latest" / "big.bin").read_bytes() == (src / "big.bin").read_bytes()
    finally:
        subprocess.run(["fusermount3", "-u", "-z", str(mp)], capture_output=True, timeout=30)


# -- the ops tables ------------------------------------------------------------------------


@pytest.mark.parametrize("encryption", ["auto", "none"])
def test_task_history_and_settings_are_sealed(tmp_path, encryption):
    safe = tmp_path / "safe"
    init(safe, "--encryption", encryption)
    src = make_src(tmp_path)
    backup(safe, src)
    run_cli("restore", "data@latest", tmp_path / "out", safe=safe, check=True)
    run_cli("config", "set", "smtp.password", "hunter2-" + MARK, safe=safe, check=True)
    run_cli("config", "set", "interval.data", "1h", safe=safe, check=True)
    r = run_cli("tasks", "--json", safe=safe, check=True)
    tasks = json.loads(r.out)
    assert [t["kind"] for t in tasks] == ["backup", "restore"]
    assert str(src) in tasks[0]["argv"]
    r = run_cli("config", "get", "smtp.password", safe=safe, check=True)
    assert "hunter2-" + MARK in r.out
    raw = (safe / "index" / "data.mdb").read_bytes()
    plain = encryption == "none"
    assert (MARK.encode() in raw) == plain          # the source path, argv, the setting
    assert (b"hunter2" in raw) == plain
    assert (b"interval.data" in raw) == plain       # a setting's name names a source
    r = run_cli("config", "unset", "interval.data", safe=safe, check=True)
    r = run_cli("config", "--json", safe=safe, check=True)
    assert "interval.data" not in r.out and "hunter2" in r.out


def test_a_changed_task_record_is_an_integrity_error(tmp_path):
    import lmdb
    safe = tmp_path / "safe"
    init(safe)
    backup(safe, make_src(tmp_path))
    env = lmdb.open(str(safe / "index"), max_dbs=64, subdir=True)
    with env.begin(write=True) as t:
        db = env.open_db(b"tasks", txn=t)
        k, v = next(iter(t.cursor(db=db)))
        t.put(k, v[:-1] + bytes([v[-1] ^ 1]), db=db)
    env.close()
    r = run_cli("tasks", safe=safe)
    assert r.code == 1
    assert "fails authentication" in one_line(r.err)


# -- a killed backup ---------------------------------------------------------------------


def test_sigkill_of_a_backup_leaves_a_safe_that_verifies(tmp_path):
    safe = tmp_path / "safe"
    init(safe)
    src = tmp_path / "src"
    src.mkdir()
    for i in range(40):
        (src / f"f{i}").write_bytes(os.urandom(1_000_000))
    p = subprocess.Popen([sys.executable, "-m", "pointsafe.cli", "--safe", str(safe), "backup", str(src),
                          "--name", "big"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and p.poll() is None:
            if sum(f.stat().st_size for f in (safe / "packs").rglob("*") if f.is_file()) > 8_000_000:
                break
            time.sleep(0.01)
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=60)
    r = run_cli("verify", "--data", safe=safe)
    assert r.code == 0, r.out + r.err
    r = run_cli("tasks", "--json", safe=safe, check=True)
    states = [t["state"] for t in json.loads(r.out)]
    assert states[0] in ("abandoned", "ok")
    backup(safe, src)
    run_cli("restore", "data@latest", tmp_path / "out", safe=safe, check=True)
    assert (tmp_path / "out" / "f7").read_bytes() == (src / "f7").read_bytes()
    assert run_cli("verify", "--data", safe=safe).code == 0


def test_status_check_without_the_password_is_unknown(enc_safe):
    safe, _ = enc_safe
    r = run_cli("status", "--check", safe=safe, env=NO_PASSWORD, input=b"")
    assert r.code == 3
    assert r.out.startswith("POINTSAFE UNKNOWN - ") and "is encrypted" in r.out
    r = run_cli("status", "--check", safe=safe, env={"POINTSAFE_PASSWORD": "wrong"})
    assert r.code == 3 and "wrong password" in r.out
    r = run_cli("status", "--check", safe=safe)
    assert r.code == 0 and r.out.startswith("POINTSAFE OK")


def test_repair_of_an_encrypted_safe_whose_header_is_lost_everywhere_is_one_line(enc_safe):
    import shutil
    safe, _ = enc_safe
    (safe / "header").unlink()
    (safe / "header.copy").unlink()
    shutil.rmtree(safe / "index")
    r = run_cli("repair", safe=safe)
    assert r.code == 1
    assert "header" in one_line(r.err) and "lost" in r.err
    assert (safe / "keys").is_dir() and list((safe / "keys").iterdir())


def test_repair_rebuilds_a_lost_index_of_an_encrypted_safe(enc_safe, tmp_path):
    import shutil
    safe, src = enc_safe
    shutil.rmtree(safe / "index")
    r = run_cli("repair", safe=safe, env=NO_PASSWORD, input=b"")
    assert r.code == 1 and "is encrypted" in one_line(r.err)
    assert not (safe / "index").exists()
    r = run_cli("repair", safe=safe, env={"POINTSAFE_PASSWORD": "wrong"})
    assert r.code == 1 and "wrong password" in one_line(r.err)
    r = run_cli("repair", safe=safe)
    assert r.code == 0, r.err
    run_cli("restore", "data@latest", tmp_path / "out", safe=safe, check=True)
    assert (tmp_path / "out" / "big.bin").read_bytes() == (src / "big.bin").read_bytes()
    assert run_cli("verify", "--data", safe=safe).code == 0


def test_a_header_from_another_safe_is_named_not_blamed_on_the_password(enc_safe, tmp_path):
    safe, src = enc_safe
    other = tmp_path / "other"
    init(other)
    own = (safe / "header").read_bytes()
    for name in ("header", "header.copy"):
        (safe / name).write_bytes((other / "header").read_bytes())
    before = files_of(safe)
    r = run_cli("points", safe=safe)
    assert r.code == 1
    line = one_line(r.err)
    assert "header differs" in line and "pointsafe repair" in line
    assert files_of(safe) == before
    r = run_cli("repair", safe=safe)
    assert r.code == 0, r.err
    assert (safe / "header").read_bytes() == own
    run_cli("restore", "data@latest", tmp_path / "out", safe=safe, check=True)
    assert (tmp_path / "out" / "big.bin").read_bytes() == (src / "big.bin").read_bytes()
