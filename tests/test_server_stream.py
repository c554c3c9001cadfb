"""Reading through the server as stored, restoring streamed, and gc lowering the agents' counts.

- the fetch route sends a chunk as the safe stores it (the agent's zstd frame), the agent
  decompresses it and checks it against its id; another agent's id still reads as missing;
- a restore through the server writes straight into the target, holding at most a bounded
  part of a file in memory (measured: the restoring process's peak RSS) and nothing on disk;
- gc on the server takes what it removes off the bytes stored of the agents that uploaded it,
  and the hard quota follows at once.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys

import zstandard

from _server_util import add_agent, agent, agent_env, backup_json, make_safe, running
from conftest import CLI_ENV, run_cli
from pointsafe.cas import Kind
from pointsafe.server import protocol

TEXT = b"".join(b"line %d of a log file that compresses well\n" % i for i in range(3000))


def _upload(client, raw: bytes, frame: bytes) -> bytes:
    oid = protocol.agent_id(Kind.CHUNK, raw)
    body = b"".join(protocol.encode(Kind.CHUNK, oid, protocol.CODEC_ZSTD, len(raw), frame))
    r = client.post("/api/v1/objects", content=body)
    assert r.status_code == 200, r.text
    return oid


def test_a_chunk_is_fetched_as_stored_compressed_and_decodes_to_its_id_and_only_for_its_agent(tmp_path):
    safe = make_safe(tmp_path)
    a, b = add_agent(safe, "a", "--can-restore"), add_agent(safe, "b", "--can-restore")
    frame = zstandard.ZstdCompressor(level=3).compress(TEXT)
    with running(safe) as server:
        ca, cb = server.client(a), server.client(b)
        oid = _upload(ca, TEXT, frame)
        r = ca.post("/api/v1/objects/fetch", json={"ids": [oid.hex()]})
        assert r.status_code == 200, r.text
        kind, got_id, codec, raw_len, body_len = protocol.REC.unpack_from(r.content)
        assert (kind, got_id, codec, raw_len) == (Kind.CHUNK, oid, protocol.CODEC_ZSTD, len(TEXT))
        assert r.content[protocol.REC.size:] == frame and body_len == len(frame) < len(TEXT) // 4
        [rec] = protocol.decode(r.content)
        assert rec.raw == TEXT and protocol.agent_id(rec.kind, rec.raw) == oid
        # the safe holds it, but b never uploaded it: missing for b, compressed or not
        r = cb.post("/api/v1/objects/fetch", json={"ids": [oid.hex()]})
        assert r.status_code == 404 and oid.hex() in r.json()["error"]


def _file(path, mib: int) -> str:
    """``mib`` MiB, half random and half text-like (compressible), written to ``path`` in pieces
    (never all of it in memory); returns its SHA-256."""
    rnd = random.Random(7)
    text = bytes(b"abcdefgh \n"[i % 10] for i in range(256))
    h = hashlib.sha256()
    with open(path, "wb") as f:
        for i in range(mib):
            piece = rnd.randbytes(1 << 20)
            piece = piece.translate(text) if i >= mib // 2 else piece
            h.update(piece)
            f.write(piece)
    return h.hexdigest()


def _sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while piece := f.read(1 << 20):
            h.update(piece)
    return h.hexdigest()


_PEAK = ("import resource, subprocess, sys\n"
         "r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL)\n"
         "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024, file=sys.stderr)\n"
         "sys.exit(r.returncode)\n")


def _peak_rss_mib(cmd: list[str], env: dict) -> tuple[int, str]:
    """Run ``cmd``; (its peak RSS in MiB, its stderr), failing when it fails. It is started
    from a small Python process of its own: a child's peak RSS counts the process it was
    forked from (this one holds pytest), until it execs."""
    p = subprocess.run([sys.executable, "-c", _PEAK, *cmd], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    *err, peak = p.stderr.strip().splitlines()
    return int(peak), "\n".join(err)


def test_a_restore_streams_a_large_file_into_the_target_within_a_memory_bound(tmp_path):
    safe = make_safe(tmp_path)
    tok = add_agent(safe, "big", "--can-restore")
    src = tmp_path / "src"
    src.mkdir()
    digest = _file(src / "disk.img", 192)
    (src / "small").write_bytes(b"tiny")
    cache = tmp_path / "cache"
    with running(safe) as server:
        backup_json(server, tok, src)
        env = {**os.environ, **CLI_ENV, "XDG_CACHE_HOME": str(cache)}
        for k, v in agent_env(tok).items():
            env.pop(k, None) if v is None else env.__setitem__(k, v)
        cmd = [sys.executable, "-m", "pointsafe.cli", "restore", "src@latest", str(tmp_path / "out"),
               "--server", server.url, "-q"]
        peak, err = _peak_rss_mib(cmd, env)
    assert _sha256(tmp_path / "out" / "disk.img") == digest
    assert (tmp_path / "out" / "small").read_bytes() == b"tiny"
    # the file is 192 MiB: a restore that held it (or a batch of 4096 chunks) would be far above
    assert peak < 100, f"the restore peaked at {peak} MiB: {err}"
    assert not cache.exists()          # and nothing was put on the agent's disk but the target


def _info(server, token) -> dict:
    r = server.client(token).get("/api/v1/info")
    assert r.status_code == 200, r.text
    return r.json()


def test_gc_on_the_server_lowers_the_agents_bytes_stored_and_its_hard_quota_follows(tmp_path):
    safe = make_safe(tmp_path)
    tok = add_agent(safe, "web1", "--quota-hard", "1500K")
    admin = add_agent(safe, "ops", "--admin")
    src = tmp_path / "src"
    src.mkdir()
    (src / "data").write_bytes(os.urandom(1_000_000))
    with running(safe) as server:
        first = backup_json(server, tok, src)
        stored = _info(server, tok)["stored_bytes"]
        assert stored >= 1_000_000
        (src / "data").unlink()
        (src / "data2").write_bytes(os.urandom(1_000_000))
        r = agent(server, tok, "backup", src, "-q")            # 2 MB would be held: over 1500K
        assert r.code != 0 and "hard quota" in r.err, r.err
        # the administrator forgets the agent's point (admin token) and runs gc on the server
        r2 = server.client(admin).post("/api/v1/admin/forget", json={"points": [first["id"]]})
        assert r2.status_code == 200 and r2.json()["points_dropped"] == 1, r2.text
        assert run_cli("gc", safe=safe).code == 0
        assert _info(server, tok)["stored_bytes"] == 0           # everything it had uploaded is gone
        # within the ten minutes after the refusal's recount: the count gc lowered lets it through
        again = backup_json(server, tok, src)
        assert again["stats"]["files"] == 1
        now = _info(server, tok)["stored_bytes"]
        assert 1_000_000 <= now < 1_100_000
        assert agent(server, tok, "restore", again["id"], tmp_path / "out").code == 1   # no --can-restore
    listed = {a["name"]: a for a in json.loads(run_cli("agent", "list", "--json", safe=safe).out)}
    recounted = {a["name"]: a for a in json.loads(run_cli("agent", "list", "--recount", "--json", safe=safe).out)}
    assert listed["web1"]["stored_bytes"] == recounted["web1"]["stored_bytes"] == now
