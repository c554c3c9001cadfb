"""Volumes: an ext4 image backed up as fixed blocks, changed through a real loop mount, backed up
again; the incremental stores only the blocks that changed, and both points restore to images
that fsck accepts and whose files match."""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import blake3
import pytest

from _backup_util import backup, one_error_line, restore
from conftest import needs_root, run_cli

pytestmark = needs_root

IMAGE_SIZE = 64 << 20
BLOCK = 64 * 1024     # the safe's default volume block size


def _need(tool: str) -> None:
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} is not installed (e2fsprogs)")


@contextmanager
def loop_mount(img: Path, mnt: Path, ro: bool):
    mnt.mkdir(exist_ok=True)
    opts = "loop,ro" if ro else "loop"
    r = subprocess.run(["mount", "-o", opts, str(img), str(mnt)], capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        pytest.fail(f"mount -o {opts} {img} failed: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True, timeout=60).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=60)


def files_of(top: Path) -> dict[str, bytes]:
    """relative path -> sha256 of every regular file (lost+found skipped)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames[:] = [d for d in dirnames if d != "lost+found"]
        for f in filenames:
            p = Path(dirpath) / f
            out[str(p.relative_to(top))] = hashlib.sha256(p.read_bytes()).digest()
    return out


def blocks(img: Path) -> list[bytes]:
    data = img.read_bytes()
    return [data[i:i + BLOCK] for i in range(0, len(data), BLOCK)]


def expected_new_bytes(old: Path, new: Path) -> tuple[int, int]:
    """(raw bytes of non-zero blocks of ``new`` whose content ``old`` does not hold, counted once;
    raw bytes of blocks that differ at the same offset)."""
    zero = bytes(BLOCK)
    ob, nb = blocks(old), blocks(new)
    have = {blake3.blake3(b).digest() for b in ob}
    fresh = 0
    changed = 0
    for a, b in zip(ob, nb):
        if a != b:
            changed += len(b)
        if b == zero[:len(b)]:
            continue
        h = blake3.blake3(b).digest()
        if h not in have:
            have.add(h)
            fresh += len(b)
    return fresh, changed


def fsck_ok(img: Path) -> None:
    r = subprocess.run(["fsck.ext4", "-n", "-f", str(img)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"fsck.ext4 -n -f {img.name} exited {r.returncode}:\n{r.stdout}{r.stderr}"


def test_ext4_image_incremental_and_restore(safe_dir, tmp_path):
    _need("mkfs.ext4")
    _need("fsck.ext4")
    rng = random.Random(3)
    content = tmp_path / "content"
    (content / "docs").mkdir(parents=True)
    (content / "bin").mkdir()
    for i in range(40):
        (content / "docs" / f"note{i}.txt").write_text(f"note {i}\n" * (50 + i * 40))
    for i in range(6):
        (content / "bin" / f"blob{i}").write_bytes(rng.randbytes(700_000))
    img = tmp_path / "disk.img"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(content), str(img), "64M"], check=True,
                   capture_output=True, timeout=120)
    assert img.stat().st_size == IMAGE_SIZE

    p1 = backup(safe_dir, img, "--volume", name="disk")
    assert p1["kind"] == "volume" and p1["size"] == IMAGE_SIZE and p1["warnings"] == []
    s1 = p1["stats"]
    # zero blocks are recorded, not stored: the image holds ~5 MB of data in 64 MiB
    assert s1["bytes_new"] < 16 << 20, s1
    assert s1["bytes_stored"] < 16 << 20, s1
    before = tmp_path / "before.img"
    subprocess.run(["cp", "--sparse=always", str(img), str(before)], check=True)

    # change a few files through the kernel's ext4 driver
    changed_data = 0
    with loop_mount(img, tmp_path / "mnt", ro=False) as m:
        (m / "bin" / "blob2").write_bytes(rng.randbytes(300_000)); changed_data += 300_000
        (m / "new.bin").write_bytes(rng.randbytes(200_000)); changed_data += 200_000
        (m / "docs" / "note3.txt").unlink()
        with open(m / "docs" / "note7.txt", "a") as f:
            f.write("appended line\n"); changed_data += 14
        expected_after = files_of(m)
    assert files_of(content) != expected_after

    p2 = backup(safe_dir, img, "--volume", name="disk")
    s2 = p2["stats"]
    fresh, changed_blocks = expected_new_bytes(before, img)
    # exactly the non-zero blocks whose content the safe did not hold are new
    assert s2["bytes_new"] == fresh, (s2, fresh, changed_blocks)
    # ... and that is about the changed data (64 KiB blocks, ext4 metadata and journal around it),
    # nowhere near the image or even the data it holds
    assert s2["bytes_new"] <= changed_data + (3 << 20), s2
    assert s2["bytes_stored"] <= s2["bytes_new"] + (256 << 10), s2
    assert s2["bytes_stored"] < IMAGE_SIZE // 10, s2
    print(f"\next4 incremental: {changed_data} bytes of files changed, {changed_blocks} bytes in changed "
          f"blocks, bytes_new {s2['bytes_new']}, bytes_stored {s2['bytes_stored']}")

    # nothing changed since: the image is not read again
    p3 = backup(safe_dir, img, "--volume", name="disk")
    assert p3["stats"]["bytes_read"] == 0 and p3["stats"]["bytes_new"] == 0, p3["stats"]
    assert p3["root"] == p2["root"]

    for point, want_img, want_files in ((p1, before, files_of(content)), (p2, img, expected_after)):
        out = tmp_path / f"restored-{point['id'][:8]}.img"
        r = restore(safe_dir, point["id"], out)
        assert r["warnings"] == []
        assert out.stat().st_size == IMAGE_SIZE
        assert out.read_bytes() == want_img.read_bytes(), "restored image differs from the source image"
        # holes stay holes: the restored image is about as sparse as the data it holds
        assert out.stat().st_blocks * 512 < 24 << 20
        fsck_ok(out)
        with loop_mount(out, tmp_path / "ro", ro=True) as m:
            assert files_of(m) == want_files


def test_volume_restore_refuses_existing_image_without_force(safe_dir, tmp_path):
    img = tmp_path / "small.img"
    with open(img, "wb") as f:
        f.write(random.Random(1).randbytes(100_000))
        f.truncate(1 << 20)
    p = backup(safe_dir, img, "--volume")
    out = tmp_path / "out.img"
    out.write_bytes(b"precious")
    one_error_line(run_cli("restore", p["id"], out, safe=safe_dir), "exists", "--force")
    assert out.read_bytes() == b"precious"
    restore(safe_dir, p["id"], out, "--force")
    assert out.read_bytes() == img.read_bytes()
    # a volume has no paths
    one_error_line(run_cli("restore", p["id"], tmp_path / "o2.img", "--path", "x", safe=safe_dir), "volume")
    # ls of a volume point: a clear line, not a traceback
    one_error_line(run_cli("ls", p["id"], safe=safe_dir), "volume")


@contextmanager
def loop_device(img: Path):
    r = subprocess.run(["losetup", "-f", "--show", str(img)], capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        pytest.skip(f"no loop device: {r.stderr.strip()}")
    dev = r.stdout.strip()
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], capture_output=True, timeout=60)


def test_block_device_backup_and_restore(safe_dir, tmp_path):
    """A block device is a volume without --volume; it restores into an image, and into a
    device only with --force."""
    _need("losetup")
    rng = random.Random(5)
    img = tmp_path / "dev.img"
    with open(img, "wb") as f:
        f.truncate(8 << 20)
        for off in (0, 3 << 20, (8 << 20) - 70_000):
            f.seek(off)
            f.write(rng.randbytes(70_000))
    want = img.read_bytes()
    with loop_device(img) as dev:
        p = backup(safe_dir, dev, name="loopdev")
        assert p["kind"] == "volume" and p["size"] == 8 << 20
        # a device has no holes to skip: its zeros are read, and recorded, not stored
        assert p["stats"]["bytes_read"] == 8 << 20
        assert p["stats"]["bytes_new"] <= 3 * 70_000 + 6 * BLOCK
    out = tmp_path / "out.img"
    restore(safe_dir, p["id"], out)
    assert out.read_bytes() == want
    assert out.stat().st_blocks * 512 < 2 << 20, "zero blocks are holes in the restored image"
    other = tmp_path / "other.img"
    with open(other, "wb") as f:
        f.write(b"\xee" * (8 << 20))
    with loop_device(other) as dev2:
        one_error_line(run_cli("restore", p["id"], dev2, safe=safe_dir), "block device", "--force")
        restore(safe_dir, p["id"], dev2, "--force")
    assert other.read_bytes() == want, "holes are written as zeros on a device"


# Overwrites random 4 KiB blocks of an image every 0.2 ms (raised priority: it keeps running
# during the read even on a busy machine), like a running VM.
IMAGE_WRITER = """
import os, random, sys, time
path, stop = sys.argv[1], sys.argv[2]
try:
    os.nice(-15)
except OSError:
    pass
fd = os.open(path, os.O_WRONLY)
size = os.fstat(fd).st_size
open(stop + ".started", "w").close()
while not os.path.exists(stop):
    os.pwrite(fd, os.urandom(4096), random.randrange(size // 4096) * 4096)
    time.sleep(0.0002)
"""


def test_image_changing_while_read_is_a_warning(safe_dir, tmp_path):
    img = tmp_path / "vm.img"
    img.write_bytes(random.Random(2).randbytes(24 << 20))
    stop = tmp_path / "stop"
    w = subprocess.Popen([sys.executable, "-c", IMAGE_WRITER, str(img), str(stop)])
    try:
        deadline = time.monotonic() + 30
        while not Path(str(stop) + ".started").exists():
            assert time.monotonic() < deadline and w.poll() is None, "writer did not start"
            time.sleep(0.01)
        p = backup(safe_dir, img, "--volume", "-q", expect=3)
    finally:
        stop.touch()
        w.wait(timeout=30)
    assert len(p["warnings"]) == 1 and "changed while" in p["warnings"][0]["message"], p["warnings"]
    assert p["warnings"][0]["path"] == str(img)
    # the next backup reads the image again (its mtime moved), and, quiet now, warns no more
    p2 = backup(safe_dir, img, "--volume", "-q")
    assert p2["stats"]["bytes_read"] == 24 << 20 and p2["warnings"] == []
