"""Disk-space quotas of a safe: how much of its filesystem must stay free.

The soft quota raises an alert (and warns on the terminal); the hard quota refuses to start a
backup and stops a running one: the CLI installs :func:`guard` as the writers' space check
(``Safe.writer(space_check=...)``), which the writer calls before appending, at most
once per few MiB. Free space is what an unprivileged user could still write (``f_bavail``),
so the filesystem's root reserve counts as used.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from pointsafe.cas import QuotaExceeded

from .config import parse_quota


@dataclass(frozen=True)
class Space:
    """A filesystem's size and the bytes still free for an unprivileged writer."""
    total: int   # bytes of the filesystem usable for data
    free: int    # bytes an unprivileged writer could still use

    @property
    def free_pct(self) -> float:
        """Free space as a percentage of the total (0 for a filesystem of no size)."""
        return 100.0 * self.free / self.total if self.total else 0.0


def space(path: str | Path) -> Space:
    """The size and free space of the filesystem holding ``path``."""
    st = os.statvfs(path)
    return Space(total=st.f_blocks * st.f_frsize, free=st.f_bavail * st.f_frsize)


def limit_bytes(setting: str, total: int) -> float | None:
    """The free bytes a quota setting asks for (None: off)."""
    q = parse_quota(setting)
    if q is None:
        return None
    kind, v = q
    return total * v / 100.0 if kind == "percent" else v


def _describe(setting: str) -> str:
    q = parse_quota(setting)
    return "off" if q is None else (f"{q[1]:g}% free" if q[0] == "percent" else f"{setting} free")


def state(sp: Space, settings: dict[str, str]) -> str:
    """``ok``, ``soft`` (below the soft quota) or ``hard`` (below the hard quota)."""
    hard = limit_bytes(settings["quota.hard"], sp.total)
    soft = limit_bytes(settings["quota.soft"], sp.total)
    if hard is not None and sp.free < hard:
        return "hard"
    if soft is not None and sp.free < soft:
        return "soft"
    return "ok"


def describe(sp: Space, settings: dict[str, str], which: str) -> str:
    """One line a person understands, e.g. for an alert or a warning."""
    return (f"the safe's filesystem has {human_bytes(sp.free)} free ({sp.free_pct:.1f}% of {human_bytes(sp.total)}); "
            f"the {which} quota keeps {_describe(settings['quota.' + which])}")


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB' (binary units)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def preflight(safe_dir: str | Path, settings: dict[str, str]) -> None:
    """Refuse to start a backup below the hard quota."""
    sp = space(safe_dir)
    if state(sp, settings) == "hard":
        raise QuotaExceeded("backup refused: " + describe(sp, settings, "hard")
                            + "; free space, run 'pointsafe forget' and 'pointsafe gc', or change the quota")


def guard(settings: dict[str, str]) -> Callable[[Path, int], None]:
    """A writer space check enforcing the hard quota (``Safe.writer(space_check=...)``)."""
    setting = settings["quota.hard"]

    def check(safe_dir: Path, about_to_write: int) -> None:
        sp = space(safe_dir)
        hard = limit_bytes(setting, sp.total)
        if hard is not None and sp.free - about_to_write < hard:
            raise QuotaExceeded(f"backup stopped, no point was made: the safe's filesystem is down to "
                                f"{human_bytes(sp.free)} free ({sp.free_pct:.1f}% of {human_bytes(sp.total)}) and writing on "
                                f"would cross the hard quota ({_describe(setting)}); "
                                "'pointsafe gc' reclaims what it wrote")
    return check
