"""Operations commands: tasks, status, alerts, report, config."""

from __future__ import annotations

import argparse

from pointsafe.cas import SafeError, UsageError
from pointsafe.ops import alerts, config, tasks
from pointsafe.ops.clock import human_duration, parse_iso, parse_since
from pointsafe.ops.status import build

from .common import EXIT_OK, add_common, emit_json, human_bytes, open_safe, say

EXIT_ALERTS = 2   # status: open alerts (Nagios CRITICAL); 0 = all clear, 1 = error


def register(sub) -> None:
    """Add the ``tasks``, ``status``, ``alerts``, ``report`` and ``config`` commands to the subparsers ``sub``."""
    p = sub.add_parser("tasks", help="the task history",
                       description="List recorded tasks (backup, restore, forget, gc, defrag, verify, repair, "
                                   "report), oldest first. A task is running, ok, warning, error, abandoned "
                                   "(its process died; noticed the next time any command opens the safe), "
                                   "or usage (refused for a usage error, such as an unknown point or a "
                                   "missing source, before doing anything; it raises no alert). "
                                   "'tasks show ID' prints one task with its warnings.")
    add_common(p)
    p.add_argument("--state", choices=tasks.STATES, help="only tasks in this state")
    p.add_argument("--kind", choices=tasks.KINDS, help="only tasks of this kind")
    p.add_argument("--since", metavar="T", help="only tasks started at or after T: an ISO time (UTC) "
                                                "or an age such as 36h or 7d")
    p.add_argument("--last", type=int, metavar="N", help="only the newest N matching tasks")
    p.set_defaults(func=cmd_tasks)
    tsub = p.add_subparsers(dest="tasks_cmd", metavar="show")
    s = tsub.add_parser("show", help="one task in full", description="Print one task: its command line, "
                        "process, times, state, reported figures, error and every recorded warning.")
    add_common(s)
    s.add_argument("id", type=int, help="the task id (first column of 'pointsafe tasks')")
    s.set_defaults(func=cmd_task_show)

    p = sub.add_parser("status", help="the state of the safe at a glance",
                       description="Show per source the newest point and its age, the expected interval and "
                                   "the last backup task; for the safe its size on disk, dedup and compression "
                                   "ratios, reclaimable bytes, fragmentation and the free space of its "
                                   "filesystem against the quotas; and the open alerts. Checks the standing "
                                   "conditions first (stale sources, quotas, abandoned tasks), raising alerts. "
                                   "Exit status: 0 when no alert is open, 2 while alerts are open (use it "
                                   "from cron or as a Nagios-style check), 1 on error.")
    add_common(p)
    p.add_argument("--check", action="store_true",
                   help="print one line and exit the Nagios way: 0 OK, 1 WARNING (only warning alerts "
                        "open), 2 CRITICAL (a critical alert open), 3 UNKNOWN (the safe cannot be read)")
    p.set_defaults(func=cmd_status, on_error=check_error)

    p = sub.add_parser("alerts", help="open alerts; 'alerts ack' acknowledges them",
                       description="List open alerts: tasks that ended in warning, error or abandoned, failed "
                                   "verifies, sources without a new point for longer than their interval, and "
                                   "quota breaches. Alerts stay open until acknowledged with 'alerts ack ID' "
                                   "or 'alerts ack --all'.")
    add_common(p)
    p.add_argument("--history", action="store_true", help="also list acknowledged alerts")
    p.set_defaults(func=cmd_alerts)
    asub = p.add_subparsers(dest="alerts_cmd", metavar="ack")
    s = asub.add_parser("ack", help="acknowledge alerts", description="Acknowledge alerts by id, or all "
                        "open ones with --all. A condition that persists (a stale source, a full disk) is "
                        "not raised again until it has cleared and recurred.")
    add_common(s)
    s.add_argument("ids", nargs="*", type=int, metavar="ID", help="alert ids")
    s.add_argument("--all", action="store_true", help="acknowledge every open alert")
    s.set_defaults(func=cmd_alerts_ack)

    p = sub.add_parser("report", help="e-mail the problems since the last report",
                       description="Send an e-mail listing the tasks that ended in warning, error or "
                                   "abandoned since the last report, and the open alerts, through the SMTP "
                                   "settings stored in the safe (see 'pointsafe config'). Sends nothing when "
                                   "there is nothing to report, unless --always. Meant for a daily timer.")
    add_common(p)
    p.add_argument("--since", metavar="T", help="report tasks since T (ISO time or an age such as 1d) "
                                                "instead of since the last report")
    p.add_argument("--always", action="store_true", help="send even when there is nothing to report")
    p.add_argument("--print", action="store_true", dest="print_only",
                   help="print the message instead of sending it")
    p.set_defaults(func=cmd_report, task_kind="report")

    p = sub.add_parser("config", help="per-safe settings: quotas, intervals, mail",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Show or change the settings kept in the safe:\n\n"
                                   "  quota.soft        alert below this free space (default 20%)\n"
                                   "  quota.hard        refuse/stop backups below this (default 10%)\n"
                                   "  interval.default  alert when a source has no point this long (default 36h)\n"
                                   "  interval.NAME     the same for source NAME ('off': never)\n"
                                   "  cbt.full_every    an incremental backup (--changed-blocks, a btrfs tree) reads\n"
                                   "                    its source whole when the last full read is this old\n"
                                   "                    (default 30d; 'off': never)\n"
                                   "  smtp.host, smtp.port, smtp.security (none|starttls|ssl), smtp.user,\n"
                                   "  smtp.password, smtp.from, smtp.to (comma-separated)\n\n"
                                   "Quotas are a percentage (15%), an amount of free space (5G) or 'off'; "
                                   "intervals look like 90m, 36h, 1d12h, 2w.\n\n"
                                   "  pointsafe config                  list (defaults marked)\n"
                                   "  pointsafe config set KEY VALUE\n"
                                   "  pointsafe config unset KEY        back to the default")
    add_common(p)
    p.add_argument("action", nargs="?", choices=("get", "set", "unset"), metavar="get|set|unset",
                   help="read, change or reset one setting (none: list them all)")
    p.add_argument("key", nargs="?", metavar="KEY", help="a setting name, e.g. quota.hard or interval.www")
    p.add_argument("value", nargs="?", metavar="VALUE", help="the new value (set only)")
    p.set_defaults(func=cmd_config)


