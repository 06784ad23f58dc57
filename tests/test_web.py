"""The status server: /metrics against the database, /readyz across a database outage,
and what the page may and may not contain. Real daemon process, real PostgreSQL."""

from __future__ import annotations

import asyncio
import signal
import socket
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import sqlalchemy as sa
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.ext.asyncio import AsyncEngine

from service.app import open_runtime
from service.jdcloud.listing import partitions_of
from service.metrics import Metrics
from service.simulator.server import running_simulator
from service.store.engine import create_engine
from service.sync import sync_once
from service.web.server import StatusContext, serve_status
from tests.fault_helpers import KillablePostgres, killable_postgres
from tests.test_daemon import PARTITIONS, replicas, rows, scalar, wait_for


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
def own_postgres() -> Iterator[KillablePostgres]:
    with killable_postgres() as pg:
        yield pg


async def get(session: aiohttp.ClientSession, url: str) -> tuple[int, str]:
    async with session.get(url) as response:
        return response.status, await response.text()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def test_metrics_match_the_database_and_readyz_follows_the_database(
    own_postgres: KillablePostgres, cli_env: dict[str, str], tmp_path: Path
) -> None:
    db_url = own_postgres.server_url
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    async with (
        running_simulator(seed=3, images=240) as simulator,
        replicas(
            1,
            {
                **cli_env,
                "DATABASE_URL": db_url,
                "JDCLOUD_ENDPOINT": simulator.url,
                "IMAGE_SYNC_INTERVAL": "60",
                "IMAGE_SYNC_HTTP": f"127.0.0.1:{port}",
            },
            tmp_path,
            "--migrate",
        ) as (daemon,),
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http,
    ):
        engine = create_engine(db_url, pool_size=2)
        try:

            async def run_finished() -> bool:
                try:
                    return bool(
                        await scalar(
                            engine,
                            "SELECT count(*) FROM inventory.sync_runs WHERE status = 'succeeded'",
                        )
                    )
                except sa.exc.SQLAlchemyError:  # not migrated yet
                    return False

            await wait_for(run_finished, 30, "the first run", step=0.1)
            status, body = await get(http, f"{base}/readyz")
            assert status == 200, body
            status, text = await get(http, f"{base}/metrics")
            assert status == 200
            families = {f.name for f in text_string_to_metric_families(text)}
            assert {f.name for f in Metrics().registry.collect()} <= families
            await check_metrics_against_database(engine, samples(text))
        finally:
            await engine.dispose()

        # The database goes away: alive, not ready; the page says why; metrics still served.
        await asyncio.to_thread(own_postgres.stop_immediate)
        status, body = await get(http, f"{base}/readyz")
        assert status == 503
        assert "database unreachable" in body
        assert (await get(http, f"{base}/healthz"))[0] == 200
        status, page = await get(http, f"{base}/")
        assert status == 503 and "Cannot read the database" in page
        assert (await get(http, f"{base}/metrics"))[0] == 200

        # It comes back: ready again, without a restart.
        await asyncio.to_thread(own_postgres.start)  # on the same URL
        status, body = await wait_for(
            lambda: _ready(http, f"{base}/readyz"), 15, "/readyz to recover", step=0.2
        )
        assert status == 200, body

        daemon.process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(daemon.process.wait(), 15) == 0
    assert "Traceback" not in daemon.output()


async def _ready(http: aiohttp.ClientSession, url: str) -> tuple[int, str] | None:
    status, body = await get(http, url)
    return (status, body) if status == 200 else None


