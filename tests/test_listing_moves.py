"""An image that moves between a partition's two listings while they are read.

public and thirdparty partitions are two listings, ``offline=false`` and
``offline=true``, read concurrently. Each may settle on its own (count equals
totalCount, totalCount unchanged) while an image going offline was read in neither:
the online listing was read after it left, the offline one before it arrived. The
partition must not then record it ``removed`` (and ``reappeared`` on the next sync):
the soak (bench/soak) found this as a went_offline observed as removed + reappeared.

Within one listing, page-number paging can be fooled the same way: a deletion above a
page boundary and an insertion below it between two page reads keep totalCount, and
the de-duplicated count still equals it, while the image that slid across the
boundary was read on no page (the soak found a renamed image recorded removed +
reappeared). Such an image must not be removed either.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import sqlalchemy as sa
from aiohttp import web
from sqlalchemy.ext.asyncio import AsyncEngine

from service.app import open_runtime
from service.jdcloud.listing import Partition
from service.simulator import Catalogue
from service.simulator.server import build_app
from service.sync import sync_once

REGION = "cn-north-1"


class MoveBetweenListings:
    """Armed: hold the online listing's request until the offline one was answered, then
    take ``image_id`` offline, then answer it."""

    def __init__(self, catalogue: Catalogue, image_id: str) -> None:
        self.catalogue = catalogue
        self.image_id = image_id
        self.armed = False
        self.offline_served = asyncio.Event()

    @web.middleware
    async def middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        offline = request.query.get("offline", "").lower()
        if not self.armed or not offline:
            return await handler(request)
        if offline == "true":
            response = await handler(request)
            self.offline_served.set()
            return response
        await self.offline_served.wait()
        self.catalogue.take_offline(REGION, self.image_id)
        self.armed = False
        return await handler(request)


@asynccontextmanager
async def serving(app: web.Application) -> AsyncIterator[str]:
    """The simulator's application with a test middleware, on a free loopback port."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


async def _events(engine: AsyncEngine, image_id: str) -> list[str]:
    async with engine.connect() as conn:
        rows = await conn.execute(
            sa.text(
                "SELECT event_type FROM inventory.image_events WHERE image_id = :id"
                " ORDER BY event_id"
            ),
            {"id": image_id},
        )
        return list(rows.scalars())


async def test_an_image_moving_between_listings_is_not_removed(
    engine: AsyncEngine, make_settings: Any
) -> None:
    catalogue = Catalogue(seed=5, images=30, regions=[REGION], sources=["public"])
    online = [i["imageId"] for i in catalogue.images(REGION, "public") if not i.get("offline")]
    mover = MoveBetweenListings(catalogue, online[0])
    app = build_app(catalogue)
    app.middlewares.append(mover.middleware)
    async with serving(app) as url, open_runtime(make_settings(url)) as rt:
        partitions = [Partition(REGION, "public")]
        assert (await sync_once(engine, rt.client, partitions)).ok
        mover.armed = True
        await sync_once(engine, rt.client, partitions)
        assert not mover.armed, "the move did not happen between the listings"
        assert (await sync_once(engine, rt.client, partitions)).ok
    assert await _events(engine, mover.image_id) == ["created", "went_offline"]


class DeleteAboveInsertBelow:
    """Armed: right after page 1 was served, delete the first image and add one that
    sorts last (an old createTime), so everything between slides up by one."""

    def __init__(self, catalogue: Catalogue, source: str) -> None:
        self.catalogue = catalogue
        self.source = source
        self.armed = False

    @web.middleware
    async def middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if self.armed and request.query.get("pageNumber") not in (None, "1"):
            self.armed = False
            first = self.catalogue.images(REGION, self.source)[0]["imageId"]
            self.catalogue.delete(REGION, first)
            self.catalogue.add(REGION, self.source, createTime="2001-01-01 00:00:00")
        return await handler(request)


async def test_an_image_sliding_past_a_page_boundary_is_not_removed(
    engine: AsyncEngine, make_settings: Any
) -> None:
    catalogue = Catalogue(seed=6, images=30, regions=[REGION], sources=["private"])
    served = [i["imageId"] for i in catalogue.images(REGION, "private")]
    slider = served[10]  # first of page 2; page 1 will end before it once the first goes
    mutator = DeleteAboveInsertBelow(catalogue, "private")
    app = build_app(catalogue)
    app.middlewares.append(mutator.middleware)
    async with serving(app) as url, open_runtime(make_settings(url)) as rt:
        partitions = [Partition(REGION, "private")]
        assert (await sync_once(engine, rt.client, partitions, page_size=10)).ok
        mutator.armed = True
        await sync_once(engine, rt.client, partitions, page_size=10)
        assert not mutator.armed, "the catalogue did not change between the pages"
        assert (await sync_once(engine, rt.client, partitions, page_size=10)).ok
    assert await _events(engine, slider) == ["created"]
    # The deleted one was read on page 1 before it went; the third sync removes it.
    assert await _events(engine, served[0]) == ["created", "removed"]