# -- tasks ---------------------------------------------------------------------------------------

def _duration(t: dict) -> str:
    if not t.get("finished"):
        return "-"
    return human_duration((parse_iso(t["finished"]) - parse_iso(t["started"])).total_seconds())


def _detail(t: dict) -> str:
    f = t["fields"]
    bits = []
    for k in ("name", "source", "point"):
        if f.get(k):
            bits.append(f"{k} {str(f[k])[:12] if k == 'point' else f[k]}")
            if k == "name":
                break
    if t["error"]:
        bits.append(t["error"])
    elif t["warning_count"]:
        bits.append(f"{t['warning_count']} warning(s)")
    return "; ".join(bits)


def cmd_tasks(args) -> int:
    """``pointsafe tasks``: the recorded tasks, oldest first, filtered as asked (abandoned ones marked first)."""
    since = parse_since(args.since) if args.since else None
    with open_safe(args) as safe:
        alerts.sweep_abandoned(safe.index)
        rows = tasks.list_tasks(safe.index, state=args.state, since=since, kind=args.kind, last=args.last)
    if args.last:
        rows = rows[-args.last:]
    if args.json:
        emit_json(rows)
        return EXIT_OK
    if not rows:
        say(args, "no tasks" + (" match" if args.state or args.since or args.kind else " recorded yet"))
        return EXIT_OK
    say(args, f"{'ID':>5}  {'KIND':<8} {'STATE':<9} {'STARTED (UTC)':<19}  {'TOOK':>7}  DETAIL")
    for t in rows:
        say(args, f"{t['id']:>5}  {t['kind']:<8} {t['state']:<9} {t['started'][:19].replace('T', ' ')}  "
                  f"{_duration(t):>7}  {_detail(t)}")
    return EXIT_OK


