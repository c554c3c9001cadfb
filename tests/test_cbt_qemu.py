"""Changed-block tracking from QEMU dirty bitmaps (issue 12): ``backup IMG.qcow2 --volume
--changed-blocks qemu:BITMAP`` with real qemu-img, qemu-io and qemu-nbd (Debian's qemu-utils)
and libnbd's Python binding (python3-libnbd)."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from pointsafe.cas import Safe

from conftest import PW, needs_fuse, run_cli
from test_cbt_volume import _block, _points

GRAN = 65536      # qemu-img bitmap --add's default granularity
SIZE = 24 << 20   # the guest's disk


def _skip_reason():
    for tool in ("qemu-img", "qemu-io", "qemu-nbd"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install qemu-utils)"
    from pointsafe.ingest.qcow2 import QemuError, nbd_module
    try:
        nbd_module()
    except QemuError:
        return "libnbd's Python binding is not installed (apt-get install python3-libnbd)"
    return None


pytestmark = pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or "")


def _qemu_io(img, *writes):
    """Guest writes into the qcow2 (marked in its enabled dirty bitmaps): (offset, length, pattern)."""
    cmds = []
    for off, n, pat in writes:
        cmds += ["-c", f"write -P {pat} {off} {n}"]
    subprocess.run(["qemu-io", "-f", "qcow2", *cmds, str(img)], check=True, capture_output=True)


def _image(tmp_path):
    """A qcow2 whose guest disk holds random data in its first 6 MiB and at 16 MiB, zeros elsewhere."""
    raw = tmp_path / "seed.raw"
    with open(raw, "wb") as f:
        f.write(os.urandom(6 << 20))
        f.seek(16 << 20)
        f.write(os.urandom(1 << 20))
        f.truncate(SIZE)
    img = tmp_path / "vm.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(img)], check=True)
    raw.unlink()
    return img


def _guest(img, tmp_path) -> bytes:
    out = tmp_path / "guest.raw"
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(img), str(out)], check=True)
    try:
        return out.read_bytes()
    finally:
        out.unlink()


def _content(safe_dir, p) -> bytes:
    from pointsafe.cas.blob import BlobReader
    s = Safe.open(safe_dir, PW)
    try:
        return BlobReader(p.root, p.size, s.get, s.kind).read(0, p.size)
    finally:
        s.close()


def _bitmaps(img) -> list[str]:
    out = subprocess.run(["qemu-img", "info", "-U", "--output=json", str(img)], check=True, capture_output=True).stdout
    return [b["name"] for b in json.loads(out).get("format-specific", {}).get("data", {}).get("bitmaps", [])]


def _touched(writes, block) -> int:
    """Bytes of the safe's blocks that the bitmap granules of ``writes`` cover."""
    unit = max(block, GRAN)
    units = {u for off, n, _ in writes for u in range(off // unit, (off + n - 1) // unit + 1)}
    return len(units) * unit


def _backup(img, safe_dir, *extra, env=None):
    return run_cli("backup", "--volume", "--changed-blocks", "qemu:bk", *extra, img, safe=safe_dir, env=env)


def _data_bytes(data: bytes, block: int) -> int:
    """What a full read scans: the blocks that are not all zeros."""
    zero = bytes(block)
    return sum(len(data[i:i + block]) for i in range(0, len(data), block) if data[i:i + block] != zero)


WRITES = [(5 << 20, 4096, "0x33"), (20_000_000, 100, "0x44"), (10 << 20, 128 << 10, "0x55"),
          ((16 << 20) - 10, 20, "0x66")]


def test_bitmap_incremental_reads_only_the_dirty_ranges_and_restores_to_qcow2(tmp_path, safe_dir):
    img = _image(tmp_path)
    bs = _block(safe_dir)
    r = _backup(img, safe_dir)
    assert r.code == 3 and "no previous point of that name" in r.err     # first: read whole, said so
    first = _points(safe_dir)[-1]
    assert first.extra["qemu_bitmap"]["generation"] == 1
    assert _bitmaps(img) == [first.extra["qemu_bitmap"]["name"]]
    assert first.size == SIZE and _content(safe_dir, first) == _guest(img, tmp_path)

    _qemu_io(img, *WRITES)
    r = _backup(img, safe_dir, "--json")
    assert r.code == 0, r.err
    inc = _points(safe_dir)[-1]
    assert inc.extra["change_source"] == {"kind": "qemu-bitmap", "detail": "qemu:bk", "fallback": None}
    assert inc.extra["source_format"] == "qcow2"
    assert inc.stats["bytes_scanned"] == _touched(WRITES, bs)      # only the dirty granules were read
    assert inc.stats["bytes_read"] == SIZE
    guest = _guest(img, tmp_path)
    assert _content(safe_dir, inc) == guest
    # the new bitmap was started, the old one removed after the commit
    assert inc.extra["qemu_bitmap"]["generation"] == 2 and _bitmaps(img) == [inc.extra["qemu_bitmap"]["name"]]
    shown = run_cli("show", inc.id, safe=safe_dir, check=True).out
    assert "qemu-bitmap (qemu:bk)" in shown and inc.extra["qemu_bitmap"]["name"] in shown

    # a full read with the bitmaps at hand: the same point, no missed change
    r = _backup(img, safe_dir, "--full-read")
    assert r.code == 0, r.err
    full = _points(safe_dir)[-1]
    assert full.root == inc.root and full.stats["bytes_scanned"] == _data_bytes(guest, bs)
    assert full.extra["change_source"]["kind"] == "full" and not full.warnings

    # restore: a raw image equal to qemu-img convert's, which qemu-img turns back into a qcow2
    out = tmp_path / "restored.img"
    run_cli("restore", inc.id, out, safe=safe_dir, check=True)
    assert out.read_bytes() == guest
    back = tmp_path / "back.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(out), str(back)], check=True)
    cmp = subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", str(img), str(back)],
                         capture_output=True, text=True)
    assert cmp.returncode == 0 and "identical" in cmp.stdout
    run_cli("verify", "--data", safe=safe_dir, check=True)


def test_backup_killed_after_reading_loses_no_change(tmp_path, safe_dir):
    img = _image(tmp_path)
    bs = _block(safe_dir)
    _backup(img, safe_dir)
    a = [(1 << 20, 4096, "0x71")]
    _qemu_io(img, *a)
    # --post-thaw runs once the source is read (no snapshot): the backup dies before its commit
    r = _backup(img, safe_dir, "--post-thaw", "kill -9 $PPID")
    assert r.code == -signal.SIGKILL
    assert len(_points(safe_dir)) == 1
    assert len(_bitmaps(img)) == 2          # the killed backup's new bitmap, and the one the point expects
    b = [(8 << 20, 4096, "0x72")]
    _qemu_io(img, *b)
    # a stale bitmap older than the point (as a backup killed after its commit leaves one)
    subprocess.run(["qemu-img", "bitmap", "--add", str(img), "bk.0-00000000"], check=True)
    r = _backup(img, safe_dir)
    assert r.code == 0, r.err
    p = _points(safe_dir)[-1]
    assert p.extra["change_source"]["fallback"] is None
    assert p.stats["bytes_scanned"] == _touched(a + b, bs)
    assert _content(safe_dir, p) == _guest(img, tmp_path)
    assert p.extra["qemu_bitmap"]["generation"] == 3
    assert _bitmaps(img) == [p.extra["qemu_bitmap"]["name"]]


def _in_use(img):
    """Leave the bitmaps flagged in use, as a QEMU killed while it had the image open does."""
    p = subprocess.Popen(["qemu-io", "-f", "qcow2", str(img)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert p.stdin is not None and p.stdout is not None
    p.stdin.write(b"write -P 0x77 2M 4k\n")
    p.stdin.flush()
    assert b"wrote" in p.stdout.readline()
    p.kill()
    p.wait()


FALLBACKS = {
    "bitmap missing": (lambda img, bm: subprocess.run(["qemu-img", "bitmap", "--remove", str(img), bm], check=True),
                       "is missing from the image"),
    "bitmap in use": (lambda img, bm: _in_use(img), "is inconsistent"),
    "bitmap disabled": (lambda img, bm: subprocess.run(["qemu-img", "bitmap", "--disable", str(img), bm], check=True),
                        "is disabled"),
    "disk resized": (lambda img, bm: subprocess.run(["qemu-img", "resize", "-q", str(img), str(SIZE + (4 << 20))],
                                                    check=True), "size changed"),
    "no bitmap before": (None, "was not made with dirty bitmap bk"),
}


@pytest.mark.parametrize("case", sorted(FALLBACKS))
def test_fallback_reads_whole_with_a_warning(tmp_path, safe_dir, case):
    spoil, reason = FALLBACKS[case]
    img = _image(tmp_path)
    bs = _block(safe_dir)
    if spoil is None:
        run_cli("backup", "--volume", img, safe=safe_dir, check=True)   # a plain point of the qcow2, no bitmap
    else:
        _backup(img, safe_dir)
        spoil(img, _points(safe_dir)[-1].extra["qemu_bitmap"]["name"])
    _qemu_io(img, (3 << 20, 4096, "0x99"))
    r = _backup(img, safe_dir)
    assert r.code == 3 and "changed blocks not used" in r.err and reason in r.err
    p = _points(safe_dir)[-1]
    assert p.extra["change_source"]["kind"] == "full" and reason in p.extra["change_source"]["fallback"]
    assert any(reason in w["message"] for w in p.warnings)
    guest = _guest(img, tmp_path)
    assert _content(safe_dir, p) == guest and p.stats["bytes_scanned"] == _data_bytes(guest, bs)
    assert _bitmaps(img) == [p.extra["qemu_bitmap"]["name"]]     # a fresh start, the untrusted ones gone
    # ... from which the next incremental works again
    _qemu_io(img, (7 << 20, 4096, "0x9a"))
    r = _backup(img, safe_dir)
    assert r.code == 0, r.err
    p = _points(safe_dir)[-1]
    assert p.stats["bytes_scanned"] == _touched([(7 << 20, 4096, "")], bs)
    assert _content(safe_dir, p) == _guest(img, tmp_path)


def test_plain_qcow2_volume_is_the_guest_view_and_mount_name(tmp_path, safe_dir):
    from pointsafe.fusefs.layout import image_name
    img = _image(tmp_path)
    r = run_cli("backup", "--volume", img, safe=safe_dir)
    assert r.code == 0, r.err
    p = _points(safe_dir)[-1]
    assert p.size == SIZE and _content(safe_dir, p) == _guest(img, tmp_path)
    assert image_name(p) == b"vm.img"
    # the same blob as a raw copy of the guest's disk gives (so the two deduplicate)
    raw = tmp_path / "copy.raw"
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(img), str(raw)], check=True)
    run_cli("backup", "--volume", "--name", "copy", raw, safe=safe_dir, check=True)
    assert _points(safe_dir)[-1].root == p.root
    # unchanged image: not read again
    run_cli("backup", "--volume", img, safe=safe_dir, check=True)
    again = _points(safe_dir)[-1]
    assert again.name == "vm.qcow2" and again.root == p.root and again.stats["bytes_scanned"] == 0


@needs_fuse
def test_mount_shows_the_guest_disk_as_name_img(tmp_path, safe_dir):
    from _fuse_util import mounted
    img = _image(tmp_path)
    run_cli("backup", "--volume", img, safe=safe_dir, check=True)
    p = _points(safe_dir)[-1]
    with mounted(safe_dir, tmp_path / "mnt", p.id[:12]):
        assert os.listdir(tmp_path / "mnt") == ["vm.img"]
        assert (tmp_path / "mnt" / "vm.img").read_bytes() == _guest(img, tmp_path)


def test_qemu_source_errors_are_one_line(tmp_path, safe_dir):
    raw = tmp_path / "disk.img"
    raw.write_bytes(os.urandom(1 << 20))
    r = _backup(raw, safe_dir)
    assert r.code == 1 and "needs a qcow2 image" in r.err and len(r.err.strip().splitlines()) == 1
    img = _image(tmp_path)
    r = run_cli("backup", "--volume", "--changed-blocks", "qemu:no/slash", img, safe=safe_dir)
    assert r.code == 1 and "bad bitmap name" in r.err and len(r.err.strip().splitlines()) == 1
    assert not _points(safe_dir) and _bitmaps(img) == []


def _nbd_of(img) -> int | None:
    """The pid of a qemu-nbd serving ``img``, or None."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            continue
        if args and args[0].endswith(b"qemu-nbd") and os.fsencode(str(img)) in args:
            return int(pid)
    return None


def test_backup_killed_while_reading_leaves_the_image_usable(tmp_path, safe_dir):
    img = _image(tmp_path)
    subprocess.run(["qemu-img", "resize", "-q", str(img), str(256 << 20)], check=True)
    _qemu_io(img, (64 << 20, 128 << 20, "0x21"))        # a longer read
    proc = subprocess.Popen([sys.executable, "-m", "pointsafe.cli", "--safe", str(safe_dir), "backup", "--volume",
                             "--changed-blocks", "qemu:bk", "-q", str(img)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while _nbd_of(img) is None and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        if proc.poll() is not None:
            pytest.skip("the backup ended before it could be killed while reading")
    finally:
        proc.kill()
        proc.wait()
    assert not _points(safe_dir)
    # the export ends with its client; the next backup edits the bitmaps and reads whole
    r = _backup(img, safe_dir)
    assert r.code == 3 and "no previous point" in r.err
    p = _points(safe_dir)[-1]
    assert _content(safe_dir, p) == _guest(img, tmp_path)
    assert _bitmaps(img) == [p.extra["qemu_bitmap"]["name"]]
    assert _nbd_of(img) is None


def test_a_point_of_the_image_file_bytes_is_not_the_base_of_a_guest_view(tmp_path, safe_dir):
    """A point holding the qcow2 file's own bytes (as older pointsafe stored it) is not reused
    for the guest's disk: the ranges of a change source would be in other coordinates."""
    img = _image(tmp_path)
    other = tmp_path / "bytes.img"
    shutil.copyfile(img, other)
    with open(other, "r+b") as f:
        f.write(b"RAW!")                    # not a qcow2 any more: read as its bytes
    run_cli("backup", "--volume", "--name", "vm.qcow2", other, safe=safe_dir, check=True)
    rf = tmp_path / "ranges.json"
    rf.write_text("[]")
    r = run_cli("backup", "--volume", "--changed-blocks", rf, img, safe=safe_dir)
    assert r.code == 3 and "read as raw, this one as qcow2" in r.err
    p = _points(safe_dir)[-1]
    assert _content(safe_dir, p) == _guest(img, tmp_path) and p.extra["source_format"] == "qcow2"


def test_full_read_counts_writes_the_bitmap_missed(tmp_path, safe_dir):
    img = _image(tmp_path)
    _backup(img, safe_dir)
    bm = _points(safe_dir)[-1].extra["qemu_bitmap"]["name"]
    _qemu_io(img, (9 << 20, 4096, "0x32"), (12 << 20, 4096, "0x33"))
    subprocess.run(["qemu-img", "bitmap", "--clear", str(img), bm], check=True)         # ... forgotten
    _qemu_io(img, (1 << 20, 4096, "0x31"))                                            # tracked
    r = _backup(img, safe_dir, "--full-read")
    assert r.code == 3 and "found 2 blocks that differ" in r.err
    p = _points(safe_dir)[-1]
    assert _content(safe_dir, p) == _guest(img, tmp_path)
    assert _bitmaps(img) == [p.extra["qemu_bitmap"]["name"]]


def test_without_qemu_nbd_a_qcow2_is_stored_as_its_bytes_with_a_note(tmp_path, safe_dir):
    img = _image(tmp_path)
    bin_dir = tmp_path / "bin"      # every command of the PATH but qemu-nbd
    bin_dir.mkdir()
    for d in os.environ.get("PATH", "").split(os.pathsep):
        if os.path.isdir(d):
            for n in os.listdir(d):
                if n != "qemu-nbd" and not (bin_dir / n).exists():
                    (bin_dir / n).symlink_to(os.path.join(d, n))
    env = {"PATH": str(bin_dir)}
    r = run_cli("backup", "--volume", img, safe=safe_dir, env=env)
    assert r.code == 0 and "stored as the file's bytes" in r.out + r.err and "qemu-nbd" in r.out + r.err
    p = _points(safe_dir)[-1]
    assert "source_format" not in p.extra and _content(safe_dir, p) == img.read_bytes()
    r = run_cli("backup", "--volume", "--changed-blocks", "qemu:bk", img, safe=safe_dir, env=env)
    assert r.code == 1 and "needs qemu-nbd" in r.err and len(r.err.strip().splitlines()) == 1
