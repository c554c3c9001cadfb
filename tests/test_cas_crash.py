"""A writer killed with SIGKILL at any moment leaves a safe that verifies, with every commit intact."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from pointsafe.cas import Kind, Safe, verify

from _cas_util import TESTS, check_object, check_point

TRIALS = 30


def _read_log(path: Path) -> list[tuple[str, str]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        word, _, arg = line.partition(" ")
        out.append((word, arg))
    return out


def _wait_ready(log: Path, proc: subprocess.Popen, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(w == "ready" for w, _ in _read_log(log)):
            return
        assert proc.poll() is None, f"writer exited early: {proc.stderr.read().decode()}"
        time.sleep(0.005)
    raise AssertionError("writer did not start")


def test_sigkill_at_random_moments_keeps_every_commit(safe_dir, cli):
    _sigkill_trials(safe_dir, TRIALS)

    # Finally, the CLI agrees, and a normal writer carries on (truncating any torn tail).
    r = cli("verify", "--data", "--json", safe=safe_dir)
    assert r.code == 0, r.out + r.err
    assert json.loads(r.out)["ok"]
    _writer_carries_on(safe_dir)


def test_sigkill_of_a_writer_of_an_encrypted_safe_keeps_every_commit(tmp_path, monkeypatch):
    monkeypatch.setenv("POINTSAFE_KDF_MEMORY_KIB", "8192")
    monkeypatch.setenv("POINTSAFE_KDF_TIME", "1")
    monkeypatch.setenv("POINTSAFE_PASSWORD", "crash pw")
    safe_dir = tmp_path / "safe"
    Safe.init(safe_dir, pack_size=256 * 1024, encryption="aes-256-gcm", password=b"crash pw").close()
    _sigkill_trials(safe_dir, TRIALS // 2, b"crash pw")
    _writer_carries_on(safe_dir, b"crash pw")


def _writer_carries_on(safe_dir: Path, password: bytes | None = None) -> None:
    with Safe.open(safe_dir, password=password) as safe:
        with safe.writer() as w:
            k = w.put(Kind.CHUNK, b"after the crashes")
        assert safe.get(k) == b"after the crashes"
        for pid, pe in safe.pack_entries().items():
            assert safe.pack_path(pid).stat().st_size == pe.committed_len
        indexed = set(safe.pack_entries())
        on_disk = {int(p.name[:16], 16) for p in safe.packs_dir.iterdir()}
        assert on_disk == indexed


def _sigkill_trials(safe_dir: Path, trials: int, password: bytes | None = None) -> None:
    """``trials`` writer processes (tests/_kill_writer.py) killed at random moments; after each,
    the safe verifies with --data and everything the writer logged as committed is there."""
    rng = random.Random(20261125)
    committed: set[bytes] = set()
    points: dict[str, str] = {}      # id -> "live" | "forgetting" | "forgot"
    killed_mid_work = 0
    for trial in range(trials):
        log = safe_dir.parent / f"log{trial}"
        proc = subprocess.Popen([sys.executable, str(TESTS / "_kill_writer.py"), str(safe_dir), str(log),
                                 str(trial)], stderr=subprocess.PIPE)
        try:
            if trial % 6 == 5:
                time.sleep(rng.uniform(0.05, 0.3))        # somewhere in start-up or recovery
            else:
                _wait_ready(log, proc)
                time.sleep(rng.uniform(0.0, 0.35))        # somewhere in writing or committing
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
            assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stderr.close()
        entries = _read_log(log)
        killed_mid_work += any(w == "chunk" for w, _ in entries)
        for word, arg in entries:
            if word == "chunk":
                committed.add(bytes.fromhex(arg))
            elif word == "point":
                points[arg] = "live"
            elif word in ("forgetting", "forgot"):
                points[arg] = word

        with Safe.open(safe_dir, password=password) as safe:
            rep = verify(safe, data=True)
            assert rep.ok, f"trial {trial}: {rep.errors}"
            for k in committed:
                check_object(safe, k)
            present = {p.id for p in safe.points()}
            for pid, state in points.items():
                if state == "live":
                    assert pid in present, f"trial {trial}: committed point {pid[:12]} is gone"
                elif state == "forgot":
                    assert pid not in present, f"trial {trial}: forgotten point {pid[:12]} is back"
            for p in safe.points():
                check_point(safe, p)
    # The trials did hit the writer while it worked, not only at start-up.
    assert killed_mid_work >= trials // 3
    assert len(committed) > 50 and sum(s == "live" for s in points.values()) > 2


def test_sigkill_during_repair_leaves_a_safe_that_repair_finishes(safe_dir):
    from _cas_util import make_point
    from pointsafe.cas import NotASafe, repair
    rng = random.Random(5)
    with Safe.open(safe_dir) as safe:
        with safe.writer() as w:
            pts = [make_point(w, "r", {f"f{j}".encode(): [rng.randbytes(rng.randint(10, 3000)) for _ in range(8)]
                                       for j in range(40)}) for _ in range(8)]
    t = time.monotonic()
    repair(safe_dir)
    took = time.monotonic() - t
    for _trial in range(6):
        proc = subprocess.Popen([sys.executable, "-c", "import sys; from pointsafe.cas import repair; "
                                 "print('go', flush=True); repair(sys.argv[1])", str(safe_dir)],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        assert proc.stdout.readline() == b"go\n"
        time.sleep(rng.uniform(0, took))        # somewhere inside the rebuild or the swap
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        proc.stdout.close()
        try:
            Safe.open(safe_dir).close()        # the old index, the new one, or none ...
        except NotASafe as e:
            assert "repair" in str(e)          # ... and then the message says what to do
        repair(safe_dir)
        with Safe.open(safe_dir) as safe:
            assert {p.id for p in safe.points()} == {p.id for p in pts}
            assert verify(safe, data=True).ok
        assert not (safe_dir / "index.rebuild").exists() and not (safe_dir / "index.old").exists()
