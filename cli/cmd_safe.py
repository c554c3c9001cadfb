"""Commands about the safe itself: init, verify, repair."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from pointsafe.cas import Safe, repair, verify
from pointsafe.cas.crypto import CIPHERS, default_cipher
from pointsafe.cas.keyslots import list_slots
from pointsafe.ops import tasks

from . import password
from .common import (
    EXIT_ERROR,
    EXIT_OK,
    add_common,
    emit_json,
    human_bytes,
    open_safe,
    parse_size,
    progress,
    safe_path,
    say,
)


INIT_DESCRIPTION = """\
Create a new, empty safe at PATH (or --safe / $POINTSAFE_SAFE): a new or empty directory.

The safe is encrypted unless --encryption none: every object is encrypted and authenticated
(AES-256-GCM or ChaCha20-Poly1305), object ids are keyed hashes, and the task history is
sealed. A random master key does that; it is kept only wrapped under the password, in a key
slot (SAFE/keys/, Argon2id). The password comes from --password-file FILE (its first line),
--password-command CMD (the line it prints), $POINTSAFE_PASSWORD, or is asked twice on a
terminal; never from an argument. Every later command needs it the same way.

Keep the password where you will find it when this machine is gone (a password manager, a
sealed envelope), and consider 'pointsafe key export' on paper: if every password and every
exported key is lost, no one can read the safe, not even with pointsafe. 'pointsafe key add'
gives the safe a second password."""


def register(sub) -> None:
    """Add the ``init``, ``verify`` and ``repair`` commands to the subparsers ``sub``."""
    p = sub.add_parser("init", help="create a new safe", description=INIT_DESCRIPTION,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common(p)
    p.add_argument("path", nargs="?", help="where to create the safe (a new or empty directory)")
    p.add_argument("--compression", default="zstd:1",
                   help="'none' or a zstd level 1-22, e.g. 'zstd:3' (default: zstd:1)")
    p.add_argument("--block-size", type=parse_size, default=64 * 1024,
                   help="block size for volumes, a power of two from 4K to 4M (default: 64K)")
    p.add_argument("--encryption", choices=("auto", *CIPHERS, "none"), default="auto",
                   help="how the safe is encrypted: auto (default: aes-256-gcm on a CPU with AES "
                        "instructions, else chacha20-poly1305), aes-256-gcm, chacha20-poly1305, or "
                        "none for a plain safe anyone who reads its files can read")
    p.add_argument("--pack-size", type=parse_size, default=64 * 1024 * 1024, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_init, needs_key=False)

    p = sub.add_parser("verify", help="check the safe's integrity",
                       description="Check the header, every pack record's framing and checksum, and "
                                   "that the index agrees with the packs. With --data, also re-hash "
                                   "every object against its key. Exit 1 when anything is wrong.")
    add_common(p)
    p.add_argument("--data", action="store_true", help="re-hash every object (reads everything)")
    p.set_defaults(func=cmd_verify, task_kind="verify")

    p = sub.add_parser("repair", help="rebuild the index from the packs",
                       description="Rebuild the LMDB index from the pack files alone, and a damaged or "
                                   "missing header from its copy. Damaged records and regions are "
                                   "reported (pack, offset, bytes) and left out, never cut off; only "
                                   "a torn tail is truncated. Forgotten points stay forgotten. Objects "
                                   "found lost are remembered: the next backup of each source reads it "
                                   "whole and stores them again, so older points naming them restore again.")
    add_common(p)
    p.set_defaults(func=cmd_repair, task_kind="repair")


def _check_new(path: Path) -> None:
    """UsageError (as Safe.init says it) when ``path`` is not a new or empty directory."""
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        Safe.init(path)     # raises the one line saying what is wrong with the path


def _new_safe_password(args, path) -> bytes:
    """The new safe's password from the password sources (asked twice on a terminal)."""
    pw = password.given_password(args, prompt=f"password for the new safe {path}: ", twice=True)
    if pw is None:
        raise password.PasswordError(
            f"the new safe is encrypted: give its password with {password.WAYS}, or run init on a "
            "terminal to be asked (--encryption none makes a plain safe)")
    return pw


