"""ops room: making trouble visible before a restore is needed.

Task history (``tasks``), alerts that stay until acknowledged (``alerts``), per-safe settings
kept in the safe's LMDB index (``config``), disk-space quotas (``quota``), the status page
(``status``), logs to a JSON-lines file or syslog (``logs``) and the e-mail report
(``mail``). ``recorder`` wraps every CLI command that declares a task kind.

Imports only ``pointsafe.cas`` (and, guarded, ``pointsafe.gc.fragmentation`` for the status
page). Commands report details of the running task through :func:`tasks.report` and
:func:`tasks.add_warning`, which do nothing when no task is being recorded.
"""

from .tasks import add_warning, report

__all__ = ["add_warning", "report"]
