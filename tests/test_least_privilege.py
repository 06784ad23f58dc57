"""``inventory_reader``: reads every table, view and images_as_of(), writes nothing.
The status server exposes no endpoint that changes state."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from typing import Any

import aiohttp
import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

pytestmark = pytest.mark.db

TABLES = ("images", "image_disks", "image_events", "sync_runs", "sync_partitions")
VIEWS = ("current_images", "offline_transitions", "inventory_summary", "sync_health")


@pytest.fixture(scope="module")
def reader_url(database_url: str, session_engine: AsyncEngine) -> Iterator[str]:
    """A login role that is granted inventory_reader and nothing else."""
    role = f"analyst_{secrets.token_hex(3)}"
    password = secrets.token_hex(8)
    admin = make_url(database_url).set(drivername="postgresql").render_as_string(False)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{password}' IN ROLE inventory_reader")
    url = make_url(database_url).set(drivername="postgresql", username=role, password=password)
    yield url.render_as_string(False)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", (role,)
        )
        conn.execute(f"DROP ROLE {role}")


async def test_reader_reads_everything(
    engine: AsyncEngine, make_settings: Any, reader_url: str
) -> None:
    from service.app import open_runtime
    from service.simulator import running_simulator
    from service.sync import sync_once

    async with (
        running_simulator(images=60, seed=8) as sim,
        open_runtime(make_settings(sim.url)) as rt,
    ):
        assert (await sync_once(engine, rt.client, rt.partitions())).ok
    with psycopg.connect(reader_url) as conn:
        for name in (*TABLES, *VIEWS):
            count = conn.execute(f"SELECT count(*) FROM inventory.{name}").fetchone()
            assert count is not None, name
        images = conn.execute("SELECT count(*) FROM inventory.images").fetchone()
        as_of = conn.execute("SELECT count(*) FROM inventory.images_as_of(now())").fetchone()
        assert images == as_of and images is not None and images[0] == 60


WRITES = [
    "INSERT INTO inventory.sync_runs (started_at, status, trigger, host, pid) VALUES (now(), 'running', 'x', 'h', 1)",
    "UPDATE inventory.images SET name = 'x'",
    "DELETE FROM inventory.image_events",
    "TRUNCATE inventory.image_disks",
    "UPDATE inventory.sync_partitions SET status = 'failed'",
    "CREATE TABLE inventory.mine (x int)",
    "CREATE VIEW inventory.mine AS SELECT 1",
    "CREATE TABLE public.mine (x int)",
    "DROP VIEW inventory.current_images",
    "ALTER TABLE inventory.images ADD COLUMN x int",
    "COMMENT ON TABLE inventory.images IS 'x'",
    "CREATE FUNCTION inventory.f() RETURNS int LANGUAGE sql AS 'SELECT 1'",
]


@pytest.mark.parametrize(
    "statement",
    WRITES,
    ids=[w.split(" inventory.")[0].split(" public.")[0] + str(i) for i, w in enumerate(WRITES)],
)
def test_reader_writes_nothing(reader_url: str, statement: str) -> None:
    with psycopg.connect(reader_url) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute(statement)
        conn.rollback()


async def test_status_server_has_no_state_changing_endpoint(
    engine: AsyncEngine, make_settings: Any
) -> None:
    from service.metrics import Metrics
    from service.web.server import StatusContext, build_app, serve_status

    app = build_app(StatusContext(engine=engine, settings=make_settings(), metrics=Metrics()))
    methods = {route.method for route in app.router.routes()}
    assert methods <= {"GET", "HEAD"}, methods
    context = StatusContext(engine=engine, settings=make_settings(), metrics=Metrics())
    async with engine.connect() as conn:
        before = await conn.scalar(sa.text("SELECT count(*) FROM inventory.sync_runs"))
    async with serve_status(context, "127.0.0.1", 0) as url, aiohttp.ClientSession() as session:
        for path in ("/", "/metrics", "/healthz", "/readyz", "/sync", "/run", "/admin"):
            for method in ("POST", "PUT", "PATCH", "DELETE"):
                async with session.request(method, url + path, data=b"{}") as resp:
                    assert resp.status in (404, 405), (method, path, resp.status)
    async with engine.connect() as conn:
        after = await conn.scalar(sa.text("SELECT count(*) FROM inventory.sync_runs"))
    assert before == after
