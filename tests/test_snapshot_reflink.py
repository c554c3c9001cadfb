"""reflink clones of a single file on a real loop-mounted XFS: a disk image written to during
the backup restores to the image as it was at the clone; the clone is removed; change
detection compares the live file, not the clone."""

from __future__ import annotations

import filecmp
import json
import os
import subprocess
import sys
import textwrap
import time

from _backup_util import backup as cli_backup
from _backup_util import one_error_line, restore as cli_restore
from btrfs_util import loop_fs
from conftest import run_cli
from pointsafe.cas import Safe

MB = 1 << 20

WRITER = textwrap.dedent("""
    import os, sys, time
    img, ctl = sys.argv[1], sys.argv[2]
    pause, paused, stop = (os.path.join(ctl, n) for n in ("pause", "paused", "stop"))
    fd = os.open(img, os.O_WRONLY)
    gen, size = 0, os.path.getsize(img)
    while not os.path.exists(stop):
        if os.path.exists(pause):
            os.fsync(fd)
            open(paused, "w").close()
            while os.path.exists(pause) and not os.path.exists(stop):
                time.sleep(0.002)
            continue
        gen += 1
        block = gen.to_bytes(8, "little") * 512          # 4 KiB stamped with the generation
        for off in range(0, size, 256 * 1024):
            os.pwrite(fd, block, (off + (gen % 64) * 4096) % size)
    os.close(fd)
    print(gen)
""")


def test_image_written_during_backup_restores_as_at_the_clone(tmp_path, safe_dir):
    with loop_fs(tmp_path, "xfs") as mnt:
        img = mnt / "disk.img"
        with open(img, "wb") as f:
            f.write(os.urandom(48 * MB))
        ctl = tmp_path / "ctl"
        ctl.mkdir()
        expected = tmp_path / "at-clone.img"
        # the freeze: the writer pauses, the test keeps a copy of the image as it is then; the
        # clone is taken; the writer goes on writing while the clone is read
        pre = (f"touch {ctl}/pause; while [ ! -e {ctl}/paused ]; do sleep 0.005; done; "
               f"cp --reflink=never {img} {expected}")
        post = f"rm -f {ctl}/pause {ctl}/paused; sleep 0.3"
        w = subprocess.Popen([sys.executable, "-c", WRITER, str(img), str(ctl)], stdout=subprocess.PIPE)
        try:
            time.sleep(0.3)
            p = cli_backup(safe_dir, img, "--volume", "--snapshot", "reflink", "--pre-freeze", pre,
                           "--post-thaw", post)
        finally:
            (ctl / "stop").write_text("")
            gens = int(w.communicate(timeout=60)[0])
        assert gens > 0
        assert p["snapshot"]["method"] == "reflink" and p["warnings"] == []
        assert p["source"] == str(img)
        assert [n for n in os.listdir(mnt) if "pointsafe" in n] == []          # the clone is gone
        assert not filecmp.cmp(img, expected, shallow=False)   # the writer went on after the clone
        out = tmp_path / "restored.img"
        cli_restore(safe_dir, p["id"], out)
        assert filecmp.cmp(out, expected, shallow=False)

        # change detection: the clone is a new inode each time, the live file is compared
        again = cli_backup(safe_dir, img, "--volume", "--snapshot", "reflink")
        assert again["stats"]["bytes_read"] > 0                  # changed since the clone
        third = cli_backup(safe_dir, img, "--volume")            # auto picks reflink
        assert third["snapshot"]["method"] == "reflink"
        assert third["stats"]["bytes_read"] == 0 and third["stats"]["files_unchanged"] == 1


def test_stale_clone_of_a_killed_backup_is_removed(tmp_path, safe_dir):
    with loop_fs(tmp_path, "xfs") as mnt:
        img = mnt / "disk.img"
        img.write_bytes(os.urandom(2 * MB))
        cli_backup(safe_dir, img, "--volume", "--snapshot", "reflink")
        # what a SIGKILLed backup leaves: the clone next to the image (its name carries the safe's id)
        with Safe.open(safe_dir) as s:
            sid = s.config.safe_id
        stale = mnt / f".disk.img.pointsafe-{sid[:16]}.clone"
        subprocess.run(["cp", "--reflink=always", str(img), str(stale)], check=True)
        r = run_cli("snapshots", "--json", safe=safe_dir, check=True)
        assert [(x["method"], x["state"]) for x in json.loads(r.out)["snapshots"]] == [("reflink", "stale")]
        cli_backup(safe_dir, img, "--volume", "--snapshot", "reflink")
        assert not stale.exists()


def test_explicit_reflink_needs_a_single_file_on_a_reflink_filesystem(tmp_path, safe_dir):
    img = tmp_path / "disk.img"            # ext4: no reflinks
    img.write_bytes(b"x" * 8192)
    one_error_line(run_cli("backup", img, "--volume", "--snapshot", "reflink", safe=safe_dir),
                   "--snapshot reflink", "no reflinks")
    one_error_line(run_cli("backup", tmp_path, "--snapshot", "reflink", safe=safe_dir),
                   "--snapshot reflink", "single file")
    assert json.loads(run_cli("points", "--json", safe=safe_dir, check=True).out) == []
