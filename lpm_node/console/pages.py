"""The console's pages and the actions their forms post (htmx fragments, or a redirect with the message)."""

from __future__ import annotations

import csv
import datetime as dt
import io
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from PIL import Image
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response

from lpm_node import __version__
from lpm_node.console import actions, charts, health, lookup, story
from lpm_node.console.metrics import render_metrics
from lpm_node.console.security import authenticate, new_csrf_token, same_token
from lpm_node.console.web import Console, Forbidden, console_of
from lpm_node.core.audit import utcnow
from lpm_node.core.states import SeriesStatus, values
from lpm_node.imaging.measurement import Category

LOG = logging.getLogger(__name__)


def _search_context(console: Console, filters: lookup.SearchFilters) -> dict[str, Any]:
    with console.sessions() as session:
        result = lookup.search(session, filters, console.settings.console.page_size)
    return {"filters": filters, "result": result, "statuses": values(SeriesStatus),
            "categories": [str(c) for c in Category]}


async def home(request: Request) -> Response:
    return RedirectResponse("/find", status_code=303)


async def find_page(request: Request) -> Response:
    console = console_of(request)
    return console.page(request, "find.html", **_search_context(console, lookup.SearchFilters()))


async def find_post(request: Request) -> Response:
    console = console_of(request)
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
    console = console_of(request)
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


async def series_page(request: Request) -> Response:
    console = console_of(request)
    told = console.story_of(request.path_params["public_id"])
    if told is None:
        return console.page(request, "missing.html", status=404)
    with console.sessions() as session:
        has_key = story.key_image_path(session, told["series_instance_uid"],
                                       console.settings.data_path / "outbox") is not None
    return console.page(request, "series.html", s=told, has_key=has_key)


async def key_image(request: Request) -> Response:
    console = console_of(request)
    with console.sessions() as session:
        found = lookup.find_by_public_id(session, request.path_params["public_id"])
        path = story.key_image_path(session, found[0].series_instance_uid,
                                    console.settings.data_path / "outbox") if found else None
    if path is None:
        return Response("no key image", status_code=404)
    return Response(_png(path), media_type="image/png")


async def measure_again(request: Request) -> Response:
    console = console_of(request)
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
    console = console_of(request)
    with console.sessions() as session:
        q = story.queues(session, utcnow())
        ids = lookup.public_ids(session, sorted({d["series_instance_uid"] for d in q["dead"]}
                                                | {s["series_instance_uid"] for s in q["failed_series"]}
                                                | {s["series_instance_uid"] for s in q["receiving"]}))
    return console.page(request, "queues.html", q=q, ids=ids, destinations=console.settings.output.destinations)


async def retry(request: Request) -> Response:
    console = console_of(request)
    form = await request.form()
    try:
        user = await console.require_admin(request, form)
        ids = [int(v) for v in form.getlist("delivery_id") if str(v).strip()]
        destination = next((str(v).strip() for v in form.getlist("destination") if str(v).strip()), "")
        result = None
        with console.sessions() as session:
            result = actions.retry_dead_letters(session, console.settings, user["name"], ids, destination)
    except Forbidden as exc:
        return console.outcome(request, False, str(exc), "/queues", exc.status)
    except ValueError as exc:
        return console.outcome(request, False, f"retry refused: {exc}", "/queues", 400)
    return console.outcome(request, result.ok, f"retry: {result.message}", "/queues")


def suspend(suspended: bool):  # noqa: ANN202 - an endpoint
    async def endpoint(request: Request) -> Response:
        console = console_of(request)
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
    console = console_of(request)
    with console.sessions() as session:
        rows = story.refusals(session)
        rejected = story.rejected_series(session)
        ids = lookup.public_ids(session, [r["series_instance_uid"] for r in rejected])
    return console.page(request, "refusals.html", rows=rows, rejected=rejected, ids=ids)


async def health_page(request: Request) -> Response:
    console = console_of(request)
    return console.page(request, "health.html", h=health.health(console.settings, console.sessions, console.watch))


async def throughput_page(request: Request) -> Response:
    console = console_of(request)
    with console.sessions() as session:
        rows = charts.daily(session, dt.datetime.now(dt.UTC).date())
    counts = charts.bar_chart(rows, [("received", "series received"), ("measured", "measured"),
                                     ("failed", "failed")], "Series per day")
    times = charts.bar_chart(rows, [("p50_s", "p50"), ("p95_s", "p95")], "Time to result (s)", unit=" s")
    return console.page(request, "throughput.html", rows=rows, counts_svg=counts, times_svg=times)


async def live(request: Request) -> Response:
    return JSONResponse({"status": "alive", "version": __version__})


async def ready(request: Request) -> Response:
    console = console_of(request)
    ok, parts = health.ready(console.settings, console.sessions)
    return JSONResponse({"status": "ready" if ok else "not ready", **parts}, status_code=200 if ok else 503)


async def metrics(request: Request) -> Response:
    console = console_of(request)
    return Response(render_metrics(console.sessions), media_type="text/plain; version=0.0.4; charset=utf-8")


async def login_page(request: Request) -> Response:
    console = console_of(request)
    if not console.login_required:
        return RedirectResponse("/find", status_code=303)
    return console.page(request, "login.html")


async def login_post(request: Request) -> Response:
    console = console_of(request)
    form = await request.form()
    name, password = str(form.get("name") or "")[:64], str(form.get("password") or "")[:1024]
    if not same_token(request.session.get("csrf"), form.get("csrf_token")):
        return console.page(request, "login.html", status=403, error="the form expired: try again")
    address = request.client.host if request.client else "?"
    if not console.logins.allow(f"addr:{address}", f"user:{name}"):
        LOG.warning("console: too many sign-in attempts from %s", address)
        return console.page(request, "login.html", status=429,
                            error="too many attempts: wait a minute before trying again")
    user = authenticate(console.settings.console.users, name, password)
    if user is None:
        LOG.warning("console: failed sign-in from %s", address)
        return console.page(request, "login.html", status=401, error="wrong user name or password")
    request.session.clear()
    request.session.update({"user": user.name, "csrf": new_csrf_token()})
    LOG.info("console: %s signed in from %s", user.name, address)
    return RedirectResponse("/find", status_code=303)


async def logout(request: Request) -> Response:
    console = console_of(request)
    form = await request.form()
    if same_token(request.session.get("csrf"), form.get("csrf_token")):
        request.session.clear()
    return RedirectResponse("/login" if console.login_required else "/find", status_code=303)


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
