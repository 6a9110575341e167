"""The board's web application (Starlette): login, the page, its event stream, acks, search.

Routes (every one but ``/login`` and ``/static`` needs a session)::

    GET  /login          the form (fields username, password, csrf)
    POST /login          303 to / with a session cookie; 429 past the rate limit
    POST /logout         ends the session (CSRF field)
    GET  /               the page; its first state is embedded as JSON
    GET  /api/state      the same state as JSON (a page reloads it after a reconnect)
    GET  /events         server-sent events: study, box, rejected, broker
    POST /api/ack        {"study_instance_uid", "alert_id"}; header X-CSRF-Token
    GET  /api/search?q=  studies by StudyInstanceUID (prefix) or accession number

Every response carries a strict Content-Security-Policy (scripts and styles from /static
only, no inline script, no framing) and ``Cache-Control: no-store`` outside /static.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import (
    HTMLResponse,
    JSONResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from ..config import Settings
from .auth import LoginLimiter, Session, Sessions, check_password, same_token, valid_user_name
from .events import CLOSED, Events, encode
from .store import BoardStore
from .subscriber import BoardClient, uid_ok
from .worklist import Ack, present, sort_key, utc_iso

logger = logging.getLogger(__name__)

HERE = Path(__file__).parent
SESSION_COOKIE = "edge_board_session"
LOGIN_COOKIE = "edge_board_login"
CSRF_HEADER = "x-csrf-token"
WORKLIST_MAX_ROWS = 500
"""Rows the page holds; older studies in the window are found by search."""
MAX_BODY_BYTES = 8192
KEEPALIVE_SECONDS = 15.0
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"cross-origin-opener-policy", b"same-origin"),
]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
ASGIApp = Callable[
    [Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]],
    Awaitable[None],
]


async def read_body(request: Request, limit: int = MAX_BODY_BYTES) -> bytes | None:
    """The request body, or None past ``limit`` bytes (chunked bodies included: the length
    header alone would not bound them)."""
    if int(request.headers.get("content-length") or 0) > limit:
        return None
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            return None
    return bytes(body)


async def read_form(request: Request) -> dict[str, str] | None:
    """An url-encoded form's first value of each field, or None when too large."""
    body = await read_body(request)
    if body is None:
        return None
    fields = parse_qs(body.decode(errors="replace"), keep_blank_values=True)
    return {key: values[0] for key, values in fields.items()}


