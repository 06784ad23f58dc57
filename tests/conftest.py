"""Shared fixtures: a real PostgreSQL (never a mock) and the project's own simulator.

The server is ``TEST_DATABASE_URL`` when set (CI sets it to the system PostgreSQL for
its second pass), otherwise an embedded PostgreSQL 18 started for the session. Each
test session creates a database of its own on that server and drops it at the end,
so parallel runs never see each other's rows.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import AsyncIterator, Iterator
from typing import Any

import psycopg
import pytest
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from service.config import Settings, load_settings
from service.store import migrate
from service.store.engine import create_engine
from tests.fault_helpers import truncate


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every test that touches the database carries the ``db`` marker (CI reruns them).

    Modules with a ``long`` test come first: ``make test`` hands whole modules to its
    workers in this order (``--no-loadscope-reorder``), so a long one started last would
    keep the run waiting on it alone. Order within a module is kept."""
    for item in items:
        if "database_url" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.db)
    long_modules = {item.path for item in items if item.get_closest_marker("long")}
    items.sort(key=lambda item: item.path not in long_modules)


def _libpq_url(url: str) -> str:
    """SQLAlchemy-style URL -> what psycopg accepts (drop the +driver)."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


@pytest.fixture(scope="session")
def pg_server_url() -> Iterator[str]:
    """URL of a PostgreSQL server's maintenance database."""
    url = os.environ.get("TEST_DATABASE_URL")
    if url:
        yield url
        return
    from service.embedded import throwaway_postgres

    with throwaway_postgres("image-sync-test-pg-") as server:
        yield server.url


@pytest.fixture(scope="session")
def database_url(pg_server_url: str) -> Iterator[str]:
    """A fresh database for this test session, migrated to head, dropped afterwards."""
    name = f"image_sync_test_{os.getpid()}_{secrets.token_hex(3)}"
    admin = _libpq_url(pg_server_url)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
        _pin_reader_role(conn, name)
    url = make_url(pg_server_url).set(database=name).render_as_string(hide_password=False)
    try:
        yield url
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _pin_reader_role(admin: psycopg.Connection[Any], database: str) -> None:
    """Make sure the cluster-wide role ``inventory_reader`` exists for as long as the
    session's ``database`` does.

    Migration 0002 creates the role when it is missing and a downgrade to base drops it
    when no database uses it. Neither is safe while another session (an xdist worker,
    another run on a shared server) migrates a database of its own on the same server:
    of two concurrent ``CREATE ROLE``s of one name, one fails. So the session creates it
    first, tolerating a concurrent creator, and grants it CONNECT on its database: a
    dependency that keeps any downgrade on that server from dropping it meanwhile."""
    if not admin.execute("SELECT 1 FROM pg_roles WHERE rolname = 'inventory_reader'").fetchone():
        # Another session may make it meanwhile.
        with contextlib.suppress(psycopg.errors.DuplicateObject, psycopg.errors.UniqueViolation):
            admin.execute("CREATE ROLE inventory_reader NOLOGIN")
    admin.execute(f'GRANT CONNECT ON DATABASE "{database}" TO inventory_reader')


@pytest.fixture(scope="session")
async def session_engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(database_url, pool_size=10)
    await migrate.upgrade(engine)
    yield engine
    await engine.dispose()


@pytest.fixture
async def engine(session_engine: AsyncEngine) -> AsyncIterator[AsyncEngine]:
    """The migrated test database, emptied before the test; checks no connection leaks."""
    await truncate(session_engine)
    yield session_engine
    pool = session_engine.pool
    assert pool.checkedout() == 0, f"{pool.checkedout()} pooled connections leaked"  # type: ignore[attr-defined]


@pytest.fixture
def scratch_url(pg_server_url: str) -> Iterator[str]:
    """URL of an empty database of its own (migrations are run down and up on it)."""
    name = f"image_sync_scratch_{secrets.token_hex(4)}"
    admin = _libpq_url(pg_server_url)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield make_url(pg_server_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


@pytest.fixture
async def scratch_engine(scratch_url: str) -> AsyncIterator[AsyncEngine]:
    """An engine on :func:`scratch_url`'s database."""
    engine = create_engine(scratch_url)
    try:
        yield engine
    finally:
        await engine.dispose()


@pytest.fixture
def make_settings(database_url: str) -> Any:
    """Settings for a test: the test database, a local endpoint, no rate limit by default."""

    def make(endpoint: str = "http://127.0.0.1:9", **env: str) -> Settings:
        base = {
            "DATABASE_URL": database_url,
            "JDCLOUD_ENDPOINT": endpoint,
            "IMAGE_SYNC_RATE_LIMIT": "0",
            "IMAGE_SYNC_HTTP": "off",
        }
        return load_settings({**base, **env})

    return make


@pytest.fixture
def cli_env(database_url: str) -> dict[str, str]:
    """Environment for running ``image-sync`` in a subprocess against the test database."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JDCLOUD_", "IMAGE_SYNC_"))}
    env.update(
        {
            "DATABASE_URL": database_url,
            "IMAGE_SYNC_RATE_LIMIT": "0",
            "IMAGE_SYNC_HTTP": "off",
            "IMAGE_SYNC_LOG_FORMAT": "json",
        }
    )
    return env
