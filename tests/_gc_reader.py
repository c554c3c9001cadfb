"""A reader process for the concurrency tests (run as a script, not collected).

    python tests/_gc_reader.py SAFE EXPECTED_JSON STOP_FILE OUT_JSON

Reads every point named in EXPECTED_JSON ({point id: {path: digest}}) through Safe.get, over
and over until STOP_FILE exists, and writes {"rounds": n, "errors": [...]} to OUT_JSON.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from pointsafe.cas import Safe  # noqa: E402

from _gc_util import tree_digests  # noqa: E402


def main() -> None:
    safe_dir, expected_path, stop, out = sys.argv[1:5]
    expected = json.loads(Path(expected_path).read_text())
    rounds, errors = 0, []
    with Safe.open(safe_dir) as safe:
        Path(out + ".ready").touch()
        while not os.path.exists(stop) and len(errors) < 20:
            for pid, digests in expected.items():
                try:
                    got = tree_digests(safe, bytes.fromhex(digests["__root__"]))
                    got["__root__"] = digests["__root__"]
                    if got != digests:
                        errors.append(f"point {pid[:12]}: wrong data")
                except Exception as e:  # noqa: BLE001 - every failure is a finding
                    errors.append(f"point {pid[:12]}: {type(e).__name__}: {e}")
            rounds += 1
    Path(out).write_text(json.dumps({"rounds": rounds, "errors": errors}))


if __name__ == "__main__":
    main()
