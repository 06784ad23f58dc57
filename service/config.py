"""Settings: environment variables, optionally a TOML file, validated once at start-up.

The variable names are part of the public contract (DESIGN.md). A TOML file given with
``--config`` may set the same keys (``IMAGE_SYNC_INTERVAL = 600``); the environment wins.
Every problem becomes a :class:`~service.errors.ConfigError` whose message is one line
naming the variable; the CLI prints it and exits 2.

Nothing here runs at import time: :func:`load_settings` builds a :class:`Settings` from
the mappings it is given.
"""

from __future__ import annotations

import difflib
import ipaddress
import logging
import re
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import platformdirs
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from service.dburl import parse_database_url
from service.errors import ConfigError

SOURCES: tuple[str, ...] = ("public", "thirdparty", "private", "shared", "community")
"""Every image source describeImages knows, in the order partitions are listed."""

OFFLINE_SOURCES = frozenset({"public", "thirdparty"})
"""Sources whose partition is two listings, ``offline=false`` and ``offline=true``."""

DEFAULT_ENDPOINT = "https://vm.jdcloud-api.com"
DEFAULT_STS_ENDPOINT = "https://sts.jdcloud-api.com"
DEFAULT_ACCOUNT = "default"
CATALOGUE_SOURCES: tuple[str, ...] = ("public", "thirdparty", "community")
"""Sources every account sees alike: listed once per region, with no account."""
ACCOUNT_SOURCES: tuple[str, ...] = ("private", "shared")
"""Sources whose listing depends on the account: one partition per (account, region)."""
ACCOUNT_NAME = r"^[a-z0-9][a-z0-9-]{0,62}$"
"""An account's name (DESIGN.md, Accounts): chosen by the operator, stable."""
ROLE_DURATION_RANGE = (900, 43200)
"""Seconds: the ``duration_seconds`` STS accepts for a role session."""
DEFAULT_REGIONS = "cn-north-1,cn-east-1,cn-east-2,cn-south-1"

REGION_RE = re.compile(r"^[a-z]{2}-[a-z0-9-]+$")
"""A region id like ``cn-north-1`` (the settings and the API client check it)."""

# Variable name -> model field name. The order is the order of --help and docs.
VARIABLES: dict[str, str] = {
    "DATABASE_URL": "database_url",
    "IMAGE_SYNC_DATA_DIR": "data_dir",
    "JDCLOUD_ACCESS_KEY": "access_key",
    "JDCLOUD_SECRET_KEY": "secret_key",
    "JDCLOUD_SECURITY_TOKEN": "security_token",
    "JDCLOUD_ENDPOINT": "endpoint",
    "JDCLOUD_STS_ENDPOINT": "sts_endpoint",
    "IMAGE_SYNC_ACCOUNT": "account",
    "IMAGE_SYNC_CONFIG": "config",
    "IMAGE_SYNC_REGIONS": "regions",
    "IMAGE_SYNC_SOURCES": "sources",
    "IMAGE_SYNC_INTERVAL": "interval",
    "IMAGE_SYNC_CONCURRENCY": "concurrency",
    "IMAGE_SYNC_RATE_LIMIT": "rate_limit",
    "IMAGE_SYNC_PAGE_SIZE": "page_size",
    "IMAGE_SYNC_HTTP": "http",
    "IMAGE_SYNC_LOG_FORMAT": "log_format",
    "IMAGE_SYNC_LOG_LEVEL": "log_level",
    "IMAGE_SYNC_GRACE_PERIOD": "grace_period",
    "IMAGE_SYNC_REQUEST_TIMEOUT": "request_timeout",
    "IMAGE_SYNC_CONNECT_TIMEOUT": "connect_timeout",
    "IMAGE_SYNC_MAX_ATTEMPTS": "max_attempts",
    "IMAGE_SYNC_MAX_URL_LENGTH": "max_url_length",
    "IMAGE_SYNC_STATEMENT_TIMEOUT": "statement_timeout",
    "IMAGE_SYNC_KEEP_RUNS_DAYS": "keep_runs_days",
    "IMAGE_SYNC_WEBHOOK_URL": "webhook_url",
    "IMAGE_SYNC_WEBHOOK_SECRET": "webhook_secret",
    "IMAGE_SYNC_WEBHOOK_FROM": "webhook_from",
    "IMAGE_SYNC_WEBHOOK_MAX_ATTEMPTS": "webhook_max_attempts",
    "IMAGE_SYNC_WEBHOOK_TIMEOUT": "webhook_timeout",
    **{f"IMAGE_SYNC_INTERVAL_{s.upper()}": f"interval_{s}" for s in SOURCES},
}
_FIELD_TO_VARIABLE = {v: k for k, v in VARIABLES.items()}

