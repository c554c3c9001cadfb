"""The ASGI application (Starlette): routes, login, CSRF, security headers, JSON or HTML.

Every page is server-rendered HTML that works without JavaScript; the same URL answers JSON
with ``Accept: application/json`` or ``?format=json``. Requests without a live session get
the login page (HTML, status 401) or ``{"error": "login required"}`` (JSON, 401) and nothing
else; only the style sheet and the refresh script are served to anyone. The URL map is in
docs/WEB.md.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import mimetypes
import stat
import time
from collections.abc import Awaitable, Callable, Iterator
from itertools import islice
from pathlib import Path
from typing import Any
from urllib.parse import quote

from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.convertors import Convertor, register_url_convertor
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Route

from pointsafe.cas import Entry, IntegrityError, ObjectMissing, Point, PointNotFound, Safe, SafeError, UsageError, resolve_point
from pointsafe.cas.tree import DIR, REG
from pointsafe.ingest.browse import diff as tree_diff
from pointsafe.ingest.browse import display_name, lookup
from pointsafe.ops import alerts, status, tasks
from pointsafe.ops.clock import human_duration
from pointsafe.ops.quota import human_bytes

from . import auth, data
from .chart import svg_chart
from .listing import read_page
from .paths import BadRequest, split_url_path, tail_of, url_path
from .streams import blob_pieces, parse_range, tar_stream, zip_stream

HERE = Path(__file__).resolve().parent
log = logging.getLogger("pointsafe.web")
PAGE_LIMIT = 200           # directory entries per page (at most MAX_LIMIT with ?limit=)
MAX_LIMIT = 1000
TASKS_PER_PAGE = 100
MAX_TASKS_PER_PAGE = 1000
DIFF_LIMIT = 5000          # changes a diff page shows (JSON: all)
LOGIN_DELAY = 1.0          # seconds a wrong password waits before the answer (checks run one at a time)

CSP = ("default-src 'none'; style-src 'self'; script-src 'self'; img-src 'self' data:; "
       "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
DOWNLOAD_CSP = "default-src 'none'; sandbox"
STATE_CLASS = {"ok": "ok", "warning": "warn", "soft": "warn", "error": "bad", "abandoned": "bad",
               "critical": "bad", "hard": "bad", "running": "run", "usage": "dim"}

Handler = Callable[..., Awaitable[Response]]


class _AnyPath(Convertor[str]):
    """Starlette's ``path`` convertor is ``.*``, which stops at a newline; a name may hold one."""

    regex = r"[\s\S]*"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("anypath", _AnyPath())


def _fmt_time(text: str | None) -> str:
    return (text or "-")[:19].replace("T", " ")


def _environment() -> Environment:
    env = Environment(loader=FileSystemLoader(str(HERE / "templates")),
                      autoescape=select_autoescape(default=True, default_for_string=True))
    env.filters.update(bytes=lambda n: human_bytes(n or 0), duration=lambda s: "-" if s is None else human_duration(s),
                       when=_fmt_time, cls=lambda s: STATE_CLASS.get(str(s), ""),
                       dname=display_name, filemode=stat.filemode, short=lambda s: (s or "")[:12],
                       mtime=lambda ns: time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ns / 1e9)),
                       tojson_pretty=lambda v: json.dumps(v, indent=2, sort_keys=True, default=str))
    return env


def wants_json(request: Request) -> bool:
    """JSON when asked by ``?format=json`` or an Accept header naming JSON but not HTML."""
    if request.query_params.get("format") == "json":
        return True
    accept = request.headers.get("accept", "")
    return "application/json" in accept and "text/html" not in accept


def json_response(obj: Any, status_code: int = 200) -> Response:
    """``obj`` as indented JSON with sorted keys, like the CLI's ``--json``."""
    body = json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n"
    return Response(body, status_code, media_type="application/json")


def _safe_next(target: str | None, default: str = "/") -> str:
    """A local path to go back to (never another site: ``//host`` and schemes refused)."""
    if target and target.startswith("/") and not target.startswith("//") and "\\" not in target:
        return target
    return default


def _disposition(name: bytes) -> str:
    """A Content-Disposition for a download of ``name``: an ASCII fallback and the raw bytes."""
    fallback = "".join(c if 32 <= ord(c) < 127 and c not in '"\\;' else "_" for c in name.decode("ascii", "replace"))
    return f"attachment; filename=\"{fallback or 'download'}\"; filename*=UTF-8''{quote(name, safe='')}"


