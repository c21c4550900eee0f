"""The console's JSON API, for scripts and hospital monitoring: the same data and actions as the pages, with
the same sign-in (or HTTP Basic on each request)."""

from __future__ import annotations

import datetime as dt

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from lpm_node.console import actions, charts, health, lookup, story
from lpm_node.console.web import Forbidden, console_of
from lpm_node.core.audit import utcnow


async def search(request: Request) -> Response:
    """``POST /api/series/search``: the filters as a JSON object; one page of matching series."""
    console = console_of(request)
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
        result = lookup.search(session, filters, console.settings.console.page_size)
    return JSONResponse({"total": result.total, "page": result.page, "pages": result.pages,
                         "series": result.rows})


async def series(request: Request) -> Response:
    """``GET /api/series/{id}``: a series' whole story, by its opaque id."""
    console = console_of(request)
    told = console.story_of(request.path_params["public_id"])
    if told is None:
        return JSONResponse({"error": "no such series"}, status_code=404)
    return JSONResponse(told)


async def action(request: Request) -> Response:
    """``POST /api/actions/{measure-again|retry|suspend|resume}`` (admins): the same actions as the pages."""
    console = console_of(request)
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
                result = actions.retry_dead_letters(session, console.settings, user["name"], ids,
                                                    str(body.get("destination") or ""))
            except (TypeError, ValueError) as exc:
                return JSONResponse({"error": f"retry refused: {exc}"}, status_code=400)
        elif what in ("suspend", "resume"):
            result = actions.suspend_measuring(session, what == "suspend", user["name"])
        else:
            return JSONResponse({"error": "unknown action"}, status_code=404)
    return JSONResponse({"ok": result.ok, "message": result.message}, status_code=200 if result.ok else 409)


async def queues(request: Request) -> Response:
    console = console_of(request)
    with console.sessions() as session:
        return JSONResponse(story.queues(session, utcnow()))


async def refusals(request: Request) -> Response:
    console = console_of(request)
    with console.sessions() as session:
        return JSONResponse({"associations": story.refusals(session),
                             "rejected_series": story.rejected_series(session)})


async def health_report(request: Request) -> Response:
    console = console_of(request)
    return JSONResponse(health.health(console.settings, console.sessions, console.watch))


async def throughput(request: Request) -> Response:
    console = console_of(request)
    with console.sessions() as session:
        return JSONResponse({"days": charts.daily(session, dt.datetime.now(dt.UTC).date())})
