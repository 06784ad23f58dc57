"""DATABASE_URL read as libpq reads it, and the ``_FILE`` forms of the secrets.

No database here: what the server makes of these URLs is tests/test_db_tls.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from service.app import credentials_of
from service.config import load_settings
from service.dburl import parse_database_url
from service.errors import ConfigError
from tests.cli_helpers import run_cli

PASSWORD = "pw-Do-Not-Print-7"


@pytest.mark.parametrize(
    "url",
    [
        f"postgresql://app:{PASSWORD}@db.example.com:5432/inv?sslmode=verify-full",
        f"postgres://app@db.example.com/inv?password={PASSWORD}&sslmode=require",
        f"postgresql://db.example.com/inv?user=app&password={PASSWORD}",
        f"postgresql://app:{PASSWORD}@h1:5432,h2:5433/inv?target_session_attrs=read-write",
        f"postgresql:///inv?host=/var/run/postgresql&user=app&password={PASSWORD}",
        f"postgresql://app:{PASSWORD}@%2Fvar%2Frun%2Fpostgresql/inv",
        f"postgresql://app:{PASSWORD}@[::1]:5432/inv?options=-c%20search_path%3Dx",
        f"postgresql://app:{PASSWORD}@db/inv?application_name=me&connect_timeout=5",
        f"postgresql://app:{PASSWORD}@db/inv?sslmode=allow",
        f"postgresql://app:{PASSWORD}@db/inv?sslmode=prefer",
        f"postgresql://app:{PASSWORD}@db/inv?sslmode=disable",
    ],
)
def test_libpq_urls_are_accepted_and_shown_without_the_password(url: str) -> None:
    settings = load_settings({"DATABASE_URL": url}, needs_api=False)
    parsed = parse_database_url(url)
    shown = parsed.display() + str(settings.redacted()) + repr(settings) + repr(parsed)
    assert PASSWORD not in shown, shown
    assert parsed.password == PASSWORD
    assert "app@" in parsed.display() and "/inv" in parsed.display()


def test_what_asyncpg_is_given() -> None:
    parsed = parse_database_url("postgres://u@h1:1,h2:2/db?connect_timeout=3&application_name=x")
    assert parsed.hosts == ("h1", "h2") and parsed.ports == ("1", "2")
    assert parsed.connect_timeout == 3 and parsed.application_name == "x"
    # connect_timeout would reach the server as an unknown setting; the name goes as
    # a server setting of its own.
    assert parsed.dsn == "postgres://u@h1:1,h2:2/db"
    assert parse_database_url("postgresql://h/db").application_name == "image-sync"
    assert parse_database_url("postgresql://h/db?host=%2Ftmp").hosts == ("/tmp",)


@pytest.mark.parametrize(
    ("query", "named"),
    [
        ("ssl=require", "unsupported parameter 'ssl'; use sslmode=require"),
        ("sslcompression=1", "unsupported parameter 'sslcompression'"),
        ("sslmode=verify", "sslmode='verify' is not one of disable, allow, prefer"),
        ("target_session_attrs=master", "target_session_attrs='master' is not one of"),
        ("connect_timeout=soon", "connect_timeout='soon' is not a number"),
        ("sslrootcert=/nonexistent/ca.pem", "sslrootcert: cannot read the file /nonexistent"),
        ("sslrootcert=system", "sslrootcert=system is not supported"),
    ],
)
async def test_a_bad_parameter_is_one_line_exit_2(query: str, named: str) -> None:
    url = f"postgresql://app:{PASSWORD}@127.0.0.1:9/inv?{query}"
    env = {**os.environ, "DATABASE_URL": url}
    code, out, err = await run_cli(env, "status")
    assert code == 2 and err.count("\n") == 1 and not out, err
    assert err.startswith("image-sync: configuration error: DATABASE_URL: ") and named in err, err
    assert PASSWORD not in err


def test_secrets_from_files(tmp_path: Path) -> None:
    (tmp_path / "url").write_text(f"postgresql://app:{PASSWORD}@db/inv\n")
    (tmp_path / "ak").write_text("  AK-from-file\n")
    (tmp_path / "sk").write_text("SK-from-file\n")
    settings = load_settings(
        {
            "DATABASE_URL_FILE": str(tmp_path / "url"),
            "JDCLOUD_ACCESS_KEY_FILE": str(tmp_path / "ak"),
            "JDCLOUD_SECRET_KEY_FILE": str(tmp_path / "sk"),
            "JDCLOUD_ENDPOINT": "https://vm.jdcloud-api.com",
        }
    )
    assert settings.database_url is not None
    assert settings.database_url.get_secret_value() == f"postgresql://app:{PASSWORD}@db/inv"
    assert credentials_of(settings).access_key == "AK-from-file"
    assert credentials_of(settings).secret_key == "SK-from-file"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"DATABASE_URL_FILE": "/nonexistent/url"}, "DATABASE_URL_FILE: cannot read /nonexistent"),
        (
            {"JDCLOUD_SECRET_KEY_FILE": "/nonexistent/sk", "JDCLOUD_ACCESS_KEY": "ak"},
            "JDCLOUD_SECRET_KEY_FILE: cannot read /nonexistent/sk",
        ),
        (
            {"JDCLOUD_ACCESS_KEY_FILE": "PATH", "JDCLOUD_ACCESS_KEY": "ak"},
            "JDCLOUD_ACCESS_KEY_FILE: set only one of JDCLOUD_ACCESS_KEY and",
        ),
    ],
)
def test_secret_file_mistakes(tmp_path: Path, env: dict[str, str], message: str) -> None:
    (tmp_path / "ak").write_text("ak")
    env = {k: v.replace("PATH", str(tmp_path / "ak")) for k, v in env.items()}
    with pytest.raises(ConfigError) as caught:
        load_settings(env, needs_api=False)
    assert str(caught.value).startswith(message), str(caught.value)


async def test_secret_file_mistake_through_the_cli() -> None:
    env = {**os.environ, "DATABASE_URL_FILE": "/nonexistent/url"}
    env.pop("DATABASE_URL", None)
    code, _out, err = await run_cli(env, "migrate")
    assert code == 2 and err == (
        "image-sync: configuration error: DATABASE_URL_FILE: cannot read /nonexistent/url: "
        "No such file or directory\n"
    ), err


async def test_unknown_host_is_one_line_exit_1() -> None:
    """DNS failure (.invalid never resolves): one line naming the URL without password."""
    url = f"postgresql://app:{PASSWORD}@db.no-such-host.invalid:5432/inv?sslmode=require"
    code, out, err = await run_cli({**os.environ, "DATABASE_URL": url}, "status")
    assert code == 1 and err.count("\n") == 1 and not out, err
    assert err.startswith(
        "image-sync: database: cannot connect to postgresql://app@db.no-such-host.invalid:5432/inv: "
    ), err
    assert PASSWORD not in err
