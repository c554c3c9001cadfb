"""The safe: a content-addressed object store of packs indexed by LMDB.

Public API re-exported here; nothing in this package imports from the other rooms.
``repair`` and ``verify`` (with ``audit``) are imported when first asked for: the commands a
scheduler runs every hour (``backup``, ``status``) never need them.
"""

from typing import TYPE_CHECKING, Any

from .blob import BlobBuilder, BlobReader, NodeCache, decode_list, encode_list
from .crypto import CIPHERS, Crypto, default_cipher
from .errors import (DiskFull, IntegrityError, NeedsPassword, NotASafe, ObjectMissing, PointNotFound, QuotaExceeded,
                     SafeError, SafeLocked, UnsupportedVersion, UsageError, WrongPassword)
from .header import FORMAT_VERSION, SafeConfig, parse_compression
from .keys import KEY_SIZE, Kind, object_key
from .nodes import decode_node, encode_node, node_children
from .pack import Prepared, prepare
from .point import Frozen, Point, latest, latest_per, newest_first, oldest_first
from .points import parse_time, resolve_point
from .store import Safe, Writer, take_lock, release_lock
from .timefmt import EPOCH, format_utc, format_utc_seconds, parse_utc, parse_utc_ns, utc_now_iso
from .tree import Entry, build_tree, decode_tree, encode_tree, find_entry, read_tree, tree_pages

if TYPE_CHECKING:
    from .repair import repair
    from .verify import verify


def __getattr__(name: str) -> Any:
    """``repair`` and ``verify``, imported on first use (PEP 562)."""
    import importlib
    if name not in ("repair", "verify"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    fn = getattr(importlib.import_module(f".{name}", __name__), name)
    globals()[name] = fn
    return fn


__all__ = [
    "BlobBuilder", "BlobReader", "NodeCache", "decode_list", "encode_list",
    "CIPHERS", "Crypto", "default_cipher", "NeedsPassword", "WrongPassword",
    "DiskFull", "IntegrityError", "NotASafe", "ObjectMissing", "PointNotFound", "QuotaExceeded", "SafeError",
    "SafeLocked", "UnsupportedVersion", "UsageError", "FORMAT_VERSION", "SafeConfig",
    "parse_compression", "KEY_SIZE", "Kind", "object_key", "decode_node", "encode_node",
    "node_children", "Frozen", "Point", "latest", "latest_per", "newest_first", "oldest_first",
    "EPOCH", "format_utc", "format_utc_seconds", "parse_utc", "parse_utc_ns", "parse_time", "resolve_point",
    "Prepared", "prepare", "repair", "Safe", "Writer", "take_lock", "release_lock", "utc_now_iso", "Entry",
    "decode_tree", "encode_tree", "verify", "build_tree", "read_tree", "find_entry", "tree_pages",
]
