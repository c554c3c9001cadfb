"""Where an encrypted safe's password comes from, and the safe's key once unlocked.

The password, in this order (docs: ``pointsafe --help``, README "Encryption"):

1. ``--password-file FILE``: the file's first line (its newline stripped);
2. ``--password-command CMD``: what ``sh -c CMD`` prints on stdout, one line (its newline
   stripped); the command's stderr and stdin are the user's, so it may prompt; a command that
   fails or prints nothing is one clear line;
3. ``$POINTSAFE_PASSWORD``;
4. a prompt on the terminal (getpass), when stdin is a terminal;
5. else one line saying these ways (exit 1).

The password is never an argument's value. A new password (``init``, ``key add``, ``key
passwd``, ``key import``) comes from ``--new-password-file``, ``$POINTSAFE_NEW_PASSWORD`` or a
prompt asked twice; ``init`` takes the new safe's password from the sources above (asked twice
on a terminal).

A command unlocks a safe once: the master key is kept in this process's memory for the
other opens of the same command (the task recorder, the mount's daemon, which gets it by fork),
so that one Argon2id derivation and at most one prompt are paid per command.
"""

from __future__ import annotations

import argparse
import getpass
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from pointsafe.cas import Safe, SafeError, UsageError

ENV = "POINTSAFE_PASSWORD"
NEW_ENV = "POINTSAFE_NEW_PASSWORD"
WAYS = "POINTSAFE_PASSWORD, --password-file FILE or --password-command CMD"

_unlocked: dict[str, bytes] = {}     # realpath of a safe -> its master key (this process only)
_given: dict[str, bytes] = {}        # realpath of a safe -> the password that unlocked it


class PasswordError(UsageError):
    """no password was given"""


def add_options(p: argparse.ArgumentParser, d: dict[str, Any]) -> None:
    """--password-file and --password-command (``d``: argparse defaults, as in add_common)."""
    p.add_argument("--password-file", metavar="FILE",
                   help="read the safe's password from the first line of FILE", **d)
    p.add_argument("--password-command", metavar="CMD",
                   help="run CMD (with sh -c) and use the line it prints as the safe's password", **d)


def is_encrypted(safe_dir: str | Path) -> bool:
    """Whether the safe at ``safe_dir`` is encrypted (key slots, or a header naming an
    encryption; cas refuses a safe where they disagree)."""
    from pointsafe.ops.db import is_encrypted as encrypted
    return encrypted(safe_dir)


def _first_line(data: bytes, where: str) -> bytes:
    line = data.split(b"\n", 1)[0].removesuffix(b"\r")
    if not line:
        raise PasswordError(f"{where} gave an empty password")
    return line


