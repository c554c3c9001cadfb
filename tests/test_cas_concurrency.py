"""One writer at a time, with a clear message; readers in other processes see consistent views."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from pointsafe.cas import Kind, Safe, SafeLocked

from _cas_util import TESTS, check_point, make_point

HOLDER = textwrap.dedent("""
    import sys, time
    from pointsafe.cas import Safe
    s = Safe.open(sys.argv[1])
    with s.writer("backup /srv"):
        print("locked", flush=True)
        time.sleep(60)
""")

READER = textwrap.dedent("""
    import sys
    from pointsafe.cas import Safe, Kind, object_key
    keys = [bytes.fromhex(k) for k in sys.argv[2:]]
    with Safe.open(sys.argv[1]) as s:
        for _ in range(200):
            for k in keys:
                assert object_key(Kind.CHUNK, s.get(k)) == k
    print("ok", flush=True)
""")


def _start_holder(safe_dir) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(safe_dir)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    line = p.stdout.readline()
    assert line == b"locked\n", p.stderr.read().decode()
    return p


def test_second_writer_in_the_same_process_is_refused(safe):
    with safe.writer("backup /home"):
        with pytest.raises(SafeLocked) as ei:
            safe.writer("gc")
        msg = str(ei.value)
        assert f"pid {os.getpid()}" in msg and "backup /home" in msg and "\n" not in msg
    with safe.writer("gc") as w:            # free again once the first one is done
        w.put(Kind.CHUNK, b"x")


def test_second_writer_in_another_process_gets_a_clear_message(safe_dir, cli):
    with Safe.open(safe_dir) as safe:
        with safe.writer() as w:
            keys = [w.put(Kind.CHUNK, os.urandom(5000)) for _ in range(5)]
    holder = _start_holder(safe_dir)
    try:
        r = cli("repair", safe=safe_dir)
        assert r.code == 1
        lines = r.err.strip().splitlines()
        assert len(lines) == 1, r.err
        assert "busy" in lines[0] and f"pid {holder.pid}" in lines[0] and "backup /srv" in lines[0]
        with Safe.open(safe_dir) as safe:
            with pytest.raises(SafeLocked, match=f"pid {holder.pid}"):
                safe.writer()
            # Readers are not blocked by the writer lock, in this process or in others.
            assert safe.get(keys[0])
        readers = [subprocess.Popen([sys.executable, "-c", READER, str(safe_dir), *(k.hex() for k in keys)],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(3)]
        for rp in readers:
            out, err = rp.communicate(timeout=60)
            assert rp.returncode == 0 and out == b"ok\n", err.decode()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=10)
    # A killed holder's lock goes with it.
    with Safe.open(safe_dir) as safe:
        with safe.writer() as w:
            w.put(Kind.CHUNK, b"after the holder died")
    assert cli("verify", safe=safe_dir).code == 0


def test_reader_sees_a_consistent_view_while_a_writer_commits(safe_dir):
    with Safe.open(safe_dir) as safe:
        with safe.writer() as w:
            make_point(w, "seed", {b"f": [os.urandom(1000)]})
    log = safe_dir.parent / "writer.log"
    writer = subprocess.Popen([sys.executable, str(TESTS / "_kill_writer.py"), str(safe_dir), str(log), "1", "4"],
                              stderr=subprocess.PIPE)
    seen: set[str] = set()
    rounds = objects = 0
    try:
        reader = Safe.open(safe_dir)
        try:
            deadline = time.monotonic() + 30
            while writer.poll() is None and time.monotonic() < deadline:
                rounds += 1
                if rounds % 5 == 0:             # long-lived readers and fresh ones
                    reader.close()
                    reader = Safe.open(safe_dir)
                pts = reader.points()
                assert pts, "the reader saw no points"
                seen.update(p.id for p in pts)
                for p in pts[-3:]:
                    # Every point a reader can list reaches only objects it can read.
                    objects += check_point(reader, p)
                with reader.index.read() as t:  # one snapshot: every indexed point's object is there
                    for k, _ in t.cursor(db=reader.index.db["points"]):
                        assert reader.index.get_object(t, bytes(k)) is not None
        finally:
            reader.close()
        writer.wait(timeout=30)
        assert writer.returncode == 0, writer.stderr.read().decode()
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
        writer.stderr.close()
    assert rounds > 5 and objects > 0
    assert len(seen) >= 3, "the reader never saw the writer's new points"


def test_opening_a_safe_twice_in_one_process_says_so(safe):
    from pointsafe.cas import NotASafe, SafeError
    with pytest.raises(SafeError, match="already open in this process") as ei:
        Safe.open(safe.path)
    assert not isinstance(ei.value, NotASafe) and "repair" not in str(ei.value)