def cmd_task_show(args) -> int:
    """``pointsafe tasks show ID``: one task with its details and warnings (UsageError when there is none)."""
    with open_safe(args) as safe:
        alerts.sweep_abandoned(safe.index)
        t = tasks.get(safe.index, args.id)
    if t is None:
        raise UsageError(f"no task {args.id} in this safe ('pointsafe tasks' lists them)")
    if args.json:
        emit_json(t)
        return EXIT_OK
    say(args, f"task {t['id']}: {t['kind']}, {t['state']}")
    say(args, f"  command   pointsafe {' '.join(t['argv'])}")
    say(args, f"  process   pid {t['pid']} on {t['host']}")
    say(args, f"  started   {t['started']}")
    say(args, f"  finished  {t['finished'] or '-'} (took {_duration(t)})")
    if t.get("exit_code") is not None:
        say(args, f"  exit code {t['exit_code']}")
    for k, v in sorted(t["fields"].items()):
        if isinstance(v, int) and not isinstance(v, bool) and k.startswith("bytes"):
            v = f"{v} ({human_bytes(v)})"
        say(args, f"  {k:<9} {v}")
    if t["error"]:
        say(args, f"  error     {t['error']}")
    if t["warning_count"]:
        say(args, f"  warnings  {t['warning_count']}" +
            (f" (first {len(t['warnings'])} kept)" if t["warning_count"] > len(t["warnings"]) else ""))
        for w in t["warnings"]:
            say(args, f"    {w['path'] + ': ' if w.get('path') else ''}{w['message']}")
    return EXIT_OK


# -- status --------------------------------------------------------------------------------------

def _ratio(x) -> str:
    return f"{x:.2f}x" if x else "-"


def _frag_text(f) -> str:
    if f is None:
        return ""
    if isinstance(f, dict) and "seeks_per_gib" in f:
        return (f", fragmentation {f['seeks_per_gib']:.0f} seeks/GiB (floor {f.get('minimum_per_gib', 0):.0f}, "
                f"{f.get('excess', 1):.1f}x)")
    if isinstance(f, dict) and "error" in f:
        return f", fragmentation unknown ({f['error']})"
    return f", fragmentation {f}"


def check_error(args, e: SafeError) -> int | None:
    """``status --check`` that could not start (no or a wrong password of an encrypted safe):
    the Nagios UNKNOWN line and code 3, not an ordinary error; None for plain ``status``."""
    if not getattr(args, "check", False):
        return None
    print(f"POINTSAFE UNKNOWN - {e}")
    return 3


def cmd_check(args) -> int:
    """``status --check``: one line for a monitoring system, Nagios exit codes."""
    try:
        with open_safe(args) as safe:
            st = build(safe)
    except SafeError as e:
        print(f"POINTSAFE UNKNOWN - {e}")
        return 3
    al = st["alerts"]
    n_src = len(st["sources"])
    perf = (f"| free={st['space']['free_pct']}%;;; sources={n_src} alerts={len(al)} "
            f"reclaimable={st['safe']['reclaimable_bytes']}B")
    if not al:
        print(f"POINTSAFE OK - {n_src} source(s), {st['safe']['points']} points, no open alerts {perf}")
        return 0
    code = 2 if any(a["severity"] == "critical" for a in al) else 1
    worst = sorted(al, key=lambda a: a["severity"] != "critical")[0]
    print(f"POINTSAFE {'CRITICAL' if code == 2 else 'WARNING'} - {len(al)} open alert(s); "
          f"#{worst['id']}: {worst['message']} {perf}")
    return code