class SecurityHeaders:
    """ASGI middleware: the security headers on every response; no caching outside /static."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(
        self,
        scope: Scope,
        receive: Callable[[], Awaitable[Message]],
        send: Callable[[Message], Awaitable[None]],
    ) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        static = scope["path"].startswith("/static/")

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers.extend(SECURITY_HEADERS)
                if not static:
                    headers.append((b"cache-control", b"no-store"))
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, with_headers)


class Board:
    """The application's parts and handlers; :meth:`app` builds the Starlette app."""

    def __init__(
        self, settings: Settings, store: BoardStore, client: BoardClient, events: Events
    ) -> None:
        self.settings = settings
        self.cfg = settings.board
        self.store = store
        self.client = client
        self.events = events
        self.sessions = Sessions(self.cfg.session_hours * 3600)
        self.limiter = LoginLimiter(self.cfg.login_attempts_per_minute)
        self.templates = Environment(
            loader=FileSystemLoader(HERE / "templates"),
            autoescape=select_autoescape(default=True),
        )

    def app(self) -> Starlette:
        @contextlib.asynccontextmanager
        async def lifespan(app: Starlette) -> AsyncIterator[None]:
            self.events.bind(asyncio.get_running_loop())
            yield
            self.events.shutdown()

        routes = [
            Route("/login", self.login_form, methods=["GET"]),
            Route("/login", self.login, methods=["POST"]),
            Route("/logout", self.logout, methods=["POST"]),
            Route("/", self.page, methods=["GET"]),
            Route("/api/state", self.state, methods=["GET"]),
            Route("/api/search", self.search, methods=["GET"]),
            Route("/api/ack", self.ack, methods=["POST"]),
            Route("/events", self.stream, methods=["GET"]),
            Route("/favicon.ico", self.no_icon, methods=["GET"]),
            Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
        ]
        app = Starlette(routes=routes, lifespan=lifespan)
        app.add_middleware(SecurityHeaders)
        return app

    async def no_icon(self, request: Request) -> Response:
        return Response(status_code=204)  # browsers ask; a 404 would be a console error

    # -- who is asking -------------------------------------------------------------------

    def _from_proxy(self, request: Request) -> bool:
        return request.client is not None and request.client.host in self.cfg.trusted_proxies

    def client_address(self, request: Request) -> str:
        """The browser's address: X-Forwarded-For's first entry only from a trusted proxy."""
        forwarded = request.headers.get("x-forwarded-for")
        if forwarded and self._from_proxy(request):
            return forwarded.split(",")[0].strip()
        return request.client.host if request.client else "unknown"

    def _secure(self, request: Request) -> bool:
        if self.cfg.cookie_secure or request.url.scheme == "https":
            return True
        return self._from_proxy(request) and request.headers.get("x-forwarded-proto") == "https"

    def _proxy_user(self, request: Request) -> str | None:
        name = request.headers.get(self.cfg.proxy_header)
        if name is None or not self._from_proxy(request):
            return None
        return name if valid_user_name(name) else None

    def session(self, request: Request) -> Session | None:
        session = self.sessions.get(request.cookies.get(SESSION_COOKIE))
        # With a proxy, the proxy is the authority: its user must still be the session's.
        if (
            session is not None
            and self.cfg.auth == "proxy"
            and self._proxy_user(request) != session.user
        ):
            return None
        return session

    def _session_cookie(self, response: Response, request: Request, token: str) -> None:
        response.set_cookie(
            SESSION_COOKIE,
            token,
            max_age=int(self.cfg.session_hours * 3600),
            httponly=True,
            samesite="strict",
            secure=self._secure(request),
            path="/",
        )

    # -- login ---------------------------------------------------------------------------

    def _render(self, name: str, status: int = 200, **values: Any) -> HTMLResponse:
        return HTMLResponse(self.templates.get_template(name).render(**values), status)

    async def login_form(self, request: Request) -> Response:
        if self.cfg.auth == "proxy":
            return RedirectResponse("/", 303)
        return self._login_page(request, None)

    def _login_page(
        self, request: Request, error: str | None, status: int = 200, token: str | None = None
    ) -> Response:
        """The form with a CSRF token, also set as a cookie (double submit); a failed
        attempt keeps its token so the form can simply be sent again."""
        token = token or secrets.token_urlsafe(32)
        response = self._render("login.html", status, csrf=token, error=error)
        response.set_cookie(
            LOGIN_COOKIE,
            token,
            max_age=3600,
            httponly=True,
            samesite="strict",
            secure=self._secure(request),
            path="/login",
        )
        return response

    async def login(self, request: Request) -> Response:
        if self.cfg.auth == "proxy":
            return RedirectResponse("/", 303)
        form = await read_form(request)
        if form is None:
            return self._login_page(request, "Request too large.", 413)
        name, password, csrf = (form.get(k, "") for k in ("username", "password", "csrf"))
        if not same_token(request.cookies.get(LOGIN_COOKIE), csrf) or not csrf:
            return self._login_page(request, "The form expired; please try again.", 403)
        address = self.client_address(request)
        keys = (f"address:{address}", f"user:{name.lower()}")
        if self.limiter.blocked(*keys):
            logger.warning("login refused: too many failed attempts (from %s)", address)
            return self._login_page(
                request, "Too many failed attempts; wait a minute and try again.", 429, csrf
            )
        ok = await run_in_threadpool(check_password, self.cfg.users_file, name, password)
        if not ok:
            self.limiter.failed(*keys)
            logger.info("failed login from %s", address)
            return self._login_page(request, "Wrong user name or password.", 401, csrf)
        logger.info("user %s logged in from %s", name, address)
        response = RedirectResponse("/", 303)
        token, _ = self.sessions.create(name)
        self._session_cookie(response, request, token)
        response.delete_cookie(LOGIN_COOKIE, path="/login")
        return response

    async def logout(self, request: Request) -> Response:
        session = self.session(request)
        form = await read_form(request) or {}
        if session is None or not same_token(form.get("csrf", ""), session.csrf):
            return JSONResponse({"error": "not logged in or CSRF token missing"}, 403)
        self.sessions.end(request.cookies.get(SESSION_COOKIE))
        response = RedirectResponse("/login", 303)
        response.delete_cookie(SESSION_COOKIE, path="/")
        return response

    # -- the page and its data -------------------------------------------------------------

    def current_state(self) -> dict[str, Any]:
        since = time.time() - self.cfg.worklist_hours * 3600
        rows = [
            present(r, self.cfg.viewer_url) for r in self.store.worklist(since, WORKLIST_MAX_ROWS)
        ]
        rows.sort(key=sort_key)
        return {
            "studies": rows,
            "boxes": self.store.boxes(),
            "rejected": self.store.rejected(),
            "audit": self.store.audit_log(20),
            "broker": {"connected": self.client.connected},
            "now": time.time(),
        }

    async def page(self, request: Request) -> Response:
        session = self.session(request)
        new_user = None
        if session is None:
            new_user = self._proxy_user(request) if self.cfg.auth == "proxy" else None
            if new_user is None:
                if self.cfg.auth == "proxy":
                    return JSONResponse({"error": "no user from the trusted proxy"}, 403)
                return RedirectResponse("/login", 303)
            token, session = self.sessions.create(new_user)
        state = await run_in_threadpool(self.current_state)
        config = {
            "max_wait_seconds": self.cfg.max_wait_minutes * 60,
            "sound": self.cfg.sound,
            "max_rows": WORKLIST_MAX_ROWS,
        }
        response = self._render(
            "board.html",
            user=session.user,
            csrf=session.csrf,
            logout=self.cfg.auth == "password",
            data={"state": state, "config": config},
        )
        if new_user is not None:
            self._session_cookie(response, request, token)
        return response

    def _refused(self, request: Request) -> Response | None:
        if self.session(request) is None:
            return JSONResponse({"error": "log in first"}, 401)
        return None

    async def state(self, request: Request) -> Response:
        return self._refused(request) or JSONResponse(await run_in_threadpool(self.current_state))

    async def search(self, request: Request) -> Response:
        refused = self._refused(request)
        if refused:
            return refused
        text = request.query_params.get("q", "").strip()
        if not text or len(text) > 64:
            return JSONResponse({"error": "give 1-64 characters"}, 400)
        found = await run_in_threadpool(self.store.search, text)
        for row in found:
            row["revisions"] = self.store.revisions(row["study_instance_uid"])
        return JSONResponse({"studies": [present(r, self.cfg.viewer_url) for r in found]})

    async def stream(self, request: Request) -> Response:
        session = self.session(request)
        if session is None:
            return JSONResponse({"error": "log in first"}, 401)
        token = request.cookies.get(SESSION_COOKIE)
        queue = self.events.open()

        async def events() -> AsyncIterator[str]:
            try:
                yield "retry: 1000\n" + encode("broker", {"connected": self.client.connected})
                while True:
                    try:
                        text = await asyncio.wait_for(queue.get(), KEEPALIVE_SECONDS)
                    except asyncio.TimeoutError:
                        if self.sessions.get(token) is None:
                            return  # logged out or expired: the stream ends with it
                        yield ": keep-alive\n\n"
                        continue
                    if text == CLOSED or self.sessions.get(token) is None:
                        return  # closed, or logged out / expired while events flowed
                    yield text
            finally:
                self.events.close(queue)

        return StreamingResponse(
            events(), media_type="text/event-stream", headers={"x-accel-buffering": "no"}
        )

    # -- acknowledge -----------------------------------------------------------------------

    async def ack(self, request: Request) -> Response:
        session = self.session(request)
        if session is None:
            return JSONResponse({"error": "log in first"}, 401)
        if not same_token(request.headers.get(CSRF_HEADER), session.csrf):
            return JSONResponse({"error": "CSRF token missing or wrong"}, 403)
        raw = await read_body(request)
        if raw is None:
            return JSONResponse({"error": "request too large"}, 413)
        try:
            body = json.loads(raw)
        except ValueError:
            return JSONResponse({"error": "not JSON"}, 400)
        uid = body.get("study_instance_uid") if isinstance(body, dict) else None
        alert_id = body.get("alert_id") if isinstance(body, dict) else None
        if not (isinstance(uid, str) and uid_ok(uid) and isinstance(alert_id, str)):
            return JSONResponse({"error": "study_instance_uid and alert_id expected"}, 400)
        row = await run_in_threadpool(self.store.study, uid)
        if row is None:
            return JSONResponse({"error": "no such study"}, 404)
        if row["acked_alert_id"] is not None:
            return JSONResponse(present(row, self.cfg.viewer_url))
        if row["triage"] != "urgent" or row["alert_id"] != alert_id:
            return JSONResponse(
                {"error": "this is not the study's current urgent alert; the page shows it now"},
                409,
            )
        ack = Ack(alert_id=alert_id, by=session.user, at=utc_iso(time.time()))
        sent = await run_in_threadpool(self.client.publish_ack, row, ack)
        outcome = "sent" if sent else "not sent: the broker did not confirm"
        await run_in_threadpool(
            lambda: self.store.audit(
                user=session.user,
                action="ack",
                uid=uid,
                alert_id=alert_id,
                box=row["box"],
                outcome=outcome,
                at=ack.at,
            )
        )
        logger.info("ack by %s of study %s alert %s: %s", session.user, uid, alert_id, outcome)
        if not sent:
            return JSONResponse({"error": "the broker is unreachable; the ack was not sent"}, 503)
        updated = await run_in_threadpool(self.store.acknowledge, uid, ack)
        if updated is not None:
            self.events.publish("study", present(updated, self.cfg.viewer_url))
        else:
            updated = await run_in_threadpool(self.store.study, uid)
        return JSONResponse(present(updated or row, self.cfg.viewer_url))
