"""The HTTP API (Starlette): authentication, bounded bodies, one task per request.

Every route but ``/api/openapi.json`` needs ``Authorization: Bearer <agent token>``. Errors are
JSON ``{"error": "<one line>"}`` with a status that says what went wrong (docs/SERVER.md).
Each request is recorded in the safe's task history (ops/tasks.py): kind ``backup`` for a
point's commit (so that ``pointsafe status`` shows the agents' backups), ``request`` for every
other one, with the agent, method, path, status and byte counts; refused requests are in state
``usage`` with their error, failures of the server in state ``error``. A commit's task is
written before it is answered; the others are written by :class:`TaskLog`, many in one index
transaction, within RECORD_EVERY seconds (two transactions per request, each a sync of the
index, were ~9% of the server's time under load and held the index's one write lock).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from pointsafe.cas import QuotaExceeded, SafeError

from . import agents, protocol
from .openapi import document
from .service import Refused, Service

log = logging.getLogger("pointsafe.server")

DEFAULT_RATE = 1000.0    # requests a second an agent may make (bursts of twice that); $POINTSAFE_SERVER_RATE
SEEN_EVERY = 60.0        # seconds between two writes of an agent's last contact
RECORD_EVERY = 0.5       # seconds a request's task waits, at most, to be written with others


class RateLimit:
    """A token bucket per agent: ``rate`` requests a second, bursts of ``2 * rate``."""

    def __init__(self, rate: float):
        self.rate = rate
        self.buckets: dict[str, tuple[float, float]] = {}   # agent id -> (tokens, when)
        self.lock = threading.Lock()

    def allow(self, agent_id: str) -> bool:
        """Take one token of the agent's bucket; False when it is empty."""
        now = time.monotonic()
        with self.lock:
            tokens, when = self.buckets.get(agent_id, (2 * self.rate, now))
            tokens = min(2 * self.rate, tokens + (now - when) * self.rate)
            ok = tokens >= 1
            self.buckets[agent_id] = (tokens - 1 if ok else tokens, now)
        return ok


