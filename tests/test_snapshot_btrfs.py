"""btrfs snapshots on a real loop-mounted btrfs: points are points in time, read with the
paths of SOURCE, change detection still works, one snapshot is kept per source, and a backup
killed or terminated leaves nothing it does not clean up."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

from _backup_util import backup as cli_backup
from _backup_util import one_error_line, restore as cli_restore
from _tree_util import assert_trees_equal, snapshot as tree_snapshot
from btrfs_util import btrfs_volume, make_subvolume, subvolumes
from conftest import run_cli
from pointsafe.ingest import BackupOptions, backup
from pointsafe.ingest.restore import restore

SNAPDIR = ".pointsafe-snapshots"


def snaps(vol: Path) -> list[str]:
    """Names in the subvolume's snapshot directory."""
    try:
        return sorted(os.listdir(vol / SNAPDIR))
    except FileNotFoundError:
        return []


def fill(vol: Path) -> None:
    (vol / "docs" / "deep").mkdir(parents=True)
    (vol / "docs" / "a.txt").write_text("alpha\n" * 1000)
    (vol / "docs" / "deep" / "b.bin").write_bytes(os.urandom(200_000))
    os.symlink("docs/a.txt", vol / "link")
    os.link(vol / "docs" / "a.txt", vol / "hard")


def test_point_read_from_snapshot_has_source_paths(tmp_path, safe_dir):
    with btrfs_volume(tmp_path) as mnt:
        vol = make_subvolume(mnt, "data")
        fill(vol)
        p1 = cli_backup(safe_dir, vol, "--snapshot", "btrfs")
        assert p1["source"] == str(vol)
        assert p1["snapshot"]["method"] == "btrfs" and p1["snapshot"]["held_s"] >= 0
        assert p1["snapshot"]["path"].startswith(str(vol / SNAPDIR) + "/")
        # the second point is taken with a snapshot directory in the subvolume: never in a point
        p2 = cli_backup(safe_dir, vol, "--snapshot", "btrfs")
        r = run_cli("ls", p2["id"], "--json", safe=safe_dir, check=True)
        assert SNAPDIR not in [e["path"] for e in json.loads(r.out)]
        assert sorted(e["path"] for e in json.loads(r.out)) == ["docs", "hard", "link"]
        out = tmp_path / "out"
        cli_restore(safe_dir, p2["id"], out)
        live = tree_snapshot(vol)
        live = {k: v for k, v in live.items() if not k.startswith(SNAPDIR.encode())}
        restored = tree_snapshot(out)
        assert_trees_equal(live, restored, check_root=False)
        # a directory inside the subvolume: the snapshot's copy of it, paths as in SOURCE
        p3 = cli_backup(safe_dir, vol / "docs", "--snapshot", "btrfs")
        assert p3["source"] == str(vol / "docs") and p3["snapshot"]["method"] == "btrfs"
        r = run_cli("ls", p3["id"], "-R", "--json", safe=safe_dir, check=True)
        assert sorted(e["path"] for e in json.loads(r.out)) == ["a.txt", "deep", "deep/b.bin"]


def test_unchanged_file_in_next_snapshot_is_not_read_again(tmp_path, safe_dir):
    with btrfs_volume(tmp_path) as mnt:
        vol = make_subvolume(mnt, "data")
        fill(vol)
        first = cli_backup(safe_dir, vol, "--snapshot", "btrfs")
        assert first["stats"]["bytes_read"] > 200_000
        # each snapshot has a device number of its own; the files are the same inodes
        second = cli_backup(safe_dir, vol, "--snapshot", "btrfs")
        assert second["stats"]["bytes_read"] == 0, second["stats"]
        assert second["stats"]["files_unchanged"] == 2      # a.txt (and its hardlink), b.bin
        (vol / "docs" / "a.txt").write_text("changed\n")
        third = cli_backup(safe_dir, vol, "--snapshot", "btrfs")
        assert third["stats"]["bytes_read"] == len("changed\n")
        # a live read after snapshot reads sees the same entries: no re-read either
        fourth = cli_backup(safe_dir, vol, "--snapshot", "none")
        assert fourth["snapshot"] == "none" and fourth["stats"]["bytes_read"] == 0


