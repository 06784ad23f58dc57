"""The database handle: an async SQLAlchemy engine on asyncpg, owned by one object.

:func:`open_database` resolves the URL (``DATABASE_URL`` or the embedded server),
builds the engine, checks the server answers, and disposes of both on exit.

:class:`database_errors` is the one place where driver errors (SQLAlchemy's, asyncpg's
own, a socket's) become :class:`~service.errors.DatabaseError`, ``from`` the driver's
error; every function of ``service.store`` that talks to the database goes through it,
so no module above the store catches a driver type. The URL in a message is
:meth:`~service.dburl.DatabaseUrl.display`, which never has the password.
"""

from __future__ import annotations

import functools
import logging
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from types import TracebackType
from typing import ParamSpec, TypeAlias, TypeVar

import asyncpg
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from service.config import Settings
from service.dburl import DatabaseUrl, parse_database_url
from service.embedded import EmbeddedPostgres
from service.errors import DatabaseError

log = logging.getLogger(__name__)

Engine: TypeAlias = AsyncEngine
"""The database handle the store's functions take; code above the store holds it and
passes it on, and never uses it itself."""
Connection: TypeAlias = AsyncConnection
"""A connection from :func:`connect` or :func:`transaction`, for the store's functions."""

_P = ParamSpec("_P")
_T = TypeVar("_T")

# The driver's own errors, besides the ones SQLAlchemy wraps: socket/DNS/TLS failures
# (OSError, ssl.SSLError), asyncpg's client-side checks and the errors of the raw
# connection's COPY.
DRIVER_ERRORS = (OSError, sa.exc.SQLAlchemyError, asyncpg.InterfaceError, asyncpg.PostgresError)


def describe_error(exc: BaseException, url: str = "") -> str:
    """One line about a driver error. It never carries a password: the driver's
    messages do not, and ``url`` (kept for the callers' sake) is not quoted."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        reason = str(exc.verify_message).rstrip(".")
        hint = (
            "the URL's host is not a name in the certificate"
            if "mismatch" in reason
            else "is sslrootcert the CA that signed it?"
        )
        return f"TLS: the server's certificate was refused: {reason} ({hint})"
    text = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    return text[0] if text and text[0] else type(exc).__name__


def error_kind(exc: BaseException) -> str:
    """The driver's error class, e.g. ConnectionRefusedError: says what, names nothing."""
    return type(getattr(exc, "orig", None) or exc).__name__


RETRYABLE_SQLSTATES = frozenset({"40P01", "40001"})
"""deadlock_detected, serialization_failure: the transaction can run again as it was."""


class database_errors:
    """Translate driver errors into :class:`DatabaseError` (``what: <the driver's line>``,
    the line alone when ``what`` is empty,
    raised ``from`` the driver's error), as a context manager or as a decorator of a
    coroutine function. The error's ``kind`` is the driver's class name and ``refused``
    says the server answered and refused the statement (a permission, a constraint),
    as opposed to not answering. Errors of the project's own tree pass unchanged."""

    def __init__(self, what: str) -> None:
        self.what = what

    def __enter__(self) -> database_errors:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc is None or not isinstance(exc, DRIVER_ERRORS):
            return
        refused = isinstance(
            exc, sa.exc.ProgrammingError | sa.exc.IntegrityError | asyncpg.PostgresError
        )
        line = describe_error(exc)
        sqlstate = getattr(getattr(exc, "orig", None), "sqlstate", None) or getattr(
            exc, "sqlstate", None
        )
        raise DatabaseError(
            f"{self.what}: {line}" if self.what else line,
            kind=error_kind(exc),
            refused=refused,
            retryable=sqlstate in RETRYABLE_SQLSTATES,
        ) from exc

    def __call__(self, fn: Callable[_P, Awaitable[_T]]) -> Callable[_P, Awaitable[_T]]:
        @functools.wraps(fn)
        async def translated(*args: _P.args, **kwargs: _P.kwargs) -> _T:
            with self:
                return await fn(*args, **kwargs)

        return translated


@asynccontextmanager
async def connect(
    engine: Engine, what: str = "", *, autocommit: bool = False
) -> AsyncIterator[Connection]:
    """A pooled connection for the block (each statement its own transaction with
    ``autocommit``); driver errors in the block, and in getting or returning the
    connection, are :class:`DatabaseError` (``what: ...``)."""
    with database_errors(what):
        async with engine.connect() as conn:
            if autocommit:
                await conn.execution_options(isolation_level="AUTOCOMMIT")
            yield conn


@asynccontextmanager
async def transaction(engine: Engine, what: str = "") -> AsyncIterator[Connection]:
    """A connection in a transaction committed at the end of the block (rolled back on
    an error); driver errors in the block or at commit are :class:`DatabaseError`."""
    with database_errors(what):
        async with engine.connect() as conn, conn.begin():
            yield conn


@dataclass
class Database:
    """The engine and, when it started one, the embedded server behind it."""

    engine: AsyncEngine
    url: DatabaseUrl
    embedded: EmbeddedPostgres | None = None

    @property
    def display_url(self) -> str:
        return self.url.display()


def create_engine(
    url: str | DatabaseUrl,
    *,
    pool_size: int = 10,
    max_overflow: int | None = None,
    pool_timeout: float = 60,
    statement_timeout: float = 0,
) -> AsyncEngine:
    """The engine on ``url`` (a libpq URL, see :mod:`service.dburl`)."""
    target = url if isinstance(url, DatabaseUrl) else parse_database_url(url)
    # jit off: stale statistics after a first sync make the merge look expensive and JIT
    # compiles it for no gain; temp_buffers, work_mem: a big partition's staging and
    # sorts stay in memory (measurements: bench/README.md, "Constants and their
    # numbers"). UTC: timestamps inside the jsonb history documents are written the same
    # way whatever the server's TimeZone.
    server_settings = {
        "application_name": target.application_name,
        "jit": "off",
        "temp_buffers": "64MB",
        "work_mem": "64MB",
        "timezone": "UTC",
    }
    if statement_timeout:
        server_settings["statement_timeout"] = str(int(statement_timeout * 1000))
    # The URL goes to asyncpg whole (``dsn``), not through SQLAlchemy's URL: asyncpg
    # applies libpq's sslmode, sslrootcert, host lists, unix sockets, etc.
    return create_async_engine(
        "postgresql+asyncpg://",
        pool_size=pool_size,
        max_overflow=pool_size if max_overflow is None else max_overflow,
        pool_pre_ping=True,
        pool_timeout=pool_timeout,
        connect_args={
            "dsn": target.dsn,
            "server_settings": server_settings,
            "timeout": target.connect_timeout,
        },
    )


@asynccontextmanager
async def open_database(settings: Settings, *, pool_size: int = 10) -> AsyncIterator[Database]:
    """Yield a ready :class:`Database`; dispose of it (and stop an embedded server) on exit."""
    embedded: EmbeddedPostgres | None = None
    if settings.database_url is not None:
        url = parse_database_url(settings.database_url.get_secret_value())
    else:
        embedded = EmbeddedPostgres(settings.data_dir)
        url = parse_database_url(await embedded.astart())
    engine = create_engine(url, pool_size=pool_size, statement_timeout=settings.statement_timeout)
    try:
        with database_errors(f"cannot connect to {url.display()}"):
            async with engine.connect() as conn:
                await conn.execute(sa.text("SELECT 1"))
        yield Database(engine, url, embedded)
    finally:
        await engine.dispose()
        if embedded is not None:
            await embedded.astop()
