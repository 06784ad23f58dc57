"""The status server (aiohttp): ``/healthz``, ``/readyz``, ``/metrics`` and ``/``.

Read-only by construction: every route is GET (and HEAD); anything else is 405. The
page carries no secrets (no URLs, keys or hosts of the database or the API) and loads
nothing from elsewhere: its CSS is inline and its charts are server-rendered SVG, so
it works offline, and a Content-Security-Policy forbids anything else.

- ``/healthz`` 200 while the process serves (liveness).
- ``/readyz`` 200 when the database answers, the schema is this release's and some
  configured partition succeeded within 3 tick intervals; 503 with a JSON reason
  otherwise, and while the daemon is stopping.
- ``/metrics`` the Prometheus exposition of :class:`~service.metrics.Metrics`; the
  gauges read from the database are refreshed at most every ``GAUGE_CACHE_SECONDS``.
- ``/`` the HTML status page (:mod:`service.web.page`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.config import Settings
from service.dburl import parse_database_url
from service.errors import DatabaseError, ListenError
from service.metrics import Metrics
from service.store import migrate, status
from service.store.engine import Engine, connect
from service.web import data
from service.web.page import render_page

log = logging.getLogger(__name__)

GAUGE_CACHE_SECONDS = 5.0
"""Scrapes within this many seconds of a refresh reuse the database-derived gauges."""
STALE_AFTER_INTERVALS = 3
"""/readyz fails when the newest success is older than this many tick intervals."""
DB_TIMEOUT = 5.0
"""Seconds a status request waits for the database."""

_SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'unsafe-inline'; img-src data:; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


@dataclass
class StatusContext:
    """What the status server reads. It owns none of it: the composition root
    (:func:`service.app.run_daemon`) or a test does; ``stopping`` tells it the daemon's
    shutdown began."""

    engine: Engine
    settings: Settings
    metrics: Metrics
    stopping: Callable[[], bool] = lambda: False
    tick_interval: float = 0.0
    _gauges_at: float = field(default=-1e9, repr=False)
    _gauges_lock: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)
    _head: str = field(default_factory=migrate.head_revision, repr=False)

    def __post_init__(self) -> None:
        if not self.tick_interval:
            self.tick_interval = self.settings.tick_interval


CONTEXT: web.AppKey[StatusContext] = web.AppKey("status_context", StatusContext)


def build_app(context: StatusContext) -> web.Application:
    app = web.Application(middlewares=[_headers])
    app[CONTEXT] = context
    app.router.add_get("/", status_page)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    return app


@web.middleware
async def _headers(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    response = await handler(request)
    response.headers.update(_SECURITY_HEADERS)
    return response


def _json(payload: dict[str, Any], *, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(payload), status=status, content_type="application/json")


async def healthz(request: web.Request) -> web.Response:
    return _json({"alive": True})


async def readiness(context: StatusContext) -> tuple[bool, str]:
    """(ready, reason): the checks of ``/readyz``, in order."""
    if context.stopping():
        return False, "shutting down"
    s = context.settings
    try:
        async with asyncio.timeout(DB_TIMEOUT), connect(context.engine) as conn:
            await status.ping(conn)
            revision = await migrate.revision_on(conn)
            if revision != context._head:
                return False, (
                    f"the database schema is at {revision or 'nothing'}, "
                    f"this release needs {context._head}"
                )
            age = await status.newest_success_age(conn, s.regions, s.sources)
    except TimeoutError:
        return False, f"the database did not answer within {DB_TIMEOUT:g}s"
    except DatabaseError as exc:
        # Unauthenticated: the kind of failure only. The driver's message may name the
        # host, port, user or database; the daemon's log has it.
        kind = f"{exc.kind}; the daemon's log has the cause"
        if exc.refused:  # e.g. permission denied: not "unmigrated"
            return False, f"the database refused the readiness check ({kind})"
        return False, f"database unreachable ({kind})"
    limit = STALE_AFTER_INTERVALS * context.tick_interval
    if age is None:
        return False, "no partition has synced successfully yet"
    if age > limit:
        return False, f"the last successful sync was {age:.0f}s ago (limit {limit:g}s)"
    return True, f"the last successful sync was {age:.0f}s ago"


def _database_host(settings: Settings) -> str:
    if settings.database_url is None:
        return "the embedded server"
    return parse_database_url(settings.database_url.get_secret_value()).host_names


async def readyz(request: web.Request) -> web.Response:
    ready, reason = await readiness(request.app[CONTEXT])
    return _json({"ready": ready, "reason": reason}, status=200 if ready else 503)


async def refresh_gauges(context: StatusContext) -> None:
    """Refresh the database-derived gauges unless that happened moments ago."""
    async with context._gauges_lock:
        if time.monotonic() - context._gauges_at < GAUGE_CACHE_SECONDS:
            return
        s = context.settings
        try:
            async with asyncio.timeout(DB_TIMEOUT), connect(context.engine) as conn:
                await data.refresh_gauges(conn, context.metrics, s.regions, s.sources)
        except (TimeoutError, DatabaseError) as exc:
            # Serve the process's own counters anyway; the gauges keep their last values.
            log.warning(
                "/metrics: database gauges not refreshed: %s", str(exc) or type(exc).__name__
            )
            return
        context._gauges_at = time.monotonic()


async def metrics(request: web.Request) -> web.Response:
    context = request.app[CONTEXT]
    await refresh_gauges(context)
    response = web.Response(body=generate_latest(context.metrics.registry))
    response.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return response


async def status_page(request: web.Request) -> web.Response:
    context = request.app[CONTEXT]
    ready, reason = await readiness(context)
    page_data: data.PageData | None = None
    error: str | None = None
    try:
        async with asyncio.timeout(DB_TIMEOUT), connect(context.engine) as conn:
            page_data = await data.page_data(conn)
    except TimeoutError:
        error = f"the database did not answer within {DB_TIMEOUT:g}s"
    except DatabaseError as exc:
        # The page may name the database host, nothing more (no user, port or database).
        error = f"database at {_database_host(context.settings)} unreachable ({exc.kind})"
    html = render_page(
        page_data,
        settings=context.settings,
        ready=ready,
        reason=reason,
        error=error,
        tick_interval=context.tick_interval,
    )
    return web.Response(
        text=html, content_type="text/html", charset="utf-8", status=200 if page_data else 503
    )


@asynccontextmanager
async def serve_status(context: StatusContext, host: str, port: int) -> AsyncIterator[str]:
    """Serve the status server for the duration of the block; yields its base URL."""
    runner = web.AppRunner(build_app(context), access_log=None, shutdown_timeout=2.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        try:
            await site.start()
        except OSError as exc:
            # Not a configuration error (exit 2, which systemd does not restart): the port
            # may be free again in a moment.
            raise ListenError(f"IMAGE_SYNC_HTTP: cannot listen on {host}:{port}: {exc}") from exc
        bound_host, bound_port = runner.addresses[0][:2]
        url = f"http://{f'[{bound_host}]' if ':' in bound_host else bound_host}:{bound_port}"
        log.info("status server at %s", url)
        yield url
    finally:
        await runner.cleanup()