def test_exactly_one_snapshot_kept_per_source(tmp_path, safe_dir):
    with btrfs_volume(tmp_path) as mnt:
        vol = make_subvolume(mnt, "data")
        fill(vol)
        pts = [cli_backup(safe_dir, vol, "--snapshot", "btrfs") for _ in range(3)]
        other = cli_backup(safe_dir, vol / "docs", name="docs")
        assert other["snapshot"]["method"] == "btrfs"           # auto chose btrfs
        names = snaps(vol)
        assert len(names) == 2, names
        assert Path(pts[-1]["snapshot"]["path"]).name in names
        assert Path(other["snapshot"]["path"]).name in names
        assert len([s for s in subvolumes(vol) if SNAPDIR in s]) == 2
        # forgetting the newest point of the source keeps exactly one snapshot of it
        run_cli("forget", pts[-1]["id"], safe=safe_dir, check=True)
        assert len([n for n in snaps(vol) if "-data@" in n]) == 1
        # forgetting every point of a source removes its snapshot: no point, no base
        run_cli("forget", other["id"], safe=safe_dir, check=True)
        assert [n for n in snaps(vol) if "-docs@" in n] == []
        assert len(snaps(vol)) == 1


def test_explicit_btrfs_on_other_filesystems_fails_with_one_line(tmp_path, safe_dir):
    src = tmp_path / "src"          # tmp_path is not btrfs here (ext4)
    src.mkdir()
    (src / "f").write_text("x")
    r = run_cli("backup", src, "--snapshot", "btrfs", safe=safe_dir)
    one_error_line(r, "--snapshot btrfs", "not btrfs")
    tmpfs = tmp_path / "tmpfs"
    tmpfs.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(tmpfs)], capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs")
    try:
        (tmpfs / "f").write_text("x")
        r = run_cli("backup", tmpfs, "--snapshot", "btrfs", safe=safe_dir)
        one_error_line(r, "--snapshot btrfs", "tmpfs", "not btrfs")
    finally:
        subprocess.run(["umount", "-l", str(tmpfs)])
    r = run_cli("points", "--json", safe=safe_dir, check=True)
    assert json.loads(r.out) == []
    # auto on the same source is no failure: it reads live and says so on the point
    p = cli_backup(safe_dir, src)
    assert p["snapshot"] == "none"


def test_nested_subvolume_makes_auto_read_live(tmp_path, safe_dir):
    with btrfs_volume(tmp_path) as mnt:
        vol = make_subvolume(mnt, "data")
        (vol / "top").write_text("t")
        make_subvolume(vol, "inner")
        (vol / "inner" / "x").write_text("inner data")
        r = run_cli("backup", vol, "--snapshot", "btrfs", safe=safe_dir)
        one_error_line(r, "inner", "--one-file-system")
        p = cli_backup(safe_dir, vol)                      # auto: live, with all the data
        assert p["snapshot"] == "none"
        out = tmp_path / "out"
        cli_restore(safe_dir, p["id"], out)
        assert (out / "inner" / "x").read_text() == "inner data"
        p = cli_backup(safe_dir, vol, "--snapshot", "btrfs", "--one-file-system")
        assert p["snapshot"]["method"] == "btrfs"


# -- the freeze --------------------------------------------------------------------------------

class Recorder:
    """A database integration that records when it is called (the seam with ingest/db)."""
    name = "recorder"

    def __init__(self, log: list):
        self.log = log
        self.snapshot_mode = False

    def start(self):
        self.log.append(f"start(snapshot_mode={self.snapshot_mode})")

    def snapshot_taken(self):
        self.log.append("snapshot_taken")

    def files_read(self):
        self.log.append("files_read")

    def extra_files(self):
        return []

    def info(self):
        return {}

    def close(self):
        self.log.append("close")


def _hooks(tmp_path: Path, log_file: Path, vol: Path) -> tuple[str, str]:
    # the hooks log whether the snapshot exists at their time
    pre = f"echo pre-freeze $(ls {vol}/{SNAPDIR} 2>/dev/null | wc -l) >> {log_file}"
    post = f"echo post-thaw $POINTSAFE_STATUS $POINTSAFE_SNAPSHOT $(ls {vol}/{SNAPDIR} | wc -l) >> {log_file}"
    return pre, post


