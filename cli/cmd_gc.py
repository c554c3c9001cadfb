"""Retention and space: forget, gc, defrag."""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING, Callable

from pointsafe.cas import Safe
from pointsafe.gc.retention import RULES, Policy

from .common import (
    EXIT_OK,
    EXIT_WARNINGS,
    add_common,
    emit_json,
    Meter,
    human_bytes,
    open_safe,
    progress,
    say,
)

if TYPE_CHECKING:
    from pointsafe.gc.collect import GcReport

# The gc jobs are imported when a command runs, not when the CLI starts.
DEFAULT_THRESHOLD = 0.20   # pointsafe.gc.collect.DEFAULT_THRESHOLD (checked by a test)

FORGET_DESC = """\
Forget recovery points: name them (POINT is an id prefix, latest, NAME@latest or NAME@TIME),
or give a retention policy with --keep-* rules, applied to each source (point name) on its
own, or only to --name NAME.

Points are taken newest first. --keep-last N keeps the N newest; --keep-hourly/daily/weekly/
monthly/yearly N keeps the newest point of each of the N most recent hours/days/ISO weeks/
months/years that have points (UTC). A point any rule keeps is kept. With --dry-run nothing
changes and every point is listed with the rules that keep it, or why it would go.

Forgetting drops the points' references; data that no remaining point reaches becomes dead.
Run 'pointsafe gc' (or add --prune) to give the space back to the filesystem."""

GC_DESC = """\
Give space back: mark dead the objects an interrupted backup left unreferenced, remove dead
objects from the index, delete packs that hold nothing live, and rewrite packs whose dead
share is at least --threshold percent (copying their live records into new packs).
gc first makes a plan (reads only) and prints it; --dry-run stops there, a real run then
executes that plan and says what it did. On a full disk gc deletes dead packs first (using the
safe's small space reserve for its index commits) and skips compaction, saying how much free
space it needs, when there is no room for the new packs.
Crash-safe at any instant; a rerun finishes the job. Holds the safe's writer lock: a backup
started meanwhile is told to wait. Mounts keep reading correct data throughout."""

DEFRAG_DESC = """\
Rewrite live data so that the newest point of each source reads sequentially, then give
back the space the moves left dead. The fragmentation figure is the number of seeks per GiB
read when restoring the newest point of each source in file order (a read is a seek unless
its record follows the previous one in the same pack); its floor is one seek per pack the
data fills. Crash-safe at any instant; a rerun finishes the job."""


