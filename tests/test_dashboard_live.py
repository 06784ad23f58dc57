"""The Grafana dashboard and the alert rules against the real thing: every SQL panel runs
on a synced database as inventory_reader, and every metric they read is on /metrics."""

from __future__ import annotations

from typing import Any

import aiohttp
import sqlalchemy as sa
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.ext.asyncio import AsyncEngine

from service.app import open_runtime
from service.metrics import Metrics
from service.simulator import running_simulator
from service.sync import sync_once
from service.web.server import StatusContext, serve_status
from service.webhooks import Dispatcher, subscribers_of
from tests.test_deploy import (
    SCRAPE_SERIES,
    grafana_sql_queries,
    render_grafana_sql,
    used_metric_names,
)

VARIABLES = {
    "region": ["cn-north-1", "cn-east-1", "cn-east-2", "cn-south-1"],
    "source": ["public", "thirdparty", "private", "shared", "community"],
}


async def synced(engine: AsyncEngine, make_settings: Any, metrics: Metrics) -> Any:
    async with running_simulator(images=400, seed=31) as sim:
        settings = make_settings(sim.url)
        async with open_runtime(settings, metrics=metrics) as rt:
            await sync_once(engine, rt.client, rt.partitions(), metrics=metrics)
            region = "cn-north-1"
            online = next(
                i["imageId"] for i in sim.catalogue.images(region, "public") if not i.get("offline")
            )
            sim.catalogue.take_offline(region, online)
            sim.catalogue.delete(region, sim.catalogue.images(region, "private")[0]["imageId"])
            await sync_once(engine, rt.client, rt.partitions(), metrics=metrics)
        return settings


async def test_every_dashboard_query_runs_as_reader_on_a_synced_database(
    engine: AsyncEngine, make_settings: Any
) -> None:
    await synced(engine, make_settings, Metrics())
    queries = grafana_sql_queries()
    assert len(queries) >= 5
    returned_rows = 0
    async with engine.connect() as conn:
        await conn.execute(sa.text("SET ROLE inventory_reader"))
        for _where, sql in queries:
            rendered = render_grafana_sql(sql, variables=VARIABLES)
            rows = (await conn.execute(sa.text(rendered.replace(":", r"\:")))).all()
            returned_rows += bool(rows)
        await conn.execute(sa.text("RESET ROLE"))
        await conn.rollback()
    # Not every panel has data minutes after a first sync, but most must.
    assert returned_rows >= len(queries) // 2, (
        f"only {returned_rows} of {len(queries)} panels had rows"
    )


async def test_every_metric_of_the_dashboard_and_alerts_is_on_the_live_metrics_endpoint(
    engine: AsyncEngine, make_settings: Any
) -> None:
    metrics = Metrics()
    settings = await synced(engine, make_settings, metrics)
    metrics.up.set(1)
    # The daemon's dispatcher creates the webhook series of each configured subscriber.
    hooks = make_settings(
        IMAGE_SYNC_WEBHOOK_URL="https://hooks.example.com/image-sync",
        IMAGE_SYNC_WEBHOOK_SECRET="whsec-dashboard",
    )
    async with aiohttp.ClientSession() as session:
        Dispatcher(engine, session, subscribers_of(hooks), metrics=metrics)
    context = StatusContext(engine=engine, settings=settings, metrics=metrics)
    async with (
        serve_status(context, "127.0.0.1", 0) as url,
        aiohttp.ClientSession() as http,
        http.get(f"{url}/metrics") as response,
    ):
        assert response.status == 200
        text = await response.text()
    served = {
        sample.name for family in text_string_to_metric_families(text) for sample in family.samples
    }
    missing = {
        name: sorted(where)
        for name, where in used_metric_names().items()
        if name not in served and name not in SCRAPE_SERIES
    }
    assert not missing, f"read by the dashboard or alerts but absent from /metrics: {missing}"
