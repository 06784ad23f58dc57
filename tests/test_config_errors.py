"""Bad configuration and usage through the real CLI: one clear line naming the variable,
exit code 2, no traceback. Unreachable database or endpoint: one clear line, exit 1."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from service.config import VARIABLES

LOCAL = "http://127.0.0.1:9"

# variable -> a bad value. Every variable of the contract has a row (see the test below).
BAD_VALUES: dict[str, str] = {
    "DATABASE_URL": "mysql://user:pw@host/db",
    "IMAGE_SYNC_DATA_DIR": "\x00nul",
    "JDCLOUD_ACCESS_KEY": "",  # required for a real endpoint (with JDCLOUD_ENDPOINT unset)
    "JDCLOUD_SECRET_KEY": "",  # idem, with an access key given
    "JDCLOUD_SECURITY_TOKEN": "",  # blank is allowed: covered by the "accepted" test
    "JDCLOUD_ENDPOINT": "ftp://vm.jdcloud-api.com",
    "JDCLOUD_STS_ENDPOINT": "sts.jdcloud-api.com",  # no scheme
    "IMAGE_SYNC_ACCOUNT": "Prod Account",
    "IMAGE_SYNC_CONFIG": "/nonexistent/image-sync.toml",
    "IMAGE_SYNC_REGIONS": "Not A Region",
    "IMAGE_SYNC_SOURCES": "public,marketplace",
    "IMAGE_SYNC_INTERVAL": "0",
    "IMAGE_SYNC_CONCURRENCY": "0",
    "IMAGE_SYNC_RATE_LIMIT": "-1",
    "IMAGE_SYNC_PAGE_SIZE": "500",
    "IMAGE_SYNC_HTTP": "localhost",
    "IMAGE_SYNC_LOG_FORMAT": "xml",
    "IMAGE_SYNC_LOG_LEVEL": "verbose",
    "IMAGE_SYNC_GRACE_PERIOD": "-5",
    "IMAGE_SYNC_REQUEST_TIMEOUT": "soon",
    "IMAGE_SYNC_CONNECT_TIMEOUT": "0",
    "IMAGE_SYNC_MAX_ATTEMPTS": "0",
    "IMAGE_SYNC_MAX_URL_LENGTH": "10",
    "IMAGE_SYNC_STATEMENT_TIMEOUT": "-1",
    "IMAGE_SYNC_KEEP_RUNS_DAYS": "0",
    "IMAGE_SYNC_WEBHOOK_URL": "http://hooks.example.com/image-sync",  # not https
    "IMAGE_SYNC_WEBHOOK_SECRET": "whsec-1",  # without a URL to sign for
    "IMAGE_SYNC_WEBHOOK_FROM": "yesterday",
    "IMAGE_SYNC_WEBHOOK_MAX_ATTEMPTS": "0",
    "IMAGE_SYNC_WEBHOOK_TIMEOUT": "0",
    **{f"IMAGE_SYNC_INTERVAL_{s}": "never" for s in
       ("PUBLIC", "THIRDPARTY", "PRIVATE", "SHARED", "COMMUNITY")},
}  # fmt: skip
NOT_AN_ERROR = {"JDCLOUD_SECURITY_TOKEN"}
MORE_BAD: list[tuple[str, dict[str, str]]] = [
    ("DATABASE_URL", {"DATABASE_URL": "postgresql://host:notaport/db"}),
    ("DATABASE_URL", {"DATABASE_URL": "postgresql://host:5432"}),
    ("JDCLOUD_ENDPOINT", {"JDCLOUD_ENDPOINT": "https://user:pw@example.com"}),
    ("JDCLOUD_ENDPOINT", {"JDCLOUD_ENDPOINT": "not a url"}),
    ("IMAGE_SYNC_PAGE_SIZE", {"IMAGE_SYNC_PAGE_SIZE": "9"}),
    ("IMAGE_SYNC_PAGE_SIZE", {"IMAGE_SYNC_PAGE_SIZE": "ten"}),
    ("IMAGE_SYNC_REGIONS", {"IMAGE_SYNC_REGIONS": ","}),
    ("IMAGE_SYNC_SOURCES", {"IMAGE_SYNC_SOURCES": ""}),
    ("IMAGE_SYNC_HTTP", {"IMAGE_SYNC_HTTP": "127.0.0.1:99999"}),
    ("IMAGE_SYNC_WEBHOOK_SECRET", {"IMAGE_SYNC_WEBHOOK_URL": "https://hooks.example.com/x"}),
    ("JDCLOUD_SECRET_KEY", {"JDCLOUD_ACCESS_KEY": "ak", "JDCLOUD_ENDPOINT": "https://x.example"}),
]


def _env(**overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JDCLOUD_", "IMAGE_SYNC_"))}
    env.pop("DATABASE_URL", None)
    env.update({"IMAGE_SYNC_HTTP": "off", "IMAGE_SYNC_LOG_FORMAT": "json"})
    env.update(overrides)
    return {k: v for k, v in env.items() if "\x00" not in v}


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service", *args], env=env, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip


def _case(variable: str, value: str) -> dict[str, str]:
    base = {"JDCLOUD_ENDPOINT": LOCAL}
    if variable == "JDCLOUD_ACCESS_KEY":
        return {}  # the real default endpoint, no key pair
    if variable == "JDCLOUD_SECRET_KEY":
        return {"JDCLOUD_ACCESS_KEY": "ak"}
    return {**base, variable: value}


def test_every_variable_has_a_bad_value() -> None:
    assert set(BAD_VALUES) == set(VARIABLES)


def _assert_one_clear_line(result: subprocess.CompletedProcess[str], variable: str) -> None:
    assert result.returncode == 2, (variable, result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, (variable, result.stderr)
    assert "Traceback" not in result.stderr
    assert lines[0].startswith("image-sync: configuration error: "), lines
    assert variable in lines[0], (variable, lines[0])


@pytest.mark.parametrize(
    "variable",
    sorted(v for v in BAD_VALUES if v not in NOT_AN_ERROR and v != "IMAGE_SYNC_DATA_DIR"),
)
def test_bad_value_names_the_variable(variable: str) -> None:
    result = _cli(_env(**_case(variable, BAD_VALUES[variable])), "sync", "--once")
    _assert_one_clear_line(result, variable)


@pytest.mark.parametrize(("variable", "env"), MORE_BAD, ids=[str(i) for i in range(len(MORE_BAD))])
def test_more_bad_values(variable: str, env: dict[str, str]) -> None:
    result = _cli(_env(**{"JDCLOUD_ENDPOINT": LOCAL, **env}), "sync", "--once")
    _assert_one_clear_line(result, variable)


def test_data_dir_that_cannot_be_created(tmp_path: object) -> None:
    """IMAGE_SYNC_DATA_DIR under a regular file: one line naming the directory, exit 1."""
    blocker = os.path.join(str(tmp_path), "file")
    with open(blocker, "w") as fh:
        fh.write("x")
    result = _cli(
        _env(JDCLOUD_ENDPOINT=LOCAL, IMAGE_SYNC_DATA_DIR=os.path.join(blocker, "data")),
        "status",
    )
    assert result.returncode in (1, 2), result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "file/data" in lines[0]


def test_bad_toml_config(tmp_path: object) -> None:
    path = os.path.join(str(tmp_path), "c.toml")
    with open(path, "w") as fh:
        fh.write("IMAGE_SYNC_PAGE_SIZE = 5\n")
    result = _cli(_env(JDCLOUD_ENDPOINT=LOCAL), "--config", path, "sync", "--once")
    _assert_one_clear_line(result, "IMAGE_SYNC_PAGE_SIZE")
    with open(path, "w") as fh:
        fh.write("NOT_A_KEY = 1\n")
    result = _cli(_env(JDCLOUD_ENDPOINT=LOCAL), "--config", path, "sync", "--once")
    _assert_one_clear_line(result, "--config")


def test_bad_usage_exits_2() -> None:
    for args in (["sync"], ["sync", "--once", "--source", "nope"], ["frobnicate"]):
        result = _cli(_env(JDCLOUD_ENDPOINT=LOCAL), *args)
        assert result.returncode == 2 and "Traceback" not in result.stderr, (args, result)
    result = _cli(_env(JDCLOUD_ENDPOINT=LOCAL), "sync", "--once", "--region", "Bad Region")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result
    assert result.stderr.strip().splitlines()[-1] == (
        "image-sync sync: error: argument --region: 'Bad Region' is not a region id like cn-north-1"
    ), result.stderr


def test_unreachable_database_is_one_line() -> None:
    result = _cli(
        _env(
            JDCLOUD_ENDPOINT=LOCAL,
            DATABASE_URL="postgresql://u:hunter2-db-pass@127.0.0.1:1/inventory",
        ),
        "sync",
        "--once",
    )
    assert result.returncode == 1, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith("image-sync: database: cannot connect"), lines
    assert "hunter2-db-pass" not in result.stderr + result.stdout


def test_unreachable_endpoint_is_clear(engine: object, cli_env: dict[str, str]) -> None:
    """Nothing listens at the endpoint: the partitions fail with a network error, one
    line each, and the run exits 1 without a traceback."""
    result = _cli(
        {**cli_env, "JDCLOUD_ENDPOINT": LOCAL, "IMAGE_SYNC_MAX_ATTEMPTS": "1",
         "IMAGE_SYNC_REGIONS": "cn-north-1", "IMAGE_SYNC_SOURCES": "private,public"},
        "sync", "--once",
    )  # fmt: skip
    assert result.returncode == 1, result
    assert "Traceback" not in result.stderr
    failures = [line for line in result.stderr.splitlines() if line.startswith("  cn-north-1/")]
    assert len(failures) == 2, result.stderr
    assert all("failed: NETWORK: " in line for line in failures), failures
    assert "failed" in result.stdout
