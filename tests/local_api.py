"""A tiny in-process describeImages API for the cases the simulator cannot misbehave
in (an answer scripted per request, a delay per region): a real aiohttp server on a
loopback port, never a patched ClientSession."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any

from aiohttp import web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

EMPTY_PAGE: dict[str, Any] = {"requestId": "r", "result": {"images": [], "totalCount": 0}}
"""A valid describeImages answer with no image."""


@asynccontextmanager
async def local_api(
    handler: Handler, routes: Mapping[str, Handler] | None = None
) -> AsyncIterator[str]:
    """Serve ``GET /v1/regions/{region}/images`` with ``handler`` (and each of ``routes``,
    path -> handler, e.g. describeImageMembers; ``"POST /path"`` for a POST route);
    yields the endpoint URL."""
    app = web.Application()
    app.router.add_get("/v1/regions/{region}/images", handler)
    for path, route_handler in (routes or {}).items():
        method, _, bare = path.rpartition(" ")
        app.router.add_route(method or "GET", bare, route_handler)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()