MIN_INTERVAL = 10.0
"""Seconds: the shortest sync interval accepted (also per source). Read when settings are
validated, so a test process may lower it before it loads settings."""
MAX_SECONDS = 366 * 86400.0
"""Upper bound of every duration setting: a finite value the scheduler and asyncio can use."""
NOT_SETTINGS = frozenset({"IMAGE_SYNC_IMAGE"})
"""``IMAGE_SYNC_*`` names that are not the service's settings: deploy/compose.yaml's image
override, which an env file may hand to the container too."""
_BOOLEAN_WORDS = frozenset({"true", "false", "yes", "no", "on", "off"})


def _split_list(value: Any) -> Any:
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split(",") if part.strip())
    if isinstance(value, list):
        return tuple(value)
    return value


def _none_if_blank(value: Any) -> Any:
    return None if isinstance(value, str) and not value.strip() else value


def region_id(value: Any) -> str:
    """``value`` when it is a region id like ``cn-north-1``; else ValueError saying so."""
    if not isinstance(value, str) or not REGION_RE.match(value):
        raise ValueError(f"{value!r} is not a region id like cn-north-1")
    return value


def webhook_url(value: str) -> str:
    """``value`` when it is an https URL, or http on a loopback host; else ValueError."""
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("is not an https URL like https://hooks.example.com/image-sync")
    if parts.scheme == "http" and not _is_loopback(parts.hostname):
        raise ValueError("must be https (plain http only to a loopback address)")
    try:
        parts.port  # noqa: B018 - validates the port
    except ValueError:
        raise ValueError("has a bad port") from None
    return value


