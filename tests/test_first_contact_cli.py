"""A new user's mistakes through the real CLI (issue 12): one line, the right exit code,
no traceback, no secret; unknown variables named with the closest known one."""

from __future__ import annotations

import io
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa
from rich.console import Console
from sqlalchemy.ext.asyncio import AsyncEngine

from service.config import VARIABLES, check_variable_names, known_variables
from service.errors import ConfigError
from service.report import STATUS_JSON_KEYS, print_status
from service.simulator import running_simulator
from service.store import migrate
from tests.test_api_faults import run_cli
from tests.test_config_errors import LOCAL, _assert_one_clear_line, _cli, _env

OPERATIONS_MD = Path(__file__).resolve().parents[1] / "docs" / "operations.md"
UNREACHABLE_DB = "postgresql://u@127.0.0.1:1/inventory"


def plain_lines(stderr: str) -> list[str]:
    """stderr without the JSON log records: what a person reads."""
    return [line for line in stderr.splitlines() if line.strip() and not line.startswith("{")]


@pytest.mark.parametrize(
    ("typo", "closest"),
    [
        ("IMAGE_SYNC_INTERVL", "IMAGE_SYNC_INTERVAL"),
        ("IMAGE_SYNC_INTERVAL_PUBLIK", "IMAGE_SYNC_INTERVAL_PUBLIC"),
        ("IMAGE_SYNC_KEEP_RUN_DAYS", "IMAGE_SYNC_KEEP_RUNS_DAYS"),
    ],
)
def test_an_unknown_image_sync_variable_names_the_closest_known_one(
    typo: str, closest: str
) -> None:
    result = _cli(_env(JDCLOUD_ENDPOINT=LOCAL, **{typo: "60"}), "sync", "--once")
    _assert_one_clear_line(result, typo)
    assert f"did you mean {closest}?" in result.stderr


def test_an_unknown_jdcloud_variable_is_a_warning_only() -> None:
    env = _env(JDCLOUD_ENDPOINT=LOCAL, JDCLOUD_REGION="cn-north-1", DATABASE_URL=UNREACHABLE_DB)
    result = _cli(env, "status")
    lines = plain_lines(result.stderr)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith("image-sync: warning: JDCLOUD_REGION: not a variable"), lines
    assert lines[1].startswith("image-sync: database: cannot connect"), lines


def test_known_names_come_from_the_settings_model_with_their_file_forms() -> None:
    known = known_variables()
    assert set(VARIABLES) <= known
    assert {"DATABASE_URL_FILE", "JDCLOUD_ACCESS_KEY_FILE", "JDCLOUD_SECRET_KEY_FILE"} <= known
    assert "IMAGE_SYNC_INTERVAL_PRIVATE" in known and "IMAGE_SYNC_INTERVAL_PUBLIK" not in known
    warnings: list[str] = []
    check_variable_names(
        {"JDCLOUD_SECRET_KEY_FILE": "/run/secrets/sk", "IMAGE_SYNC_IMAGE": "x", "PATH": "/bin"},
        warnings.append,
    )
    assert warnings == []
    with pytest.raises(ConfigError, match="IMAGE_SYNC_INTERVAL_PUBLIK"):
        check_variable_names({"IMAGE_SYNC_INTERVAL_PUBLIK": "60"}, warnings.append)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("IMAGE_SYNC_INTERVAL", "inf"),
        ("IMAGE_SYNC_INTERVAL", "nan"),
        ("IMAGE_SYNC_INTERVAL", "99999999999999999999"),
        ("IMAGE_SYNC_INTERVAL", "0.001"),
        ("IMAGE_SYNC_INTERVAL", "true"),
        ("IMAGE_SYNC_INTERVAL_PRIVATE", "5"),
        ("IMAGE_SYNC_GRACE_PERIOD", "inf"),
        ("IMAGE_SYNC_CONCURRENCY", "false"),
    ],
)
def test_run_refuses_numbers_out_of_range_with_one_line(variable: str, value: str) -> None:
    result = _cli(_env(JDCLOUD_ENDPOINT=LOCAL, **{variable: value}), "run")
    _assert_one_clear_line(result, variable)


@pytest.mark.parametrize(
    ("text", "variable"),
    [
        ("IMAGE_SYNC_INTERVAL = true\n", "IMAGE_SYNC_INTERVAL"),
        ("IMAGE_SYNC_PAGE_SIZE = false\n", "IMAGE_SYNC_PAGE_SIZE"),
        ("IMAGE_SYNC_INTERVL = 60\n", "did you mean IMAGE_SYNC_INTERVAL?"),
    ],
)
def test_toml_booleans_and_unknown_keys_are_refused(
    tmp_path: Path, text: str, variable: str
) -> None:
    path = tmp_path / "c.toml"
    path.write_text(text)
    result = _cli(_env(JDCLOUD_ENDPOINT=LOCAL), "--config", str(path), "run")
    _assert_one_clear_line(result, variable)


@pytest.mark.parametrize("variable", ["JDCLOUD_ACCESS_KEY", "JDCLOUD_SECRET_KEY"])
def test_a_control_character_in_a_key_names_the_variable_not_the_value(variable: str) -> None:
    keys = {"JDCLOUD_ACCESS_KEY": "AKvisible01", "JDCLOUD_SECRET_KEY": "SKvisible02"}
    keys[variable] = keys[variable][:5] + "\n" + keys[variable][5:]
    result = _cli(_env(JDCLOUD_ENDPOINT=LOCAL, **keys), "sync", "--once")
    _assert_one_clear_line(result, variable)
    assert "visible" not in result.stderr + result.stdout


