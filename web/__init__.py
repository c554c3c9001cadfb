"""The web dashboard of one open safe (``pointsafe web``): pages and JSON over the same facts as
``status``, ``tasks``, ``alerts``, ``points``, ``ls`` and ``diff``, and downloads of files,
directories (tar, zip) and volume images.

The room is handed an open :class:`pointsafe.cas.Safe` by the command line and never opens a
safe by path, so it works the same for every kind of safe the CLI can open. Arrows: web ->
ingest/ops/gc/cas; nothing imports web but the CLI. See docs/WEB.md.
"""

from .app import create_app

__all__ = ["create_app"]
