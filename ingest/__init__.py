"""The ingest room: sources become recovery points, points become files again.

``backup`` reads a directory tree or a volume through the pipeline (``pipeline``, ``walk``,
``volume``, ``chunking``) into the safe; ``restore`` writes a point back out; ``browse``
navigates and compares point trees (ls, diff); ``db`` makes points database-consistent.
"""

from .backup import BackupOptions, BackupResult, HookFailed, backup, graft

__all__ = ["BackupOptions", "BackupResult", "HookFailed", "backup", "graft"]