def test_freeze_order_with_snapshot(tmp_path, safe):
    with btrfs_volume(tmp_path) as mnt:
        vol = make_subvolume(mnt, "data")
        fill(vol)
        log: list[str] = []
        hook_log = tmp_path / "hooks.log"
        pre, post = _hooks(tmp_path, hook_log, vol)
        res = backup(safe, str(vol), BackupOptions(snapshot="btrfs", consistency=[Recorder(log)],
                                                   pre_freeze=pre, post_thaw=post))
        assert log == ["start(snapshot_mode=True)", "snapshot_taken", "files_read", "close"]
        assert hook_log.read_text().split("\n")[:2] == ["pre-freeze 0", "post-thaw ok btrfs 1"]
        snap = res.point.snapshot
        assert snap["method"] == "btrfs" and 0 <= snap["held_s"] < 60


def test_freeze_without_snapshot_lasts_the_read(tmp_path, safe):
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("x")
    log: list[str] = []
    hook_log = tmp_path / "hooks.log"
    res = backup(safe, str(src), BackupOptions(snapshot="none", consistency=[Recorder(log)],
                                               pre_freeze=f"echo pre >> {hook_log}",
                                               post_thaw=f"echo post $POINTSAFE_STATUS >> {hook_log}"))
    assert log == ["start(snapshot_mode=False)", "files_read", "close"]
    assert hook_log.read_text().split() == ["pre", "post", "ok"]
    assert res.point.snapshot == "none"


def test_failing_pre_freeze_aborts_and_post_thaw_still_runs(tmp_path, safe_dir):
    with btrfs_volume(tmp_path) as mnt:
        vol = make_subvolume(mnt, "data")
        fill(vol)
        hook_log = tmp_path / "hooks.log"
        r = run_cli("backup", vol, "--snapshot", "btrfs", "--pre-freeze", "exit 7",
                    "--post-thaw", f"echo post $POINTSAFE_STATUS >> {hook_log}", safe=safe_dir)
        one_error_line(r, "pre-freeze", "7")
        assert hook_log.read_text().split() == ["post", "error"]
        assert snaps(vol) == []
        assert json.loads(run_cli("points", "--json", safe=safe_dir, check=True).out) == []


# -- consistency under a writer ---------------------------------------------------------------

WRITER = textwrap.dedent("""
    import hashlib, os, random, sys, time
    root, n = sys.argv[1], int(sys.argv[2])
    a, b, c = (os.path.join(root, d) for d in "ABC")
    where = {f"m{i:03d}": a for i in range(n)}
    rng = random.Random(1)
    stop = os.path.join(root, "..", "stop")
    k = 0
    while not os.path.exists(stop):
        for _ in range(50):
            m = rng.choice(list(where))
            src = where[m]
            dst = b if src == a else a
            os.rename(os.path.join(src, m), os.path.join(dst, m))   # atomic: in exactly one dir
            where[m] = dst
            s = f"s{rng.randrange(n // 4):03d}"
            payload = os.urandom(rng.randrange(1000, 30000))
            tmp = os.path.join(c, f".{s}.tmp")
            with open(tmp, "wb") as f:
                f.write(payload + hashlib.sha256(payload).digest())
            os.rename(tmp, os.path.join(c, s))                     # atomic replace
            k += 1
    print(k)
""")