def cmd_init(args) -> int:
    """``pointsafe init [PATH]``: create a new, empty safe (encrypted unless ``--encryption
    none``) and print its settings."""
    if args.path:
        args.safe = args.path
    raw = getattr(args, "safe", None) or os.environ.get("POINTSAFE_SAFE") or ""
    bucket = raw.startswith("s3://")
    path: str | Path = raw.rstrip("/") if bucket else safe_path(args)
    where: dict[str, Any] = ({"s3_endpoint": getattr(args, "s3_endpoint", None),
                              "unsafe_no_locking": getattr(args, "unsafe_no_locking", False)} if bucket else {})
    cipher = default_cipher() if args.encryption == "auto" else args.encryption
    if cipher == "none":
        safe = Safe.init(path, compression=args.compression, block_size=args.block_size, pack_size=args.pack_size,
                         **where)
    else:
        if not bucket:
            _check_new(Path(path))    # before the password is asked for
        safe = Safe.init(path, compression=args.compression, block_size=args.block_size, pack_size=args.pack_size,
                         encryption=cipher, password=_new_safe_password(args, path), **where)
    cfg = safe.config
    slots = [s.slot for s in list_slots(safe.path)]
    cache = safe.path
    safe.close()
    if args.json:
        emit_json({"safe": str(path), "safe_id": cfg.safe_id, "compression": cfg.compression,
                   "block_size": cfg.block_size, "encryption": cfg.cipher or "none", "key_slots": slots,
                   **({"cache": str(cache)} if bucket else {})})
        return EXIT_OK
    say(args, f"created safe {path} (compression {cfg.compression}, volume block size "
              f"{human_bytes(cfg.block_size)}, encryption {cfg.cipher or 'none'})")
    if cfg.cipher:
        say(args, "keep the password safe: without it (or a key exported with 'pointsafe key export') "
                  "nothing in the safe can be read, by anyone")
    return EXIT_OK


def cmd_verify(args) -> int:
    """Check the safe; exit 1 when anything is wrong. Opens the index read-only."""
    with open_safe(args, write=False) as safe:
        total = sum(pe.committed_len for pe in safe.pack_entries().values())
        with progress(args, total, "verifying") as advance:
            rep = verify(safe, data=args.data, progress=advance)
    tasks.report(packs=rep.packs, objects=rep.objects, points=rep.points, bytes_checked=rep.bytes_checked,
                 data=args.data, errors=len(rep.errors))
    for e in rep.errors:
        tasks.add_warning(e.get("pack"), e["message"])
    if not rep.ok:
        tasks.report(error=f"{len(rep.errors)} problem(s) found; first: {rep.errors[0]['message']}")
    if args.json:
        emit_json(rep.as_dict())
    else:
        for n in rep.notes:
            say(args, f"note: {n}")
        for e in rep.errors:
            say(args, f"ERROR: {e['message']}")
        say(args, f"{'ok' if rep.ok else 'FAILED'}: {rep.packs} packs, {rep.objects} records "
                  f"({human_bytes(rep.bytes_checked)}), {rep.points} points checked"
                  f"{', every object re-hashed' if args.data else ''}; {len(rep.errors)} errors")
    return EXIT_OK if rep.ok else EXIT_ERROR


def cmd_repair(args) -> int:
    """Rebuild the index (and a damaged header); exit 1 when something could not be read."""
    path = safe_path(args)
    # An encrypted safe is rebuilt with its key: the one this command unlocked already, else
    # repair asks for the password (only for an encrypted safe) and unlocks with the header it
    # will keep (the header file may be the damage being repaired).
    rep = repair(path, master_key=password.unlocked(path),
                 password=lambda: password.password_for(args, path))
    tasks.report(packs=rep.packs, objects=rep.objects, points=rep.points, damaged=len(rep.damaged),
                 unreadable_bytes=rep.unreadable_bytes, truncated=len(rep.truncated),
                 missing_children=rep.missing_children)
    for d in rep.damaged:
        tasks.add_warning(d.get("pack"), d["message"])
    if rep.damaged or rep.missing_children:
        tasks.report(error=f"{len(rep.damaged)} damaged region(s) or record(s) left out "
                           f"({human_bytes(rep.unreadable_bytes)}), "
                           f"{rep.missing_children} reference(s) to missing objects")
    if args.json:
        emit_json(rep.as_dict())
    else:
        if rep.header:
            say(args, f"header: {rep.header}")
        for d in rep.damaged:
            say(args, f"damaged: {d['message']}")
        for t in rep.truncated:
            say(args, f"truncated: pack {t['pack']} at offset {t['offset']}: a torn tail of {t['bytes']} bytes "
                      "(an unfinished last record)")
        damaged = (f", {len(rep.damaged)} damaged regions or records left out "
                   f"({human_bytes(rep.unreadable_bytes)} unreadable, kept in their packs)" if rep.damaged else "")
        missing = f", {rep.missing_children} references to missing objects" if rep.missing_children else ""
        say(args, f"rebuilt the index from {rep.packs} packs: {rep.objects} objects, {rep.points} points"
                  f"{damaged}{missing}")
    return EXIT_ERROR if rep.damaged or rep.missing_children else EXIT_OK
