"""No secret leaks: with debug logging, failing requests, refused credentials and a
failing database, neither the API secret key nor the database password appears in any
log line, CLI output, exception text, ``sync_runs``/``sync_partitions`` error message,
``/metrics``, ``/readyz`` or the status page."""

from __future__ import annotations

import asyncio
import secrets
import sys
from collections.abc import Iterator
from typing import Any

import aiohttp
import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from service.errors import DatabaseError
from service.metrics import Metrics
from service.runtime import open_runtime
from service.simulator import running_simulator
from service.store.engine import open_database
from service.sync import sync_once

pytestmark = pytest.mark.db

SECRET_KEY = "SK-" + secrets.token_hex(12) + "-do-not-leak"
ACCESS_KEY = "AK-" + secrets.token_hex(6)
DB_PASSWORD = "pw-" + secrets.token_hex(10) + "-do-not-leak"


@pytest.fixture(scope="module")
def secret_db_url(database_url: str) -> Iterator[str]:
    """The test database through a login role that has a password."""
    role = f"secretive_{secrets.token_hex(3)}"
    admin = make_url(database_url).set(drivername="postgresql").render_as_string(False)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{DB_PASSWORD}'")
        conn.execute(f"GRANT ALL ON SCHEMA inventory TO {role}")
        conn.execute(f"GRANT ALL ON ALL TABLES IN SCHEMA inventory TO {role}")
    yield make_url(database_url).set(username=role, password=DB_PASSWORD).render_as_string(False)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", (role,)
        )
        conn.execute(f"DROP OWNED BY {role}")
        conn.execute(f"DROP ROLE {role}")


def assert_clean(text: str, where: str) -> None:
    assert SECRET_KEY not in text, f"the API secret key leaked into {where}"
    assert DB_PASSWORD not in text, f"the database password leaked into {where}"


async def _cli(env: dict[str, str], *args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "service", *args, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode() + err.decode()


async def _recorded_errors(engine: AsyncEngine) -> str:
    async with engine.connect() as conn:
        rows = (
            await conn.execute(
                sa.text(
                    "SELECT coalesce(error_status, '') || ' ' || coalesce(error_message, '')"
                    " FROM inventory.sync_partitions UNION ALL"
                    " SELECT coalesce(error_message, '') FROM inventory.sync_runs"
                )
            )
        ).scalars()
        return "\n".join(rows)


async def test_cli_sync_with_debug_logging_and_failures(
    engine: AsyncEngine, cli_env: dict[str, str], secret_db_url: str
) -> None:
    env = {
        **cli_env,
        "DATABASE_URL": secret_db_url,
        "JDCLOUD_ACCESS_KEY": ACCESS_KEY,
        "JDCLOUD_SECRET_KEY": SECRET_KEY,
        "JDCLOUD_SECURITY_TOKEN": "tok-" + SECRET_KEY,
        "IMAGE_SYNC_LOG_LEVEL": "debug",
        "IMAGE_SYNC_LOG_FORMAT": "text",
        "IMAGE_SYNC_MAX_ATTEMPTS": "2",
        "IMAGE_SYNC_REGIONS": "cn-north-1,cn-east-1",
    }
    faults = {
        "fail_partitions": {"cn-north-1/private": "internal", "cn-east-1/shared": "QUOTA_EXCEEDED"},
        "fail_first_n": [{"kind": "reset", "n": 2}, {"kind": "html", "n": 1}],
    }
    async with running_simulator(
        images=200, seed=4, access_key=ACCESS_KEY, secret_key=SECRET_KEY, faults=faults
    ) as sim:
        code, output = await _cli({**env, "JDCLOUD_ENDPOINT": sim.url}, "sync", "--once")
        assert code == 1, output[-3000:]
        assert "DEBUG" in output  # debug logging was on
        assert "QUOTA_EXCEEDED" in output
        assert_clean(output, "the output of a failing sync")
        # Refused credentials (the simulator knows another secret): one line, no secret.
        code, output = await _cli(
            {**env, "JDCLOUD_ENDPOINT": sim.url, "JDCLOUD_SECRET_KEY": SECRET_KEY + "x"},
            "sync", "--once",
        )  # fmt: skip
        assert code == 1 and "refused the credentials" in output, output[-3000:]
        assert_clean(output, "the output of a refused sync")
    assert_clean(await _recorded_errors(engine), "sync_partitions/sync_runs error messages")
    # The database refuses the connection: the URL carries the password; output must not.
    bad_db = make_url(secret_db_url).set(port=1, host="127.0.0.1").render_as_string(False)
    code, output = await _cli({**env, "DATABASE_URL": bad_db, "JDCLOUD_ENDPOINT": sim.url},
                              "sync", "--once")  # fmt: skip
    assert code == 1 and "cannot connect" in output, output
    assert_clean(output, "the output of a database failure")
    for command in ("status", "check", "migrate"):
        code, output = await _cli({**env, "DATABASE_URL": bad_db}, command)
        assert code == 1, (command, output)
        assert_clean(output, f"`image-sync {command}` with a failing database")


async def test_exception_texts(make_settings: Any, secret_db_url: str) -> None:
    bad_db = make_url(secret_db_url).set(port=1, host="127.0.0.1").render_as_string(False)
    with pytest.raises(DatabaseError) as caught:
        async with open_database(make_settings(DATABASE_URL=bad_db)):
            pass
    assert_clean(str(caught.value) + repr(caught.value), "a DatabaseError")
    settings = make_settings(
        DATABASE_URL=secret_db_url, JDCLOUD_ACCESS_KEY=ACCESS_KEY, JDCLOUD_SECRET_KEY=SECRET_KEY
    )
    assert_clean(repr(settings) + str(settings.redacted()) + repr(settings.credentials()),
                 "Settings/Credentials repr")  # fmt: skip


async def test_status_server_pages(
    engine: AsyncEngine, make_settings: Any, secret_db_url: str
) -> None:
    from service.web.server import StatusContext, serve_status

    async with running_simulator(
        images=100, seed=2, access_key=ACCESS_KEY, secret_key=SECRET_KEY,
        faults={"fail_partitions": {"cn-north-1/private": "QUOTA_EXCEEDED"}},
    ) as sim:  # fmt: skip
        settings = make_settings(
            sim.url,
            DATABASE_URL=secret_db_url,
            JDCLOUD_ACCESS_KEY=ACCESS_KEY,
            JDCLOUD_SECRET_KEY=SECRET_KEY,
        )
        metrics = Metrics()
        async with open_runtime(settings, metrics=metrics) as rt:
            await sync_once(rt.database.engine, rt.client, rt.partitions(), metrics=metrics)
            context = StatusContext(engine=rt.database.engine, settings=settings, metrics=metrics)
            async with serve_status(context, "127.0.0.1", 0) as url, aiohttp.ClientSession() as s:
                for path in ("/", "/metrics", "/readyz", "/healthz"):
                    async with s.get(url + path) as resp:
                        body = await resp.text()
                    assert resp.status in (200, 503), (path, resp.status)
                    assert_clean(body + str(resp.headers), path)
