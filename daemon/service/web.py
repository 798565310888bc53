"""Optional loopback HTTP: the Prometheus ``/metrics`` endpoint and the read-only dashboard.

Both are off by default (``[metrics] enabled``, ``[dashboard] enabled``). Each feature names a
``host:port``; features that name the same address share one aiohttp site, others get one each. The
dashboard is loopback-only (config validation refuses anything else) and read-only: it serves the page
and three JSON views (status, history, recent log lines) and has no route that changes the node, so it
needs no authentication beyond "a process on this machine". The control API stays on its Unix socket.

The dashboard is one static HTML file (``daemon/service/dashboard.html``) with inline JS and SVG charts: no
CDN, no build step. Its first data is embedded in the page when it is served, so it draws immediately
(also in a headless browser dumping the DOM), then it polls ``/api/status``, ``/api/history`` and
``/api/logs``. The history is this node's rounds across restarts (``daemon/service/history.py``),
thinned evenly to at most ``HISTORY_POINTS`` so a long run stays light and keeps its whole shape.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from daemon.config import Config, parse_listen
from daemon.service.logs import RingBufferHandler
from daemon.service.metrics import NodeMetrics

__all__ = ["open_http_sites"]

log = logging.getLogger(__name__)

STATUS = web.AppKey("status", Callable[[], Awaitable[dict[str, Any]]])
HISTORY = web.AppKey("history", Callable[[], list[dict[str, Any]]])
METRICS = web.AppKey("metrics", NodeMetrics)
LOGS = web.AppKey("logs", RingBufferHandler)
DATA_SLOT = "/*MESHTRAIN_INITIAL_DATA*/null"  # replaced by {"status", "history", "logs"} when served
HISTORY_POINTS = 2000  # the page plots at most this many rounds (evenly thinned), to stay light
LOG_LINES = 200  # recent lines the page shows; the ring keeps more for `meshtrain logs`

metrics_routes = web.RouteTableDef()
dashboard_routes = web.RouteTableDef()


@metrics_routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    body = await request.app[METRICS].scrape()
    response = web.Response(body=body)
    response.content_type = CONTENT_TYPE_LATEST.split(";")[0]
    response.charset = "utf-8"
    return response


@dashboard_routes.get("/")
async def page(request: web.Request) -> web.Response:
    html = resources.files("daemon.service").joinpath("dashboard.html").read_text()
    data = json.dumps({"status": await request.app[STATUS](), "history": _history(request),
                       "logs": _logs(request)})
    html = html.replace(DATA_SLOT, data.replace("</", "<\\/"))  # no "</script>" inside the script
    return web.Response(text=html, content_type="text/html", headers={"Cache-Control": "no-store"})


@dashboard_routes.get("/api/status")
async def api_status(request: web.Request) -> web.Response:
    return web.json_response(await request.app[STATUS]())


@dashboard_routes.get("/api/history")
async def api_history(request: web.Request) -> web.Response:
    return web.json_response({"rounds": _history(request)})


@dashboard_routes.get("/api/logs")
async def api_logs(request: web.Request) -> web.Response:
    return web.json_response({"lines": _logs(request)})


def _history(request: web.Request) -> list[dict[str, Any]]:
    return thin(request.app[HISTORY](), HISTORY_POINTS)


def thin(records: list[dict[str, Any]], points: int) -> list[dict[str, Any]]:
    """At most ``points`` of ``records``, evenly spaced, the newest always included."""
    if len(records) <= points:
        return records
    step = len(records) / (points - 1)
    return [records[round(i * step)] for i in range(points - 1)] + [records[-1]]


def _logs(request: web.Request) -> list[str]:
    ring = request.app.get(LOGS)
    return ring.tail(LOG_LINES) if ring is not None else []


async def open_http_sites(
    config: Config,
    *,
    status: Callable[[], Awaitable[dict[str, Any]]],
    history: Callable[[], list[dict[str, Any]]],
    metrics: NodeMetrics | None,
    logs: RingBufferHandler | None = None,
) -> list[web.AppRunner]:
    """Start the enabled HTTP features; the caller cleans up the returned runners (in order)."""
    by_address: dict[tuple[str, int], list[web.RouteTableDef]] = {}
    if config.metrics.enabled and metrics is not None:
        by_address.setdefault(parse_listen("metrics.listen", config.metrics.listen), []).append(
            metrics_routes
        )
    if config.dashboard.enabled:
        address = parse_listen("dashboard.listen", config.dashboard.listen)
        by_address.setdefault(address, []).append(dashboard_routes)
    runners: list[web.AppRunner] = []
    try:
        for (host, port), route_tables in by_address.items():
            app = web.Application()
            app[STATUS] = status
            app[HISTORY] = history
            if metrics is not None:
                app[METRICS] = metrics
            if logs is not None:
                app[LOGS] = logs
            for table in route_tables:
                app.add_routes(table)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            runners.append(runner)
            await web.TCPSite(runner, host.strip("[]"), port).start()
            served = ",".join("metrics" if t is metrics_routes else "dashboard" for t in route_tables)
            log.info("http listening address=http://%s:%d serves=%s", host, port, served)
    except OSError:
        for runner in runners:
            await runner.cleanup()
        raise
    return runners
