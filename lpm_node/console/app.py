"""The console's web application: pages, the JSON API, health and metrics (Starlette, Jinja2, htmx).

Series are named by opaque ids; searches are POSTed, so no patient data is in a URL, a browser history or a
proxy's log. Every action is a POST with a CSRF token, allowed to admins only, and audited with their name.
"""

from __future__ import annotations

import base64
import contextlib
import csv
import datetime as dt
import io
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from jinja2 import Environment, PackageLoader, select_autoescape
from PIL import Image
from sqlalchemy.orm import sessionmaker
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from lpm_node import __version__
from lpm_node.console import actions, charts, health, lookup, story
from lpm_node.console.metrics import render_metrics
from lpm_node.console.security import (
    RateLimit,
    authenticate,
    is_loopback,
    login_required,
    new_csrf_token,
    same_token,
    session_secret,
)
from lpm_node.core.audit import operator_name, session_factory, utcnow
from lpm_node.core.config import Settings
from lpm_node.core.states import SeriesStatus, values
from lpm_node.imaging.measurement import NO_STEATOSIS, NOT_ASSESSABLE, STEATOSIS

LOG = logging.getLogger(__name__)
STATIC = Path(__file__).resolve().parent / "static"
HTMX = "htmx-2.0.11.min.js"
OPEN_PATHS = ("/static/", "/health/live", "/health/ready", "/login")
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
                               "frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


class Forbidden(Exception):
    """An action this request may not take (status and message for the answer)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Console:
    """The state one console process shares across requests: settings, database, the C-ECHO watch, limits."""

    def __init__(self, settings: Settings, sessions: sessionmaker | None = None) -> None:
        self.settings = settings
        self.sessions = sessions or session_factory(settings.db_url)
        self.watch = health.EchoWatch(settings)
        self.logins = RateLimit(settings.console.login_attempts_per_minute)
        self.login_required = login_required(settings.console)
        self.templates = Environment(loader=PackageLoader("lpm_node.console", "templates"),
                                     autoescape=select_autoescape(default=True, default_for_string=True))
        self.templates.filters["category_words"] = story.category_words
        self.templates.filters["hu"] = lambda v: "" if v is None else f"{v:.2f} HU"
        self.templates.filters["age"] = _age

    # -- who is asking ------------------------------------------------------------------------------------

    def user_of(self, request: Request) -> dict[str, str] | None:
        """The signed-in user ({name, role}), the local operator on loopback without users, or None."""
        if not self.login_required:
            return {"name": f"{operator_name()} (console on loopback)", "role": "admin"}
        basic = getattr(request.state, "basic_user", None)
        if basic:
            return basic
        name = request.session.get("user")
        user = next((u for u in self.settings.console.users if u.name == name), None)
        return {"name": user.name, "role": user.role} if user else None

    def csrf(self, request: Request) -> str:
        token = request.session.get("csrf")
        if not token:
            token = request.session["csrf"] = new_csrf_token()
        return token

    def same_origin_form(self, request: Request, form: Any) -> bool:
        """A posted form carries this session's CSRF token (or the request signed in with HTTP Basic)."""
        if getattr(request.state, "basic_user", None):
            return True
        return same_token(request.session.get("csrf"), request.headers.get("x-csrf-token") or form.get("csrf_token"))

    async def require_admin(self, request: Request, form: Any = None, *, json_body: bool = False) -> dict[str, str]:
        """The admin taking an action; raises Forbidden for a viewer or a missing or wrong CSRF token.

        ``json_body``: an API call with a JSON body, which no other site can make a browser send without a CORS
        preflight (that the console never grants); without a session to ride on (loopback, no users) it needs
        no token."""
        user = self.user_of(request)
        if user is None:
            raise Forbidden(401, "sign in first")
        given = request.headers.get("x-csrf-token") or (form.get("csrf_token") if form is not None else None)
        exempt = getattr(request.state, "basic_user", None) or (json_body and not self.login_required)
        if not exempt and not same_token(request.session.get("csrf"), given):
            raise Forbidden(403, "the form has expired or did not come from this console (CSRF check): reload it")
        if user["role"] != "admin":
            raise Forbidden(403, f"{user['name']} is a viewer: only admins act")
        return user

    # -- rendering ---------------------------------------------------------------------------------------

    def page(self, request: Request, template: str, status: int = 200, **context: Any) -> HTMLResponse:
        user = self.user_of(request)
        html = self.templates.get_template(template).render(
            request=request, user=user, csrf=self.csrf(request), version=__version__, htmx=HTMX,
            can_act=bool(user and user["role"] == "admin"), login_required=self.login_required,
            flash=request.session.pop("flash", None), **context)
        return HTMLResponse(html, status_code=status)

    def outcome(self, request: Request, ok: bool, message: str, back: str, status: int = 200) -> Response:
        """An action's answer: a fragment for htmx, else back to the page with the message."""
        if request.headers.get("hx-request"):
            html = self.templates.get_template("_message.html").render(ok=ok, message=message)
            return HTMLResponse(html, status_code=status if status >= 400 else 200)
        request.session["flash"] = {"ok": ok, "message": message}
        return RedirectResponse(back, status_code=303)


