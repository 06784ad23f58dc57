"""The database handle: an async SQLAlchemy engine on asyncpg, owned by one object.

:func:`open_database` resolves the URL (``DATABASE_URL`` or the embedded server),
builds the engine, checks the server answers, and disposes of both on exit.
Driver errors are translated into :class:`~service.errors.DatabaseError` with the
password redacted.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from service.config import Settings, redact_url
from service.embedded import EmbeddedPostgres
from service.errors import DatabaseError

log = logging.getLogger(__name__)

APPLICATION_NAME = "image-sync"


def async_url(url: str) -> sa.URL:
    """A ``postgresql://`` URL as SQLAlchemy's asyncpg URL."""
    parsed = make_url(url)
    return parsed.set(drivername="postgresql+asyncpg")


def describe_error(exc: BaseException, url: str) -> str:
    """One line about a driver error, without the password."""
    text = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    first = text[0] if text else type(exc).__name__
    return redact_url(f"{first} (database {redact_url(url)})")


@dataclass
class Database:
    """The engine and, when it started one, the embedded server behind it."""

    engine: AsyncEngine
    url: str
    embedded: EmbeddedPostgres | None = None

    @property
    def display_url(self) -> str:
        return redact_url(self.url)


def create_engine(url: str, *, pool_size: int = 10, statement_timeout: float = 0) -> AsyncEngine:
    # JIT compiles a merge's plan for about a second whenever stale statistics make it
    # look expensive (right after a first sync), for no gain on these statements.
    # UTC: timestamps inside the jsonb history documents are written the same way
    # whatever the server's TimeZone. work_mem: a 40,000-image merge sorts its created
    # events in memory instead of spilling 45 MB to disk.
    server_settings = {
        "application_name": APPLICATION_NAME,
        "jit": "off",
        "temp_buffers": "64MB",
        "work_mem": "64MB",
        "timezone": "UTC",
    }
    if statement_timeout:
        server_settings["statement_timeout"] = str(int(statement_timeout * 1000))
    return create_async_engine(
        async_url(url),
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_pre_ping=True,
        pool_timeout=60,
        connect_args={"server_settings": server_settings, "timeout": 10},
    )


@asynccontextmanager
async def open_database(settings: Settings, *, pool_size: int = 10) -> AsyncIterator[Database]:
    """Yield a ready :class:`Database`; dispose of it (and stop an embedded server) on exit."""
    embedded: EmbeddedPostgres | None = None
    if settings.database_url is not None:
        url = settings.database_url.get_secret_value()
    else:
        embedded = EmbeddedPostgres(settings.data_dir)
        url = await embedded.astart()
    engine = create_engine(url, pool_size=pool_size, statement_timeout=settings.statement_timeout)
    try:
        try:
            async with engine.connect() as conn:
                await conn.execute(sa.text("SELECT 1"))
        except (OSError, sa.exc.SQLAlchemyError) as exc:
            raise DatabaseError(f"cannot connect: {describe_error(exc, url)}") from None
        yield Database(engine, url, embedded)
    finally:
        await engine.dispose()
        if embedded is not None:
            await embedded.astop()
