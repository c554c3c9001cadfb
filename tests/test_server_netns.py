"""An agent on another network (a network namespace joined by a veth pair): TLS on a real
interface address, plain HTTP refused there, and a backup and restore across it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from _server_util import add_agent, make_safe, self_signed, start, stop
from _tree_util import all_types_tree, assert_trees_equal, make_tree
from _web_util import free_port
from conftest import run_cli


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@pytest.fixture
def remote_net():
    """(namespace, the server's address on the host side, the agent's address): a namespace
    reached through a veth pair on a /30 of its own."""
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    tag = f"{os.getpid() % 100000}"
    ns, host_if, ns_if = f"psagent{tag}", f"psh{tag}", f"psn{tag}"
    net = os.getpid() % 250 + 1
    server_ip, agent_ip = f"10.213.{net}.1", f"10.213.{net}.2"
    try:
        _ip("netns", "add", ns)
    except (subprocess.CalledProcessError, FileNotFoundError) as e:
        pytest.skip(f"no network namespaces here: {e}")
    try:
        _ip("link", "add", host_if, "type", "veth", "peer", "name", ns_if)
        _ip("link", "set", ns_if, "netns", ns)
        _ip("addr", "add", f"{server_ip}/30", "dev", host_if)
        _ip("link", "set", host_if, "up")
        _ip("netns", "exec", ns, "ip", "addr", "add", f"{agent_ip}/30", "dev", ns_if)
        _ip("netns", "exec", ns, "ip", "link", "set", ns_if, "up")
        _ip("netns", "exec", ns, "ip", "link", "set", "lo", "up")
        yield ns, server_ip, agent_ip
    finally:
        subprocess.run(["ip", "link", "del", host_if], capture_output=True, timeout=30)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


def _in_ns(ns: str, token: str, *args, env: dict | None = None) -> subprocess.CompletedProcess:
    e = {k: v for k, v in os.environ.items() if k not in ("POINTSAFE_SAFE", "POINTSAFE_PASSWORD")}
    e.update(POINTSAFE_TOKEN=token, **(env or {}))
    return subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-m", "pointsafe.cli", *map(str, args)],
                          capture_output=True, text=True, env=e, timeout=300)


def test_an_agent_on_another_network_backs_up_and_restores_over_tls(tmp_path, remote_net):
    ns, server_ip, _ = remote_net
    safe = make_safe(tmp_path)
    tok = add_agent(safe, "remote", "--can-restore")
    src = tmp_path / "src"
    make_tree(src, all_types_tree(7))
    port = free_port()
    r = run_cli("serve", "--listen", f"{server_ip}:{port}", safe=safe, timeout=60)
    assert r.code == 1 and "refusing to listen" in r.err, r.err        # a real interface, no TLS: refused
    cert, key = self_signed(tmp_path, server_ip)
    server = start(safe, port, "--tls-cert", str(cert), "--tls-key", str(key), scheme="https", host=server_ip)
    try:
        url = f"https://{server_ip}:{port}"
        p = _in_ns(ns, tok, "backup", src, "-q", "--server", url)
        assert p.returncode == 1 and "certificate verify failed" in p.stderr, p.stderr
        p = _in_ns(ns, tok, "backup", src, "-q", "--json", "--server", url, env={"SSL_CERT_FILE": str(cert)})
        assert p.returncode == 0, p.stderr
        point = json.loads(p.stdout)
        p = _in_ns(ns, tok, "restore", point["id"], tmp_path / "out", "--server", url, env={"SSL_CERT_FILE": str(cert)})
        assert p.returncode == 0, p.stderr
    finally:
        assert stop(server.proc) == 0
    assert_trees_equal(src, tmp_path / "out")
