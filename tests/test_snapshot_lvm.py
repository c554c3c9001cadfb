"""LVM snapshots. Device-mapper is missing on these machines, so a real snapshot cannot be
taken (that test skips with the reason); what can be tested is: the commands that would be
run, the clean-up order on success and on every failure, and one clear line from the real
binaries' refusals and when lvm2 is missing."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from _backup_util import one_error_line
from conftest import run_cli
from pointsafe.ingest.snapshot import Request, SnapshotError
from pointsafe.ingest.snapshot.lvm import LvmProvider, dm_available, size_args, snapshot_name

SAFE_ID = "0123456789abcdef" * 2


@pytest.fixture(autouse=True)
def no_dev_mapper_left():
    """lvm2's binaries create /dev/mapper/control when it is missing; leave the machine as found."""
    had = os.path.lexists("/dev/mapper")
    yield
    if not had and not dm_available():
        shutil.rmtree("/dev/mapper", ignore_errors=True)


class Recording:
    """Runs nothing: records each command and answers with the exit code given for its verb."""

    def __init__(self, fail: dict[str, int] | None = None):
        self.calls: list[list[str]] = []
        self.fail = fail or {}

    def __call__(self, cmd: list[str]) -> subprocess.CompletedProcess:
        self.calls.append(cmd)
        key = " ".join(cmd[:2]) if cmd[:2] == ["umount", "-l"] else cmd[0]
        code = self.fail.get(key, 0)
        return subprocess.CompletedProcess(cmd, code, "", f"{cmd[0]}: refused (test)" if code else "")


def _req(tmp_path: Path, size: str = "10%ORIGIN", name: str = "srv data") -> Request:
    return Request("lvm", tmp_path, os.stat(tmp_path), "tree", name, SAFE_ID, size)


def test_commands_and_clean_up_order_of_a_tree_backup(tmp_path):
    run = Recording()
    p = LvmProvider(_req(tmp_path), "vg0", "data", "srv", "xfs", runner=run, mount_dir=str(tmp_path))
    snap = snapshot_name(SAFE_ID, "srv data")
    assert snap == "pointsafe-01234567-srv_data"
    taken = p.take()
    mp = run.calls[1][-1]
    assert run.calls == [["lvcreate", "--snapshot", "--name", snap, "-l", "10%ORIGIN", "vg0/data"],
                         ["mount", "-o", "ro,nouuid", f"/dev/vg0/{snap}", mp]]
    assert taken.read_path == Path(mp) / "srv" and taken.method == "lvm"
    p.release()
    assert run.calls[2:] == [["umount", mp], ["lvremove", "--yes", f"vg0/{snap}"]]
    assert not os.path.exists(mp)
    p.release()                                  # a second release runs nothing
    assert len(run.calls) == 4


def test_ext4_mounts_without_nouuid_and_sizes_choose_the_option(tmp_path):
    run = Recording()
    p = LvmProvider(_req(tmp_path, size="2G"), "vg0", "root", ".", "ext4", runner=run, mount_dir=str(tmp_path))
    p.take()
    assert run.calls[0][4:6] == ["-L", "2G"] and run.calls[1][1:3] == ["-o", "ro"]
    p.keep()                                     # never kept: removed
    assert [c[0] for c in run.calls] == ["lvcreate", "mount", "umount", "lvremove"]
    assert size_args("512M") == ["-L", "512M"] and size_args("20%FREE") == ["-l", "20%FREE"]
    with pytest.raises(SnapshotError, match="--snapshot-size"):
        size_args("lots")


def test_volume_snapshot_is_read_from_its_device_and_removed(tmp_path):
    run = Recording()
    req = Request("lvm", Path("/dev/vg0/vm"), os.stat(tmp_path), "volume", "vm", SAFE_ID)
    p = LvmProvider(req, "vg0", "vm", None, None, runner=run)
    taken = p.take()
    assert taken.read_path == Path(f"/dev/vg0/{snapshot_name(SAFE_ID, 'vm')}")
    p.release()
    assert [c[0] for c in run.calls] == ["lvcreate", "lvremove"]