def _from_file(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(64 * 1024)
    except OSError as e:
        raise PasswordError(f"--password-file {path}: cannot read it: {e.strerror}") from None
    return _first_line(data, f"--password-file {path}")


def _from_command(cmd: str) -> bytes:
    try:
        p = subprocess.run(["/bin/sh", "-c", cmd], stdout=subprocess.PIPE)
    except OSError as e:
        raise PasswordError(f"--password-command: cannot run /bin/sh: {e.strerror}") from None
    if p.returncode != 0:
        raise PasswordError(f"--password-command {cmd!r} failed (exit status {p.returncode})")
    return _first_line(p.stdout, f"--password-command {cmd!r}")


def _on_terminal() -> bool:
    try:
        return sys.stdin.isatty()
    except (AttributeError, ValueError):
        return False


def _prompt(text: str, twice: bool) -> bytes:
    pw = getpass.getpass(text)
    if not pw:
        raise PasswordError("an empty password was typed")
    if twice and getpass.getpass("again, to be sure: ") != pw:
        raise PasswordError("the two passwords typed differ")
    return pw.encode()


def given_password(args: argparse.Namespace, prompt: str = "password: ", twice: bool = False) -> bytes | None:
    """The password from the first source that gives one (module docstring), prompting on a
    terminal (``twice``: and again, refusing two that differ); None when no source gives one."""
    if getattr(args, "password_file", None):
        return _from_file(args.password_file)
    if getattr(args, "password_command", None):
        return _from_command(args.password_command)
    env = os.environb.get(ENV.encode())
    if env:
        return env
    if _on_terminal():
        return _prompt(prompt, twice)
    return None


def password_for(args: argparse.Namespace, safe_dir: str | Path) -> bytes:
    """The password of the encrypted safe ``safe_dir``; PasswordError (one line naming the
    ways to give it) when no source gives one."""
    pw = given_password(args, prompt=f"password of {safe_dir}: ")
    if pw is None:
        raise PasswordError(f"{safe_dir} is encrypted: give its password with {WAYS} "
                            "(or run the command on a terminal to be asked)")
    return pw


def new_password(args: argparse.Namespace, what: str = "new password: ") -> bytes:
    """A new password: ``--new-password-file``, ``$POINTSAFE_NEW_PASSWORD``, or typed twice on a
    terminal; PasswordError (one line) when none is given."""
    path = getattr(args, "new_password_file", None)
    if path:
        try:
            with open(path, "rb") as f:
                return _first_line(f.read(64 * 1024), f"--new-password-file {path}")
        except OSError as e:
            raise PasswordError(f"--new-password-file {path}: cannot read it: {e.strerror}") from None
    env = os.environb.get(NEW_ENV.encode())
    if env:
        return env
    if _on_terminal():
        return _prompt(what, twice=True)
    raise PasswordError(f"no new password given: use --new-password-file FILE or {NEW_ENV}, "
                        "or run the command on a terminal to be asked")


def _slot_key(safe_dir: str | Path) -> str:
    return os.path.realpath(safe_dir)


def remember(safe_dir: str | Path, master: bytes) -> None:
    """Keep ``master`` as the unlocked key of ``safe_dir`` for the rest of this process."""
    _unlocked[_slot_key(safe_dir)] = master


def unlocked(safe_dir: str | Path) -> bytes | None:
    """The master key of ``safe_dir`` if this process unlocked it already, else None."""
    return _unlocked.get(_slot_key(safe_dir))


def unlock(args: argparse.Namespace, safe_dir: str | Path) -> bytes | None:
    """The master key of the safe at ``safe_dir`` (None for a plain safe), unlocked with the
    password once per process; WrongPassword (one line) when no key slot opens with it."""
    if not is_encrypted(safe_dir):
        return None
    k = _slot_key(safe_dir)
    if k not in _unlocked:
        from pointsafe.cas.errors import WrongPassword
        from pointsafe.cas.keyslots import unlock as unlock_slots
        pw = current_password(args, safe_dir)
        try:
            _unlocked[k] = unlock_slots(Path(safe_dir), pw)
        except WrongPassword:
            if _headers_differ(Path(safe_dir)):
                raise WrongPassword(
                    f"no key slot of {safe_dir} opens with this password under its header, and the "
                    "header differs from the copy kept in header.copy or the index: the header may "
                    "have been replaced; 'pointsafe repair' puts the safe's own back") from None
            raise
    return _unlocked[k]


def current_password(args: argparse.Namespace, safe_dir: str | Path) -> bytes:
    """The password given for ``safe_dir`` (:func:`password_for`), asked at most once per process."""
    k = _slot_key(safe_dir)
    if k not in _given:
        _given[k] = password_for(args, safe_dir)
    return _given[k]


def _headers_differ(safe_dir: Path) -> bool:
    """Whether the header file differs from header.copy or from the index's copy (a header
    copied from another safe makes every password look wrong: key slots are bound to the safe
    id). Reads only; False when it cannot tell."""
    try:
        header = (safe_dir / "header").read_bytes()
    except OSError:
        return False
    copies: list[bytes | None] = []
    try:
        copies.append((safe_dir / "header.copy").read_bytes())
    except OSError:
        pass
    from pointsafe.cas.index import read_meta
    copies.append(read_meta(safe_dir / "index", b"header"))
    return any(c is not None and c != header for c in copies)


def open_safe(args: argparse.Namespace, path: str | Path, write: bool | None = None) -> Safe:
    """The safe at ``path``, opened (``write`` as in Safe.open), unlocked with the password of
    the module docstring when it is encrypted; the index's ops tables seal with its key."""
    from pointsafe.ops import db
    safe = Safe.open(Path(path), write=write, master_key=unlock(args, path))
    if safe.crypto is not None:
        db.use_crypto(path, safe.crypto)
    return safe


def crypto_for(args: argparse.Namespace):
    """A function ``safe_dir -> Crypto | None`` for the task recorder (ops/recorder.py): it
    unlocks the safe (prompting at most once per process) before anything is written to it."""
    def get(safe_dir: Path):
        master = unlock(args, safe_dir)
        if master is None:
            return None
        from pointsafe.cas.crypto import Crypto
        from pointsafe.cas.header import read_header
        cipher = read_header(Path(safe_dir)).cipher
        if cipher is None:      # key slots beside a plain header: never write plain values there
            raise SafeError(f"{safe_dir} has key slots but its header names no encryption: the header "
                            "was changed without the key ('pointsafe verify' says more)")
        return Crypto(master, cipher)
    return get
