"""No secret leaks: with debug logging, failing requests, refused credentials and a
failing database, neither the API secret key nor the database password appears in any
log line, CLI output, exception text, ``sync_runs``/``sync_partitions`` error message,
``/metrics``, ``/readyz`` or the status page."""

from __future__ import annotations

import asyncio
import secrets
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from service.app import credentials_of, open_runtime
from service.dburl import parse_database_url
from service.errors import DatabaseError
from service.metrics import Metrics
from service.simulator import running_simulator
from service.store.engine import open_database
from service.sync import sync_once
from tests.cli_helpers import run_cli

pytestmark = pytest.mark.db

SECRET_KEY = "SK-" + secrets.token_hex(12) + "-do-not-leak"
ACCESS_KEY = "AK-" + secrets.token_hex(6)
DB_PASSWORD = "pw-" + secrets.token_hex(10) + "-do-not-leak"


@pytest.fixture(scope="module")
def secret_db_url(database_url: str, session_engine: AsyncEngine) -> Iterator[str]:
    """The test database (migrated: ``session_engine``, which a worker of a parallel run
    may not have made yet) through a login role that has a password."""
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
    code, out, err = await run_cli(env, *args)
    return code, out + err


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


@pytest.mark.long
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
    assert_clean(repr(settings) + str(settings.redacted()) + repr(credentials_of(settings)),
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


# -- every form a secret may be given in --------------------------------------------------


def _dead_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _login(url: str) -> tuple[str, str, str, str]:
    """(user, database, host or socket directory, port) of a test database URL."""
    parsed = parse_database_url(url)
    return parsed.user, parsed.database, parsed.hosts[0], parsed.ports[0] or "5432"


def _query_url(url: str, port: int | None = None, **params: str) -> str:
    """The same database with host and port in the query (TCP and unix socket alike)."""
    _user, database, host, own_port = _login(url)
    query = "&".join(
        f"{k}={v}" for k, v in {"host": host, "port": port or own_port, **params}.items()
    )
    return f"/{database}?{query}"


def _secret_forms(
    url: str, tmp: Path, port: int | None = None
) -> dict[str, tuple[dict[str, str], list[str]]]:
    """(environment, extra CLI arguments) giving the database password and the API secret
    in each supported way; ``port`` points the database at another (dead) port."""
    user = _login(url)[0]
    user_info = f"postgresql://{user}:{DB_PASSWORD}@{_query_url(url, port)}"
    (tmp / f"url-{port}").write_text(f"  {user_info}\n")
    (tmp / "secret-key").write_text(SECRET_KEY + "\n")
    (tmp / f"config-{port}.toml").write_text(
        f'DATABASE_URL = "{user_info}"\nJDCLOUD_ACCESS_KEY = "{ACCESS_KEY}"\n'
        f'JDCLOUD_SECRET_KEY = "{SECRET_KEY}"\n'
    )
    keys = {"JDCLOUD_ACCESS_KEY": ACCESS_KEY}
    return {
        "?password=, JDCLOUD_SECRET_KEY_FILE": (
            {"DATABASE_URL": f"postgresql://{user}@{_query_url(url, port, password=DB_PASSWORD)}",
             "JDCLOUD_SECRET_KEY_FILE": str(tmp / "secret-key"), **keys}, []),
        "?user=&password=, JDCLOUD_SECRET_KEY": (
            {"DATABASE_URL": "postgres://"
             + _query_url(url, port, user=user, password=DB_PASSWORD),
             "JDCLOUD_SECRET_KEY": SECRET_KEY, **keys}, []),
        "DATABASE_URL_FILE": (
            {"DATABASE_URL_FILE": str(tmp / f"url-{port}"),
             "JDCLOUD_SECRET_KEY": SECRET_KEY, **keys}, []),
        "TOML": ({}, ["--config", str(tmp / f"config-{port}.toml")]),
    }  # fmt: skip


def _base_env(cli_env: dict[str, str], **extra: str) -> dict[str, str]:
    env = {k: v for k, v in cli_env.items() if k != "DATABASE_URL"}
    return {**env, "IMAGE_SYNC_LOG_LEVEL": "debug", "IMAGE_SYNC_LOG_FORMAT": "json", **extra}


@pytest.mark.long
async def test_every_form_of_the_secrets_stays_out_of_the_cli(
    engine: AsyncEngine, cli_env: dict[str, str], secret_db_url: str, tmp_path: Path
) -> None:
    forms = _secret_forms(secret_db_url, tmp_path)
    regions = ("cn-north-1", "cn-east-1", "cn-east-2", "cn-south-1")  # one per form: in parallel
    faults = {"fail_partitions": {f"{region}/private": "QUOTA_EXCEEDED" for region in regions}}
    async with running_simulator(
        images=40, seed=5, access_key=ACCESS_KEY, secret_key=SECRET_KEY, faults=faults
    ) as sim:
        base = _base_env(cli_env, JDCLOUD_ENDPOINT=sim.url)
        results = await asyncio.gather(
            *(
                _cli({**base, **env, "IMAGE_SYNC_REGIONS": region}, *args, "sync", "--once")
                for (env, args), region in zip(forms.values(), regions, strict=True)
            )
        )
    for form, (code, output) in zip(forms, results, strict=True):
        assert code == 1 and "QUOTA_EXCEEDED" in output and '"debug"' in output, (form, output)
        assert_clean(output, f"`sync --once` with {form}")
    assert_clean(await _recorded_errors(engine), "sync_partitions/sync_runs error messages")
    dead = _secret_forms(secret_db_url, tmp_path, port=_dead_port())
    results = await asyncio.gather(
        *(_cli({**_base_env(cli_env), **env}, *args, "status") for env, args in dead.values())
    )
    for form, (code, output) in zip(dead, results, strict=True):
        assert code == 1 and "cannot connect" in output, (form, output)
        assert_clean(output, f"`status` on an unreachable database with {form}")


async def test_endpoint_with_credentials_is_refused_without_echo(cli_env: dict[str, str]) -> None:
    env = {**cli_env, "JDCLOUD_ENDPOINT": f"http://{ACCESS_KEY}:{SECRET_KEY}@127.0.0.1:9"}
    code, output = await _cli(env, "sync", "--once")
    assert code == 2 and output.count("\n") == 1, output
    assert "JDCLOUD_ENDPOINT" in output and ACCESS_KEY not in output, output
    assert_clean(output, "the JDCLOUD_ENDPOINT error")


def _assert_names_no_database(text: str, where: str, url: str, *, host: bool = False) -> None:
    """No user, database name, port (nor host, unless ``host``) of ``url`` in ``text``."""
    user, database, host_name, port = _login(url)
    ports = (f":{port}", f"port {port}", f"port={port}")  # not the digits inside a number
    for part in (user, database, *ports, *(() if host else (host_name,))):
        assert part not in text, f"{where} names the database's {part!r}: {text[:300]}"


async def test_running_daemon_pages(
    engine: AsyncEngine, cli_env: dict[str, str], secret_db_url: str, tmp_path: Path
) -> None:
    """``image-sync run`` with the password in ?password= and the key in a file: its
    unauthenticated endpoints name no database, no page or log line has a secret."""
    from tests.test_daemon import replicas, wait_for

    port = _dead_port()
    env, _ = _secret_forms(secret_db_url, tmp_path)["?password=, JDCLOUD_SECRET_KEY_FILE"]
    async with running_simulator(
        images=40, seed=6, access_key=ACCESS_KEY, secret_key=SECRET_KEY
    ) as sim:
        env = {**_base_env(cli_env), **env, "JDCLOUD_ENDPOINT": sim.url,
               "IMAGE_SYNC_HTTP": f"127.0.0.1:{port}"}  # fmt: skip
        async with replicas(1, env, tmp_path) as (daemon,), aiohttp.ClientSession() as s:

            async def ready() -> bool:
                try:
                    async with s.get(f"http://127.0.0.1:{port}/readyz") as resp:
                        return resp.status == 200
                except aiohttp.ClientError:
                    return False

            await wait_for(ready, 60, "the daemon to be ready")
            for path in ("/", "/healthz", "/readyz", "/metrics"):
                async with s.get(f"http://127.0.0.1:{port}{path}") as resp:
                    body = await resp.text()
                assert resp.status == 200, (path, body[:300])
                assert_clean(body + str(resp.headers), f"the daemon's {path}")
                if path != "/":
                    _assert_names_no_database(body, path, secret_db_url)
            daemon.process.terminate()
            assert await daemon.process.wait() == 0
    assert '"debug"' in daemon.output()
    assert_clean(daemon.output(), "the daemon's log")


async def test_unauthenticated_endpoints_while_the_database_is_down(
    make_settings: Any, secret_db_url: str
) -> None:
    from service.store.engine import create_engine
    from service.web.server import StatusContext, serve_status

    user = _login(secret_db_url)[0]
    down = f"postgresql://{user}:{DB_PASSWORD}@{_query_url(secret_db_url, _dead_port())}"
    settings = make_settings(DATABASE_URL=down)
    engine = create_engine(down, pool_size=1)
    context = StatusContext(engine=engine, settings=settings, metrics=Metrics())
    try:
        async with serve_status(context, "127.0.0.1", 0) as url, aiohttp.ClientSession() as s:
            for path in ("/", "/healthz", "/readyz", "/metrics"):
                async with s.get(url + path) as resp:
                    body = await resp.text()
                assert_clean(body, f"{path} while the database is down")
                if path == "/":
                    assert resp.status == 503 and "unreachable" in body
                    # The status page may name the host, nothing else of the database.
                    _assert_names_no_database(body, path, down, host=True)
                else:
                    _assert_names_no_database(body, path, down)
                if path == "/readyz":
                    assert resp.status == 503 and "unreachable" in body, body
    finally:
        await engine.dispose()
