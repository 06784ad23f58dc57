"""``[[accounts]]`` in the TOML file and the one-account form: what each resolves to,
and every mistake as one line naming it, exit 2, through the real CLI (DESIGN.md,
Accounts)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from service.app import credentials_of
from service.config import DEFAULT_ACCOUNT, Settings, load_settings
from service.errors import ConfigError
from service.jdcloud.accounts import Account, accounts_of

LOCAL = "http://127.0.0.1:9"
BASE = {"JDCLOUD_ACCESS_KEY": "AKBASE00000000", "JDCLOUD_SECRET_KEY": "SKBASE-secret-000"}


def _accounts(settings: Settings) -> tuple[Account, ...]:
    return accounts_of(settings, credentials_of(settings))


def _settings(tmp_path: Path, toml: str, env: dict[str, str] | None = None) -> Settings:
    path = tmp_path / "accounts.toml"
    path.write_text(toml, encoding="utf-8")
    return load_settings({"JDCLOUD_ENDPOINT": LOCAL, **(env or {})}, path)


def test_one_account_form_is_unchanged() -> None:
    settings = load_settings({"JDCLOUD_ENDPOINT": LOCAL, **BASE})
    (account,) = _accounts(settings)
    assert account.name == DEFAULT_ACCOUNT == "default"
    assert account.credentials is not None
    assert account.credentials.access_key == BASE["JDCLOUD_ACCESS_KEY"]
    assert account.role is None
    assert account.regions == settings.regions
    named = load_settings({"JDCLOUD_ENDPOINT": LOCAL, "IMAGE_SYNC_ACCOUNT": "prod", **BASE})
    assert [a.name for a in _accounts(named)] == ["prod"]


def test_accounts_of_every_kind_resolve_in_order(tmp_path: Path) -> None:
    (tmp_path / "ak").write_text("AKFILE000000\n", encoding="utf-8")
    (tmp_path / "sk").write_text("  SKFILE-secret-0000 \n", encoding="utf-8")
    toml = f"""
IMAGE_SYNC_REGIONS = "cn-north-1,cn-east-2"

[[accounts]]
name = "team-a"
access_key_env = "TEAM_A_AK"
secret_key_env = "TEAM_A_SK"
security_token_env = "TEAM_A_TOKEN"

[[accounts]]
name = "team-b"
access_key_file = "{tmp_path / "ak"}"
secret_key_file = "{tmp_path / "sk"}"
regions = ["cn-south-1"]

[[accounts]]
name = "audit"
role_jrn = "jrn:iam::123456789:role/image-reader"
duration_seconds = 7200
session_name = "inventory"