def _public_url(url: str) -> str:
    """``url`` without user-info and query (where a token may hide): safe to show."""
    parts = urlsplit(url)
    netloc = parts.hostname or ""
    if ":" in netloc:
        netloc = f"[{netloc}]"
    if parts.port:
        netloc += f":{parts.port}"
    return f"{parts.scheme}://{netloc}{parts.path}"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class WebhookConfig(BaseModel):
    """One ``[[webhooks]]`` table of the TOML file. ``secret`` is filled from the
    environment variable ``secret_env`` names (a secret is never written in the file)."""

    model_config = ConfigDict(
        frozen=True, extra="forbid", str_strip_whitespace=True, populate_by_name=True
    )

    name: str | None = Field(default=None, pattern=r"^[a-z0-9][a-z0-9._-]{0,62}$")
    url: str
    secret_env: str = Field(min_length=1)
    secret: SecretStr | None = Field(default=None, exclude=True)
    event_types: tuple[str, ...] = ()
    sources: tuple[str, ...] = ()
    accounts: tuple[str, ...] = ()
    from_: Literal["end", "beginning"] = Field(default="end", alias="from")

    _url = field_validator("url")(webhook_url)

    @field_validator("sources")
    @classmethod
    def _sources(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for source in value:
            if source not in SOURCES:
                raise ValueError(f"unknown source {source!r}; known: {', '.join(SOURCES)}")
        return value


_INLINE_SECRETS = {
    "access_key": "access_key_env or access_key_file",
    "secret_key": "secret_key_env or secret_key_file",
    "security_token": "security_token_env",
    "secret": "secret_key_env or secret_key_file",
}


class AccountConfig(BaseModel):
    """One ``[[accounts]]`` table of the TOML file (DESIGN.md, Accounts).

    The key pair comes from the environment variables ``*_env`` name or from the files
    ``*_file`` name (never written in the file itself); or the account is a role
    (``role_jrn``) assumed with the base pair; or neither: the base pair itself. The
    secrets are filled in by :func:`load_settings` (``access_key``, ``secret_key``,
    ``security_token``; excluded from dumps)."""

    model_config = ConfigDict(frozen=True, extra="forbid", str_strip_whitespace=True)

    name: str = Field(pattern=ACCOUNT_NAME)
    access_key_env: str | None = Field(default=None, min_length=1)
    secret_key_env: str | None = Field(default=None, min_length=1)
    security_token_env: str | None = Field(default=None, min_length=1)
    access_key_file: Path | None = None
    secret_key_file: Path | None = None
    role_jrn: str | None = Field(default=None, pattern=r"^jrn:[^\s]+$")
    duration_seconds: int = Field(
        default=3600, ge=ROLE_DURATION_RANGE[0], le=ROLE_DURATION_RANGE[1], strict=True
    )
    session_name: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.@=,-]{2,64}$")
    regions: tuple[str, ...] | None = None
    access_key: str | None = Field(default=None, exclude=True)
    secret_key: SecretStr | None = Field(default=None, exclude=True)
    security_token: SecretStr | None = Field(default=None, exclude=True)

    @field_validator("regions", mode="before")
    @classmethod
    def _regions(cls, value: Any) -> Any:
        if value is None:
            return None
        if not isinstance(value, list) or not value:
            raise ValueError('must be a non-empty list of region ids, e.g. ["cn-north-1"]')
        return tuple(dict.fromkeys(region_id(region) for region in value))

    @property
    def kind(self) -> Literal["env", "file", "role", "base"]:
        if self.role_jrn is not None:
            return "role"
        if self.access_key_env is not None or self.secret_key_env is not None:
            return "env"
        if self.access_key_file is not None or self.secret_key_file is not None:
            return "file"
        return "base"


