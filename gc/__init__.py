"""The gc room: retention (forget), reference-counted collection, pack compaction, defragmentation.

One module per job, each split into a plan (reads only: ``--dry-run`` and reports) and an
execution under the safe's writer lock:

- ``retention``: which points a keep-last/hourly/daily/weekly/monthly/yearly policy keeps (pure);
- ``forget``: drop points (named or by policy) and drain their releases (cas/release.py);
- ``collect``: gc: bury orphans, drop dead objects, delete empty packs, compact (``compact``);
- ``defrag``: rewrite the newest points' chunks in file order (``walk``), then compact;
- ``fragmentation``: the seeks-per-GiB figure that ``status``, ``gc`` and ``defrag`` report.

The primitives that touch packs and the index (relocation, dropping, the release queue and the
refcount audit) live in cas/ (relocate.py, release.py, audit.py): cas never imports this room.
"""
