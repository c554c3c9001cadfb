"""A FUSE mount keeps returning correct bytes while gc and defrag move its packs."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from pointsafe.cas import Safe
from pointsafe.gc.collect import run_gc
from pointsafe.gc.defrag import defrag
from pointsafe.gc.forget import forget, plan_forget

from test_gc import _history



def _fuse_reason():
    from conftest import fuse_skip_reason
    return fuse_skip_reason()


@pytest.mark.skipif(_fuse_reason() is not None, reason=str(_fuse_reason()))
def test_a_mount_reads_correct_bytes_while_gc_and_defrag_move_its_packs(tmp_path, cli):
    import threading

    import blake3
    path, hist = _history(tmp_path, 8, files=10, size=256 * 1024)
    newest, digests = hist[-1]
    with Safe.open(path) as safe:
        forget(safe, plan_forget(safe, [hist[i][0].id for i in range(4)]))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    log = open(tmp_path / "mount.log", "w+")
    fs = subprocess.Popen([sys.executable, "-m", "pointsafe.cli", "--safe", str(path), "mount", "--foreground",
                           str(mnt), newest.id[:12], "--cache-size", "1M"], stdout=log, stderr=log)
    deadline = time.time() + 60
    while not os.path.ismount(mnt):
        if fs.poll() is not None or time.time() > deadline:
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False)
            fs.kill()
            log.seek(0)
            pytest.fail(f"the mount did not come up: {log.read()}")
        time.sleep(0.05)
    errors: list[str] = []
    rounds = [0]
    stop = threading.Event()

    def read_all() -> None:
        while not stop.is_set() and len(errors) < 10:
            for rel, want in digests.items():
                try:
                    fd = os.open(mnt / rel, os.O_RDONLY)
                    try:
                        h = blake3.blake3()
                        while piece := os.read(fd, 1 << 20):
                            h.update(piece)
                        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)   # read through FUSE again next time
                    finally:
                        os.close(fd)
                    if h.hexdigest() != want:
                        errors.append(f"{rel}: wrong bytes")
                except OSError as e:
                    errors.append(f"{rel}: {e}")
            rounds[0] += 1

    t = threading.Thread(target=read_all)
    t.start()
    try:
        with Safe.open(path) as safe:
            assert run_gc(safe, threshold=0.0).packs_rewritten
            assert defrag(safe).objects_moved
            assert run_gc(safe, threshold=0.0).objects_freed == 0
        time.sleep(0.3)
    finally:
        stop.set()
        t.join(timeout=120)
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False)
        try:
            fs.wait(timeout=30)
        except subprocess.TimeoutExpired:
            fs.kill()
        log.close()
    assert errors == []
    assert rounds[0] >= 2