def test_status_with_negative_runs_is_a_usage_error() -> None:
    result = _cli(
        _env(JDCLOUD_ENDPOINT=LOCAL, DATABASE_URL=UNREACHABLE_DB), "status", "--runs", "-1"
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "image-sync status: error: argument --runs: '-1' is negative; give 0 or more"
    )


def test_schema_doc_outside_the_repository_is_one_line(
    engine: object, cli_env: dict[str, str], tmp_path: Path
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "service", "schema-doc"],
        env=cli_env, cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    _assert_one_clear_line(result, "--output")
    assert "docs/schema.md" in result.stderr and "--output -" in result.stderr


def test_a_busy_status_port_exits_1_with_one_line(engine: object, cli_env: dict[str, str]) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        env = {**cli_env, "JDCLOUD_ENDPOINT": LOCAL, "IMAGE_SYNC_HTTP": f"127.0.0.1:{port}"}
        result = _cli(env, "run")
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    (line,) = plain_lines(result.stderr)
    assert line.startswith(f"image-sync: IMAGE_SYNC_HTTP: cannot listen on 127.0.0.1:{port}")


# --- (9) status readable at 80 columns, skipped_locked apart, JSON --------------------------


async def test_status_fits_80_columns_and_counts_skipped_locked_apart(
    engine: AsyncEngine, cli_env: dict[str, str]
) -> None:
    from service.store.apply import PARTITION_LOCK_SPACE, partition_lock_key

    async with running_simulator(seed=45, images=100) as sim:
        env = {**cli_env, "JDCLOUD_ENDPOINT": sim.url}
        # Another process holds two partitions while this one syncs.
        async with engine.connect() as holder, holder.begin():
            # (a catalogue partition, and the one account's private partition)
            for region, source, account in (
                ("cn-north-1", "public", ""),
                ("cn-east-1", "private", "default"),
            ):
                key = partition_lock_key(region, source, account)
                await holder.execute(
                    sa.text("SELECT pg_advisory_xact_lock(:space, :key)"),
                    {"space": PARTITION_LOCK_SPACE, "key": key},
                )
            code, out, err = await run_cli(env, "sync", "--once")
    assert code == 0, err
    assert "18/20 partitions synced, 2 skipped_locked" in out, out
    code, out, err = await run_cli({**env, "COLUMNS": "80"}, "status")
    assert code == 0, err
    lines = out.splitlines()
    assert max(len(line) for line in lines) <= 80, out
    assert "…" not in out  # no header or value cut to "r…"
    assert any(line.split()[:4] == ["run", "started", "status", "trigger"] for line in lines)
    assert "cn-north-1/public" in out and "skipped" not in out  # health ignores the skip
    buffer = io.StringIO()
    await print_status(engine, console=Console(file=buffer, width=80, color_system=None))
    assert max(len(line) for line in buffer.getvalue().splitlines()) <= 80


async def test_status_and_check_json(engine: AsyncEngine, cli_env: dict[str, str]) -> None:
    async with running_simulator(seed=46, images=60) as sim:
        env = {**cli_env, "JDCLOUD_ENDPOINT": sim.url, "IMAGE_SYNC_REGIONS": "cn-north-1"}
        assert (await run_cli(env, "sync", "--once"))[0] == 0
    code, out, err = await run_cli(env, "status", "--json", "--runs", "3")
    assert code == 0, err
    document = json.loads(out)
    assert set(document) == set(STATUS_JSON_KEYS)
    assert len(document["partitions"]) == 5 and len(document["runs"]) == 1
    for key, rows in document.items():
        assert all(list(row) == list(STATUS_JSON_KEYS[key]) for row in rows)
    assert {p["last_status"] for p in document["partitions"]} == {"succeeded"}
    code, out, err = await run_cli(env, "check", "--json")
    assert (code, json.loads(out)) == (0, {"ok": True, "problems": []}), err


async def test_the_simulator_admin_url_it_advertises_lists_its_operations() -> None:
    import aiohttp

    async with running_simulator(seed=47, images=20) as sim, aiohttp.ClientSession() as http:
        for url in (f"{sim.url}/__simulator__/", f"{sim.url}/__simulator__"):
            async with http.get(url) as response:
                assert response.status == 200
                index = await response.json()
    operations = {(op["method"], op["path"]) for op in index["operations"]}
    assert {
        ("GET", "/__simulator__/faults"),
        ("PUT", "/__simulator__/faults"),
        ("POST", "/__simulator__/catalogue/{op}"),
        ("GET", "/__simulator__/requests"),
        ("DELETE", "/__simulator__/requests"),
        ("GET", "/__simulator__/stats"),
    } <= operations
    assert all(op["doc"] for op in index["operations"])
    result = _cli(_env(), "simulate", "--help")
    assert result.returncode == 0
    for method, path in operations:
        assert any(method in line and path in line for line in result.stdout.splitlines())


async def test_run_on_an_old_schema_exits_with_one_line_as_operations_md_says(
    scratch_engine: AsyncEngine,
    scratch_url: str,
    cli_env: dict[str, str],
) -> None:
    """docs/operations.md: a pod on a schema older than its release exits at start with one
    line (and restarts until the migration Job has run); it does not serve unready."""
    await migrate.upgrade(scratch_engine, "0002")
    env = {
        **cli_env,
        "DATABASE_URL": scratch_url,
        "JDCLOUD_ENDPOINT": LOCAL,
        "IMAGE_SYNC_HTTP": "off",
    }
    code, _out, err = await run_cli(env, "run")
    assert code == 1 and "Traceback" not in err, err
    (line,) = plain_lines(err)
    assert line.startswith("image-sync: database: the database schema is at 0002"), line
    doc = OPERATIONS_MD.read_text()
    assert "stay unready" not in doc and "exit at start with one line" in doc
