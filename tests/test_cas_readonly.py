"""A safe on a read-only filesystem can be read (points, ls, restore, verify), and a user who may
not read the safe is told "permission denied", not to run repair (issue 10)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from _cas_util import read_only_bind
from conftest import ROOT, needs_root, run_cli
from pointsafe.cas import Safe, SafeError


@needs_root
def test_a_safe_on_a_read_only_filesystem_can_be_read(safe_with_point, tmp_path):
    safe, point, src = safe_with_point
    with read_only_bind(safe, tmp_path / "ro") as ro:
        assert os.statvfs(ro).f_flag & os.ST_RDONLY
        r = run_cli("points", "--json", safe=ro)
        assert r.code == 0, r.err
        assert [p["id"] for p in json.loads(r.out)] == [point]
        r = run_cli("ls", point, "d", safe=ro)
        assert r.code == 0 and "f" in r.out, r.err
        r = run_cli("restore", point, tmp_path / "out", safe=ro)
        assert r.code == 0, r.err
        assert (tmp_path / "out" / "d" / "f").read_bytes() == (src / "d" / "f").read_bytes()
        r = run_cli("verify", "--data", safe=ro)
        assert r.code == 0 and r.out.splitlines()[-1].startswith("ok:"), r.out + r.err
        for r in (run_cli("points", safe=ro), run_cli("verify", safe=ro)):
            assert "repair" not in r.err, r.err

        with Safe.open(ro) as s:        # opened read-only on its own; writing says so
            assert s.readonly
            with pytest.raises(SafeError, match="read-only"):
                s.index.write()
        with pytest.raises(SafeError, match="read-only filesystem"):
            Safe.open(ro, write=True)
        r = run_cli("backup", src, safe=ro)     # (ops notes that it cannot record the task)
        errors = [ln for ln in r.err.splitlines() if ln.startswith("pointsafe: error:")]
        assert r.code == 1 and len(errors) == 1 and "Read-only file system" in errors[0], r.err
    # On the writable path the same safe still takes a writer.
    with Safe.open(safe) as s:
        assert not s.readonly
        with s.writer("test"):
            pass


@needs_root
def test_a_user_without_permission_is_told_so(safe_with_point):
    safe, point, _ = safe_with_point
    # A directory every user may enter, holding a copy of root's (0700) safe.
    outer = Path(tempfile.mkdtemp(prefix="pointsafe-perm-", dir="/tmp"))
    try:
        os.chmod(outer, 0o755)
        mine = outer / "safe"
        shutil.copytree(safe, mine)
        os.chmod(mine, 0o700)   # (what init makes; tests/test_cas_faults.py checks that)
        cmd = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
               sys.executable, "-m", "pointsafe.cli", "--safe", str(mine)]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "HOME": "/tmp"}
        for args in (["points"], ["ls", point], ["verify"], ["repair"]):
            p = subprocess.run(cmd + args, capture_output=True, timeout=120, env=env, cwd="/tmp", check=False)
            err = p.stderr.decode()
            assert p.returncode == 1, (args, err)
            line = [ln for ln in err.splitlines() if ln.startswith("pointsafe: error:")]
            assert len(line) == 1 and "permission denied" in line[0].lower(), (args, err)
            assert "repair" not in line[0] and "Traceback" not in err, (args, err)

        # Readable but not writable by others (an old 0755 safe): readers still read it,
        # read-only; LMDB's lock file is root's, so a reader that cannot use it says so.
        subprocess.run(["chmod", "-R", "go+rX", str(mine)], check=True)
        p = subprocess.run(cmd + ["points", "--json"], capture_output=True, timeout=120, env=env, cwd="/tmp",
                           check=False)
        err = p.stderr.decode()
        assert "Traceback" not in err and "repair" not in err, err
        if p.returncode != 0:
            assert "permission denied" in err.lower(), err
        else:
            assert point in p.stdout.decode()
    finally:
        shutil.rmtree(outer, ignore_errors=True)
