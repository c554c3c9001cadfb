"""The web dashboard's login, sessions, CSRF and where it may listen: a real ``pointsafe web``
server in a subprocess, spoken to over HTTP."""

from __future__ import annotations

import datetime
import json
import re
import subprocess

import httpx
import pytest

from _web_util import PASSWORD, csrf_of, login, login_token, running, set_password, web_cmd
from conftest import run_cli


@pytest.fixture
def served(safe_with_point):
    """(server, safe, point id, source) with the web password set."""
    safe, pid, src = safe_with_point
    set_password(safe)
    with running(safe) as server:
        yield server, safe, pid, src


def test_every_page_needs_a_login(served):
    server, safe, pid, src = served
    c = httpx.Client(base_url=server.url, timeout=30)
    for url in ["/", "/tasks", "/tasks/1", "/points", f"/points/{pid}", f"/points/{pid}/tree/d/",
                f"/points/{pid}/raw/g", f"/points/{pid}/tar/", "/alerts", f"/diff?a={pid}&b={pid}"]:
        r = c.get(url)
        assert r.status_code == 401, url
        assert 'name="password"' in r.text, url
        shown = re.sub(r'<input type="hidden" name="next" value="[^"]*">', "", r.text)   # the URL asked for
        assert str(safe) not in shown and pid[:12] not in shown and "hello" not in shown, url
        j = c.get(url, headers={"accept": "application/json"})
        assert j.status_code == 401 and j.json() == {"error": "login required"}, url
    assert c.post("/alerts/ack", data={"all": "1"}).status_code == 401
    assert c.get("/static/style.css").status_code == 200     # the login page's style sheet only


def test_wrong_password_is_refused_and_sets_no_cookie(served):
    server = served[0]
    c = httpx.Client(base_url=server.url, timeout=30)
    r = c.post("/login", data={"password": "not the password", "token": login_token(c), "next": "/"})
    assert r.status_code == 401
    assert "wrong password" in r.text
    assert "set-cookie" not in r.headers
    assert c.get("/").status_code == 401
    # Without the form's token the right password is refused too (login CSRF).
    r = c.post("/login", data={"password": PASSWORD, "token": "forged", "next": "/"})
    assert r.status_code == 403 and "set-cookie" not in r.headers


def test_session_cookie_flags_tampering_and_logout(served):
    server = served[0]
    c = httpx.Client(base_url=server.url, timeout=30)
    r = c.post("/login", data={"password": PASSWORD, "token": login_token(c), "next": "/tasks"})
    assert r.status_code == 303 and r.headers["location"] == "/tasks"
    cookie = r.headers["set-cookie"]
    flags = [f.strip().lower() for f in cookie.split(";")]
    assert "httponly" in flags and "samesite=strict" in flags and "path=/" in flags
    assert "secure" not in flags       # plain HTTP on loopback: a Secure cookie would never come back
    value = cookie.split(";")[0].split("=", 1)[1]
    page = c.get("/")
    assert page.status_code == 200 and "Sources" in page.text

    tampered = value[:-2] + ("AA" if not value.endswith("AA") else "BB")
    other = httpx.Client(base_url=server.url, timeout=30, cookies={"pointsafe_session": tampered})
    assert other.get("/").status_code == 401

    # Logging out needs the CSRF token, then ends the session: a copy of the cookie no longer works.
    assert c.post("/logout", data={}).status_code == 403
    assert c.get("/").status_code == 200
    r = c.post("/logout", data={"csrf": csrf_of(page.text)})
    assert r.status_code == 303
    replay = httpx.Client(base_url=server.url, timeout=30, cookies={"pointsafe_session": value})
    assert replay.get("/").status_code == 401


def _failed_backup(safe, src) -> None:
    """A backup refused by the hard quota: a task in error and its critical alert."""
    run_cli("config", "set", "quota.hard", "99.9%", safe=safe, check=True)
    assert run_cli("backup", src, "--name", "data", safe=safe).code == 1
    run_cli("config", "set", "quota.hard", "off", safe=safe, check=True)
    run_cli("config", "set", "quota.soft", "off", safe=safe, check=True)


def test_acknowledging_needs_the_csrf_token(served):
    server, safe, pid, src = served
    _failed_backup(safe, src)
    c = login(server)
    page = c.get("/")
    assert "backup task" in page.text and "failed" in page.text
    open_ids = [a["id"] for a in c.get("/alerts?format=json").json()]
    assert open_ids
    first = open_ids[0]
    for data in ({"id": str(first)}, {"id": str(first), "csrf": "wrong"}):
        r = c.post("/alerts/ack", data=data)
        assert r.status_code == 403
    # A form posted from another site is refused even with the token.
    r = c.post("/alerts/ack", data={"id": str(first), "csrf": csrf_of(page.text)},
               headers={"origin": "http://evil.example"})
    assert r.status_code == 403
    assert [a["id"] for a in c.get("/alerts?format=json").json()] == open_ids
    assert run_cli("status", safe=safe).code == 2
    r = c.post("/alerts/ack", data={"id": str(first), "csrf": csrf_of(page.text), "back": "/alerts"})
    assert r.status_code == 303 and r.headers["location"] == "/alerts"
    assert [a["id"] for a in c.get("/alerts?format=json").json()] == open_ids[1:]
    r = c.post("/alerts/ack", data={"all": "1", "csrf": csrf_of(page.text)})
    assert r.status_code == 303
    st = run_cli("status", "--json", safe=safe)
    assert st.code == 0 and json.loads(st.out)["ok"] is True