class TaskLog:
    """Finished requests waiting to be written to the task history: one thread writes what
    has come every RECORD_EVERY seconds, in one transaction (``tasks.record_finished``);
    ``close`` writes the rest. Never fails a request: a failed write is a line in the log."""

    def __init__(self, safe: Any, every: float = RECORD_EVERY):
        self.safe = safe
        self.every = every
        self.cond = threading.Condition()
        self.waiting: list[dict[str, Any]] = []
        self.closed = False
        self.thread = threading.Thread(target=self._run, name="pointsafe-serve-tasks", daemon=True)
        self.thread.start()

    def add(self, task: dict[str, Any], now: bool = False) -> None:
        """Queue ``task`` (see ``tasks.record_finished``); with ``now``, write it (and what
        waits) before returning."""
        if now:
            with self.cond:
                batch, self.waiting = self.waiting + [task], []
            self._write(batch)
            return
        with self.cond:
            self.waiting.append(task)
            self.cond.notify()

    def _run(self) -> None:
        while True:
            with self.cond:
                while not self.waiting and not self.closed:
                    self.cond.wait()
                closed = self.closed
            if not closed:
                time.sleep(self.every)      # gather what comes meanwhile
            with self.cond:
                batch, self.waiting = self.waiting, []
            self._write(batch)
            if closed:
                return

    def _write(self, batch: list[dict[str, Any]]) -> None:
        if not batch:
            return
        try:
            from pointsafe.ops import tasks
            tasks.record_finished(self.safe.index, batch)
        except Exception as e:  # noqa: BLE001 - the history is a record, not the service
            log.warning("could not record %d requests in the task history: %s", len(batch), e)

    def close(self) -> None:
        """Write what waits and stop the thread."""
        with self.cond:
            self.closed = True
            self.cond.notify()
        self.thread.join(timeout=30)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, at most ``limit`` bytes; Refused 413 beyond it (before reading when
    Content-Length says so), 400 when it is shorter than its Content-Length or the client left."""
    cl = request.headers.get("content-length")
    if cl is not None and (not cl.isdigit()):
        raise Refused(400, "bad Content-Length")
    if cl is not None and int(cl) > limit:
        raise Refused(413, f"the body has {cl} bytes, more than the limit of {limit}; nothing stored")
    parts, n = [], 0
    try:
        async for chunk in request.stream():
            n += len(chunk)
            if n > limit:
                raise Refused(413, f"the body is larger than the limit of {limit} bytes; nothing stored")
            parts.append(chunk)
    except ClientDisconnect:
        raise Refused(400, "truncated body: the client went away; nothing stored") from None
    if cl is not None and n != int(cl):
        raise Refused(400, f"truncated body: {n} of {cl} bytes; nothing stored")
    return b"".join(parts)


async def read_json(request: Request) -> Any:
    """The body as JSON (at most MAX_JSON bytes); Refused 400 when it is not JSON."""
    body = await read_body(request, protocol.MAX_JSON)
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise Refused(400, f"the body is not valid JSON ({e}); nothing done") from None
    except RecursionError:
        raise Refused(400, "the body's JSON is nested too deeply; nothing done") from None


async def read_ids(request: Request) -> list[bytes]:
    """The ``ids`` of a JSON body ``{"ids": [hex, ...]}``."""
    body = await read_json(request)
    if not isinstance(body, dict):
        raise Refused(400, "the body must be a JSON object {\"ids\": [...]}")
    try:
        return protocol.parse_ids(body.get("ids"))
    except ValueError as e:
        raise Refused(400, str(e)) from None


def create_app(service: Service, rate: float = DEFAULT_RATE, task_log: TaskLog | None = None) -> Starlette:
    """The ASGI application serving ``service``'s safe; each agent may make ``rate`` requests a
    second (429 beyond). Requests are recorded through ``task_log`` (default: one of its own;
    whoever closes the safe closes the log first)."""
    safe = service.safe
    limit = RateLimit(rate)
    history = task_log or TaskLog(safe)
    seen: dict[str, float] = {}

    def authenticate(request: Request) -> agents.Agent:
        h = request.headers.get("authorization", "")
        scheme, _, token = h.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Refused(401, "no token: send 'Authorization: Bearer <agent token>'")
        a = agents.by_token(safe, token.strip())
        if a is None:
            raise Refused(401, "unknown token (removed or rotated agent?)")
        if not limit.allow(a.id):
            raise Refused(429, f"too many requests from agent {a.name} (more than {limit.rate:g} a second); "
                               "slow down")
        if time.monotonic() - seen.get(a.id, -SEEN_EVERY) >= SEEN_EVERY:
            seen[a.id] = time.monotonic()
            agents.touch(safe, a)
        return a

    Handler = Callable[[Request, agents.Agent], Awaitable[Any]]

    def allowed(agent: agents.Agent, admin_route: bool, request: Request) -> None:
        """Refused 403 unless an admin token calls an admin route or an agent token another."""
        if admin_route and not agent.admin:
            what = request.url.path.removeprefix("/api/v1/admin/").split("/")[0]
            raise Refused(403, f"agent tokens may not use the administration ({what}); run 'pointsafe {what}' "
                               "on the server, or use an admin token")
        if agent.admin and not admin_route:
            raise Refused(403, f"{agent.name} is an admin token: it backs up and reads nothing; use an agent's token")

    def route(path: str, methods: list[str], fn: Handler, kind: str = "request", admin: bool = False) -> Route:
        async def endpoint(request: Request) -> Response:
            agent: agents.Agent | None = None
            started = _now()
            fields: dict[str, Any] = {"method": request.method, "path": request.url.path}
            try:
                agent = await run_in_threadpool(authenticate, request)
                fields["agent"] = agent.name
                allowed(agent, admin, request)
                result = await fn(request, agent)
                resp = result if isinstance(result, Response) else JSONResponse(result)
                error = None
            except Refused as e:
                resp, error = JSONResponse({"error": e.message}, status_code=e.status), e.message
            except QuotaExceeded as e:
                resp, error = JSONResponse({"error": str(e)}, status_code=507), str(e)
            except SafeError as e:
                resp, error = JSONResponse({"error": str(e)}, status_code=500), str(e)
            except Exception as e:  # noqa: BLE001 - a bug: one line to the agent, the traceback to the log
                log.exception("%s %s", request.method, request.url.path)
                resp, error = JSONResponse({"error": f"internal error: {type(e).__name__}"}, status_code=500), repr(e)
            fields["status"] = resp.status_code
            if isinstance(result_fields := getattr(request.state, "fields", None), dict):
                fields.update(result_fields)
            task = _task(kind if resp.status_code < 400 else "request", fields, error, resp.status_code, started)
            if task["kind"] == "backup":   # written before the agent hears of its point
                await run_in_threadpool(history.add, task, True)
            else:
                history.add(task)
            return resp
        return Route(path, endpoint, methods=methods)

    async def info(request: Request, agent: agents.Agent) -> Any:
        return service.info(agent)

    async def missing(request: Request, agent: agents.Agent) -> Any:
        ids = await read_ids(request)
        out = await run_in_threadpool(service.missing, agent, ids)
        request.state.fields = {"ids": len(ids), "missing": len(out)}
        return {"missing": [m.hex() for m in out]}

    async def upload(request: Request, agent: agents.Agent) -> Any:
        body = await read_body(request, protocol.MAX_BODY)
        out = await run_in_threadpool(service.upload, agent, body)
        request.state.fields = {"bytes": len(body), **out}
        # not how many were new to the safe: that would tell an agent what other agents hold
        return {"received": out["received"]}

    async def fetch(request: Request, agent: agents.Agent) -> Any:
        ids = await read_ids(request)
        data = await run_in_threadpool(service.fetch, agent, ids)
        request.state.fields = {"ids": len(ids), "bytes": len(data)}
        return Response(data, media_type="application/octet-stream")

    async def points(request: Request, agent: agents.Agent) -> Any:
        return {"points": await run_in_threadpool(service.points, agent)}

    async def commit(request: Request, agent: agents.Agent) -> Any:
        body = await read_json(request)
        out = await run_in_threadpool(service.commit, agent, body)
        request.state.fields = {"point": out["id"], "name": out["name"], "source": out["source"],
                                "bytes": (out.get("stats") or {}).get("bytes_read", 0),
                                "files": (out.get("stats") or {}).get("files", 0)}
        return out

    async def admin_agents(request: Request, agent: agents.Agent) -> Any:
        return {"agents": await run_in_threadpool(service.admin_agents)}

    async def admin_forget(request: Request, agent: agents.Agent) -> Any:
        body = await read_json(request)
        out = await run_in_threadpool(service.admin_forget, body)
        request.state.fields = {"points_dropped": out["points_dropped"], "dead_bytes": out["dead_bytes"]}
        return out

    async def admin_other(request: Request, agent: agents.Agent) -> Any:
        raise Refused(404, f"no such admin route: {request.method} {request.url.path} (there are GET "
                           "/api/v1/admin/agents and POST /api/v1/admin/forget)")

    async def openapi(request: Request) -> Response:
        return JSONResponse(document())

    async def not_found(request: Request, exc: Exception) -> Response:
        return JSONResponse({"error": f"no such route: {request.method} {request.url.path}"}, status_code=404)

    async def not_allowed(request: Request, exc: Exception) -> Response:
        return JSONResponse({"error": f"method {request.method} is not allowed on {request.url.path}"}, status_code=405)

    routes = [
        Route("/api/openapi.json", openapi, methods=["GET"]),
        route("/api/v1/info", ["GET"], info),
        route("/api/v1/objects/missing", ["POST"], missing),
        route("/api/v1/objects", ["POST"], upload),
        route("/api/v1/objects/fetch", ["POST"], fetch),
        route("/api/v1/points", ["GET"], points),
        route("/api/v1/points", ["POST"], commit, kind="backup"),
        route("/api/v1/admin/agents", ["GET"], admin_agents, admin=True),
        route("/api/v1/admin/forget", ["POST"], admin_forget, admin=True),
        route("/api/v1/admin/{what:path}", ["GET", "POST", "PUT", "DELETE"], admin_other, admin=True),
    ]
    return Starlette(routes=routes, exception_handlers={404: not_found, 405: not_allowed})


def _now() -> str:
    from pointsafe.ops.clock import iso, real_now
    return iso(real_now())


def _task(kind: str, fields: dict[str, Any], error: str | None, status: int, started: str) -> dict[str, Any]:
    """The finished task of one request (``tasks.record_finished``)."""
    state = "ok" if status < 400 else ("usage" if status < 500 else "error")
    return {"kind": kind, "argv": [fields.get("method", ""), fields.get("path", "")], "started": started,
            "finished": _now(), "state": state, "fields": fields, "error": error}
