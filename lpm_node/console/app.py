"""The console's web application: its routes (pages, the JSON API, health and metrics), the session and the
guard in front of them (Starlette, Jinja2, htmx)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from sqlalchemy.orm import sessionmaker
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from lpm_node.console import api, pages
from lpm_node.console.security import session_secret
from lpm_node.console.web import STATIC, Console, Guard
from lpm_node.core.config import Settings


def build_app(settings: Settings, sessions: sessionmaker | None = None) -> Starlette:
    """The console for ``settings`` (reading the audit database at ``settings.db_url`` unless given sessions)."""
    console = Console(settings, sessions)
    routes = [
        Route("/", pages.home),
        Route("/find", pages.find_page, methods=["GET"]),
        Route("/find", pages.find_post, methods=["POST"]),
        Route("/find.csv", pages.find_csv, methods=["POST"]),
        Route("/series/{public_id}", pages.series_page),
        Route("/series/{public_id}/key.png", pages.key_image),
        Route("/series/{public_id}/measure-again", pages.measure_again, methods=["POST"]),
        Route("/queues", pages.queues_page),
        Route("/queues/retry", pages.retry, methods=["POST"]),
        Route("/queues/suspend", pages.suspend(True), methods=["POST"]),
        Route("/queues/resume", pages.suspend(False), methods=["POST"]),
        Route("/refusals", pages.refusals_page),
        Route("/health", pages.health_page),
        Route("/throughput", pages.throughput_page),
        Route("/health/live", pages.live),
        Route("/health/ready", pages.ready),
        Route("/metrics", pages.metrics),
        Route("/login", pages.login_page, methods=["GET"]),
        Route("/login", pages.login_post, methods=["POST"]),
        Route("/logout", pages.logout, methods=["POST"]),
        Route("/api/series/search", api.search, methods=["POST"]),
        Route("/api/series/{public_id}", api.series),
        Route("/api/actions/{action}", api.action, methods=["POST"]),
        Route("/api/queues", api.queues),
        Route("/api/refusals", api.refusals),
        Route("/api/health", api.health_report),
        Route("/api/throughput", api.throughput),
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
