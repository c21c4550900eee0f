"""What every request of the console shares: the console's state (settings, database, templates, the C-ECHO
watch, the sign-in limit), who is asking and what they may do, and the guard in front of every route.

Series are named by opaque ids; searches are POSTed, so no patient data is in a URL, a browser history or a
proxy's log. Every action is a POST with a CSRF token, allowed to admins only, and audited with their name.
"""

from __future__ import annotations

import base64
import logging
from pathlib import Path
from typing import Any

from jinja2 import Environment, PackageLoader, select_autoescape
from sqlalchemy.orm import sessionmaker
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

from lpm_node import __version__
from lpm_node.console import health, lookup, story
from lpm_node.console.security import (
    RateLimit,
    authenticate,
    is_loopback,
    login_required,
    new_csrf_token,
    same_token,
)
from lpm_node.core.audit import operator_name, session_factory
from lpm_node.core.config import Settings

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

    def story_of(self, public_id: str) -> dict[str, Any] | None:
        """A series' story by its opaque id (None when there is no such series)."""
        with self.sessions() as session:
            found = lookup.find_by_public_id(session, public_id)
            if found is None:
                return None
            return story.series_story(session, *found, viewer_url=self.settings.console.viewer_url)

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




def console_of(request: Request) -> Console:
    """The console serving ``request``."""
    return request.app.state.console
