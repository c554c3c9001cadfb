"""The btrfs send stream (``btrfs send --no-data -p PARENT NEW``), parsed and replayed.

Format and pitfalls: docs/research/changed-blocks-and-s3.md section 1. The stream is read in
full and checked (magic, version, every command's CRC32C, a final ``end``) before anything is
replayed; any doubt raises ``SendStreamError`` and the caller reads the whole tree instead.
Replay keys every change by inode number, against the parent snapshot's namespace, so that
orphan names (``o<ino>-<gen>-<n>``), renamed directories and link/unlink swaps resolve to the
names in the new snapshot.
"""

from __future__ import annotations

import fcntl
import os
import struct
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

MAGIC = b"btrfs-stream\0"

CMD_NAMES = {
    1: "subvol", 2: "snapshot", 3: "mkfile", 4: "mkdir", 5: "mknod", 6: "mkfifo", 7: "mksock",
    8: "symlink", 9: "rename", 10: "link", 11: "unlink", 12: "rmdir", 13: "set_xattr",
    14: "remove_xattr", 15: "write", 16: "clone", 17: "truncate", 18: "chmod", 19: "chown",
    20: "utimes", 21: "end", 22: "update_extent", 23: "fallocate", 24: "fileattr",
    25: "encoded_write",
}
A_UUID, A_CTRANSID, A_INO, A_SIZE, A_PATH, A_PATH_TO, A_PATH_LINK = 1, 2, 3, 4, 15, 16, 17
A_FILE_OFFSET, A_DATA, A_CLONE_UUID, A_CLONE_CTRANSID, A_CLONE_LEN = 18, 19, 20, 21, 24
_STRS = {13, 15, 16, 17, 22}
_BYTES = {1, 14, 19, 20, 9, 10, 11, 12}   # uuids, xattr data, data, timespecs: kept raw
_U32 = {25, 30, 31}


class SendStreamError(Exception):
    """The stream cannot be trusted (bad magic/CRC, unknown command, no ``end``)."""


def _crc32c_table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_T = _crc32c_table()


