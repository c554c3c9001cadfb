"""A safe this process may not write (a read-only filesystem, a safe the user may read but not
write) is read without a word about task recording: it cannot hold a task history, and a note
on every command would be noise. Real recording failures (a full disk) are still noted
(tests/test_ops_quota.py)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from _cas_util import read_only_bind
from conftest import ROOT, needs_root, run_cli


def _tasks(safe: Path) -> list[dict]:
    return json.loads(run_cli("tasks", "--json", safe=safe, check=True).out)


@needs_root
def test_commands_on_a_read_only_filesystem_print_no_recording_note(safe_with_point, tmp_path):
    safe, point, src = safe_with_point
    before = _tasks(safe)
    with read_only_bind(safe, tmp_path / "ro") as ro:
        assert os.statvfs(ro).f_flag & os.ST_RDONLY
        for args in (["points"], ["ls", point, "d"], ["restore", point, str(tmp_path / "out")]):
            r = run_cli(*args, safe=ro)
            assert r.code == 0, (args, r.err)
            assert "note" not in r.err and "could not record" not in r.err, (args, r.err)
        assert (tmp_path / "out" / "d" / "f").read_bytes() == (src / "d" / "f").read_bytes()
        # A write still fails with its one error line, and no recording note beside it.
        r = run_cli("backup", src, safe=ro)
        assert r.code == 1 and "could not record" not in r.err, r.err
    # Nothing was recorded on the read-only safe; on the writable path recording goes on.
    assert len(_tasks(safe)) == len(before)
    run_cli("restore", point, tmp_path / "out2", safe=safe, check=True)
    assert len(_tasks(safe)) == len(before) + 1


@needs_root
def test_a_user_who_may_read_but_not_write_the_safe_gets_no_note(safe_with_point):
    safe, point, _ = safe_with_point
    outer = Path(tempfile.mkdtemp(prefix="pointsafe-ro-user-", dir="/tmp"))
    try:
        os.chmod(outer, 0o755)
        mine = outer / "safe"
        shutil.copytree(safe, mine)
        subprocess.run(["chmod", "-R", "go+rX", str(mine)], check=True)   # readable, writable by root only
        cmd = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
               sys.executable, "-m", "pointsafe.cli", "--safe", str(mine), "points", "--json"]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "HOME": "/tmp"}
        p = subprocess.run(cmd, capture_output=True, timeout=120, env=env, cwd="/tmp", check=False)
        err = p.stderr.decode()
        assert "could not record" not in err and "note:" not in err, err
        if p.returncode == 0:    # (LMDB may refuse a reader that cannot use root's lock file)
            assert point in p.stdout.decode()
        else:
            assert "permission denied" in err.lower() and "Traceback" not in err, err
    finally:
        shutil.rmtree(outer, ignore_errors=True)