def test_a_new_password_ends_the_sessions(served):
    server, safe, _, _ = served
    c = login(server)
    assert c.get("/").status_code == 200
    set_password(safe, "another long password")
    assert c.get("/").status_code == 401
    login(server, "another long password")
    with pytest.raises(AssertionError):
        login(server, PASSWORD)


def _refused(safe, *args: str) -> str:
    p = subprocess.run(web_cmd(safe, *args), capture_output=True, timeout=60, stdin=subprocess.DEVNULL)
    assert p.returncode == 1, (p.returncode, p.stderr)
    err = p.stderr.decode().strip()
    assert err.startswith("pointsafe: error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_listen_rules(safe_with_point, tmp_path):
    safe = safe_with_point[0]
    assert "no web password is set" in _refused(safe, "--listen", "127.0.0.1:1")
    set_password(safe)
    assert "not a loopback address" in _refused(safe, "--listen", "0.0.0.0:8080")
    assert "not a loopback address" in _refused(safe, "--listen", "[::]:8080")
    assert "both --tls-cert and --tls-key" in _refused(safe, "--listen", "0.0.0.0:8080", "--tls-cert", "x")
    assert "bad --listen" in _refused(safe, "--listen", "nonsense")
    cert, key = _self_signed(tmp_path)
    assert "cannot use --tls-cert" in _refused(safe, "--listen", "127.0.0.1:1", "--tls-cert", str(key),
                                               "--tls-key", str(key))
    with pytest.raises(AssertionError):
        set_password(safe, "short")


def test_non_loopback_is_allowed_with_tls_and_a_password():
    from pointsafe.web.server import Listen, check_listen
    check_listen(Listen("192.0.2.1", 8443, False), "c.pem", "k.pem", True)   # no error


def test_tls_serves_https_with_secure_cookies(safe_with_point, tmp_path):
    safe = safe_with_point[0]
    set_password(safe)
    cert, key = _self_signed(tmp_path)
    with running(safe, "--tls-cert", str(cert), "--tls-key", str(key), scheme="https") as server:
        c = httpx.Client(base_url=server.url, verify=False, timeout=30)
        r = c.post("/login", data={"password": PASSWORD, "token": login_token(c), "next": "/"})
        assert r.status_code == 303
        assert "secure" in [f.strip().lower() for f in r.headers["set-cookie"].split(";")]
        page = c.get("/")
        assert page.headers["strict-transport-security"].startswith("max-age=")


def test_security_headers(served):
    server = served[0]
    c = login(server)
    for url in ["/", "/login"]:
        h = c.get(url).headers
        assert "frame-ancestors 'none'" in h["content-security-policy"]
        assert "script-src 'self'" in h["content-security-policy"]
        assert h["x-frame-options"] == "DENY"
        assert h["x-content-type-options"] == "nosniff"


def _self_signed(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
    cp, kp = tmp_path / "cert.pem", tmp_path / "key.pem"
    cp.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    kp.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption()))
    return cp, kp


def test_sigterm_stops_the_server_cleanly(safe_with_point):
    safe = safe_with_point[0]
    set_password(safe)
    for _ in range(3):   # the instant it listens, before uvicorn has its own handlers: a clean stop too
        with running(safe) as server:
            server.proc.terminate()
            assert server.proc.wait(timeout=30) == 0, server.log.read_text()
            assert "Traceback" not in server.log.read_text()


def test_after_a_wrong_password_the_login_still_goes_to_the_page_asked_for(served):
    server, _, pid, _ = served
    c = httpx.Client(base_url=server.url, timeout=30)
    page = c.get(f"/points/{pid}")
    assert page.status_code == 401
    nxt = re.search(r'name="next" value="([^"]+)"', page.text).group(1)
    r = c.post("/login", data={"password": "wrong password", "token": login_token(c), "next": nxt})
    assert r.status_code == 401
    nxt2 = re.search(r'name="next" value="([^"]+)"', r.text).group(1)
    assert nxt2 == nxt == f"/points/{pid}"
    r = c.post("/login", data={"password": PASSWORD, "token": login_token(c), "next": nxt2})
    assert r.status_code == 303 and r.headers["location"] == f"/points/{pid}"
    for evil in ("//evil.example/x", "https://evil.example/", "/\\evil.example"):
        c2 = httpx.Client(base_url=server.url, timeout=30)
        r = c2.post("/login", data={"password": PASSWORD, "token": login_token(c2), "next": evil})
        assert r.status_code == 303 and r.headers["location"] == "/", evil
