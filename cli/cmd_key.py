"""key: the passwords (key slots) of an encrypted safe, and its master key on paper."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pointsafe.cas import IntegrityError, Safe, SafeError, UsageError
from pointsafe.cas import keyslots
from pointsafe.cas.errors import WrongPassword
from pointsafe.cas.header import read_header

from . import password
from .common import EXIT_OK, add_common, emit_json, safe_path, say

KEY_DESCRIPTION = """\
An encrypted safe's data is encrypted with one random master key, which is kept only wrapped:
each key slot (a file in SAFE/keys/) holds it wrapped under one password (Argon2id). Any
password of any slot opens the safe. Adding or changing a password rewrites one slot, never
the data. The slots tell nothing secret (see 'key list'); the master key never leaves the
process, except through 'key export'.

  pointsafe key list [--json]          the slots: id, label, created, KDF parameters
  pointsafe key add [--label TEXT]     add a password (the current one unlocks)
  pointsafe key remove SLOT            remove a slot (never the last one)
  pointsafe key passwd [SLOT]          change the password of a slot (default: the slot the
                                       current password opens)
  pointsafe key export                 print the master key, for a paper backup
  pointsafe key import FILE            open the safe with an exported key (FILE, '-' for stdin)
                                       and add a slot with a new password: the way back in
                                       when every password is lost

The current password comes from --password-file, --password-command, $POINTSAFE_PASSWORD or
a prompt (as for every command). A new password comes from --new-password-file FILE (its first
line), $POINTSAFE_NEW_PASSWORD, or is asked twice on a terminal.

If every password and every exported key is lost, the safe cannot be read by anyone. A plain
safe (init --encryption none) has no keys: these commands say so and exit 1."""

SUBCOMMANDS = {
    "list": "list the key slots (nothing secret)",
    "add": "add a password: a new key slot",
    "remove": "remove a key slot (refused for the last one)",
    "passwd": "change a slot's password",
    "export": "print the master key for a paper backup (whoever holds it reads every backup)",
    "import": "regain access with an exported key: adds a slot with a new password",
}


def register(sub) -> None:
    """Add the ``key`` command and its subcommands to the subparsers ``sub``."""
    p = sub.add_parser("key", help="an encrypted safe's passwords and master key",
                       description=KEY_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common(p)
    p.set_defaults(func=lambda args: _usage(p), needs_key=False)
    ksub = p.add_subparsers(dest="key_cmd", metavar="list|add|remove|passwd|export|import")

    s = _sub(ksub, "list", "List the safe's key slots: id, label, when it was made, and its Argon2id "
                           "parameters (memory in KiB, passes, lanes). Needs no password.")
    s.set_defaults(func=cmd_list, needs_key=False)

    s = _sub(ksub, "add", "Add a password to the safe: a new key slot wrapping the master key under it. "
                          "The current password unlocks the safe; the new one comes from "
                          "--new-password-file, $POINTSAFE_NEW_PASSWORD or is asked twice.")
    s.add_argument("--label", default="", help="a note kept in the slot, e.g. whose password it is")
    _new_password_option(s)
    s.set_defaults(func=cmd_add, needs_key=True)

    s = _sub(ksub, "remove", "Remove a key slot: its password no longer opens the safe. The current "
                             "password must open the safe (any slot). The last slot is never removed: "
                             "without a slot no password opens the safe.")
    s.add_argument("slot", metavar="SLOT", help="the slot id (see 'pointsafe key list')")
    s.set_defaults(func=cmd_remove, needs_key=True)

    s = _sub(ksub, "passwd", "Change the password of a key slot: the slot is rewritten to open with the "
                             "new password only. Without SLOT: the slot the current password opens.")
    s.add_argument("slot", metavar="SLOT", nargs="?", help="the slot id (see 'pointsafe key list')")
    _new_password_option(s)
    s.set_defaults(func=cmd_passwd, needs_key=True)

    s = _sub(ksub, "export", "Print the safe's master key as a text block, for a paper or offline "
                             "backup. Whoever holds it reads every backup of the safe, whatever the "
                             "passwords: keep it like the backups themselves. 'key import' uses it.")
    s.set_defaults(func=cmd_export, needs_key=True)

    s = _sub(ksub, "import", "Open the safe with a master key printed by 'key export' (read from FILE, "
                             "or stdin with '-') and add a key slot with a new password; no current "
                             "password is needed. A key of another safe is refused.")
    s.add_argument("file", metavar="FILE", help="the exported key ('-': read it from stdin)")
    s.add_argument("--label", default="imported", help="a note kept in the new slot (default: imported)")
    _new_password_option(s)
    s.set_defaults(func=cmd_import, needs_key=False)


def _sub(ksub, name: str, description: str) -> argparse.ArgumentParser:
    s = ksub.add_parser(name, help=SUBCOMMANDS[name], description=description)
    add_common(s)
    return s


def _new_password_option(s: argparse.ArgumentParser) -> None:
    s.add_argument("--new-password-file", metavar="FILE",
                   help="read the new password from the first line of FILE")


def _usage(p: argparse.ArgumentParser) -> int:
    raise UsageError("key needs a subcommand: list, add, remove SLOT, passwd [SLOT], export or import FILE "
                     "(see 'pointsafe key --help')")


def push_keys(path: Path) -> None:
    """A safe in a bucket: make the bucket's key slots those of its cache (a local safe: nothing)."""
    from pointsafe.cas.s3safe import push_keys as push
    push(path)


