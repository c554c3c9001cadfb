"""The e-mail report (``pointsafe report``, run by a timer): tasks that ended in warning, error
or abandoned since the last report, and every open alert, sent through the SMTP settings kept
in the safe (ops/config.py). Nothing to report, nothing sent (unless asked to)."""

from __future__ import annotations

import smtplib
import socket
import ssl
from email.message import EmailMessage

from pointsafe.cas import SafeError, UsageError

from . import alerts, config, tasks
from .clock import iso, real_now

LAST_KEY = "state.report_last"   # kept in the config table, hidden from 'pointsafe config'


class ReportError(SafeError):
    """The report could not be sent (the SMTP server refused or was unreachable)."""


def gather(index, since: str | None = None) -> dict:
    """What the next report says: problem tasks since ``since`` (default: the last report)."""
    stored = config.load(index)
    if since is None:
        since = stored.get(LAST_KEY)
    # through the task index's state facets: the problem tasks only, not the whole history
    bad = sorted((t for state in ("warning", "error", "abandoned") for t in tasks.list_tasks(index, state=state)
                  if since is None or (t["finished"] or t["started"]) >= since), key=lambda t: t["id"])
    return {"since": since, "tasks": bad, "alerts": alerts.list_alerts(index)}


def compose(content: dict, safe_path: str, settings: dict[str, str]) -> EmailMessage:
    """The report mail for ``content`` (from :func:`gather`): a subject counting open alerts and
    task problems, and a plain-text body listing them, from the configured sender."""
    bad, open_alerts = content["tasks"], content["alerts"]
    host = socket.gethostname()
    msg = EmailMessage()
    msg["Subject"] = (f"pointsafe on {host}: {len(open_alerts)} open alert{'s' if len(open_alerts) != 1 else ''}, "
                      f"{len(bad)} task{'s' if len(bad) != 1 else ''} with problems")
    msg["From"] = settings["smtp.from"]
    msg["To"] = settings.get("smtp.to", "")
    lines = [f"Safe {safe_path} on {host}, report of {iso(real_now())}.", ""]
    if open_alerts:
        lines.append(f"Open alerts ({len(open_alerts)}); acknowledge with 'pointsafe alerts ack ID':")
        for a in open_alerts:
            lines.append(f"  #{a['id']} [{a['severity']}] {a['raised'][:19]}Z  {a['message']}")
        lines.append("")
    if bad:
        since = f" since {content['since'][:19]}Z" if content["since"] else ""
        lines.append(f"Tasks that ended in warning, error or abandoned{since} ({len(bad)}):")
        for t in bad:
            lines.append(f"  task {t['id']} {t['kind']} {t['state']}, started {t['started'][:19]}Z: "
                         f"{t['error'] or ''}".rstrip(": "))
            for w in t["warnings"][:10]:
                lines.append(f"      {w['path'] + ': ' if w.get('path') else ''}{w['message']}")
            if t["warning_count"] > 10:
                lines.append(f"      ... and {t['warning_count'] - 10} more warnings ('pointsafe tasks show {t['id']}')")
        lines.append("")
    if not open_alerts and not bad:
        lines.append("Nothing to report: no open alerts and no task problems.")
    lines.append("See 'pointsafe status' for the whole picture.")
    msg.set_content("\n".join(lines) + "\n")
    return msg


def send(msg: EmailMessage, settings: dict[str, str], timeout: float = 30) -> list[str]:
    """Send through the configured server; returns the recipients. ReportError on failure."""
    host = settings.get("smtp.host")
    to = [a.strip() for a in settings.get("smtp.to", "").split(",") if a.strip()]
    if not host or not to:
        raise UsageError("no mail server or recipient configured: set them with "
                         "'pointsafe config set smtp.host HOST' and 'pointsafe config set smtp.to ADDRESS'")
    port = int(settings["smtp.port"])
    security = settings.get("smtp.security", "none")
    try:
        conn: smtplib.SMTP
        if security == "ssl":
            conn = smtplib.SMTP_SSL(host, port, timeout=timeout, context=ssl.create_default_context())
        else:
            conn = smtplib.SMTP(host, port, timeout=timeout)
        with conn:
            if security == "starttls":
                conn.starttls(context=ssl.create_default_context())
            if settings.get("smtp.user"):
                conn.login(settings["smtp.user"], settings.get("smtp.password", ""))
            conn.send_message(msg, from_addr=settings["smtp.from"], to_addrs=to)
    except (OSError, smtplib.SMTPException) as e:
        raise ReportError(f"cannot send the report through {host}:{port}: {e}") from None
    return to


def mark_sent(index) -> str:
    """Remember now as the time of the last report sent (the default --since of the next one); returns that time."""
    stamp = iso(real_now())
    table = config.ensure_tables(index)["config"]
    with index.write() as t:
        config.put(table, t, LAST_KEY, stamp)
    return stamp
