"""pointsafe: continuous-data-protection backups into a content-addressed safe.

The rooms live in top-level folders mapped into this namespace by pyproject.toml:
``pointsafe.cas`` (the safe), ``pointsafe.ingest`` (backups and restores),
``pointsafe.fusefs`` (the FUSE browser), ``pointsafe.gc`` (retention, GC, defrag) and
``pointsafe.cli`` (the command).
"""

__version__ = "0.1.0"
