"""One listener for several safes: each request goes to the safe whose agent holds its token.

``pointsafe serve`` may serve more than one safe on one address (a provider keeps one safe per
customer, or per group of servers that should deduplicate together). The agents of each safe
are that safe's own (``pointsafe --safe SAFE agent add``), so a bearer token names its safe: the
router finds the safe that knows the token and hands the request to that safe's application,
unchanged. A request without a token, or with one no safe knows, goes to the first safe's
application, which answers it as it answers any unknown token (401) or serves what needs no
token (/api/openapi.json). Safes never see each other's requests, objects or agents.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from pointsafe.cas import Safe

from . import agents

ASGIApp = Callable[[MutableMapping[str, Any], Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]],
                   Awaitable[None]]

KNOWN_TOKENS = 4096   # token hashes remembered with their safe (a removed token then gets its safe's 401)


class SafeRouter:
    """An ASGI application dispatching to one application per safe, by the request's token."""

    def __init__(self, served: list[tuple[Safe, ASGIApp]]):
        if not served:
            raise ValueError("SafeRouter needs at least one safe")
        self.served = served
        self.known: dict[str, int] = {}    # token hash -> index in ``served``

    def which(self, headers: list[tuple[bytes, bytes]]) -> int:
        """The index of the safe whose agent holds the bearer token in ``headers`` (0 when none)."""
        token = ""
        for k, v in headers:
            if k.lower() == b"authorization":
                scheme, _, rest = v.decode("latin-1").partition(" ")
                token = rest.strip() if scheme.lower() == "bearer" else ""
                break
        if not token.startswith(agents.TOKEN_PREFIX):
            return 0
        h = agents.token_hash(token)
        i = self.known.get(h)
        if i is not None:
            return i
        for i, (safe, _) in enumerate(self.served):
            if agents.by_token(safe, token) is not None:
                if len(self.known) >= KNOWN_TOKENS:
                    self.known.clear()
                self.known[h] = i
                return i
        return 0

    async def __call__(self, scope: MutableMapping[str, Any], receive: Callable[[], Awaitable[Any]],
                       send: Callable[[Any], Awaitable[None]]) -> None:
        i = self.which(scope.get("headers") or []) if scope["type"] == "http" else 0
        await self.served[i][1](scope, receive, send)