def crc32c_seed0(data: bytes) -> int:
    """CRC32C as btrfs send uses it: seed 0, no final xor."""
    try:
        import crc32c as _c
        return int(_c.crc32c(data, 0xFFFFFFFF)) ^ 0xFFFFFFFF
    except ImportError:
        pass
    crc = 0
    for b in data:
        crc = _T[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc


@dataclass
class Command:
    cmd: int
    attrs: dict[int, object]

    @property
    def name(self) -> str:
        return CMD_NAMES.get(self.cmd, str(self.cmd))

    def s(self, a: int) -> str:
        v = self.attrs.get(a)
        if not isinstance(v, str):
            raise SendStreamError(f"{self.name}: attribute {a} missing")
        return v

    def u(self, a: int) -> int:
        v = self.attrs.get(a)
        if not isinstance(v, int):
            raise SendStreamError(f"{self.name}: attribute {a} missing")
        return v


def parse(stream: bytes) -> tuple[int, list[Command]]:
    """(version, commands) of a whole stream; raises SendStreamError unless it is intact."""
    if not stream.startswith(MAGIC) or len(stream) < 17:
        raise SendStreamError("not a btrfs send stream")
    (version,) = struct.unpack_from("<I", stream, 13)
    if version not in (1, 2):
        raise SendStreamError(f"send stream version {version} is not understood")
    pos = 17
    cmds: list[Command] = []
    while pos < len(stream):
        if pos + 10 > len(stream):
            raise SendStreamError("truncated command header")
        length, cmd, crc = struct.unpack_from("<IHI", stream, pos)
        end = pos + 10 + length
        if end > len(stream):
            raise SendStreamError("truncated command")
        hdr = bytearray(stream[pos:pos + 10])
        hdr[6:10] = b"\0\0\0\0"
        if crc32c_seed0(bytes(hdr) + stream[pos + 10:end]) != crc:
            raise SendStreamError(f"bad CRC in command {len(cmds)}")
        if cmd not in CMD_NAMES:
            raise SendStreamError(f"unknown send command {cmd}")
        cmds.append(Command(cmd, _tlvs(stream, pos + 10, end, version)))
        pos = end
        if cmd == 21:
            if pos != len(stream):
                raise SendStreamError("data after end")
            return version, cmds
    raise SendStreamError("send stream has no end command")


def _tlvs(buf: bytes, pos: int, end: int, version: int) -> dict[int, object]:
    attrs: dict[int, object] = {}
    while pos < end:
        if pos + 2 > end:
            raise SendStreamError("truncated attribute")
        (typ,) = struct.unpack_from("<H", buf, pos)
        if version >= 2 and typ == A_DATA:   # v2: DATA has no length, runs to the end
            attrs[typ] = buf[pos + 2:end]
            return attrs
        if pos + 4 > end:
            raise SendStreamError("truncated attribute")
        (ln,) = struct.unpack_from("<H", buf, pos + 2)
        val = buf[pos + 4:pos + 4 + ln]
        if len(val) != ln:
            raise SendStreamError("truncated attribute")
        pos += 4 + ln
        if typ in _STRS:
            attrs[typ] = val.decode("utf-8", "surrogateescape")
        elif typ in _BYTES or typ > 31:
            attrs[typ] = val
        elif typ in _U32 and ln == 4:
            attrs[typ] = struct.unpack("<I", val)[0]
        elif ln == 8:
            attrs[typ] = struct.unpack("<Q", val)[0]
        else:
            attrs[typ] = val
    return attrs


@dataclass
class Changes:
    """What changed between the parent and the new snapshot, in the new snapshot's names."""
    clone_uuid: bytes | None = None
    clone_ctransid: int | None = None
    changed: set[str] = field(default_factory=set)    # paths (new names) whose inode was touched
    deleted_inos: set[int] = field(default_factory=set)
    extents: dict[str, list[tuple[int, int]]] = field(default_factory=dict)  # path -> [(off, len)]
    whole: set[str] = field(default_factory=set)       # files to read whole (new, clone, truncate)
    dirs: set[str] = field(default_factory=set)        # directories whose entries changed
    moved: dict[str, str] = field(default_factory=dict)  # renamed directory: new path -> path in the parent


class _Namespace:
    """dir ino -> {name: ino}, filled lazily from the parent snapshot and edited by the stream."""

    def __init__(self, root: Path):
        self.root = root
        self.entries: dict[int, dict[str, int]] = {}
        self.names: dict[int, set[tuple[int, str]]] = {}
        self.real: dict[int, str] = {256: ""}   # dir ino -> path in parent snapshot

    def _load(self, dino: int) -> dict[str, int]:
        if dino not in self.entries:
            d: dict[str, int] = {}
            rp = self.real.get(dino)
            if rp is not None:
                try:
                    with os.scandir(self.root / rp if rp else self.root) as it:
                        for e in it:
                            d[e.name] = e.inode()
                            if e.is_dir(follow_symlinks=False):
                                self.real.setdefault(e.inode(), os.path.join(rp, e.name))
                except FileNotFoundError:
                    pass
            self.entries[dino] = d
            for name, ino in d.items():
                self.names.setdefault(ino, set()).add((dino, name))
        return self.entries[dino]

    def lookup(self, path: str) -> tuple[int, str, int | None]:
        """(dir ino, last name, ino or None) for a path in the current state."""
        parts = [p for p in path.split("/") if p]
        if not parts:
            return 0, "", 256
        dino = 256
        for p in parts[:-1]:
            nxt = self._load(dino).get(p)
            if nxt is None:
                raise SendStreamError(f"path {path!r} does not resolve")
            dino = nxt
        return dino, parts[-1], self._load(dino).get(parts[-1])

    def ino(self, path: str) -> int:
        i = self.lookup(path)[2]
        if i is None:
            raise SendStreamError(f"path {path!r} does not resolve")
        return i

    def add(self, path: str, ino: int) -> None:
        dino, name, _ = self.lookup(path)
        self._load(dino)[name] = ino
        self.names.setdefault(ino, set()).add((dino, name))

    def remove(self, path: str) -> int:
        dino, name, ino = self.lookup(path)
        if ino is None:
            raise SendStreamError(f"path {path!r} does not resolve")
        del self._load(dino)[name]
        self.names.get(ino, set()).discard((dino, name))
        return ino

    def path_of(self, ino: int, depth: int = 0) -> str | None:
        """A current name of ``ino`` (the first found), or None when it has none."""
        if ino == 256:
            return ""
        if depth > 4096:
            raise SendStreamError("directory loop")
        for dino, name in sorted(self.names.get(ino, ())):
            base = self.path_of(dino, depth + 1)
            if base is not None:
                return os.path.join(base, name) if base else name
        return None

    def all_paths(self, ino: int) -> list[str]:
        if ino == 256:
            return [""]
        out = []
        for dino, name in sorted(self.names.get(ino, ())):
            base = self.path_of(dino)
            if base is not None:
                out.append(os.path.join(base, name) if base else name)
        return out


def replay(cmds: list[Command], parent_root: Path) -> Changes:
    """Apply the commands to the parent snapshot's namespace; the touched inodes, by new name."""
    ns = _Namespace(parent_root)
    ch = Changes()
    if not cmds or cmds[0].name not in ("snapshot", "subvol"):
        raise SendStreamError("stream does not start with snapshot/subvol")
    first = cmds[0]
    if first.name == "snapshot":
        cu = first.attrs.get(A_CLONE_UUID)
        ch.clone_uuid = cu if isinstance(cu, bytes) else None
        ch.clone_ctransid = first.u(A_CLONE_CTRANSID)
    touched: set[int] = set()
    whole: set[int] = set()
    dirs: set[int] = set()
    extents: dict[int, list[tuple[int, int]]] = {}
    for c in cmds[1:]:
        n = c.name
        if n in ("mkfile", "mkdir", "mknod", "mkfifo", "mksock", "symlink"):
            ino = c.u(A_INO)
            ns.add(c.s(A_PATH), ino)
            dirs.add(ns.lookup(c.s(A_PATH))[0])   # (send makes it under an orphan name, then renames)
            touched.add(ino)
            whole.add(ino)
            if n == "mkdir":
                ns.entries[ino] = {}
                dirs.add(ino)
        elif n == "rename":
            src, dst = c.s(A_PATH), c.s(A_PATH_TO)
            dirs.add(ns.lookup(src)[0])
            ino = ns.remove(src)
            ns.add(dst, ino)
            dirs.add(ns.lookup(dst)[0])
            touched.add(ino)
        elif n == "link":
            ino = ns.ino(c.s(A_PATH_LINK))
            ns.add(c.s(A_PATH), ino)
            dirs.add(ns.lookup(c.s(A_PATH))[0])
            touched.add(ino)
        elif n in ("unlink", "rmdir"):
            dirs.add(ns.lookup(c.s(A_PATH))[0])
            ino = ns.remove(c.s(A_PATH))
            touched.add(ino)
        elif n in ("update_extent", "write", "fallocate", "encoded_write"):
            ino = ns.ino(c.s(A_PATH))
            touched.add(ino)
            if n == "update_extent":
                extents.setdefault(ino, []).append((c.u(A_FILE_OFFSET), c.u(A_SIZE)))
            else:
                whole.add(ino)
        elif n in ("clone", "truncate"):
            ino = ns.ino(c.s(A_PATH))
            touched.add(ino)
            whole.add(ino)
        elif n in ("set_xattr", "remove_xattr", "chmod", "chown", "utimes", "fileattr"):
            touched.add(ns.ino(c.s(A_PATH)))
        elif n == "end":
            break
        else:
            raise SendStreamError(f"send command {n} not expected here")
    for ino in touched | dirs:
        paths = ns.all_paths(ino)
        if not paths:
            ch.deleted_inos.add(ino)
        for p in paths:
            ch.changed.add(p)
            if ino in dirs:
                ch.dirs.add(p)
            if ino in whole:
                ch.whole.add(p)
            elif ino in extents:
                ch.extents[p] = sorted(extents[ino])
            old = ns.real.get(ino)
            if old is not None and old != p and ino not in whole and len(paths) == 1:
                ch.moved[p] = old
    return ch


def send_changes(parent: Path, new: Path, proto: int | None = None) -> Changes:
    """Run ``btrfs send --no-data -p PARENT NEW`` and replay it; SendStreamError on any failure."""
    cmd = ["btrfs", "send", "-q", "--no-data"]
    if proto is not None:
        cmd += ["--proto", str(proto)]
    r = subprocess.run(cmd + ["-p", str(parent), str(new)], capture_output=True)
    if r.returncode != 0:
        raise SendStreamError(f"btrfs send failed: {r.stderr.decode(errors='replace').strip()}")
    return replay(parse(r.stdout)[1], parent)


_FMT = "<Q256sQQQQ16s16s16sQQQQ" + "QI4x" * 4 + "8Q"
_IOC = (2 << 30) | (struct.calcsize(_FMT) << 16) | (0x94 << 8) | 60


@dataclass(frozen=True)
class SubvolInfo:
    uuid: str
    parent_uuid: str
    ctransid: int
    readonly: bool


def subvol_info(path: Path) -> SubvolInfo:
    """BTRFS_IOC_GET_SUBVOL_INFO of a subvolume root (no subprocess, no privilege)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        v = struct.unpack(_FMT, fcntl.ioctl(fd, _IOC, bytes(struct.calcsize(_FMT))))
    finally:
        os.close(fd)
    return SubvolInfo(uuid=v[6].hex(), parent_uuid=v[7].hex(), ctransid=v[9], readonly=bool(v[5] & 1))


def subvol_root(path: Path) -> Path:
    """The root of the btrfs subvolume holding ``path`` (inode 256, on the same device)."""
    path = Path(os.path.abspath(path))
    dev = os.lstat(path).st_dev
    while os.lstat(path).st_ino != 256 and path.parent != path and os.lstat(path.parent).st_dev == dev:
        path = path.parent
    return path


def subvol_record(read_path: Path) -> dict | None:
    """What a btrfs point records of its snapshot (``snapshot.subvol``), or None when unknown."""
    try:
        i = subvol_info(subvol_root(read_path))
    except OSError:
        return None
    return {"uuid": i.uuid, "parent_uuid": i.parent_uuid, "ctransid": i.ctransid}


def parent_mismatch(recorded: dict | None, parent: Path, new: Path, changes: Changes | None = None) -> str | None:
    """Why the retained ``parent`` snapshot cannot be the base of an incremental read of ``new``
    (one line for the point's warning), or None when it can: it must still be the snapshot the
    previous point recorded (uuid, ctransid: an edited snapshot has a new ctransid), read-only,
    of the same subvolume as ``new``, and the stream must say it was sent against it."""
    if not recorded or not {"uuid", "parent_uuid", "ctransid"} <= set(recorded):
        return "the previous point recorded no btrfs snapshot identity"
    try:
        p, n = subvol_info(parent), subvol_info(new)
    except OSError as e:
        return f"the previous point's snapshot {parent} cannot be read: {e.strerror or e}"
    if p.uuid != recorded["uuid"] or p.ctransid != recorded["ctransid"]:
        return f"the previous point's snapshot {parent} was changed since that point"
    if not (p.readonly and n.readonly):
        return "a snapshot is not read-only"
    if p.parent_uuid != recorded["parent_uuid"] or n.parent_uuid != p.parent_uuid:
        return "the snapshots are not of the same subvolume"
    if changes is not None and (changes.clone_uuid is None or changes.clone_uuid.hex() != p.uuid
                                or changes.clone_ctransid != p.ctransid):
        return "the send stream was not made against the previous point's snapshot"
    return None
