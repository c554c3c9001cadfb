"""The safe: a content-addressed object store of packs indexed by LMDB.

Public API re-exported here; nothing in this package imports from the other rooms.
"""

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
from .repair import repair
from .store import Safe, Writer, take_lock, release_lock
from .timefmt import EPOCH, format_utc, format_utc_seconds, parse_utc, parse_utc_ns, utc_now_iso
from .tree import Entry, build_tree, decode_tree, encode_tree, find_entry, read_tree, tree_pages
from .verify import verify

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
