"""``/readyz`` says why it is not ready, and says it right: a database that refuses the
check is not reported as a schema that was never migrated."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from service.metrics import Metrics
from service.store import migrate
from service.store.engine import create_engine
from service.web.server import StatusContext, readiness

pytestmark = pytest.mark.db


@pytest.fixture
async def unprivileged_engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    """An engine logged in as a role that may connect but read nothing of inventory."""
    role, password = f"nobody_{secrets.token_hex(3)}", secrets.token_hex(8)
    admin = make_url(database_url).set(drivername="postgresql").render_as_string(False)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{password}'")
        conn.execute(f"GRANT USAGE ON SCHEMA inventory TO {role}")
    url = make_url(database_url).set(username=role, password=password)
    engine = create_engine(url.render_as_string(False))
    try:
        yield engine
    finally:
        await engine.dispose()
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f"REVOKE ALL ON SCHEMA inventory FROM {role}")
            conn.execute(f"DROP ROLE {role}")


async def test_permission_denied_is_not_reported_as_an_unmigrated_schema(
    engine: AsyncEngine, unprivileged_engine: AsyncEngine, make_settings: Any
) -> None:
    context = StatusContext(engine=unprivileged_engine, settings=make_settings(), metrics=Metrics())
    ready, reason = await readiness(context)
    assert not ready
    assert "the database refused the readiness check" in reason
    assert "schema is at nothing" not in reason


async def test_an_unmigrated_database_is_reported_as_such(
    pg_server_url: str, make_settings: Any
) -> None:
    name = f"image_sync_empty_{secrets.token_hex(3)}"
    admin = make_url(pg_server_url).set(drivername="postgresql").render_as_string(False)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    engine = create_engine(make_url(pg_server_url).set(database=name).render_as_string(False))
    try:
        context = StatusContext(engine=engine, settings=make_settings(), metrics=Metrics())
        ready, reason = await readiness(context)
        assert not ready
        assert reason == (
            f"the database schema is at nothing, this release needs {migrate.head_revision()}"
        )
    finally:
        await engine.dispose()
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