def _age(seconds: float | None) -> str:
    if seconds is None:
        return ""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


# -- middleware -------------------------------------------------------------------------------------------


class Guard(BaseHTTPMiddleware):
    """Loopback Host check, login for everything but the open paths, HTTP Basic for scripts, security headers."""

    def __init__(self, app: Any, console: Console) -> None:
        super().__init__(app)
        self.console = console

    async def dispatch(self, request: Request, call_next: Any) -> Response:
        console = self.console
        path = request.url.path
        if is_loopback(console.settings.console.host):
            host = (request.headers.get("host") or "").rsplit(":", 1)[0].strip("[]")
            if host and not is_loopback(host):
                return _headers(Response("unknown Host for a console on loopback", status_code=421))
        auth = request.headers.get("authorization", "")
        if auth.lower().startswith("basic ") and console.login_required:
            user = self._basic(request, auth)
            if user is None:
                return _headers(JSONResponse({"error": "wrong user name or password, or too many attempts"},
                                             status_code=401, headers={"WWW-Authenticate": 'Basic realm="lpm-node"'}))
            request.state.basic_user = user
        if (console.login_required and not path.startswith(OPEN_PATHS) and console.user_of(request) is None):
            if path.startswith("/api/") or path == "/metrics":
                return _headers(JSONResponse({"error": "sign in first"}, status_code=401,
                                             headers={"WWW-Authenticate": 'Basic realm="lpm-node"'}))
            return _headers(RedirectResponse("/login", status_code=303))
        return _headers(await call_next(request))

    def _basic(self, request: Request, auth: str) -> dict[str, str] | None:
        try:
            name, _, password = base64.b64decode(auth[6:]).decode().partition(":")
        except ValueError:
            return None
        address = request.client.host if request.client else "?"
        if not self.console.logins.allow(f"addr:{address}", f"user:{name}"):
            return None
        user = authenticate(self.console.settings.console.users, name, password)
        return {"name": user.name, "role": user.role} if user else None


def _headers(response: Response) -> Response:
    for key, value in SECURITY_HEADERS.items():
        response.headers.setdefault(key, value)
    return response


# -- pages --------------------------------------------------------------------------------------------------


def _search_context(console: Console, filters: lookup.SearchFilters) -> dict[str, Any]:
    with console.sessions() as session:
        result = lookup.search(session, filters, console.settings.console.page_size)
    return {"filters": filters, "result": result, "statuses": values(SeriesStatus),
            "categories": [STEATOSIS, NO_STEATOSIS, NOT_ASSESSABLE]}