def _logged(pieces: Iterator[bytes], name: bytes) -> Iterator[bytes]:
    """``pieces``, logging a damaged or missing content (then the transfer breaks off: the
    status line is long gone, and a short body is how a client learns it)."""
    try:
        yield from pieces
    except (IntegrityError, ObjectMissing) as e:
        log.warning("download: %s: %s", display_name(name), e)
        raise


class SecurityHeaders:
    """ASGI middleware: the security headers on every response (a response's own CSP wins)."""

    def __init__(self, app, tls: bool) -> None:
        self.app = app
        self.tls = tls

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                have = {k.lower() for k, _ in headers}
                extra = [(b"content-security-policy", CSP.encode()), (b"x-frame-options", b"DENY"),
                         (b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer"),
                         (b"cache-control", b"no-store"), (b"cross-origin-opener-policy", b"same-origin")]
                if self.tls:
                    extra.append((b"strict-transport-security", b"max-age=31536000"))
                headers += [(k, v) for k, v in extra if k not in have]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


class Web:
    """The dashboard of one open safe: its routes and what they share."""

    def __init__(self, safe: Safe, tls: bool = False) -> None:
        self.safe = safe
        self.tls = tls
        self.sessions = auth.Sessions()
        self.env = _environment()
        self.login_lock = asyncio.Lock()

    # -- rendering -------------------------------------------------------------------------

    def page(self, request: Request, template: str, status_code: int = 200, **ctx: Any) -> Response:
        """An HTML page from ``template`` with the shared context (the session's CSRF token)."""
        session = request.scope.get("pointsafe.session")
        html = self.env.get_template(template).render(
            csrf=session.csrf if session else "", logged_in=session is not None, request_path=request.url.path,
            back=request.url.path + (f"?{request.url.query}" if request.url.query else ""),
            safe_path=str(self.safe.path), url_path=url_path, **ctx)
        return HTMLResponse(html, status_code)

    def error(self, request: Request, status_code: int, message: str) -> Response:
        """An error as JSON ``{"error": ...}`` or as a page."""
        if wants_json(request):
            return json_response({"error": message}, status_code)
        return self.page(request, "error.html", status_code, message=message, code=status_code)

    def login_page(self, request: Request, status_code: int = 200, message: str = "", nxt: str | None = None) -> Response:
        """The login form (where every unauthenticated request lands); after it, ``nxt`` or the
        page asked for."""
        if nxt is None and request.url.path == "/login":
            nxt = request.query_params.get("next")
        if nxt is None:
            nxt = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return self.page(request, "login.html", status_code, token=self.sessions.login_token(),
                         next=_safe_next(nxt if nxt != "/login" else "/"), message=message,
                         has_password=auth.password_hash(self.safe.index) is not None)

    # -- guards ----------------------------------------------------------------------------

    def session_of(self, request: Request) -> auth.Session | None:
        """The request's live session, or None."""
        return self.sessions.find(request.cookies.get(auth.COOKIE), auth.password_hash(self.safe.index))

    def guarded(self, fn: Callable[[Request], Response]) -> Handler:
        """A GET handler run in a worker thread for a logged-in session only; SafeErrors become
        404 (an unknown point or path), 400 (a bad path) or 500 pages."""
        @functools.wraps(fn)
        async def handler(request: Request) -> Response:
            session = self.session_of(request)
            if session is None:
                if wants_json(request):
                    return json_response({"error": "login required"}, 401)
                return self.login_page(request, 401)
            request.scope["pointsafe.session"] = session
            try:
                return await run_in_threadpool(fn, request)
            except BadRequest as e:
                return self.error(request, 400, str(e))
            except (UsageError, PointNotFound) as e:
                return self.error(request, 404, str(e))
            except (IntegrityError, ObjectMissing, SafeError) as e:
                return self.error(request, 500, str(e))
        return handler

    async def posted(self, request: Request) -> tuple[auth.Session | None, dict[str, Any], Response | None]:
        """The session and form of a POST, or the refusal: 401 without a session, 403 for a
        missing or wrong CSRF token or a foreign Origin."""
        session = self.session_of(request)
        if session is None:
            return None, {}, self.error(request, 401, "login required")
        request.scope["pointsafe.session"] = session
        form = await request.form()
        fields = {k: form.getlist(k) for k in form.keys()}
        origin = request.headers.get("origin")
        if origin and origin != "null" and origin.split("://", 1)[-1] != request.headers.get("host"):
            return session, fields, self.error(request, 403, "refused: the request came from another site")
        tokens = fields.get("csrf") or []
        token = tokens[0] if tokens and isinstance(tokens[0], str) else None
        if not auth.csrf_ok(session, token):
            return session, fields, self.error(request, 403, "refused: the form's CSRF token is missing or wrong; "
                                                              "reload the page and try again")
        return session, fields, None

    # -- login -----------------------------------------------------------------------------

    async def login_get(self, request: Request) -> Response:
        """GET /login: the login form."""
        if self.session_of(request) is not None:
            return RedirectResponse(_safe_next(request.query_params.get("next")), 303)
        return self.login_page(request)

    async def login_post(self, request: Request) -> Response:
        """POST /login: check the password; a new session cookie and back to ``next``."""
        form = await request.form()
        password, token = str(form.get("password") or ""), str(form.get("token") or "")
        nxt = _safe_next(str(form.get("next") or "/"))
        if not self.sessions.check_login_token(token):
            return self.login_page(request, 403, "the login form expired; please try again", nxt)
        stored = auth.password_hash(self.safe.index)
        async with self.login_lock:      # one password check at a time: guessing in parallel gains nothing
            ok = await run_in_threadpool(auth.check_password, stored, password)
            if not ok:
                await asyncio.sleep(LOGIN_DELAY)
        if not ok:
            msg = "wrong password" if stored else "no web password is set: run 'pointsafe web passwd'"
            return self.login_page(request, 401, msg, nxt)
        cookie, _ = self.sessions.open(stored or "")
        resp = RedirectResponse(nxt, 303)
        resp.set_cookie(auth.COOKIE, cookie, max_age=int(self.sessions.lifetime), path="/", httponly=True,
                        samesite="strict", secure=self.tls)
        return resp

    async def logout(self, request: Request) -> Response:
        """POST /logout: end the session (CSRF-checked)."""
        session, _, refused = await self.posted(request)
        if refused:
            return refused
        assert session is not None
        self.sessions.close(session.sid)
        resp = RedirectResponse("/login", 303)
        resp.delete_cookie(auth.COOKIE, path="/", httponly=True, samesite="strict", secure=self.tls)
        return resp

    # -- dashboard and alerts ----------------------------------------------------------------

    def dashboard(self, request: Request) -> Response:
        """GET /: ``status --json``'s dict (plus ``dashboard``: chart series, trend, recency)."""
        points = self.safe.points()
        st = status.build(self.safe, points=points)
        series = data.chart_series(points)
        extra = {"series": series, "trend": data.space_trend(points, st["space"]),
                 "recency": data.recency(self.safe.index)}
        if wants_json(request):
            return json_response({**st, "dashboard": extra})
        charts = [
            svg_chart("Safe size (bytes stored by the points, summed)", series["t"], series["stored_total"],
                      human_bytes, lambda t: time.strftime("%Y-%m-%d %H:%M", time.gmtime(t))),
            svg_chart("Bytes new per backup", series["t"], series["bytes_new"], human_bytes,
                      lambda t: time.strftime("%Y-%m-%d %H:%M", time.gmtime(t)), bars=True, colour="#2f855a"),
            svg_chart("Backup duration", series["t"], series["duration"], human_duration,
                      lambda t: time.strftime("%Y-%m-%d %H:%M", time.gmtime(t)), colour="#b7791f"),
        ]
        return self.page(request, "dashboard.html", st=st, extra=extra, charts=charts, refresh=True)

    def alerts_page(self, request: Request) -> Response:
        """GET /alerts: the open alerts (every one with ?history=1), as ``alerts --json``."""
        history = request.query_params.get("history") in ("1", "yes", "true")
        rows = alerts.list_alerts(self.safe.index, include_acked=history)
        if wants_json(request):
            return json_response(rows)
        return self.page(request, "alerts.html", alerts=rows, history=history)

    async def ack(self, request: Request) -> Response:
        """POST /alerts/ack: acknowledge the form's ``id`` values, or every open one with ``all``."""
        _, fields, refused = await self.posted(request)
        if refused:
            return refused
        try:
            ids = None if fields.get("all") else [int(i) for i in fields.get("id", [])]
        except ValueError:
            return self.error(request, 400, "bad alert id")
        if ids == []:
            return self.error(request, 400, "no alert given")
        try:
            done = await run_in_threadpool(alerts.ack, self.safe.index, ids)
        except SafeError as e:      # e.g. a safe opened read-only
            return self.error(request, 500, f"could not acknowledge: {e}")
        if wants_json(request):
            return json_response({"acknowledged": [a["id"] for a in done]})
        return RedirectResponse(_safe_next((fields.get("back") or ["/"])[0]), 303)

    # -- tasks ---------------------------------------------------------------------------------

    def tasks_page(self, request: Request) -> Response:
        """GET /tasks?state=&kind=&source=&before=&limit=: the task history, newest first, a
        page at a time (the tasks below id ``before``). JSON: as ``tasks --json``, oldest first:
        every match, the newest ``last=N``, or with ``limit`` the page the HTML shows."""
        q = request.query_params
        state, kind, source = q.get("state") or None, q.get("kind") or None, q.get("source") or None
        if state and state not in tasks.STATES:
            raise BadRequest(f"unknown state {state!r}: use one of {', '.join(tasks.STATES)}")
        if kind and kind not in tasks.KINDS:
            raise BadRequest(f"unknown kind {kind!r}: use one of {', '.join(tasks.KINDS)}")
        before = int(q["before"]) if q.get("before", "").isdigit() and int(q["before"]) else None
        limit = min(MAX_TASKS_PER_PAGE, int(q["limit"])) if q.get("limit", "").isdigit() and int(q["limit"]) \
            else TASKS_PER_PAGE
        idx = self.safe.index
        if wants_json(request):
            last = q.get("last")
            if last and last.isdigit() and int(last):
                return json_response(list(reversed(tasks.page(idx, state, kind, source, limit=int(last)))))
            if q.get("limit") or before:
                return json_response(list(reversed(tasks.page(idx, state, kind, source, before=before, limit=limit))))
            return json_response(data.filter_tasks(idx, state, kind, source))
        rows = tasks.page(idx, state, kind, source, before=before, limit=limit + 1)
        more = len(rows) > limit
        shown = [{**t, "took": data.task_duration(t)} for t in rows[:limit]]
        query = f"state={quote(state or '')}&kind={quote(kind or '')}&source={quote(source or '')}"
        return self.page(request, "tasks.html", tasks=shown, total=tasks.count(idx, state, kind, source),
                         before=before or 0, older=shown[-1]["id"] if more and shown else None,
                         limit=limit, state=state or "", kind=kind or "", source=source or "",
                         states=tasks.STATES, kinds=tasks.KINDS,
                         sources=sorted(set(data.task_sources(idx)) | set(data.points_by_source(self.safe))),
                         query=query + (f"&limit={limit}" if limit != TASKS_PER_PAGE else ""))

    def task_page(self, request: Request) -> Response:
        """GET /tasks/ID: one task with its lines and its alerts (JSON: ``tasks show --json`` and
        ``alerts``)."""
        tid = request.path_params["tid"]
        t = tasks.get(self.safe.index, tid)
        if t is None:
            raise UsageError(f"no task {tid} in this safe")
        mine = [a for a in alerts.list_alerts(self.safe.index, include_acked=True) if a.get("task") == tid]
        if wants_json(request):
            return json_response({**t, "alerts": mine})
        return self.page(request, "task.html", t=t, alerts=mine, lines=data.task_lines(t))

    # -- agents ----------------------------------------------------------------------------

    def agents_page(self, request: Request) -> Response:
        """GET /agents: the agents of ``pointsafe serve``, their sources, rights, last contact,
        points and bytes stored against their quotas (JSON: ``agent list --json`` and ``newest``)."""
        rows = data.agent_rows(self.safe)
        if wants_json(request):
            return json_response(rows)
        return self.page(request, "agents.html", agents=rows)

    # -- points ----------------------------------------------------------------------------

    def point_of(self, request: Request) -> Point:
        """The point the URL names: a full id, or any POINT the CLI accepts."""
        spec = request.path_params["pid"]
        return self.safe.point(spec) or resolve_point(self.safe, spec)

    def points_page(self, request: Request) -> Response:
        """GET /points?name=&agent=: points per source with their stats (JSON: ``points --json``);
        ``agent``: only the points that agent made through ``pointsafe serve``."""
        name = request.query_params.get("name") or None
        who = request.query_params.get("agent") or None

        def shown(p: Point) -> bool:
            return (name is None or p.name == name) and (who is None or p.extra.get("agent") == who)
        if wants_json(request):
            return json_response([p.to_record() for p in self.safe.points() if shown(p)])
        groups = {n: rows for n, ps in data.points_by_source(self.safe).items()
                  if (rows := [data.point_row(p) for p in ps if shown(p)])}
        return self.page(request, "points.html", groups=groups, name=name or "", agent=who or "")

    def point_page(self, request: Request) -> Response:
        """GET /points/ID: one point's record (JSON: ``show --json``), its snapshot and
        consistency records, links to browse and download, and a diff with its neighbours."""
        p = self.point_of(request)
        if wants_json(request):
            return json_response(p.to_record())
        same = [q for q in self.safe.points() if q.name == p.name and q.kind == "tree"]
        return self.page(request, "point.html", p=p, row=data.point_row(p), rec=p.to_record(),
                         others=[q for q in reversed(same) if q.id != p.id])

    def _target(self, request: Request, word: str) -> tuple[Point, list[bytes], Entry]:
        """The point, path components and entry a /points/ID/WORD/PATH URL names."""
        p = self.point_of(request)
        if p.kind != "tree":
            raise UsageError(f"point {p.id[:12]} is a volume: download its image at /points/{p.id}/image")
        raw = request.scope.get("raw_path") or request.url.path.encode()
        if raw.split(b"?", 1)[0].split(b"/")[3:4] != [word.encode()]:
            raise UsageError(f"no such page: use /points/{p.id}/{word}/PATH")
        parts = split_url_path(tail_of(raw, 3))
        e = lookup(self.safe, p, b"/".join(parts))
        return p, parts, e

    def tree(self, request: Request) -> Response:
        """GET /points/ID/tree/PATH: one page of a directory (?offset=&limit=), or one entry."""
        p, parts, e = self._target(request, "tree")
        q = request.query_params
        offset = int(q["offset"]) if q.get("offset", "").isdigit() else 0
        limit = min(MAX_LIMIT, int(q["limit"])) if q.get("limit", "").isdigit() and int(q["limit"]) else PAGE_LIMIT
        prefix = b"/".join(parts)
        if e.type != DIR:
            if wants_json(request):
                return json_response({"point": p.id, "entry": data.entry_json(prefix, e)})
            return self.page(request, "entry.html", p=p, parts=parts, e=e, is_reg=e.type == REG)
        before = self.safe.objects_read
        pg = read_page(self.safe, e, offset, limit)
        if wants_json(request):
            return json_response({"point": p.id, "path": data.entry_json(prefix, e)["path"], "offset": pg.offset,
                                  "limit": limit, "total": pg.total, "nodes_read": pg.nodes_read,
                                  "entries": [data.entry_json(prefix + b"/" + c.name if prefix else c.name, c)
                                              for c in pg.entries]})
        return self.page(request, "tree.html", p=p, parts=parts, e=e, page=pg, limit=limit,
                         objects_read=self.safe.objects_read - before)

    def raw(self, request: Request) -> Response:
        """GET /points/ID/raw/PATH: a regular file's bytes, streamed, with its size and type."""
        p, parts, e = self._target(request, "raw")
        if e.type != REG:
            raise UsageError(f"{display_name(b'/'.join(parts)) or '/'} is not a regular file")
        name = parts[-1]
        ctype = mimetypes.guess_type(name.decode("utf-8", "replace"))[0] or "application/octet-stream"
        return self.send_blob(request, e.ref, e.size, ctype, name)

    def send_blob(self, request: Request, ref: bytes | None, size: int, ctype: str, name: bytes) -> Response:
        """A blob as a download, streamed: all of it (200), or the one byte range the request
        asks for (206; 416 when it lies past the end)."""
        if ref is not None and self.safe.entry(ref) is None:
            raise ObjectMissing(f"{display_name(name)}: its content (object {ref.hex()[:12]}) is missing from the safe")
        headers = {"accept-ranges": "bytes", "content-disposition": _disposition(name),
                   "content-security-policy": DOWNLOAD_CSP}
        rng = parse_range(request.headers.get("range"), size)
        if rng == "bad":
            return Response(status_code=416, headers={**headers, "content-range": f"bytes */{size}"})
        if isinstance(rng, tuple):
            start, end = rng
            return StreamingResponse(_logged(blob_pieces(self.safe, ref, size, start, end), name), 206, media_type=ctype,
                                     headers={**headers, "content-length": str(end - start),
                                              "content-range": f"bytes {start}-{end - 1}/{size}"})
        return StreamingResponse(_logged(blob_pieces(self.safe, ref, size), name), media_type=ctype,
                                 headers={**headers, "content-length": str(size)})

    def _archive(self, request: Request, word: str) -> Response:
        p, parts, e = self._target(request, word)
        if e.type != DIR:
            raise UsageError(f"{display_name(b'/'.join(parts))} is not a directory")
        top = parts[-1] if parts else f"{p.name or 'point'}-{p.id[:12]}".encode()
        stream = tar_stream if word == "tar" else zip_stream
        ctype = "application/x-tar" if word == "tar" else "application/zip"
        return StreamingResponse(stream(self.safe, e, top), media_type=ctype,
                                 headers={"content-disposition": _disposition(top + b"." + word.encode()),
                                          "content-security-policy": DOWNLOAD_CSP})

    def tar(self, request: Request) -> Response:
        """GET /points/ID/tar/PATH: a directory as a pax tar stream."""
        return self._archive(request, "tar")

    def zip(self, request: Request) -> Response:
        """GET /points/ID/zip/PATH: a directory as a zip stream."""
        return self._archive(request, "zip")

    def image(self, request: Request) -> Response:
        """GET /points/ID/image: a volume point's image, streamed, with its size."""
        p = self.point_of(request)
        if p.kind != "volume":
            raise UsageError(f"point {p.id[:12]} is not a volume point")
        name = f"{p.name or 'volume'}-{p.id[:12]}.img".encode()
        return self.send_blob(request, p.root, p.size, "application/octet-stream", name)

    def diff_page(self, request: Request) -> Response:
        """GET /diff?a=POINT&b=POINT: what changed from a to b (JSON: as ``diff --json``)."""
        q = request.query_params
        if not q.get("a") or not q.get("b"):
            raise BadRequest("diff needs two points: /diff?a=POINT&b=POINT")
        a = self.safe.point(q["a"]) or resolve_point(self.safe, q["a"])
        b = self.safe.point(q["b"]) or resolve_point(self.safe, q["b"])
        if a.kind != "tree" or b.kind != "tree":
            raise UsageError("diff compares tree points; for volumes compare restored images")
        changes = tree_diff(self.safe, a.root_entry(), b.root_entry())
        if wants_json(request):
            return json_response([data.change_json(*change) for change in changes])
        shown = [(c, path, url_path(path.split(b"/")) if new is not None and c != "-" else None)
                 for c, path, old, new in islice(changes, DIFF_LIMIT + 1)]
        return self.page(request, "diff.html", a=a, b=b, changes=shown[:DIFF_LIMIT], more=len(shown) > DIFF_LIMIT,
                         limit=DIFF_LIMIT)

    # -- static ----------------------------------------------------------------------------

    async def static(self, request: Request) -> Response:
        """GET /static/NAME: the style sheet and the refresh script (served to anyone)."""
        name = request.path_params["name"]
        files = {"style.css": "text/css", "refresh.js": "text/javascript"}
        if name not in files:
            return PlainTextResponse("not found", 404)
        resp = Response((HERE / "static" / name).read_bytes(), media_type=files[name])
        resp.headers["cache-control"] = "max-age=3600"
        return resp

    def routes(self) -> list[Route]:
        """The URL map (docs/WEB.md)."""
        g = self.guarded
        return [
            Route("/", g(self.dashboard)),
            Route("/login", self.login_get, methods=["GET"]),
            Route("/login", self.login_post, methods=["POST"]),
            Route("/logout", self.logout, methods=["POST"]),
            Route("/alerts", g(self.alerts_page)),
            Route("/alerts/ack", self.ack, methods=["POST"]),
            Route("/tasks", g(self.tasks_page)),
            Route("/tasks/{tid:int}", g(self.task_page)),
            Route("/agents", g(self.agents_page)),
            Route("/points", g(self.points_page)),
            Route("/points/{pid}", g(self.point_page)),
            Route("/points/{pid}/tree{rest:anypath}", g(self.tree)),
            Route("/points/{pid}/raw{rest:anypath}", g(self.raw)),
            Route("/points/{pid}/tar{rest:anypath}", g(self.tar)),
            Route("/points/{pid}/zip{rest:anypath}", g(self.zip)),
            Route("/points/{pid}/image", g(self.image)),
            Route("/diff", g(self.diff_page)),
            Route("/static/{name}", self.static),
            Route("/favicon.ico", lambda request: Response(status_code=204)),
        ]


def create_app(safe: Safe, tls: bool = False) -> Any:
    """The ASGI app serving the open ``safe`` (``tls``: cookies marked Secure, HSTS sent)."""
    web = Web(safe, tls)
    app = Starlette(routes=web.routes())
    app.state.web = web
    return SecurityHeaders(app, tls)
