"""``pointsafe key``: list, add, remove, passwd, export, import, through the CLI."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from conftest import TEST_PASSWORD, run_cli
from _tty_util import run_tty

NO_PASSWORD = {"POINTSAFE_PASSWORD": None}


def pw(text: str) -> dict:
    return {"POINTSAFE_PASSWORD": text}


def one_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one line, got: {err!r}"
    assert "Traceback" not in err
    return lines[0]


def slots(safe: Path, env=None) -> list[dict]:
    r = run_cli("key", "list", "--json", safe=safe, env=env)
    assert r.code == 0, r.err
    return json.loads(r.out)


def opens(safe: Path, password: str) -> bool:
    """Whether ``password`` opens the safe (a command that reads its points)."""
    r = run_cli("points", "--json", safe=safe, env=pw(password), input=b"")
    assert r.code == 0 or "wrong password" in r.err, r.err
    return r.code == 0


@pytest.fixture
def safe(tmp_path) -> Path:
    """An encrypted safe (the test password) with one point."""
    s = tmp_path / "safe"
    run_cli("init", s, check=True)
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(os.urandom(50_000))
    run_cli("backup", src, "--name", "data", safe=s, check=True)
    return s


def test_list_needs_no_password_and_shows_the_kdf(safe):
    got = slots(safe, env=NO_PASSWORD)
    assert len(got) == 1
    s = got[0]
    assert s["kdf"] == "argon2id" and s["m_kib"] == 8192 and s["t"] == 1 and len(s["slot"]) == 8
    r = run_cli("key", "list", safe=safe, env=NO_PASSWORD)
    assert r.code == 0 and s["slot"] in r.out and "argon2id" in r.out


def test_add_then_either_password_opens(safe, tmp_path):
    r = run_cli("key", "add", "--label", "alice", "--json", safe=safe, env={"POINTSAFE_NEW_PASSWORD": "second pw"})
    assert r.code == 0, r.err
    new = json.loads(r.out)
    got = slots(safe)
    assert len(got) == 2 and {"alice"} <= {s["label"] for s in got} and new["slot"] in {s["slot"] for s in got}
    assert opens(safe, TEST_PASSWORD) and opens(safe, "second pw")
    assert not opens(safe, "third pw")
    f = tmp_path / "new"
    f.write_text("from a file\n")
    run_cli("key", "add", "--new-password-file", f, safe=safe, check=True)
    assert opens(safe, "from a file")


def test_add_needs_the_current_password(safe):
    r = run_cli("key", "add", safe=safe, env=pw("guess") | {"POINTSAFE_NEW_PASSWORD": "mine now"})
    assert r.code == 1 and "wrong password" in one_line(r.err)
    assert len(slots(safe)) == 1 and not opens(safe, "mine now")
    r = run_cli("key", "add", safe=safe, env={"POINTSAFE_NEW_PASSWORD": None}, input=b"")
    assert r.code == 1 and "POINTSAFE_NEW_PASSWORD" in one_line(r.err)


def test_passwd_changes_one_slot_and_the_old_password_is_refused(safe):
    run_cli("key", "add", safe=safe, env={"POINTSAFE_NEW_PASSWORD": "other"}, check=True)
    before = {s["slot"]: s for s in slots(safe)}
    r = run_cli("key", "passwd", "--json", safe=safe, env={"POINTSAFE_NEW_PASSWORD": "changed"})
    assert r.code == 0, r.err
    changed = json.loads(r.out)["slot"]
    after = {s["slot"]: s for s in slots(safe)}
    assert set(after) == set(before)
    assert not opens(safe, TEST_PASSWORD)
    assert opens(safe, "changed") and opens(safe, "other")
    # with SLOT: that slot, whichever password unlocks
    other = next(s for s in after if s != changed)
    r = run_cli("key", "passwd", other, safe=safe, env=pw("changed") | {"POINTSAFE_NEW_PASSWORD": "other2"})
    assert r.code == 0, r.err
    assert not opens(safe, "other") and opens(safe, "other2") and opens(safe, "changed")
    r = run_cli("key", "passwd", "deadbeef", safe=safe, env=pw("changed") | {"POINTSAFE_NEW_PASSWORD": "x"})
    assert r.code == 1 and "deadbeef" in one_line(r.err)


def test_passwd_on_a_terminal_asks_twice(safe):
    code, out = run_tty("--safe", safe, "key", "passwd", answers=[TEST_PASSWORD, "typed pw", "typed pw"])
    assert code == 0, out
    assert opens(safe, "typed pw") and not opens(safe, TEST_PASSWORD)
    code, out = run_tty("--safe", safe, "key", "passwd", answers=["typed pw", "one", "two"])
    assert code == 1 and "differ" in out
    assert opens(safe, "typed pw")


def test_remove_a_slot_but_never_the_last(safe):
    [only] = slots(safe)
    r = run_cli("key", "remove", only["slot"], safe=safe)
    assert r.code == 1 and "last" in one_line(r.err)
    assert slots(safe) == [only] and opens(safe, TEST_PASSWORD)
    run_cli("key", "add", safe=safe, env={"POINTSAFE_NEW_PASSWORD": "second"}, check=True)
    r = run_cli("key", "remove", only["slot"], safe=safe, env=pw("second"))
    assert r.code == 0, r.err
    assert [s["slot"] for s in slots(safe)] != [only["slot"]] and len(slots(safe)) == 1
    assert not opens(safe, TEST_PASSWORD) and opens(safe, "second")
    r = run_cli("key", "remove", "0000zzzz", safe=safe, env=pw("second"))
    assert r.code == 1 and "0000zzzz" in one_line(r.err)


def test_export_then_import_after_every_password_is_lost(safe, tmp_path):
    r = run_cli("key", "export", safe=safe)
    assert r.code == 0, r.err
    assert "master key" in r.err and "warning" in r.err
    exported = tmp_path / "key.txt"
    exported.write_text(r.out)
    # every password is lost: the only slot now opens with a password nobody knows
    run_cli("key", "passwd", safe=safe, env={"POINTSAFE_NEW_PASSWORD": os.urandom(16).hex()}, check=True)
    assert not opens(safe, TEST_PASSWORD)
    r = run_cli("key", "import", exported, "--json", safe=safe, env=NO_PASSWORD | {"POINTSAFE_NEW_PASSWORD": "found again"})
    assert r.code == 0, r.err
    assert len(slots(safe)) == 2
    assert opens(safe, "found again")
    r = run_cli("restore", "data@latest", tmp_path / "out", safe=safe, env=pw("found again"))
    assert r.code == 0, r.err
    # from stdin too
    r = run_cli("key", "import", "-", safe=safe, input=exported.read_bytes(),
                env=NO_PASSWORD | {"POINTSAFE_NEW_PASSWORD": "third"})
    assert r.code == 0, r.err
    assert opens(safe, "third")


def test_import_refuses_another_safes_key_and_a_typo(safe, tmp_path):
    other = tmp_path / "other"
    run_cli("init", other, check=True)
    text = run_cli("key", "export", safe=other, check=True).out
    f = tmp_path / "other.txt"
    f.write_text(text)
    r = run_cli("key", "import", f, safe=safe, env={"POINTSAFE_NEW_PASSWORD": "x"})
    assert r.code == 1 and "another safe" in one_line(r.err)
    lines = text.splitlines()
    f.write_text("\n".join(ln.replace("safe:", "safe-x:") for ln in lines) + "\n")  # no safe id line
    r = run_cli("key", "import", f, safe=safe, env={"POINTSAFE_NEW_PASSWORD": "x"})
    assert r.code == 1 and "does not open" in one_line(r.err)
    mine = run_cli("key", "export", safe=safe, check=True).out
    key_line = next(ln for ln in mine.splitlines() if ln.startswith("key:"))
    typo = key_line[:-1] + ("0" if key_line[-1] != "0" else "1")
    f.write_text(mine.replace(key_line, typo))
    r = run_cli("key", "import", f, safe=safe, env={"POINTSAFE_NEW_PASSWORD": "x"})
    assert r.code == 1 and "check" in one_line(r.err)
    assert len(slots(safe)) == 1


def test_a_plain_safe_has_no_keys(tmp_path):
    s = tmp_path / "plain"
    run_cli("init", s, "--encryption", "none", check=True)
    for cmd in (["list"], ["add"], ["remove", "00000000"], ["passwd"], ["export"], ["import", "x"]):
        r = run_cli("key", *cmd, safe=s)
        assert r.code == 1, cmd
        assert "not encrypted" in one_line(r.err), cmd


def test_key_help_reads_like_a_manual():
    r = run_cli("key", "--help")
    assert r.code == 0
    for word in ("list", "add", "remove SLOT", "passwd [SLOT]", "export", "import FILE",
                 "--new-password-file", "POINTSAFE_NEW_PASSWORD", "every password"):
        assert word in r.out, word
    r = run_cli("key", "export", "--help")
    assert r.code == 0 and "every backup" in r.out
    r = run_cli("key", safe=Path("/nonexistent"))
    assert r.code == 1 and "subcommand" in one_line(r.err)


def test_passwd_on_a_terminal_with_two_slots_changes_the_one_typed_and_asks_once(safe):
    run_cli("key", "add", safe=safe, env={"POINTSAFE_NEW_PASSWORD": "other"}, check=True)
    code, out = run_tty("--safe", safe, "key", "passwd", answers=["other", "typed pw", "typed pw"])
    assert code == 0, out
    assert out.count(f"password of {safe}:") == 1
    assert opens(safe, "typed pw") and opens(safe, TEST_PASSWORD) and not opens(safe, "other")


def test_every_slot_file_deleted_then_import_restores_access(safe, tmp_path):
    import shutil
    exported = tmp_path / "key.txt"
    exported.write_text(run_cli("key", "export", safe=safe, check=True).out)
    shutil.rmtree(safe / "keys")
    for cmd in (["points"], ["backup", tmp_path / "src"], ["key", "list"]):
        r = run_cli(*cmd, safe=safe)
        assert r.code == 1, (cmd, r.err)
        line = one_line(r.err)
        assert "not encrypted" not in line and ("key slot" in line or "keys" in line), line
    r = run_cli("key", "import", exported, safe=safe, env=NO_PASSWORD | {"POINTSAFE_NEW_PASSWORD": "back"})
    assert r.code == 0, r.err
    assert opens(safe, "back")
    assert run_cli("verify", safe=safe, env=pw("back")).code == 0