def build_app(settings: Settings, sessions: sessionmaker | None = None) -> Starlette:
    """The console for ``settings`` (reading the audit database at ``settings.db_url`` unless given sessions)."""
    console = Console(settings, sessions)

    async def home(request: Request) -> Response:
        return RedirectResponse("/find", status_code=303)

    async def find_page(request: Request) -> Response:
        return console.page(request, "find.html", **_search_context(console, lookup.SearchFilters()))

    async def find_post(request: Request) -> Response:
        form = await request.form()
        if not console.same_origin_form(request, form):
            return console.outcome(request, False, "the form has expired: reload the page", "/find", status=403)
        try:
            filters = lookup.SearchFilters.from_mapping(form)
        except ValueError as exc:
            return console.outcome(request, False, f"search not understood: {exc}", "/find", status=400)
        template = "_results.html" if request.headers.get("hx-request") else "find.html"
        return console.page(request, template, **_search_context(console, filters))

    async def find_csv(request: Request) -> Response:
        form = await request.form()
        if not console.same_origin_form(request, form):
            return JSONResponse({"error": "the form has expired: reload the page"}, status_code=403)
        try:
            filters = lookup.SearchFilters.from_mapping(form)
        except ValueError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        with console.sessions() as session:
            result = lookup.search(session, filters, console.settings.console.page_size, everything=True)
        out = io.StringIO()
        columns = ["id", "accession_number", "patient_id", "patient_name", "study_date", "study_description",
                   "series_description", "modality", "instances", "status", "reason", "received_at",
                   "dl_parenchymal_hu", "category", "study_instance_uid", "series_instance_uid"]
        writer = csv.DictWriter(out, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in result.rows:
            writer.writerow({k: _csv_safe(v) for k, v in row.items()})
        stamp = utcnow().strftime("%Y%m%dT%H%M%SZ")
        return Response(out.getvalue(), media_type="text/csv; charset=utf-8",
                        headers={"Content-Disposition": f'attachment; filename="lpm-series-{stamp}.csv"'})

    def _story(public_id: str) -> dict[str, Any] | None:
        with console.sessions() as session:
            found = lookup.find_by_public_id(session, public_id)
            if found is None:
                return None
            return story.series_story(session, *found, viewer_url=settings.console.viewer_url)

    async def series_page(request: Request) -> Response:
        told = _story(request.path_params["public_id"])
        if told is None:
            return console.page(request, "missing.html", status=404)
        with console.sessions() as session:
            has_key = story.key_image_path(session, told["series_instance_uid"],
                                           settings.data_path / "outbox") is not None
        return console.page(request, "series.html", s=told, has_key=has_key)

    async def key_image(request: Request) -> Response:
        with console.sessions() as session:
            found = lookup.find_by_public_id(session, request.path_params["public_id"])
            path = story.key_image_path(session, found[0].series_instance_uid,
                                        settings.data_path / "outbox") if found else None
        if path is None:
            return Response("no key image", status_code=404)
        return Response(_png(path), media_type="image/png")

    async def measure_again(request: Request) -> Response:
        form = await request.form()
        back = f"/series/{request.path_params['public_id']}"
        try:
            user = await console.require_admin(request, form)
        except Forbidden as exc:
            return console.outcome(request, False, str(exc), back, exc.status)
        with console.sessions() as session:
            found = lookup.find_by_public_id(session, request.path_params["public_id"])
            if found is None:
                return console.outcome(request, False, "no such series", "/find", 404)
            result = actions.measure_again(session, found[0].series_instance_uid, user["name"])
        return console.outcome(request, result.ok, f"measure again: {result.message}", back)

    async def queues_page(request: Request) -> Response:
        with console.sessions() as session:
            q = story.queues(session, utcnow())
            ids = lookup.public_ids(session, sorted({d["series_instance_uid"] for d in q["dead"]}
                                                    | {s["series_instance_uid"] for s in q["failed_series"]}
                                                    | {s["series_instance_uid"] for s in q["receiving"]}))
        return console.page(request, "queues.html", q=q, ids=ids, destinations=settings.output.destinations)

    async def retry(request: Request) -> Response:
        form = await request.form()
        try:
            user = await console.require_admin(request, form)
            ids = [int(v) for v in form.getlist("delivery_id") if str(v).strip()]
            destination = next((str(v).strip() for v in form.getlist("destination") if str(v).strip()), "")
            result = None
            with console.sessions() as session:
                result = actions.retry_dead_letters(session, settings, user["name"], ids, destination)
        except Forbidden as exc:
            return console.outcome(request, False, str(exc), "/queues", exc.status)
        except ValueError as exc:
            return console.outcome(request, False, f"retry refused: {exc}", "/queues", 400)
        return console.outcome(request, result.ok, f"retry: {result.message}", "/queues")

    def suspend(suspended: bool):  # noqa: ANN202 - an endpoint
        async def endpoint(request: Request) -> Response:
            form = await request.form()
            try:
                user = await console.require_admin(request, form)
            except Forbidden as exc:
                return console.outcome(request, False, str(exc), "/queues", exc.status)
            with console.sessions() as session:
                result = actions.suspend_measuring(session, suspended, user["name"])
            return console.outcome(request, result.ok, result.message, "/queues")
        return endpoint

    async def refusals_page(request: Request) -> Response:
        with console.sessions() as session:
            rows = story.refusals(session)
            rejected = story.rejected_series(session)
            ids = lookup.public_ids(session, [r["series_instance_uid"] for r in rejected])
        return console.page(request, "refusals.html", rows=rows, rejected=rejected, ids=ids)

    async def health_page(request: Request) -> Response:
        return console.page(request, "health.html", h=health.health(settings, console.sessions, console.watch))

    async def throughput_page(request: Request) -> Response:
        with console.sessions() as session:
            rows = charts.daily(session, dt.datetime.now(dt.UTC).date())
        counts = charts.bar_chart(rows, [("received", "series received"), ("measured", "measured"),
                                         ("failed", "failed")], "Series per day")
        times = charts.bar_chart(rows, [("p50_s", "p50"), ("p95_s", "p95")], "Time to result (s)", unit=" s")
        return console.page(request, "throughput.html", rows=rows, counts_svg=counts, times_svg=times)

    async def live(request: Request) -> Response:
        return JSONResponse({"status": "alive", "version": __version__})

    async def ready(request: Request) -> Response:
        ok, parts = health.ready(settings, console.sessions)
        return JSONResponse({"status": "ready" if ok else "not ready", **parts}, status_code=200 if ok else 503)

    async def metrics(request: Request) -> Response:
        return Response(render_metrics(console.sessions), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def login_page(request: Request) -> Response:
        if not console.login_required:
            return RedirectResponse("/find", status_code=303)
        return console.page(request, "login.html")

    async def login_post(request: Request) -> Response:
        form = await request.form()
        name, password = str(form.get("name") or "")[:64], str(form.get("password") or "")[:1024]
        if not same_token(request.session.get("csrf"), form.get("csrf_token")):
            return console.page(request, "login.html", status=403, error="the form expired: try again")
        address = request.client.host if request.client else "?"
        if not console.logins.allow(f"addr:{address}", f"user:{name}"):
            LOG.warning("console: too many sign-in attempts from %s", address)
            return console.page(request, "login.html", status=429,
                                error="too many attempts: wait a minute before trying again")
        user = authenticate(settings.console.users, name, password)
        if user is None:
            LOG.warning("console: failed sign-in from %s", address)
            return console.page(request, "login.html", status=401, error="wrong user name or password")
        request.session.clear()
        request.session.update({"user": user.name, "csrf": new_csrf_token()})
        LOG.info("console: %s signed in from %s", user.name, address)
        return RedirectResponse("/find", status_code=303)

    async def logout(request: Request) -> Response:
        form = await request.form()
        if same_token(request.session.get("csrf"), form.get("csrf_token")):
            request.session.clear()
        return RedirectResponse("/login" if console.login_required else "/find", status_code=303)

    # -- JSON API ----------------------------------------------------------------------------------------

    async def api_search(request: Request) -> Response:
        if not request.headers.get("content-type", "").startswith("application/json"):
            return JSONResponse({"error": "send the filters as a JSON body (Content-Type: application/json)"},
                                status_code=415)
        try:
            body = await request.json()
            if not isinstance(body, dict):
                raise ValueError("the body must be a JSON object")
            filters = lookup.SearchFilters.from_mapping(body)
        except ValueError as exc:
            return JSONResponse({"error": f"search not understood: {exc}"}, status_code=400)
        with console.sessions() as session:
            result = lookup.search(session, filters, settings.console.page_size)
        return JSONResponse({"total": result.total, "page": result.page, "pages": result.pages,
                             "series": result.rows})

    async def api_series(request: Request) -> Response:
        told = _story(request.path_params["public_id"])
        if told is None:
            return JSONResponse({"error": "no such series"}, status_code=404)
        return JSONResponse(told)

    async def api_action(request: Request) -> Response:
        if not request.headers.get("content-type", "").startswith("application/json"):
            return JSONResponse({"error": "send a JSON body (Content-Type: application/json)"}, status_code=415)
        try:
            user = await console.require_admin(request, json_body=True)
            body = await request.json()
        except Forbidden as exc:
            return JSONResponse({"error": str(exc)}, status_code=exc.status)
        except ValueError:
            return JSONResponse({"error": "the body is not JSON"}, status_code=400)
        what = request.path_params["action"]
        with console.sessions() as session:
            if what == "measure-again":
                found = lookup.find_by_public_id(session, str(body.get("id") or ""))
                if found is None:
                    return JSONResponse({"error": "no such series"}, status_code=404)
                result = actions.measure_again(session, found[0].series_instance_uid, user["name"])
            elif what == "retry":
                try:
                    ids = [int(i) for i in body.get("delivery_ids") or []]
                    result = actions.retry_dead_letters(session, settings, user["name"], ids,
                                                        str(body.get("destination") or ""))
                except (TypeError, ValueError) as exc:
                    return JSONResponse({"error": f"retry refused: {exc}"}, status_code=400)
            elif what in ("suspend", "resume"):
                result = actions.suspend_measuring(session, what == "suspend", user["name"])
            else:
                return JSONResponse({"error": "unknown action"}, status_code=404)
        return JSONResponse({"ok": result.ok, "message": result.message}, status_code=200 if result.ok else 409)

    async def api_queues(request: Request) -> Response:
        with console.sessions() as session:
            return JSONResponse(story.queues(session, utcnow()))

    async def api_refusals(request: Request) -> Response:
        with console.sessions() as session:
            return JSONResponse({"associations": story.refusals(session),
                                 "rejected_series": story.rejected_series(session)})

    async def api_health(request: Request) -> Response:
        return JSONResponse(health.health(settings, console.sessions, console.watch))

    async def api_throughput(request: Request) -> Response:
        with console.sessions() as session:
            return JSONResponse({"days": charts.daily(session, dt.datetime.now(dt.UTC).date())})

    routes = [
        Route("/", home), Route("/find", find_page, methods=["GET"]), Route("/find", find_post, methods=["POST"]),
        Route("/find.csv", find_csv, methods=["POST"]),
        Route("/series/{public_id}", series_page), Route("/series/{public_id}/key.png", key_image),
        Route("/series/{public_id}/measure-again", measure_again, methods=["POST"]),
        Route("/queues", queues_page), Route("/queues/retry", retry, methods=["POST"]),
        Route("/queues/suspend", suspend(True), methods=["POST"]),
        Route("/queues/resume", suspend(False), methods=["POST"]),
        Route("/refusals", refusals_page), Route("/health", health_page), Route("/throughput", throughput_page),
        Route("/health/live", live), Route("/health/ready", ready), Route("/metrics", metrics),
        Route("/login", login_page, methods=["GET"]), Route("/login", login_post, methods=["POST"]),
        Route("/logout", logout, methods=["POST"]),
        Route("/api/series/search", api_search, methods=["POST"]), Route("/api/series/{public_id}", api_series),
        Route("/api/actions/{action}", api_action, methods=["POST"]),
        Route("/api/queues", api_queues), Route("/api/refusals", api_refusals), Route("/api/health", api_health),
        Route("/api/throughput", api_throughput),
        Mount("/static", app=StaticFiles(directory=STATIC), name="static"),
    ]
    c = settings.console
    secure = bool(c.tls_certificate) or c.behind_tls_proxy
    middleware = [
        Middleware(SessionMiddleware, secret_key=session_secret(settings.data_path), session_cookie="lpm_console",
                   max_age=c.session_minutes * 60, same_site="strict", https_only=secure),
        Middleware(Guard, console=console),
    ]
    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        console.watch.start()
        yield
        console.watch.stop()

    app = Starlette(routes=routes, middleware=middleware, lifespan=lifespan)
    app.state.console = console
    return app


def _csv_safe(value: Any) -> Any:
    """A cell a spreadsheet will not run as a formula."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


def _png(path: Path) -> bytes:
    """The key image (a Secondary Capture, RGB or grey) as PNG."""
    ds = pydicom.dcmread(path)
    pixels = np.asarray(ds.pixel_array)
    if pixels.dtype != np.uint8:
        low, high = float(pixels.min()), float(pixels.max())
        pixels = ((pixels - low) / max(high - low, 1.0) * 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()
