"""The release queue (cas/release.py): queued drops are never lost inside a drain batch."""

from __future__ import annotations

from pointsafe.cas import Kind, Safe, encode_tree
from pointsafe.cas.release import drain, forget_points_queued
from pointsafe.cas.audit import audit
from pointsafe.cas.tree import DIR, Entry


def _tree(w, entries: list[Entry]) -> bytes:
    children, payload = encode_tree(entries)
    return w.put_node(Kind.TREE, children, payload)


def test_a_drop_queued_for_a_key_of_the_same_batch_is_applied(safe_dir):
    """Tree B is the root of one point and a subdirectory of the root A of another. Forgetting
    both puts A and B in one drain batch; when A dies first it queues one more drop for B,
    which must not be lost when B's own entry is processed (B would leak at count 1)."""
    for salt in range(64):
        with Safe.open(safe_dir) as safe:
            with safe.writer("test") as w:
                b = _tree(w, [Entry(f"leaf{salt}".encode(), DIR, 0o755)])
                a = _tree(w, [Entry(b"sub", DIR, 0o755, ref=b)])
                if a > b:
                    continue   # the batch goes in key order: we need A before B
                pa = w.add_point({"name": "a", "kind": "tree", "started": f"t{salt}"}, a)
                pb = w.add_point({"name": "b", "kind": "tree", "started": f"t{salt}"}, b)
                forget_points_queued(w, [bytes.fromhex(pa.id), bytes.fromhex(pb.id)])
                drain(w)
                drain(w)
                assert w.lookup(b).refcount == 0 and w.lookup(b).dead
            rep = audit(safe)
            assert rep.ok, rep.errors
            return
    raise AssertionError("no salt gave A < B")
