"""Paths inside a point in URLs: raw name bytes, percent-encoded one component at a time.

A name is any bytes but ``/`` and NUL (not always UTF-8), so URLs carry the raw bytes
percent-encoded, and the server reads the request's raw path (the ASGI ``raw_path``), never
the decoded text, in which a non-UTF-8 byte would be lost. A component that decodes to
``.``, ``..``, or holds ``/`` (an encoded slash) or NUL is refused: no name in a point can be
one, and a path must never climb.
"""

from __future__ import annotations

from urllib.parse import quote, unquote_to_bytes

from pointsafe.cas import UsageError


class BadRequest(UsageError):
    """A request the server cannot make sense of (answered 400)."""


class BadPath(BadRequest):
    """A path in a URL that no entry of a point can have (``..``, an encoded slash, NUL)."""


def split_url_path(raw: bytes) -> list[bytes]:
    """The name components of a raw (percent-encoded) URL path tail; BadPath for ``.``,
    ``..``, an encoded ``/`` or a NUL byte in any component. Empty components are dropped."""
    out = []
    for piece in raw.split(b"/"):
        if not piece:
            continue
        name = unquote_to_bytes(piece)
        if name in (b".", b"..") or b"/" in name or b"\0" in name:
            raise BadPath(f"bad path component {piece.decode('ascii', 'replace')!r}: "
                          "'.', '..', encoded slashes and NUL are not allowed")
        out.append(name)
    return out


def url_path(parts: list[bytes]) -> str:
    """The URL form of a path's components: each percent-encoded, joined with ``/``."""
    return "/".join(quote(p, safe="") for p in parts)


def tail_of(raw_path: bytes, skip: int) -> bytes:
    """The part of a raw request path after its first ``skip`` components (``/a/b/c`` with
    skip 2: ``c``); the query string is not part of ``raw_path``."""
    raw = raw_path.split(b"?", 1)[0]
    pieces = raw.split(b"/")
    return b"/".join(pieces[skip + 1:])