class Settings(BaseModel):
    """The validated configuration. Secrets are :class:`SecretStr`, never printed."""

    model_config = ConfigDict(
        frozen=True, extra="forbid", str_strip_whitespace=True, allow_inf_nan=False
    )

    database_url: SecretStr | None = None
    data_dir: Path = Field(
        default_factory=lambda: Path(platformdirs.user_data_dir("jdcloud-image-sync"))
    )
    access_key: str | None = None
    secret_key: SecretStr | None = None
    security_token: SecretStr | None = None
    endpoint: str = DEFAULT_ENDPOINT
    sts_endpoint: str = DEFAULT_STS_ENDPOINT
    account: str = Field(default=DEFAULT_ACCOUNT, pattern=ACCOUNT_NAME)
    config: Path | None = None
    regions: tuple[str, ...] = tuple(DEFAULT_REGIONS.split(","))
    sources: tuple[str, ...] = SOURCES
    interval: float = Field(default=900, gt=0, le=MAX_SECONDS)
    concurrency: int = Field(default=16, ge=1, le=1024)
    rate_limit: float = Field(default=10, ge=0, le=1e6)
    page_size: int = Field(default=100, ge=10, le=100)
    http: str = "127.0.0.1:8080"
    log_format: Literal["text", "json"] | None = None
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    grace_period: float = Field(default=30, ge=0, le=MAX_SECONDS)
    request_timeout: float = Field(default=30, gt=0, le=MAX_SECONDS)
    connect_timeout: float = Field(default=10, gt=0, le=MAX_SECONDS)
    max_attempts: int = Field(default=6, ge=1, le=50)
    max_url_length: int = Field(default=4096, ge=512, le=1_000_000)
    statement_timeout: float = Field(default=300, ge=0, le=MAX_SECONDS)
    keep_runs_days: int = Field(default=90, ge=1, le=36500)
    interval_public: float | None = Field(default=None, gt=0, le=MAX_SECONDS)
    interval_thirdparty: float | None = Field(default=None, gt=0, le=MAX_SECONDS)
    interval_private: float | None = Field(default=None, gt=0, le=MAX_SECONDS)
    interval_shared: float | None = Field(default=None, gt=0, le=MAX_SECONDS)
    interval_community: float | None = Field(default=None, gt=0, le=MAX_SECONDS)
    webhook_url: str | None = None
    webhook_secret: SecretStr | None = None
    webhook_from: Literal["end", "beginning"] = "end"
    webhook_max_attempts: int = Field(default=5, ge=1, le=50)
    webhook_timeout: float = Field(default=10, gt=0, le=300)
    webhooks: tuple[WebhookConfig, ...] = ()
    accounts: tuple[AccountConfig, ...] = ()

    _blank_is_none = field_validator(
        "database_url",
        "access_key",
        "secret_key",
        "security_token",
        "log_format",
        "webhook_url",
        "webhook_secret",
        *(f"interval_{s}" for s in SOURCES),
        mode="before",
    )(_none_if_blank)

    @field_validator("*", mode="before")
    @classmethod
    def _numbers_are_not_booleans(cls, value: Any, info: ValidationInfo) -> Any:
        # pydantic's lax mode reads TOML's `true` as 1: refuse it where a number is due.
        field_name = info.field_name or ""
        if cls.model_fields[field_name].annotation not in _NUMERIC:
            return value
        if isinstance(value, bool) or (
            isinstance(value, str) and value.strip().lower() in _BOOLEAN_WORDS
        ):
            raise ValueError("must be a number, not a boolean")
        return value

    @field_validator("interval", *(f"interval_{s}" for s in SOURCES))
    @classmethod
    def _interval(cls, value: float | None) -> float | None:
        if value is not None and value < MIN_INTERVAL:
            raise ValueError(f"must be at least {MIN_INTERVAL:g} seconds")
        return value

    @field_validator("access_key", "secret_key", "security_token", mode="before")
    @classmethod
    def _printable(cls, value: Any) -> Any:
        # A control character (a newline pasted with the key) would reach an HTTP header.
        if isinstance(value, str) and any(ord(c) < 0x20 or ord(c) == 0x7F for c in value.strip()):
            raise ValueError("contains a control character (a newline?); the value is not shown")
        return value

    @field_validator("webhook_url")
    @classmethod
    def _webhook_url(cls, value: str | None) -> str | None:
        return None if value is None else webhook_url(value)

    @field_validator("webhook_from", mode="before")
    @classmethod
    def _webhook_from(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    @field_validator("log_format", "log_level", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    @field_validator("regions", mode="before")
    @classmethod
    def _regions(cls, value: Any) -> Any:
        regions = _split_list(value)
        if not regions:
            raise ValueError("needs at least one region, e.g. cn-north-1")
        return tuple(dict.fromkeys(region_id(region) for region in regions))

    @field_validator("sources", mode="before")
    @classmethod
    def _sources(cls, value: Any) -> Any:
        sources = _split_list(value)
        if not sources:
            raise ValueError(f"needs at least one of {', '.join(SOURCES)}")
        for source in sources:
            if source not in SOURCES:
                raise ValueError(f"unknown source {source!r}; known: {', '.join(SOURCES)}")
        return tuple(dict.fromkeys(sources))

    @field_validator("accounts")
    @classmethod
    def _unique_accounts(cls, value: tuple[AccountConfig, ...]) -> tuple[AccountConfig, ...]:
        seen: set[str] = set()
        for entry in value:
            if entry.name in seen:
                raise ValueError(f"the account name {entry.name!r} is given twice")
            seen.add(entry.name)
        return value

    @field_validator("endpoint", "sts_endpoint")
    @classmethod
    def _endpoint(cls, value: str) -> str:
        parts = urlsplit(value)
        if "@" in parts.netloc:
            # Not quoted: user:password@ would echo a secret.
            raise ValueError(
                "must not carry credentials (user:password@): the key pair goes in "
                "JDCLOUD_ACCESS_KEY and JDCLOUD_SECRET_KEY"
            )
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{value!r} is not an http(s) URL like {DEFAULT_ENDPOINT}")
        if parts.query or parts.fragment:
            raise ValueError("must be a base URL without query or fragment")
        try:
            parts.port  # noqa: B018 - validates the port
        except ValueError as exc:
            raise ValueError(f"bad port in {value!r}") from exc
        return value.rstrip("/")

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            parse_database_url(value.get_secret_value())
        return value

    @field_validator("http")
    @classmethod
    def _http(cls, value: str) -> str:
        if value.lower() == "off":
            return "off"
        _host, sep, port = value.rpartition(":")
        if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError(f"{value!r} is not host:port (e.g. 127.0.0.1:8080) or 'off'")
        return value

    # -- derived values ---------------------------------------------------------------

    @property
    def is_local_endpoint(self) -> bool:
        """True for a plain-http loopback endpoint: the built-in simulator or a test server."""
        parts = urlsplit(self.endpoint)
        return parts.scheme == "http" and _is_loopback(parts.hostname or "")

    @property
    def http_address(self) -> tuple[str, int] | None:
        """The status server's (host, port), or None when ``IMAGE_SYNC_HTTP=off``."""
        if self.http == "off":
            return None
        host, _, port = self.http.rpartition(":")
        return host.strip("[]"), int(port)

    def interval_for(self, source: str) -> float:
        """Seconds between syncs of one source's partitions."""
        override: float | None = getattr(self, f"interval_{source}")
        return override if override is not None else self.interval

    @property
    def tick_interval(self) -> float:
        """Seconds between the daemon's ticks: the shortest of the sources' intervals."""
        return min(self.interval_for(source) for source in self.sources)

    def secret_values(self) -> list[str]:
        """Every secret the settings hold (for the log redactor); session tokens that STS
        hands out later are added by their owner."""
        values = [
            self.secret_key.get_secret_value() if self.secret_key else "",
            self.security_token.get_secret_value() if self.security_token else "",
        ]
        for entry in self.accounts:
            for secret in (entry.secret_key, entry.security_token):
                if secret is not None:
                    values.append(secret.get_secret_value())
        return [value for value in values if value]

    def redacted(self) -> dict[str, str]:
        """Every variable with its effective value, secrets masked: for logs and --help."""
        out: dict[str, str] = {}
        for variable, name in VARIABLES.items():
            value = getattr(self, name)
            if name == "database_url" and value is not None:
                out[variable] = parse_database_url(value.get_secret_value()).display()
            elif name == "config":
                out[variable] = "" if value is None else str(value)
            elif name == "webhook_url" and value is not None:
                out[variable] = _public_url(value)
            elif isinstance(value, SecretStr):
                out[variable] = "********"
            elif isinstance(value, tuple):
                out[variable] = ",".join(value)
            else:
                out[variable] = "" if value is None else str(value)
        return out


_NUMERIC = (int, float, int | None, float | None)


def known_variables() -> frozenset[str]:
    """Every variable name the service reads: one per :class:`Settings` field (its name in
    VARIABLES, else its alias, else ``IMAGE_SYNC_<FIELD>``), each also as ``<NAME>_FILE``."""
    names = set(VARIABLES)
    for name, info in Settings.model_fields.items():
        names.add(info.alias or _FIELD_TO_VARIABLE.get(name) or f"IMAGE_SYNC_{name.upper()}")
    return frozenset(names | {f"{name}_FILE" for name in names})


def _closest(name: str, known: frozenset[str] | set[str]) -> str:
    """`` (did you mean X?)`` for the known name most like ``name``, or ``""``."""
    match = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.8)
    return f" (did you mean {match[0]}?)" if match else ""


def check_variable_names(environ: Mapping[str, str], warn: Callable[[str], None]) -> None:
    """An unknown ``IMAGE_SYNC_*`` variable is a :class:`ConfigError` naming the closest known
    one (a typo would otherwise be silently ignored); an unknown ``JDCLOUD_*`` one only a
    warning, since other JD Cloud tools share the prefix."""
    known = known_variables()
    for name in sorted(environ):
        if name in known or name in NOT_SETTINGS:
            continue
        if name.startswith("IMAGE_SYNC_"):
            raise ConfigError(name, f"unknown variable{_closest(name, known)}")
        if name.startswith("JDCLOUD_"):
            warn(f"{name}: not a variable of image-sync, ignored{_closest(name, known)}")


def load_settings(
    environ: Mapping[str, str],
    config_file: Path | str | None = None,
    *,
    needs_api: bool = True,
    warn: Callable[[str], None] | None = None,
    **overrides: Any,
) -> Settings:
    """Validate settings from a TOML file (optional), the environment and ``overrides``.

    ``needs_api=False`` is for commands that only use the database (migrate, status,
    check, schema-doc): they do not require API credentials. Raises
    :class:`ConfigError` naming the first bad variable; ``warn`` receives the warning
    lines (unknown ``JDCLOUD_*`` variables), by default the log.
    """
    check_variable_names(environ, warn or logging.getLogger(__name__).warning)
    raw: dict[str, Any] = {}
    config_name = "--config"
    if config_file is None and environ.get("IMAGE_SYNC_CONFIG", "").strip():
        config_file, config_name = environ["IMAGE_SYNC_CONFIG"].strip(), "IMAGE_SYNC_CONFIG"
    if config_file is not None:
        raw.update(_read_toml(Path(config_file), config_name))
    environ = {**environ, **_read_secret_files(environ)}
    raw.update({VARIABLES[name]: value for name, value in environ.items() if name in VARIABLES})
    raw.update({k: v for k, v in overrides.items() if v is not None})
    if config_file is not None:
        raw["config"] = str(config_file)  # the file read, whichever way it was named
    settings = _validated(raw)
    settings = _webhook_secrets(settings, environ)
    settings = _account_secrets(settings, environ)
    _check_key_pairs(settings, needs_api=needs_api)
    return settings


def _validated(raw: dict[str, Any]) -> Settings:
    """``Settings`` from the merged raw values; the first problem as one ConfigError."""
    try:
        return Settings.model_validate(raw)
    except ValidationError as exc:
        error = exc.errors()[0]
        name = str(error["loc"][0]) if error["loc"] else ""
        variable = _FIELD_TO_VARIABLE.get(name, name or "configuration")
        if name in ("webhooks", "accounts") and len(error["loc"]) > 1:
            variable = f"{name}[{error['loc'][1]}]" + "".join(f".{p}" for p in error["loc"][2:])
        message = str(error["msg"]).removeprefix("Value error, ")
        value = error.get("input")
        if name == "accounts" and error["type"] == "extra_forbidden":
            message, value = "unknown key", None  # its value may be a secret: not shown
        if name not in (
            "database_url",
            "access_key",
            "secret_key",
            "security_token",
            "endpoint",
        ) and isinstance(value, str | int | float):
            message = f"{message} (got {value!r})"
        # Not chained: pydantic's error carries the input, which may be a secret.
        raise ConfigError(variable, message) from None


def _check_key_pairs(settings: Settings, *, needs_api: bool) -> None:
    """Half a key pair, a role without the base pair, or no key pair for a real endpoint
    (where an account uses the base pair) is a ConfigError."""
    if bool(settings.access_key) != (settings.secret_key is not None):
        # Half a key pair is a mistake on any endpoint (the simulator's demo pair
        # would otherwise be used silently).
        missing = "JDCLOUD_SECRET_KEY" if settings.access_key else "JDCLOUD_ACCESS_KEY"
        other = "JDCLOUD_ACCESS_KEY" if settings.access_key else "JDCLOUD_SECRET_KEY"
        raise ConfigError(missing, f"required when {other} is set")
    base_needed = not settings.accounts or any(entry.kind == "base" for entry in settings.accounts)
    for index, entry in enumerate(settings.accounts):
        if entry.kind == "role" and not settings.access_key:
            # A role is assumed with the base pair; the demo pair assumes nothing.
            raise ConfigError(
                f"accounts[{index}].role_jrn",
                "a role is assumed with the base pair: set JDCLOUD_ACCESS_KEY and "
                "JDCLOUD_SECRET_KEY",
            )
    if needs_api and base_needed and not settings.is_local_endpoint:
        if not settings.access_key:
            raise ConfigError(
                "JDCLOUD_ACCESS_KEY", f"required for the endpoint {settings.endpoint}"
            )
        if settings.secret_key is None:
            raise ConfigError(
                "JDCLOUD_SECRET_KEY", f"required for the endpoint {settings.endpoint}"
            )


FILE_VARIABLES = ("DATABASE_URL", "JDCLOUD_ACCESS_KEY", "JDCLOUD_SECRET_KEY")
"""Variables that may instead be read from a mounted file named by ``<NAME>_FILE``."""


def _read_secret_files(environ: Mapping[str, str]) -> dict[str, str]:
    """``DATABASE_URL`` from ``DATABASE_URL_FILE`` and so on: each file's text, stripped."""
    out: dict[str, str] = {}
    for name in FILE_VARIABLES:
        path = environ.get(f"{name}_FILE")
        if not path:
            continue
        if environ.get(name):
            raise ConfigError(f"{name}_FILE", f"set only one of {name} and {name}_FILE")
        try:
            out[name] = Path(path).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "not text"
            raise ConfigError(f"{name}_FILE", f"cannot read {path}: {reason}") from exc
    return out


def _webhook_secrets(settings: Settings, environ: Mapping[str, str]) -> Settings:
    """Fill each ``[[webhooks]]`` secret from its ``secret_env`` variable; require the
    secret of ``IMAGE_SYNC_WEBHOOK_URL``."""
    if settings.webhook_url and settings.webhook_secret is None:
        raise ConfigError(
            "IMAGE_SYNC_WEBHOOK_SECRET", "required when IMAGE_SYNC_WEBHOOK_URL is set"
        )
    if settings.webhook_secret is not None and not settings.webhook_url:
        raise ConfigError("IMAGE_SYNC_WEBHOOK_SECRET", "set without IMAGE_SYNC_WEBHOOK_URL")
    hooks = []
    for index, hook in enumerate(settings.webhooks):
        secret = environ.get(hook.secret_env, "").strip()
        if not secret:
            raise ConfigError(
                f"webhooks[{index}].secret_env", f"the variable {hook.secret_env} is not set"
            )
        hooks.append(hook.model_copy(update={"secret": SecretStr(secret)}))
    return settings.model_copy(update={"webhooks": tuple(hooks)})


def _read_toml(path: Path, name: str = "--config") -> dict[str, Any]:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(name, f"no such file: {path}") from exc
    except IsADirectoryError as exc:
        raise ConfigError(name, f"{path} is a directory, not a TOML file") from exc
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "not text"
        raise ConfigError(name, f"cannot read {path}: {reason}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(name, f"{path} is not valid TOML: {exc}") from exc
    out: dict[str, Any] = {}
    for key, value in data.items():
        if key == "webhooks":  # [[webhooks]]: a list of tables, not a variable
            out["webhooks"] = value
            continue
        if key == "accounts":  # [[accounts]]
            out["accounts"] = _account_tables(value, path, name)
            continue
        variable = key.upper()
        if variable not in VARIABLES or variable == "IMAGE_SYNC_CONFIG":
            raise ConfigError(
                name, f"{path}: unknown key {key!r}{_closest(variable, set(VARIABLES))}"
            )
        out[VARIABLES[variable]] = value
    return out


def _account_tables(value: Any, path: Path, name: str) -> list[Any]:
    """The ``[[accounts]]`` tables; a secret written inline is refused here, before
    validation, so that no message can echo it."""
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise ConfigError(name, f"{path}: accounts must be [[accounts]] tables")
    for index, table in enumerate(value):
        for key in table:
            if key in _INLINE_SECRETS:
                raise ConfigError(
                    f"accounts[{index}].{key}",
                    "a secret is never written in the configuration file: name it with "
                    f"{_INLINE_SECRETS[key]} (the value is not shown)",
                )
    return value


def _account_secrets(settings: Settings, environ: Mapping[str, str]) -> Settings:
    """Fill each ``[[accounts]]`` key pair from the variables or files it names; check
    that an entry is exactly one kind (key pair from env, from files, role, base)."""
    entries = []
    for index, entry in enumerate(settings.accounts):
        where = f"accounts[{index}]"
        env_keys = [k for k in ("access_key_env", "secret_key_env", "security_token_env")
                    if getattr(entry, k) is not None]  # fmt: skip
        file_keys = [k for k in ("access_key_file", "secret_key_file") if getattr(entry, k)]
        kinds = [kind for kind, used in (
            ("access_key_env/secret_key_env", env_keys),
            ("access_key_file/secret_key_file", file_keys),
            ("role_jrn", entry.role_jrn is not None),
        ) if used]  # fmt: skip
        if len(kinds) > 1:
            raise ConfigError(f"{where}", f"give only one of {' or '.join(kinds)}")
        if entry.role_jrn is None and (entry.session_name or "duration_seconds" in (
            entry.model_fields_set
        )):  # fmt: skip
            raise ConfigError(f"{where}.role_jrn", "session_name/duration_seconds need a role_jrn")
        update: dict[str, Any] = {}
        if env_keys:
            for key in ("access_key_env", "secret_key_env"):
                if getattr(entry, key) is None:
                    raise ConfigError(f"{where}.{key}", f"required with {env_keys[0]}")
            for key, target in (
                ("access_key_env", "access_key"),
                ("secret_key_env", "secret_key"),
                ("security_token_env", "security_token"),
            ):
                variable = getattr(entry, key)
                if variable is None:
                    continue
                value = environ.get(variable, "").strip()
                if not value:
                    raise ConfigError(f"{where}.{key}", f"the variable {variable} is not set")
                update[target] = value
        elif file_keys:
            for key, target in (
                ("access_key_file", "access_key"),
                ("secret_key_file", "secret_key"),
            ):
                path = getattr(entry, key)
                if path is None:
                    raise ConfigError(f"{where}.{key}", f"required with {file_keys[0]}")
                update[target] = _read_secret_file(f"{where}.{key}", Path(path))
        for target in ("access_key", "secret_key", "security_token"):
            found: str | None = update.get(target)
            if found is None:
                continue
            if any(ord(c) < 0x20 or ord(c) == 0x7F for c in found):
                named = f"{target}_env" if env_keys else f"{target}_file"
                raise ConfigError(
                    f"{where}.{named}", "contains a control character; the value is not shown"
                )
            if target != "access_key":
                update[target] = SecretStr(found)
        entries.append(entry.model_copy(update=update) if update else entry)
    return settings.model_copy(update={"accounts": tuple(entries)})


def _read_secret_file(where: str, path: Path) -> str:
    try:
        value = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "not text"
        raise ConfigError(where, f"cannot read {path}: {reason}") from None
    if not value:
        raise ConfigError(where, f"{path} is empty")
    return value