def _encrypted_safe(args) -> Path:
    """The safe's folder; UsageError (one line) when it is a plain safe."""
    path = safe_path(args)
    read_header(path)      # NotASafe for a path that is no safe
    if not password.is_encrypted(path):
        raise UsageError(f"{path} is not encrypted (made with --encryption none): it has no keys")
    return path


def cmd_list(args) -> int:
    """``key list``: the key slots (no password needed)."""
    path = _encrypted_safe(args)
    slots = keyslots.list_slots(path)
    if not slots:
        raise SafeError(f"{path} is encrypted but has no key slot left: no password opens it "
                        "('pointsafe key import FILE' restores access with an exported key)")
    if args.json:
        emit_json([s.as_dict() for s in slots])
        return EXIT_OK
    say(args, f"{'SLOT':<8}  {'CREATED (UTC)':<19}  {'KDF':<26}  LABEL")
    for s in slots:
        kdf = f"{s.kdf} m={s.m_kib}KiB t={s.t} p={s.p}"
        say(args, f"{s.slot:<8}  {s.created[:19].replace('T', ' '):<19}  {kdf:<26}  {s.label}")
    return EXIT_OK


def _report_slot(args, verb: str, slot: keyslots.KeySlot) -> None:
    if args.json:
        emit_json(dict(slot.as_dict(), action=verb))
    else:
        say(args, f"{verb} key slot {slot.slot}" + (f" ({slot.label})" if slot.label else ""))


def cmd_add(args) -> int:
    """``key add``: a new slot for a new password (the current one unlocks)."""
    path = _encrypted_safe(args)
    master = password.unlock(args, path)
    assert master is not None
    slot = keyslots.add_slot(path, master, password.new_password(args), label=args.label)
    push_keys(path)
    _report_slot(args, "added", slot)
    return EXIT_OK


def cmd_remove(args) -> int:
    """``key remove SLOT``: delete a slot (the current password must open the safe; never the last)."""
    path = _encrypted_safe(args)
    password.unlock(args, path)
    keyslots.remove_slot(path, args.slot)
    push_keys(path)
    if args.json:
        emit_json({"slot": args.slot, "action": "removed"})
    else:
        say(args, f"removed key slot {args.slot}")
    return EXIT_OK


def _slot_of(args, path: Path) -> str:
    """The slot the current password opens (one Argon2id per slot tried)."""
    pw = password.current_password(args, path)
    for s in keyslots.list_slots(path):
        if keyslots.slot_opens(path, s.slot, pw):
            return s.slot
    raise WrongPassword(f"wrong password (no key slot of {path} opens with it)")


def cmd_passwd(args) -> int:
    """``key passwd [SLOT]``: rewrite one slot under a new password."""
    path = _encrypted_safe(args)
    master = password.unlock(args, path)
    assert master is not None
    slot = args.slot
    if slot is None:
        slots = keyslots.list_slots(path)
        slot = slots[0].slot if len(slots) == 1 else _slot_of(args, path)
    elif slot not in {s.slot for s in keyslots.list_slots(path)}:
        raise UsageError(f"no key slot {slot!r} in {path} (see 'pointsafe key list')")
    new = keyslots.change_password(path, master, slot, password.new_password(args))
    push_keys(path)
    _report_slot(args, "changed the password of", new)
    return EXIT_OK


def cmd_export(args) -> int:
    """``key export``: print the master key; a warning on stderr."""
    path = _encrypted_safe(args)
    master = password.unlock(args, path)
    assert master is not None
    text = keyslots.export_key(master, read_header(path).safe_id)
    print("pointsafe: warning: this is the safe's master key: whoever holds it reads every backup, "
          "whatever the passwords; keep it offline (on paper, in a safe) and never with the backups",
          file=sys.stderr)
    if args.json:
        emit_json({"safe_id": read_header(path).safe_id, "export": text})
    else:
        sys.stdout.write(text)
    return EXIT_OK


def _read_export(name: str) -> str:
    if name == "-":
        return sys.stdin.read()
    try:
        return Path(name).read_text(errors="replace")
    except OSError as e:
        raise UsageError(f"{name}: cannot read the exported key: {e.strerror}") from None


def cmd_import(args) -> int:
    """``key import FILE``: open the safe with an exported key, add a slot with a new password."""
    path = _encrypted_safe(args)
    text = _read_export(args.file)
    master = keyslots.import_key(text)
    safe_id = read_header(path).safe_id
    named = keyslots.exported_safe_id(text)
    if named is not None and named != safe_id:
        raise UsageError(f"{args.file}: this key is the key of another safe ({named}), not of {path} ({safe_id})")
    try:
        Safe.open(path, write=False, master_key=master).close()   # checks the key against the header
    except (IntegrityError, WrongPassword):
        raise UsageError(f"{args.file}: this key does not open {path} (another safe's key, or a changed "
                         "header: 'pointsafe verify' says which)") from None
    new = password.new_password(args)
    slot = keyslots.add_slot(path, master, new, label=args.label)
    push_keys(path)
    password.remember(path, master)
    _report_slot(args, "imported the key: added", slot)
    return EXIT_OK
