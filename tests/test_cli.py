"""The CLI as a user runs it: real subprocesses, the simulator, the test database."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from sqlalchemy.ext.asyncio import AsyncEngine

from service.simulator import simulator_in_thread

IMAGE_SYNC = [sys.executable, "-m", "service"]


def run(
    args: list[str], env: dict[str, str], timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*IMAGE_SYNC, *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def test_demo_exits_zero_with_its_summary() -> None:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("JDCLOUD_", "IMAGE_SYNC_", "DATABASE_URL"))
    }
    result = run(["demo", "--images", "500"], env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "demo OK" in result.stdout
    assert "Images in the database" in result.stdout
    assert "went_offline" in result.stdout and "removed" in result.stdout


async def test_migrate_sync_status(cli_env: dict[str, str], engine: AsyncEngine) -> None:
    """(``engine`` empties the session's database first: a registry another test wrote,
    e.g. of other regions, would decide what ``status`` shows.)"""
    with simulator_in_thread(images=300, seed=4) as sim:
        env = {**cli_env, "JDCLOUD_ENDPOINT": sim.url}
        migrated = run(["migrate"], env)
        assert migrated.returncode == 0, migrated.stderr
        assert "schema at" in migrated.stdout
        synced = run(["sync", "--once", "--region", "cn-east-1", "--source", "private"], env)
        assert synced.returncode == 0, synced.stderr
        assert "1/1 partitions synced" in synced.stdout
        # JSON log lines (not a TTY), one per partition outcome, with counts.
        assert '"partition cn-east-1/private succeeded' in synced.stderr
        status = run(["status"], env)
        assert status.returncode == 0, status.stderr
        assert "cn-east-1" in status.stdout and "succeeded" in status.stdout


def test_sync_exit_code_one_when_a_partition_fails(cli_env: dict[str, str]) -> None:
    faults = {"fail_partitions": {"cn-south-1/shared": "QUOTA_EXCEEDED"}}
    with simulator_in_thread(images=200, seed=4, faults=faults) as sim:
        env = {**cli_env, "JDCLOUD_ENDPOINT": sim.url, "IMAGE_SYNC_REGIONS": "cn-south-1"}
        result = run(["sync", "--once", "--migrate"], env)
    assert result.returncode == 1
    assert "4/5 partitions synced" in result.stdout
    assert "cn-south-1/shared: failed: QUOTA_EXCEEDED" in result.stderr
    assert "Traceback" not in result.stderr


def test_sync_refuses_pending_migrations_with_one_line(
    cli_env: dict[str, str], pg_server_url: str
) -> None:
    import psycopg
    from sqlalchemy.engine import make_url

    name = f"image_sync_empty_{os.getpid()}"
    admin = (
        make_url(pg_server_url).set(drivername="postgresql").render_as_string(hide_password=False)
    )
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        url = make_url(pg_server_url).set(database=name).render_as_string(hide_password=False)
        result = run(
            ["sync", "--once"],
            {**cli_env, "DATABASE_URL": url, "JDCLOUD_ENDPOINT": "http://127.0.0.1:9"},
        )
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("image-sync: database: the database schema is at nothing"), (
        result.stderr
    )
    assert "Traceback" not in result.stderr


def test_help_lists_commands_and_variables() -> None:
    result = run(["--help"], dict(os.environ))
    assert result.returncode == 0
    for word in (
        "sync",
        "run",
        "migrate",
        "status",
        "simulate",
        "demo",
        "check",
        "IMAGE_SYNC_INTERVAL",
        "DATABASE_URL",
    ):
        assert word in result.stdout
    sim_help = run(["simulate", "--help"], dict(os.environ))
    assert sim_help.returncode == 0 and "--latency-ms" in sim_help.stdout


def test_second_process_reuses_the_embedded_server(tmp_path: Path) -> None:
    """Two processes on one IMAGE_SYNC_DATA_DIR: the second joins, the last stops it."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("JDCLOUD_", "IMAGE_SYNC_", "DATABASE_URL"))
    }
    env.update({"IMAGE_SYNC_DATA_DIR": str(tmp_path), "JDCLOUD_ENDPOINT": "http://127.0.0.1:9"})
    holder_code = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from service.embedded import EmbeddedPostgres\n"
        "server = EmbeddedPostgres(Path(sys.argv[1]))\n"
        "print(server.start(), flush=True)\n"
        "sys.stdin.readline()\n"
        "server.stop()\n"
    )
    postmaster = tmp_path / "pgdata" / "postmaster.pid"
    with subprocess.Popen(
        [sys.executable, "-c", holder_code, str(tmp_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    ) as holder:
        assert holder.stdin is not None and holder.stdout is not None
        try:
            holder.stdout.readline()
            assert postmaster.exists()
            pid_before = postmaster.read_text().splitlines()[0]
            second = run(["migrate"], env)
            assert second.returncode == 0, second.stderr
            # The second process joined the running server and left it running for the first.
            assert postmaster.exists() and postmaster.read_text().splitlines()[0] == pid_before
        finally:
            holder.stdin.write("\n")
            holder.stdin.flush()
            holder.wait(timeout=30)
    deadline = time.monotonic() + 10
    while postmaster.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not postmaster.exists(), "the last process should have stopped the embedded server"


def test_database_commands_need_no_api_credentials(cli_env: dict[str, str]) -> None:
    env = {k: v for k, v in cli_env.items() if k != "JDCLOUD_ENDPOINT"}  # the real https default
    assert run(["migrate"], env).returncode == 0
    # `alembic` from a shell, which the README calls the same as `image-sync migrate`.
    alembic = subprocess.run(
        [str(Path(sys.executable).with_name("alembic")), "current"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).parents[1],
    )
    assert alembic.returncode == 0, alembic.stderr[-2000:]
    assert "(head)" in alembic.stdout, alembic.stdout
    status = run(["status"], env)
    assert status.returncode == 0, status.stderr
    # ...while a sync against the real endpoint does, and says which variable is missing.
    sync = run(["sync", "--once"], env)
    assert sync.returncode == 2
    assert sync.stderr.strip() == (
        "image-sync: configuration error: JDCLOUD_ACCESS_KEY: "
        "required for the endpoint https://vm.jdcloud-api.com"
    )


def test_half_a_key_pair_is_an_error_even_for_the_simulator(cli_env: dict[str, str]) -> None:
    env = {**cli_env, "JDCLOUD_ENDPOINT": "http://127.0.0.1:9", "JDCLOUD_ACCESS_KEY": "AKID"}
    result = run(["sync", "--once"], env)
    assert result.returncode == 2
    assert "JDCLOUD_SECRET_KEY: required when JDCLOUD_ACCESS_KEY is set" in result.stderr