[[accounts]]
name = "base"
"""
    env = {
        **BASE,
        "TEAM_A_AK": "AKTEAMA00000",
        "TEAM_A_SK": "SKTEAMA-secret",
        "TEAM_A_TOKEN": "tok-a-1234",
    }
    settings = _settings(tmp_path, toml, env)
    accounts = _accounts(settings)
    assert [a.name for a in accounts] == ["team-a", "team-b", "audit", "base"]
    team_a, team_b, audit, base = accounts
    assert team_a.credentials.access_key == "AKTEAMA00000"
    assert team_a.credentials.secret_key == "SKTEAMA-secret"
    assert team_a.credentials.security_token == "tok-a-1234"
    assert team_a.regions == ("cn-north-1", "cn-east-2")
    assert team_b.credentials.access_key == "AKFILE000000"
    assert team_b.credentials.secret_key == "SKFILE-secret-0000"  # whitespace stripped
    assert team_b.regions == ("cn-south-1",)
    assert audit.credentials is None
    assert audit.role.role_jrn == "jrn:iam::123456789:role/image-reader"
    assert (audit.role.duration_seconds, audit.role.session_name) == (7200, "inventory")
    assert audit.base.access_key == BASE["JDCLOUD_ACCESS_KEY"]
    assert base.credentials.access_key == BASE["JDCLOUD_ACCESS_KEY"]
    # Secrets are known to the redactor and never in a repr.
    secrets = settings.secret_values()
    assert {
        "SKTEAMA-secret",
        "tok-a-1234",
        "SKFILE-secret-0000",
        BASE["JDCLOUD_SECRET_KEY"],
    } <= set(secrets)
    assert "SKTEAMA-secret" not in repr(settings) + repr(accounts)


def test_key_pair_accounts_need_no_base_pair_for_a_real_endpoint(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[[accounts]]\nname = "a"\naccess_key_env = "A"\nsecret_key_env = "S"\n')
    settings = load_settings(
        {"JDCLOUD_ENDPOINT": "https://vm.example.com", "A": "ak-a", "S": "sk-a"}, path
    )
    assert [a.name for a in _accounts(settings)] == ["a"]
    # ... while an account using the base pair does need it there.
    path.write_text('[[accounts]]\nname = "a"\n')
    with pytest.raises(ConfigError, match="JDCLOUD_ACCESS_KEY"):
        load_settings({"JDCLOUD_ENDPOINT": "https://vm.example.com"}, path)


def test_config_file_from_the_environment_and_option_wins(tmp_path: Path) -> None:
    env_file, option_file = tmp_path / "env.toml", tmp_path / "option.toml"
    env_file.write_text('[[accounts]]\nname = "from-env"\n')
    option_file.write_text('[[accounts]]\nname = "from-option"\n')
    environ = {"JDCLOUD_ENDPOINT": LOCAL, "IMAGE_SYNC_CONFIG": str(env_file)}
    assert [a.name for a in _accounts(load_settings(environ))] == ["from-env"]
    chosen = load_settings(environ, option_file)
    assert [a.name for a in _accounts(chosen)] == ["from-option"]
    assert chosen.config == option_file


SECRET = "sk-inline-DO-NOT-ECHO"
MISTAKES: list[tuple[str, str, dict[str, str]]] = [
    # (what the line must name, the TOML, extra environment)
    ("accounts[0].secret_key", f'[[accounts]]\nname = "a"\nsecret_key = "{SECRET}"\n', {}),
    ("accounts[0].access_key", f'[[accounts]]\nname = "a"\naccess_key = "{SECRET}"\n', {}),
    ("accounts", '[[accounts]]\nname = "a"\n[[accounts]]\nname = "a"\n', {}),
    ("accounts[0].name", '[[accounts]]\nname = "Team A"\n', {}),
    ("accounts[0].name", '[[accounts]]\nname = "-a"\n', {}),
    ("accounts[0].name", '[[accounts]]\nregions = ["cn-north-1"]\n', {}),
    ("accounts[0].access_key_env", '[[accounts]]\nname = "a"\naccess_key_env = "NO_SUCH_AK"\n'
     'secret_key_env = "NO_SUCH_SK"\n', {}),
    ("accounts[0].secret_key_env", '[[accounts]]\nname = "a"\naccess_key_env = "AK"\n',
     {"AK": "x"}),
    ("accounts[0].access_key_file", '[[accounts]]\nname = "a"\n'
     'access_key_file = "/nonexistent/ak"\nsecret_key_file = "/nonexistent/sk"\n', {}),
    ("accounts[0].colour", f'[[accounts]]\nname = "a"\ncolour = "{SECRET}"\n', {}),
    ("accounts[0].role_jrn", '[[accounts]]\nname = "a"\nrole_jrn = "jrn:iam::1:role/r"\n', {}),
    ("accounts[0].role_jrn", '[[accounts]]\nname = "a"\nrole_jrn = "not-a-jrn"\n', {}),
    ("accounts[0].duration_seconds", '[[accounts]]\nname = "a"\nrole_jrn = "jrn:iam::1:role/r"\n'
     "duration_seconds = true\n", {}),
    ("accounts[0].duration_seconds", '[[accounts]]\nname = "a"\nrole_jrn = "jrn:iam::1:role/r"\n'
     "duration_seconds = 60\n", {}),
    ("accounts[0].regions", '[[accounts]]\nname = "a"\nregions = ["Not A Region"]\n', {}),
    ("accounts[0].regions", '[[accounts]]\nname = "a"\nregions = []\n', {}),
    ("accounts[0]", '[[accounts]]\nname = "a"\nrole_jrn = "jrn:iam::1:role/r"\n'
     'access_key_env = "AK"\nsecret_key_env = "SK"\n', {"AK": "x", "SK": "y"}),
    ("--config", 'accounts = "a,b"\n', {}),
]  # fmt: skip


def _env(**overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JDCLOUD_", "IMAGE_SYNC_"))}
    env.pop("DATABASE_URL", None)
    env.update({"IMAGE_SYNC_HTTP": "off", "IMAGE_SYNC_LOG_FORMAT": "json"})
    env.update(overrides)
    return env


@pytest.mark.parametrize(("named", "toml", "extra"), MISTAKES, ids=[m[0] for m in MISTAKES])
def test_every_mistake_is_one_line_exit_2(
    tmp_path: Path, named: str, toml: str, extra: dict[str, str]
) -> None:
    path = tmp_path / "accounts.toml"
    path.write_text(toml, encoding="utf-8")
    result = subprocess.run(
        [sys.executable, "-m", "service", "--config", str(path), "sync", "--once"],
        env=_env(JDCLOUD_ENDPOINT=LOCAL, **extra),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith(f"image-sync: configuration error: {named}"), lines[0]
    assert SECRET not in result.stderr + result.stdout


def test_a_missing_config_file_named_by_the_environment() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "service", "sync", "--once"],
        env=_env(JDCLOUD_ENDPOINT=LOCAL, IMAGE_SYNC_CONFIG="/nonexistent/c.toml"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "image-sync: configuration error: IMAGE_SYNC_CONFIG: no such file: /nonexistent/c.toml"
    )