async def check_metrics_against_database(
    engine: AsyncEngine, metrics: dict[tuple[str, tuple[tuple[str, str], ...]], float]
) -> None:
    def value(name: str, **labels: str) -> float:
        return metrics.get((name, tuple(sorted(labels.items()))), 0.0)

    def total(name: str, **match: str) -> float:
        return sum(
            v
            for (n, labels), v in metrics.items()
            if n == name and all(dict(labels).get(k) == w for k, w in match.items())
        )

    assert value("image_sync_up") == 1
    images = await rows(
        engine,
        """SELECT region_id, image_source, offline, sum(images) AS n
             FROM inventory.inventory_summary GROUP BY 1, 2, 3""",
    )
    assert images
    for r in images:
        offline = "none" if r.offline is None else str(r.offline).lower()
        got = value("image_sync_images", region=r.region_id, source=r.image_source, offline=offline)
        assert got == r.n, (r, got)
    assert total("image_sync_images") == sum(r.n for r in images)
    health = await rows(
        engine,
        """SELECT region_id, image_source, coalesce(account, '') AS account,
                  extract(epoch FROM last_success_at)::float8 AS ts
             FROM inventory.sync_health""",
    )
    assert len(health) == PARTITIONS
    for r in health:
        got = value(
            "image_sync_partition_last_success_timestamp_seconds",
            region=r.region_id,
            source=r.image_source,
            account=r.account,
        )
        assert got == pytest.approx(r.ts, abs=1e-3)
    db = (
        await rows(
            engine,
            """SELECT count(*) FILTER (WHERE status = 'succeeded') AS succeeded,
                      sum(api_requests) AS requests, sum(created) AS created
                 FROM inventory.sync_partitions""",
        )
    )[0]
    assert total("image_sync_partitions_total", status="succeeded") == db.succeeded == PARTITIONS
    assert total("image_sync_api_requests_total") == db.requests
    assert total("image_sync_api_requests_total", status="200") == db.requests
    created = await scalar(
        engine, "SELECT count(*) FROM inventory.image_events WHERE event_type = 'created'"
    )
    assert value("image_sync_events_total", type="created") == created == db.created
    assert value("image_sync_run_duration_seconds_count") == await scalar(
        engine, "SELECT count(*) FROM inventory.sync_runs"
    )


# -- the page, in-process on the test database -------------------------------------------


@pytest.fixture
async def status_server(engine: AsyncEngine, make_settings: Any) -> AsyncIterator[str]:
    settings = make_settings(
        IMAGE_SYNC_INTERVAL="900",
        JDCLOUD_ACCESS_KEY="AKTESTSTATUSPAGE",
        JDCLOUD_SECRET_KEY="s3cr3t-key-value",
    )
    context = StatusContext(engine=engine, settings=settings, metrics=Metrics())
    async with serve_status(context, "127.0.0.1", 0) as url:
        yield url


async def test_status_page_is_read_only_escaped_and_free_of_secrets(
    engine: AsyncEngine, make_settings: Any, status_server: str, database_url: str
) -> None:
    async with running_simulator(seed=1, images=60) as simulator:
        settings = make_settings(simulator.url)
        async with open_runtime(settings) as rt:
            await sync_once(
                rt.database.engine, rt.client, partitions_of(["cn-north-1"], ["public"])
            )
    hostile = "<script>alert('x')</script>"
    async with engine.begin() as conn:
        run_id = await conn.scalar(
            sa.text(
                "INSERT INTO inventory.sync_runs (started_at, finished_at, status, trigger, host, pid)"
                " VALUES (now(), now(), 'failed', 'cli', 'h', 1) RETURNING run_id"
            )
        )
        await conn.execute(
            sa.text(
                "INSERT INTO inventory.sync_partitions (run_id, region_id, image_source, status,"
                " started_at, finished_at, error_status, error_message)"
                " VALUES (:r, 'cn-east-1', 'private', 'failed', :t, :t, 'INTERNAL', :m)"
            ),
            {"r": run_id, "t": datetime.now(UTC), "m": hostile},
        )
    async with aiohttp.ClientSession() as http:
        async with http.get(status_server + "/") as response:
            assert response.status == 200
            page = await response.text()
            headers = response.headers
        for method in ("POST", "PUT", "DELETE", "PATCH"):
            async with http.request(method, status_server + "/") as response:
                assert response.status == 405
        async with http.head(status_server + "/readyz") as response:
            assert response.status in (200, 503)
    assert hostile not in page
    assert "&lt;script&gt;" in page
    assert "default-src 'none'" in headers["Content-Security-Policy"]
    assert '<meta name="viewport"' in page
    assert "<svg" in page
    for secret in ("s3cr3t-key-value", database_url, "postgresql://", "http://127.0.0.1"):
        assert secret not in page
    for external in ("<script", 'src="http', 'href="http', "@import"):
        assert external not in page
