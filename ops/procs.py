"""Is the process that started a task still running?

A task records its pid, the host name, the kernel's boot id and the process start time (field
22 of ``/proc/PID/stat``, clock ticks since boot). A pid alone is not enough: pids are reused,
and a reboot starts counting again. A task is dead when it ran on this host and the boot id
differs, the pid is gone, or the pid now belongs to a process that started at another time.
Tasks of other hosts (a safe on shared storage) are never judged.
"""

from __future__ import annotations

import os
import socket


def boot_id() -> str:
    """This boot's id (/proc/sys/kernel/random/boot_id), or "" when it cannot be read."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def start_token(pid: int) -> str | None:
    """The start time of process ``pid`` in clock ticks since boot, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rindex(b")") + 2:].split()
    if fields[0] in (b"Z", b"X"):
        return None                 # a zombie: killed, not yet reaped by its parent
    return fields[19].decode()      # field 22 overall; fields[0] is field 3 (state)


def identity() -> dict:
    """What identifies this process for the abandoned-task sweep: pid, host, boot id, start time."""
    pid = os.getpid()
    return {"pid": pid, "host": socket.gethostname(), "boot_id": boot_id(), "proc_start": start_token(pid)}


def is_dead(task: dict) -> bool:
    """True when the task's process is certainly gone (see the module docstring)."""
    if task.get("host") != socket.gethostname():
        return False
    if task.get("boot_id") and task.get("boot_id") != boot_id():
        return True
    pid = task.get("pid")
    if not isinstance(pid, int):
        return False
    token = start_token(pid)
    if token is None:
        return True
    recorded = task.get("proc_start")
    return recorded is not None and token != recorded
