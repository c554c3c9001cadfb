"""A writer process for the crash and concurrency tests (run as a script, not collected).

    python tests/_kill_writer.py SAFE LOG SEED [SECONDS]

Writes batches of random chunks and points into SAFE forever (or for SECONDS), forgetting an
old point now and then. After each commit *returns* it appends what it committed to LOG, one
line per fact, so that whatever the log says was committed must survive a SIGKILL:

    ready
    chunk <key hex>        committed (flush returned)
    point <id hex>         committed
    forgetting <id hex>    about to forget (may or may not be committed when killed)
    forgot <id hex>        forget committed
"""

from __future__ import annotations

import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from pointsafe.cas import Kind, Safe  # noqa: E402
from pointsafe.cas.parallel import put_many  # noqa: E402
from pointsafe.cas.release import forget_points  # noqa: E402

from _cas_util import make_point, random_bytes  # noqa: E402


def main() -> None:
    safe_path, log_path, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
    until = time.monotonic() + float(sys.argv[4]) if len(sys.argv) > 4 else None
    rng = random.Random(seed)
    log = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def say(*lines: str) -> None:
        if lines:
            os.write(log, "".join(line + "\n" for line in lines).encode())

    recent: list[bytes] = []
    live: list[str] = []
    safe = Safe.open(safe_path, password=os.environb.get(b"POINTSAFE_PASSWORD"))   # an encrypted safe's
    live = [p.id for p in safe.points()]
    say("ready")
    n = 0
    while until is None or time.monotonic() < until:
        with safe.writer("kill-writer") as w:
            for _ in range(rng.randint(1, 4)):
                datas = []
                for _ in range(rng.randint(1, 25)):
                    if recent and rng.random() < 0.2:
                        data = rng.choice(recent)          # a duplicate
                    else:
                        size = rng.choice([0, 7, 900, 20_000, 65_536, 65_536])
                        data = random_bytes(rng, size, rng.random() < 0.5)
                        recent = (recent + [data])[-40:]
                    datas.append(data)
                if rng.random() < 0.5:                     # the threaded front end, or one by one
                    keys = put_many(w, Kind.CHUNK, datas, threads=2, group_bytes=100_000)
                else:
                    keys = [w.put(Kind.CHUNK, d) for d in datas]
                r = rng.random()
                if r < 0.35:
                    n += 1
                    files = {f"f{i}".encode(): [d, rng.randint(1, 100_000)] for i, d in enumerate(datas[:6])}
                    p = make_point(w, f"job{n % 3}", files, fanout=3,
                                   subdir={b"s": datas[6:9]} if len(datas) > 6 else None)
                    live.append(p.id)
                    say(*(f"chunk {k.hex()}" for k in keys), f"point {p.id}")
                elif r < 0.45 and len(live) > 3:
                    victim = live.pop(0)
                    say(f"forgetting {victim}")
                    forget_points(w, [bytes.fromhex(victim)])
                    say(*(f"chunk {k.hex()}" for k in keys), f"forgot {victim}")
                else:
                    w.flush()
                    say(*(f"chunk {k.hex()}" for k in keys))
    safe.close()


if __name__ == "__main__":
    main()