def cmd_status(args) -> int:
    """``pointsafe status``: the safe, its space, its sources and open alerts; exit 2 when alerts are open
    (``--check``: the short form for monitoring)."""
    if args.check:
        return cmd_check(args)
    with open_safe(args) as safe:
        st = build(safe)
    if args.json:
        emit_json(st)
        return EXIT_OK if st["ok"] else EXIT_ALERTS
    s, sp = st["safe"], st["space"]
    say(args, f"safe {s['path']}: {s['points']} points, {human_bytes(s['size_on_disk'])} on disk "
              f"({s['packs']} packs)")
    say(args, f"  dedup {_ratio(s['dedup_ratio'])} ({human_bytes(s['logical_bytes'])} in points, "
              f"{human_bytes(s['unique_bytes'])} unique), compression {_ratio(s['compression_ratio'])}, "
              f"reclaimable {human_bytes(s['reclaimable_bytes'])}"
              + (f" (and {s['orphans']} orphans of an interrupted backup: 'pointsafe gc' buries them)"
                 if s.get("orphans") else "")
              + _frag_text(s["fragmentation"]))
    say(args, f"  filesystem: {human_bytes(sp['free'])} free of {human_bytes(sp['total'])} "
              f"({sp['free_pct']:.1f}%); quotas: soft {sp['quota_soft']}, hard {sp['quota_hard']}"
              + ("" if sp["state"] == "ok" else f"  ** below the {sp['state']} quota **"))
    say(args)
    if st["sources"]:
        say(args, f"{'SOURCE':<20} {'NEWEST POINT':<14} {'AGE':>8} {'EXPECTED':>9}  LAST BACKUP TASK")
        for src in st["sources"]:
            lp, lt = src["last_point"], src["last_task"]
            age = human_duration(lp["age_seconds"]) if lp else "-"
            exp = human_duration(src["interval_seconds"]) if src["interval_seconds"] else "off"
            task = f"{lt['id']} {lt['state']}" if lt else "-"
            say(args, f"{src['name'][:20]:<20} {lp['id'][:12] if lp else 'none':<14} {age:>8} {exp:>9}  {task}"
                      + ("  STALE" if src["stale"] else ""))
    else:
        say(args, "no sources yet: make a point with 'pointsafe backup'")
    say(args)
    for n in st["notes"]:
        say(args, f"note: {n}")
    if st["alerts"]:
        say(args, f"{len(st['alerts'])} open alert(s) ('pointsafe alerts ack ID' when handled):")
        for a in st["alerts"]:
            say(args, f"  #{a['id']} [{a['severity']}] {a['message']}")
        return EXIT_ALERTS
    say(args, "no open alerts")
    return EXIT_OK


# -- alerts --------------------------------------------------------------------------------------

def cmd_alerts(args) -> int:
    """``pointsafe alerts``: the open alerts (every one with --history), after updating the standing conditions."""
    with open_safe(args) as safe:
        try:
            alerts.sweep_abandoned(safe.index)
            alerts.evaluate(safe.index, safe.path)
        except Exception as e:  # a full disk must not hide the alerts already open
            say(args, f"note: could not update the alerts: {e}")
        rows = alerts.list_alerts(safe.index, include_acked=args.history)
    if args.json:
        emit_json(rows)
        return EXIT_OK
    if not rows:
        say(args, "no open alerts")
        return EXIT_OK
    for a in rows:
        acked = f"  (acknowledged {a['acked'][:19]}Z)" if a["acked"] else ""
        say(args, f"#{a['id']:<4} {a['severity']:<8} {a['raised'][:19].replace('T', ' ')}  {a['message']}{acked}")
    return EXIT_OK