def test_failed_mount_still_removes_the_snapshot(tmp_path):
    run = Recording(fail={"mount": 32})
    p = LvmProvider(_req(tmp_path), "vg0", "data", ".", "ext4", runner=run, mount_dir=str(tmp_path))
    with pytest.raises(SnapshotError, match="mounting the snapshot") as e:
        p.take()
    assert "\n" not in str(e.value)
    p.release()
    assert [c[0] for c in run.calls] == ["lvcreate", "mount", "lvremove"]
    assert [n for n in os.listdir(tmp_path) if n.startswith("pointsafe-")] == []   # no mount dir left


def test_busy_mount_is_unmounted_lazily_before_lvremove(tmp_path):
    run = Recording(fail={"umount": 32})
    p = LvmProvider(_req(tmp_path), "vg0", "data", ".", "ext4", runner=run, mount_dir=str(tmp_path))
    p.take()
    p.release()
    assert [c[:2] for c in run.calls[2:]] == [["umount", run.calls[1][-1]], ["umount", "-l"], ["lvremove", "--yes"]]


def test_unmount_failure_keeps_the_snapshot_and_says_so(tmp_path):
    run = Recording(fail={"umount": 32, "umount -l": 32})
    p = LvmProvider(_req(tmp_path), "vg0", "data", ".", "ext4", runner=run, mount_dir=str(tmp_path))
    p.take()
    with pytest.raises(SnapshotError, match="could not be cleaned up"):
        p.release()
    assert "lvremove" not in [c[0] for c in run.calls]   # never remove a mounted snapshot


def test_real_lvcreate_refusal_is_one_line(tmp_path):
    if shutil.which("lvcreate") is None:
        pytest.skip("lvm2 is not installed")
    p = LvmProvider(_req(tmp_path), "pointsafe-test-novg", "data", ".", "ext4", mount_dir=str(tmp_path))
    with pytest.raises(SnapshotError) as e:
        p.take()
    msg = str(e.value)
    assert msg.startswith("lvcreate --snapshot of pointsafe-test-novg/data failed: ") and "\n" not in msg
    assert not p.created
    p.release()                                    # nothing to clean up; nothing run


def test_lvm2_missing_is_one_line(tmp_path, safe_dir):
    src = tmp_path / "src"
    src.mkdir()
    venv_bin = str(Path(os.sys.executable).parent)
    r = run_cli("backup", src, "--snapshot", "lvm", safe=safe_dir, env={"PATH": f"{venv_bin}:/usr/bin:/bin"})
    one_error_line(r, "--snapshot lvm", "lvm2 is not installed")


def test_no_device_mapper_is_one_line(tmp_path, safe_dir):
    if dm_available():
        pytest.skip("device-mapper is available here")
    if shutil.which("lvcreate") is None:
        pytest.skip("lvm2 is not installed")
    src = tmp_path / "src"
    src.mkdir()
    one_error_line(run_cli("backup", src, "--snapshot", "lvm", safe=safe_dir), "--snapshot lvm", "device-mapper")
    # the real lvs refuses too: the plan says so instead of guessing
    r = subprocess.run(["lvs", "--noheadings", "-o", "vg_name", "/dev/null"], capture_output=True, text=True)
    assert r.returncode != 0


def test_real_lvm_snapshot_of_a_mounted_volume(tmp_path):
    if not dm_available():
        pytest.skip("device-mapper is not available on this machine (no device-mapper driver in the kernel): "
                    "no logical volume can be made or snapshotted")
    pytest.skip("a real LVM test needs a volume group to spare; not set up on this machine")


def test_bad_snapshot_size_is_refused_before_anything_runs(tmp_path, safe_dir):
    src = tmp_path / "src"
    src.mkdir()
    one_error_line(run_cli("backup", src, "--snapshot-size", "lots", safe=safe_dir), "--snapshot-size", "lots")