def register(sub) -> None:
    """Add the ``forget``, ``gc`` and ``defrag`` commands to the subparsers ``sub``."""
    p = sub.add_parser("forget", help="forget points (by id or by a retention policy)",
                       description=FORGET_DESC, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common(p)
    p.add_argument("points", nargs="*", metavar="POINT", help="points to forget")
    for rule in RULES:
        what = "newest points" if rule == "last" else f"{rule} points"
        p.add_argument(f"--keep-{rule}", type=_count, default=0, metavar="N", help=f"keep N {what}")
    p.add_argument("--name", help="apply the policy to the points named NAME only")
    p.add_argument("--dry-run", action="store_true", help="list what would be forgotten and why; change nothing")
    p.add_argument("--prune", action="store_true", help="run gc afterwards")
    p.set_defaults(func=cmd_forget)

    p = sub.add_parser("gc", help="give back the space of forgotten data",
                       description=GC_DESC, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common(p)
    p.add_argument("--dry-run", action="store_true", help="say what would be done; change nothing")
    p.add_argument("--threshold", type=_percent, default=DEFAULT_THRESHOLD * 100, metavar="PCT",
                   help="rewrite packs whose dead share is at least PCT percent (default: 20)")
    p.set_defaults(func=cmd_gc)

    p = sub.add_parser("defrag", help="make the newest points read sequentially",
                       description=DEFRAG_DESC, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common(p)
    p.add_argument("--dry-run", action="store_true", help="measure and say how much would move; change nothing")
    p.set_defaults(func=cmd_defrag)


def _count(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError("must be 0 or more")
    return n


def _percent(text: str) -> float:
    try:
        n = float(text.rstrip("%"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a percentage: {text!r}") from None
    if not 0 <= n <= 100:
        raise argparse.ArgumentTypeError("must be between 0 and 100")
    return n


def _frag(d: dict | None) -> str:
    if not d:
        return "not measured"
    return f"{d['seeks_per_gib']:g} seeks/GiB ({d['seeks']} seeks, floor {d['minimum_seeks']})"


def cmd_forget(args) -> int:
    """``pointsafe forget``: forget the named points or those the --keep-* policy lets go (with
    --dry-run, only say which), then gc with --prune."""
    from pointsafe.gc.collect import run_gc
    from pointsafe.gc.forget import forget, plan_forget
    policy = Policy(**{r: getattr(args, f"keep_{r}") for r in RULES})
    with open_safe(args) as safe:
        decisions = plan_forget(safe, args.points, policy, args.name)
        rep = forget(safe, decisions, dry_run=args.dry_run, policy=None if args.points else policy)
        gc_rep = None
        if args.prune and not args.dry_run:
            gc_rep = run_gc(safe)
    if args.json:
        out = rep.as_dict()
        if gc_rep is not None:
            out["gc"] = gc_rep.as_dict()
        emit_json(out)
        return EXIT_OK
    for d in decisions:
        verb = "keep  " if d.keep else ("would forget" if args.dry_run else "forget")
        say(args, f"{verb} {d.point.id[:12]}  {d.point.name}  {d.point.started}  "
                  f"({'; '.join(d.reasons)})")
    if args.dry_run:
        say(args, f"dry run: {rep.points_dropped} points would be forgotten, {rep.points_kept} kept")
    else:
        say(args, f"forgot {rep.points_dropped} points ({rep.points_kept} kept): {rep.objects_freed} objects "
                  f"died, {human_bytes(rep.dead_bytes)} now reclaimable by 'pointsafe gc'")
    if gc_rep is not None:
        _say_gc(args, gc_rep)
    return EXIT_OK


def _say_plan(args, p: dict, pre: str) -> None:
    """The plan's lines (``p`` is ``GcPlan.as_dict()``); ``pre`` starts each line."""
    cascade = ""
    if p["queued"]:
        cascade += f", finish an interrupted forget ({p['released']} objects die)"
    if p["orphans"]:
        cascade += (f", bury {p['orphans']} orphans of an interrupted backup "
                    f"({p['orphans_buried']} objects die with what only they reach)")
    say(args, f"{pre}free {p['objects_dropped']} dead objects ({human_bytes(p['dead_bytes'])}){cascade}")
    rewrite = (f"rewrite {len(p['rewrite'])} packs (moving {p['objects_moved']} objects, "
               f"{human_bytes(p['bytes_moved'])})" if p["compact"] else
               f"skip the compaction of {len(p['rewrite'])} packs (no room)")
    say(args, f"{pre}delete {len(p['delete'])} packs, {rewrite}; "
              f"reclaim {human_bytes(p['bytes_reclaimed'])} of {human_bytes(p['size_before'])}")


def _say_gc(args, r) -> None:
    if r.dry_run:
        _say_plan(args, r.plan, "dry run: would ")
        say(args, f"fragmentation now: {_frag(r.fragmentation_before)}")
    else:
        _say_plan(args, r.plan, "plan: ")
        buried = (f"; buried the orphans of an interrupted backup ({r.orphans_buried} objects died "
                  "with what only they reached)") if r.orphans_buried else ""
        say(args, f"done: freed {r.objects_freed} dead objects ({human_bytes(r.dead_bytes_freed)}){buried}")
        say(args, f"done: deleted {len(r.packs_deleted)} packs, rewrote {len(r.packs_rewritten)} packs "
                  f"(moving {r.objects_moved} objects, {human_bytes(r.bytes_moved)}, "
                  f"into {len(r.packs_written)} new packs)")
        say(args, f"reclaimed {human_bytes(r.bytes_reclaimed)}: "
                  f"packs {human_bytes(r.size_before)} -> {human_bytes(r.size_after)}")
        say(args, f"fragmentation: {_frag(r.fragmentation_before)} -> {_frag(r.fragmentation_after)}")
    for w in r.warnings:
        say(args, f"warning: {w}")


def new_pack_bytes(safe: Safe) -> Callable[[], int]:
    """A probe for :func:`progress`: the bytes of the pack files made since this call, which
    is what gc's compaction and defrag have moved so far (gc/ reports no progress itself)."""
    def names() -> set[str]:
        try:
            with os.scandir(safe.packs_dir) as it:
                return {d.name for d in it if d.name.endswith(".pack")}
        except OSError:
            return set()

    before = names()

    def probe() -> int:
        n = 0
        try:
            with os.scandir(safe.packs_dir) as it:
                for d in it:
                    if d.name.endswith(".pack") and d.name not in before:
                        try:
                            n += d.stat().st_size
                        except FileNotFoundError:    # deleted meanwhile
                            pass
        except OSError:
            pass
        return n
    return probe


def _run_gc(args: argparse.Namespace, safe: Safe, meter: Meter) -> GcReport:
    """What ``run_gc`` does (plan; unless --dry-run, execute the plan under the writer lock),
    with a progress phase for the plan and one for its execution."""
    from pointsafe.gc.collect import execute, plan_gc, report_plan
    threshold = args.threshold / 100
    meter.phase("gc: planning")
    if args.dry_run:
        return report_plan(safe, plan_gc(safe, threshold))
    with safe.writer("gc") as w:
        plan = plan_gc(w.safe, threshold)
        moving = plan.compact and bool(plan.rewrite)
        meter.phase(f"gc: freeing {plan.objects_dropped} dead objects, deleting {len(plan.delete)} packs, "
                    f"{f'rewriting {len(plan.rewrite)}' if moving else 'rewriting none'}; moved into new packs",
                    plan.bytes_moved if moving else None)
        return execute(w, plan)


def cmd_gc(args: argparse.Namespace) -> int:
    """``pointsafe gc``: give back dead space (see GC_DESC); exit 3 when it warns.

    Without a terminal it logs a progress line per phase and every 30 s (bytes moved into new
    packs so far), as backup does."""
    with open_safe(args) as safe:
        # "planning" from the start: a progress line may come before the first phase
        with progress(args, None, "gc: planning", poll=new_pack_bytes(safe)) as meter:
            r = _run_gc(args, safe, meter)
            meter.phase("gc: finished; moved into new packs", meter.total)
    if args.json:
        emit_json(r.as_dict())
    else:
        _say_gc(args, r)
    return EXIT_WARNINGS if r.warnings else EXIT_OK


def cmd_defrag(args: argparse.Namespace) -> int:
    """``pointsafe defrag``: rewrite the newest points to read sequentially (see DEFRAG_DESC);
    exit 3 when it warns.

    Without a terminal it logs a progress line when it starts, every 30 s and when it ends
    (bytes written into new packs so far), as backup does."""
    from pointsafe.gc.defrag import defrag
    with open_safe(args) as safe:
        with progress(args, None, "defrag", poll=new_pack_bytes(safe)) as meter:
            meter.phase("defrag: measuring" if args.dry_run else "defrag: moved into new packs")
            r = defrag(safe, dry_run=args.dry_run)
            meter.phase("defrag: finished; moved into new packs")
    if args.json:
        emit_json(r.as_dict())
        return EXIT_WARNINGS if r.warnings else EXIT_OK
    pre = "dry run: would " if r.dry_run else ""
    say(args, f"walked {r.chunks_walked} chunks of the newest points; kept {r.runs_kept} long runs in place")
    say(args, f"{pre}move {r.objects_moved} objects ({human_bytes(r.bytes_moved)})"
              f"{'' if r.dry_run else f'; rewrote {len(r.packs_rewritten)} packs, deleted {len(r.packs_deleted)}'}")
    if not r.dry_run:
        say(args, f"packs {human_bytes(r.size_before)} -> {human_bytes(r.size_after)} "
                  f"(reclaimed {human_bytes(r.bytes_reclaimed)})")
    say(args, f"fragmentation: {_frag(r.fragmentation_before)} -> {_frag(r.fragmentation_after)}")
    for w in r.warnings:
        say(args, f"warning: {w}")
    return EXIT_WARNINGS if r.warnings else EXIT_OK
