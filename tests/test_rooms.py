"""The rooms' imports point one way (DESIGN.md, Code): nothing in cas/ imports another room, and
no two rooms import each other, directly or round a longer loop (a loop is how a room ends up
needing the whole program to be imported or tested)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ROOMS = ("cas", "ingest", "fusefs", "gc", "ops", "server", "web", "cli")


def imports_of(room: str) -> dict[str, str]:
    """Other rooms that ``room`` imports -> one file that does (absolute imports, anywhere in a file)."""
    out: dict[str, str] = {}
    for f in sorted((ROOT / room).rglob("*.py")):
        for n in ast.walk(ast.parse(f.read_text(), str(f))):
            mods = [n.module] if isinstance(n, ast.ImportFrom) and n.module and n.level == 0 else \
                [a.name for a in n.names] if isinstance(n, ast.Import) else []
            for m in mods:
                parts = m.split(".")
                if parts[0] == "pointsafe" and len(parts) > 1 and parts[1] in ROOMS and parts[1] != room:
                    out.setdefault(parts[1], str(f.relative_to(ROOT)))
    return out


def test_cas_imports_no_other_room():
    assert imports_of("cas") == {}


def test_no_two_rooms_import_each_other_round_any_loop():
    graph = {r: imports_of(r) for r in ROOMS}

    def loop_from(start: str) -> list[str] | None:
        stack = [(start, [start])]
        while stack:
            room, path = stack.pop()
            for nxt in graph[room]:
                if nxt == start:
                    return path + [nxt]
                if nxt not in path:
                    stack.append((nxt, path + [nxt]))
        return None

    for r in ROOMS:
        loop = loop_from(r)
        assert loop is None, "rooms import each other round a loop: " + " -> ".join(
            f"{a} ({graph[a][b]})" for a, b in zip(loop, loop[1:]))