def make_moving_tree(root: Path, n: int) -> None:
    for d in "ABC":
        (root / d).mkdir(parents=True)
    for i in range(n):
        (root / "A" / f"m{i:03d}").write_bytes(os.urandom(5000))
    for i in range(n // 4):
        payload = os.urandom(2000)
        (root / "C" / f"s{i:03d}").write_bytes(payload + hashlib.sha256(payload).digest())


def problems(tree: Path, n: int) -> list[str]:
    """What is inconsistent in a restored point: a moving file in both or neither of A and B,
    a self-checking file whose checksum is wrong."""
    out = []
    a, b = set(os.listdir(tree / "A")), set(os.listdir(tree / "B"))
    for i in range(n):
        m = f"m{i:03d}"
        if (m in a) == (m in b):
            out.append(f"{m} in {'both' if m in a else 'neither'}")
    for s in os.listdir(tree / "C"):
        if s.startswith("."):
            continue
        data = (tree / "C" / s).read_bytes()
        if hashlib.sha256(data[:-32]).digest() != data[-32:]:
            out.append(f"{s}: checksum wrong")
    return out


@contextmanager
def moving_writer(vol: Path, n: int) -> Iterator[Path]:
    """``vol/tree`` made by :func:`make_moving_tree`, with the WRITER changing it until the block
    ends (then stopped; AssertionError when it failed); yields the tree."""
    src = vol / "tree"
    make_moving_tree(src, n)
    stop = vol / "stop"
    w = subprocess.Popen([sys.executable, "-c", WRITER, str(src), str(n)], stdout=subprocess.PIPE)
    try:
        time.sleep(0.2)
        yield src
    finally:
        stop.write_text("")
        w.wait(timeout=30)
        stop.unlink()
    assert w.returncode == 0


def _points_under_writer(tmp_path: Path, safe, vol: Path, mode: str, n: int, tries: int,
                         stop_at_first: bool) -> list[list[str]]:
    found = []
    with moving_writer(vol, n) as src:
        for i in range(tries):
            res = backup(safe, str(src), BackupOptions(snapshot=mode, name=f"tree-{mode}"))
            out = tmp_path / f"out-{mode}-{i}"
            restore(safe, res.point, str(out))
            found.append(problems(out, n))
            if stop_at_first and found[-1]:
                break
    return found


def test_btrfs_points_are_consistent_under_a_writer(tmp_path, safe):
    with btrfs_volume(tmp_path, size="600M") as mnt:
        vol = make_subvolume(mnt, "data")
        found = _points_under_writer(tmp_path, safe, vol, "btrfs", n=400, tries=8, stop_at_first=False)
        assert found == [[]] * 8, [f[:5] for f in found]
        # the negative control: the live tree read file after file can be a mix of moments
        live = _points_under_writer(tmp_path, safe, make_subvolume(mnt, "live"), "none", n=400, tries=15,
                                    stop_at_first=True)
        if not any(live):
            warnings.warn(f"negative control: no inconsistency seen in {len(live)} live points", stacklevel=1)
        else:
            print(f"live read: inconsistent point after {len(live)} tries: {live[-1][:3]}")


# -- killed and terminated backups --------------------------------------------------------------

def _start_stuck_backup(tmp_path: Path, safe_dir: Path, vol: Path) -> tuple[subprocess.Popen, Path]:
    """A CLI backup that stops in its --post-thaw hook (the snapshot taken, nothing read yet)."""
    ready = tmp_path / "ready"
    hook = f"echo $$ > {tmp_path}/hook.pid; touch {ready}; exec sleep 60"
    cmd = [sys.executable, "-m", "pointsafe.cli", "--safe", str(safe_dir), "backup", str(vol),
           "--snapshot", "btrfs", "--post-thaw", hook]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the backup never reached its --post-thaw hook"
        time.sleep(0.02)
    return proc, ready


def _kill_hook(tmp_path: Path) -> None:
    """End the hook's process (it outlives a SIGKILLed backup), by the pid it wrote."""
    try:
        os.kill(int((tmp_path / "hook.pid").read_text()), signal.SIGKILL)
    except (OSError, ValueError):
        pass


def test_sigkilled_backup_leaves_a_stale_snapshot_the_next_removes(tmp_path, safe_dir):
    with btrfs_volume(tmp_path) as mnt:
        vol = make_subvolume(mnt, "data")
        fill(vol)
        kept = cli_backup(safe_dir, vol, "--snapshot", "btrfs")
        before = tree_snapshot(vol / "docs")
        proc, _ = _start_stuck_backup(tmp_path, safe_dir, vol)
        try:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        finally:
            _kill_hook(tmp_path)
        left = snaps(vol)
        assert len(left) == 2 and any(n.endswith(".partial") for n in left), left
        r = run_cli("snapshots", "--json", safe=safe_dir, check=True)
        states = sorted(x["state"] for x in json.loads(r.out)["snapshots"])
        assert states == ["retained", "stale"]
        nxt = cli_backup(safe_dir, vol, "--snapshot", "btrfs")
        assert snaps(vol) == [Path(nxt["snapshot"]["path"]).name]
        assert Path(kept["snapshot"]["path"]).name not in snaps(vol)
        assert_trees_equal(before, tree_snapshot(vol / "docs"))   # nothing of the source touched


def test_sigterm_during_backup_removes_its_snapshot(tmp_path, safe_dir):
    with btrfs_volume(tmp_path) as mnt:
        vol = make_subvolume(mnt, "data")
        fill(vol)
        kept = cli_backup(safe_dir, vol, "--snapshot", "btrfs")
        proc, _ = _start_stuck_backup(tmp_path, safe_dir, vol)
        try:
            assert len(snaps(vol)) == 2
            proc.send_signal(signal.SIGTERM)
            out, err = proc.communicate(timeout=60)
        finally:
            _kill_hook(tmp_path)
        assert proc.returncode == 130, err
        assert snaps(vol) == [Path(kept["snapshot"]["path"]).name]
        assert not [m for m in open("/proc/self/mountinfo") if SNAPDIR in m]
        assert len(json.loads(run_cli("points", "--json", safe=safe_dir, check=True).out)) == 1


def _signal_while_reading(safe_dir: Path, vol: Path, sig: int) -> subprocess.Popen:
    """Send ``sig`` to a CLI backup of ``vol`` once its snapshot is taken and it is reading."""
    cmd = [sys.executable, "-m", "pointsafe.cli", "--safe", str(safe_dir), "backup", str(vol),
           "--snapshot", "btrfs", "-q"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not any(n.endswith(".partial") for n in snaps(vol)):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.005)
    time.sleep(0.3)   # into the read
    proc.send_signal(sig)
    proc.communicate(timeout=60)
    if proc.returncode == 0:
        pytest.skip("the backup finished before the signal arrived")
    return proc


def _big(vol: Path) -> None:
    with open(vol / "big", "wb") as f:
        for _ in range(40):
            f.write(os.urandom(8 << 20))      # 320 MiB: reading it takes a while


def test_sigterm_while_reading_a_snapshot_removes_it(tmp_path, safe_dir):
    with btrfs_volume(tmp_path, size="1G") as mnt:
        vol = make_subvolume(mnt, "data")
        _big(vol)
        proc = _signal_while_reading(safe_dir, vol, signal.SIGTERM)
        assert proc.returncode == 130
        assert snaps(vol) == []
        assert json.loads(run_cli("points", "--json", safe=safe_dir, check=True).out) == []


def test_sigkill_while_reading_then_the_next_backup_removes_the_stale_snapshot(tmp_path, safe_dir):
    with btrfs_volume(tmp_path, size="1G") as mnt:
        vol = make_subvolume(mnt, "data")
        _big(vol)
        (vol / "small").write_text("s")
        before = tree_snapshot(vol)
        proc = _signal_while_reading(safe_dir, vol, signal.SIGKILL)
        assert proc.returncode == -signal.SIGKILL
        stale = snaps(vol)
        assert len(stale) == 1 and stale[0].endswith(".partial")
        p = cli_backup(safe_dir, vol, "--snapshot", "btrfs", "--exclude", "big")
        assert snaps(vol) == [Path(p["snapshot"]["path"]).name]
        after = {k: v for k, v in tree_snapshot(vol).items() if not k.startswith(SNAPDIR.encode())}
        # nothing of the source touched (but its top directory, which holds .pointsafe-snapshots now)
        assert_trees_equal(before, after, check_root=False)


def test_disk_image_on_btrfs_is_read_from_a_snapshot_and_change_detection_holds(tmp_path, safe_dir):
    with btrfs_volume(tmp_path) as mnt:
        vol = make_subvolume(mnt, "vm")
        (vol / "disk.img").write_bytes(os.urandom(3 << 20))
        first = cli_backup(safe_dir, vol / "disk.img", "--volume")            # auto: btrfs first
        assert first["snapshot"]["method"] == "btrfs" and first["stats"]["bytes_read"] == 3 << 20
        assert first["source"] == str(vol / "disk.img")
        # the snapshot's file is the live inode on another device; a clone is another inode;
        # the live file is unchanged, so none of them reads it again
        for mode in ("btrfs", "reflink", "none"):
            p = cli_backup(safe_dir, vol / "disk.img", "--volume", "--snapshot", mode)
            assert p["stats"]["bytes_read"] == 0, (mode, p["stats"])
        out = tmp_path / "restored.img"
        cli_restore(safe_dir, first["id"], out)
        assert out.read_bytes() == (vol / "disk.img").read_bytes()


# -- flushoncommit for the instant of the snapshot ------------------------------------------------

def _options(mnt: Path) -> list[str]:
    from pointsafe.ingest.snapshot.fs import mount_of
    m = mount_of(mnt)
    assert m is not None and m.mountpoint == str(mnt)
    return m.options.split(",")


def test_snapshot_is_taken_with_flushoncommit_and_the_option_is_put_back(tmp_path, safe_dir):
    from pointsafe.ingest.snapshot import btrfs as bt
    with btrfs_volume(tmp_path) as mnt:
        vol = make_subvolume(mnt, "data")
        fill(vol)
        assert "flushoncommit" not in _options(mnt)
        seen = []
        with bt.flushing_commits(vol) as note:
            seen = _options(mnt)
        assert note == "" and "flushoncommit" in seen
        assert "flushoncommit" not in _options(mnt)
        cli_backup(safe_dir, vol, "--snapshot", "btrfs")
        assert "flushoncommit" not in _options(mnt)
        # a backup killed while the option was on left its marker: the next one puts it back
        subprocess.run(["mount", "-o", "remount,flushoncommit", str(mnt)], check=True)
        key = bt.blake3.blake3(bt.mount_of(vol).device.encode()).hexdigest()[:16]
        (bt.RUN_DIR / f"btrfs-{key}.lock").write_bytes(b"on")
        cli_backup(safe_dir, vol, "--snapshot", "btrfs")
        assert "flushoncommit" not in _options(mnt)
        # mounted with flushoncommit by its owner: left so
        subprocess.run(["mount", "-o", "remount,flushoncommit", str(mnt)], check=True)
        cli_backup(safe_dir, vol, "--snapshot", "btrfs")
        assert "flushoncommit" in _options(mnt)


def test_read_live_is_said_once_per_source_and_again_when_a_snapshot_stops_applying(tmp_path, safe_dir):
    with btrfs_volume(tmp_path) as mnt:
        vol = make_subvolume(mnt, "data")
        fill(vol)
        plain = tmp_path / "plain"
        plain.mkdir()
        (plain / "f").write_text("x")

        def notes(src, *extra):
            r = run_cli("backup", str(src), "--name", "n-" + src.name, *extra, safe=safe_dir, check=True)
            return [line for line in r.out.splitlines() if line.startswith("note: no snapshot")]

        assert len(notes(plain)) == 1            # the first point of a source read live
        assert notes(plain) == []                # ... not again on every run
        assert notes(vol) == []                  # a snapshot
        # the same source read live after snapshots (here: a nested subvolume stops auto): said again
        subprocess.run(["btrfs", "subvolume", "create", str(vol / "nested")], check=True, capture_output=True)
        said = notes(vol)
        assert len(said) == 1 and "nested" in said[0], said
        assert notes(vol) == []


def test_a_snapshot_waiting_on_a_frozen_filesystem_says_so_and_goes_on_once_thawed(tmp_path, safe_dir):
    with btrfs_volume(tmp_path) as mnt:
        vol = make_subvolume(mnt, "data")
        fill(vol)
        cli_backup(safe_dir, vol, "--snapshot", "btrfs")
        # the hook freezes the filesystem just before the snapshot, as one meant for LVM would
        cmd = [sys.executable, "-m", "pointsafe.cli", "--safe", str(safe_dir), "backup", str(vol),
               "--snapshot", "btrfs", "--json", "-q", "--pre-freeze", f"fsfreeze -f {mnt}"]
        env = {**os.environ, "POINTSAFE_SNAPSHOT_HINT_S": "1"}
        from conftest import CLI_ENV
        env.update({k: v for k, v in CLI_ENV.items() if v is not None})
        try:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
            lines: list[str] = []
            reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
            reader.start()
            deadline = time.monotonic() + 60
            while not any("is the filesystem frozen" in x for x in lines):
                assert proc.poll() is None and time.monotonic() < deadline, lines
                time.sleep(0.1)
        finally:
            subprocess.run(["fsfreeze", "-u", str(mnt)], capture_output=True)
        assert proc.wait(timeout=120) == 0, lines
        reader.join(timeout=30)
        out = proc.stdout.read()
        assert json.loads(out)["snapshot"]["method"] == "btrfs"