def cmd_alerts_ack(args) -> int:
    """``pointsafe alerts ack``: acknowledge the given alerts, or all with --all (UsageError for an unknown id)."""
    if bool(args.ids) == bool(args.all):
        raise UsageError("give alert ids or --all (not both)")
    with open_safe(args) as safe:
        if args.ids:
            for i in args.ids:
                if alerts.get(safe.index, i) is None:
                    raise UsageError(f"no alert {i} in this safe ('pointsafe alerts' lists them)")
        done = alerts.ack(safe.index, None if args.all else args.ids)
    if args.json:
        emit_json({"acknowledged": [a["id"] for a in done]})
    else:
        say(args, f"acknowledged {len(done)} alert(s)" + (f": {', '.join(str(a['id']) for a in done)}" if done else ""))
    return EXIT_OK


# -- report --------------------------------------------------------------------------------------

def cmd_report(args) -> int:
    """``pointsafe report``: mail the open alerts and the task problems since the last report (unless
    there is nothing to say and no --always); --print-only prints the mail instead."""
    from pointsafe.ops import mail   # smtplib and ssl: only when a report is made
    since = parse_since(args.since) if args.since else None
    with open_safe(args) as safe:
        try:
            alerts.evaluate(safe.index, safe.path)
        except Exception as e:
            say(args, f"note: could not update the alerts: {e}")
        content = mail.gather(safe.index, since)
        settings = config.effective(config.load(safe.index))
        msg = mail.compose(content, str(safe.path), settings)
        empty = not content["tasks"] and not content["alerts"]
        result = {"subject": msg["Subject"], "tasks": len(content["tasks"]), "alerts": len(content["alerts"]),
                  "sent": False, "to": []}
        if args.print_only:
            print(msg.as_string())
            return EXIT_OK
        if empty and not args.always:
            say(args, "nothing to report: no open alerts and no task problems; no mail sent")
        else:
            result["to"] = mail.send(msg, settings)
            result["sent"] = True
            mail.mark_sent(safe.index)
            say(args, f"report sent to {', '.join(result['to'])}: {msg['Subject']}")
        tasks.report(**{k: v for k, v in result.items() if k != "subject"})
    if args.json:
        emit_json(result)
    return EXIT_OK


# -- config --------------------------------------------------------------------------------------

def cmd_config(args) -> int:
    """``pointsafe config [get|set|unset KEY [VALUE]]``: show or change the safe's settings."""
    with open_safe(args) as safe:
        if args.action is None:
            stored = {k: v for k, v in config.load(safe.index).items() if not k.startswith("state.")}
            eff = config.effective(stored)
            if args.json:
                emit_json({"settings": {k: v for k, v in eff.items()}, "stored": stored})
                return EXIT_OK
            for k in sorted(eff):
                v = "********" if k == "smtp.password" else eff[k]
                say(args, f"{k:<18} {v}{'' if k in stored else '   (default)'}")
            return EXIT_OK
        if not args.key:
            raise UsageError(f"'config {args.action}' needs a KEY")
        key = args.key.strip()
        if args.action == "get":
            eff = config.effective(config.load(safe.index))
            if key.startswith("interval.") and key not in eff:
                eff[key] = eff["interval.default"]
            if key not in eff:
                config.check_key(key)
                raise UsageError(f"{key} is not set")
            if args.json:
                emit_json({key: eff[key]})
            else:
                print(eff[key])
            return EXIT_OK
        if args.action == "set":
            if args.value is None:
                raise UsageError(f"'config set {key}' needs a VALUE")
            v = config.set_value(safe.index, key, args.value)
            out: dict[str, str | None] = {key: v}
        else:
            if args.value is not None:
                raise UsageError("'config unset' takes only a KEY")
            config.check_key(key)
            config.unset(safe.index, key)
            out = {key: None}
    if args.json:
        emit_json(out)
    else:
        say(args, f"{key} = {out[key]}" if out[key] is not None else f"{key} is back to its default")
    return EXIT_OK
