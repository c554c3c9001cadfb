"""Where pointsafe serve listens: TLS required off loopback, HTTPS end to end, a clean stop, the
OpenAPI document."""

from __future__ import annotations

import signal

from _server_util import add_agent, agent, make_safe, running, self_signed, start, stop
from _web_util import free_port
from conftest import run_cli


def test_an_address_off_loopback_is_refused_without_tls(tmp_path):
    safe = make_safe(tmp_path)
    for listen in ("0.0.0.0:%d" % free_port(), "[::]:%d" % free_port()):
        r = run_cli("serve", "--listen", listen, safe=safe, timeout=60)
        assert r.code == 1 and "refusing to listen" in r.err and "without TLS" in r.err, r.err
    cert, key = self_signed(tmp_path)
    r = run_cli("serve", "--listen", "0.0.0.0:%d" % free_port(), "--tls-cert", cert, safe=safe, timeout=60)
    assert r.code == 1 and "give both --tls-cert and --tls-key" in r.err, r.err
    r = run_cli("serve", "--listen", "nonsense", safe=safe, timeout=60)
    assert r.code == 1 and "bad --listen" in r.err, r.err


def test_with_tls_it_serves_off_loopback_and_agents_verify_its_certificate(tmp_path):
    safe = make_safe(tmp_path)
    tok = add_agent(safe, "tls", "--can-restore")
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"over TLS" * 1000)
    cert, key = self_signed(tmp_path)
    server = start(safe, None, "--tls-cert", str(cert), "--tls-key", str(key), scheme="https", host="0.0.0.0")
    try:
        r = agent(server, tok, "backup", src, "-q")                  # an unknown certificate: refused
        assert r.code == 1 and "certificate verify failed" in r.err and "SSL_CERT_FILE" in r.err, r.err
        r = agent(server, tok, "backup", src, "-q", "--json", env={"SSL_CERT_FILE": str(cert)})
        assert r.code == 0, r.err
        r = agent(server, tok, "restore", "src@latest", tmp_path / "out", env={"SSL_CERT_FILE": str(cert)})
        assert r.code == 0, r.err
        assert (tmp_path / "out" / "f").read_bytes() == b"over TLS" * 1000
    finally:
        assert stop(server.proc) == 0


def test_sigterm_stops_it_cleanly_and_the_openapi_document_names_every_route(tmp_path):
    safe = make_safe(tmp_path)
    tok = add_agent(safe, "doc")
    with running(safe) as server:
        doc = server.client(None).get("/api/openapi.json").json()
        assert set(doc["paths"]) == {"/api/v1/info", "/api/v1/objects/missing", "/api/v1/objects",
                                     "/api/v1/objects/fetch", "/api/v1/points", "/api/v1/admin/agents",
                                     "/api/v1/admin/forget"}
        assert set(doc["paths"]["/api/v1/points"]) == {"get", "post"}
        r = server.client(tok).get("/api/v1/nothing")
        assert r.status_code == 404 and "no such route" in r.json()["error"]
        r = server.client(tok).delete("/api/v1/points")
        assert r.status_code == 405
        assert stop(server.proc, signal.SIGTERM) == 0
        assert "Traceback" not in server.log.read_text()
