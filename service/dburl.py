"""``DATABASE_URL`` as libpq reads it, checked once and handed to asyncpg.

Managed PostgreSQL providers hand out libpq URLs (``?sslmode=verify-full&sslrootcert=
ca.pem``). asyncpg parses most libpq parameters of a DSN itself with libpq's meaning
(``sslmode``, ``sslrootcert``, ``sslcert``, ``sslkey``, ``target_session_attrs``, host
and port lists, ``?host=/socket/dir``, ``?user=``, ``?password=``) and sends what it does
not know as startup parameters (``options``, ``application_name``), so the service
passes it the DSN as given. Only ``connect_timeout`` would reach the server as an
unknown setting: it becomes asyncpg's ``timeout``. SQLAlchemy's own URL parsing is
bypassed on purpose: it would turn the query into keyword arguments asyncpg rejects.

Everything else is refused here (one line naming the parameter, exit 2) rather than
sent to the server, and the password, however given, is kept out of :meth:`display`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit

SCHEMES = ("postgresql", "postgres", "postgresql+asyncpg")
SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
SESSION_ATTRS = ("any", "read-write", "read-only", "primary", "standby", "prefer-standby")
FILE_PARAMETERS = ("sslrootcert", "sslcert", "sslkey")
PARAMETERS = frozenset(
    {"host", "port", "dbname", "user", "password", "sslmode", "application_name", "options"}
    | {"connect_timeout", "target_session_attrs", *FILE_PARAMETERS}
)
DEFAULT_APPLICATION_NAME = "image-sync"
DEFAULT_CONNECT_TIMEOUT = 10.0


@dataclass(frozen=True, slots=True)
class DatabaseUrl:
    """A checked ``DATABASE_URL``: what asyncpg gets, and what may be shown."""

    dsn: str = field(repr=False)
    """For asyncpg: the URL less ``connect_timeout`` and ``application_name``."""
    hosts: tuple[str, ...]
    ports: tuple[str, ...]
    user: str
    database: str
    password: str = field(repr=False)
    application_name: str = DEFAULT_APPLICATION_NAME
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT

    def display(self) -> str:
        """``postgresql://user@host:port/db``: never the password nor the query."""
        hosts = ",".join(
            f"{host}:{port}" if port and not host.startswith("/") else host
            for host, port in zip(self.hosts, self.ports or ("",) * len(self.hosts), strict=False)
        )
        user = f"{self.user}@" if self.user else ""
        return f"postgresql://{user}{hosts or 'localhost'}/{self.database}"

    @property
    def host_names(self) -> str:
        """Only the host(s): what the status page may show."""
        return ",".join(self.hosts) or "localhost"


def parse_database_url(url: str) -> DatabaseUrl:
    """Check ``url`` as libpq would; ValueError with one line naming what is wrong.

    The messages never quote the URL (it may carry the password)."""
    parts = urlsplit(url.strip())
    if parts.scheme not in SCHEMES:
        raise ValueError(
            "must be a postgresql:// URL, e.g. postgresql://user:password@host:5432/db"
        )
    try:
        query = parse_qsl(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
    except ValueError:
        raise ValueError("has a malformed query string") from None
    params = dict(query)
    for name in params:
        if name not in PARAMETERS:
            raise ValueError(_unsupported(name))
    userinfo, _, hostspec = parts.netloc.rpartition("@")
    user, _, password = userinfo.partition(":")
    hosts, ports = _hosts(unquote(params["host"]) if "host" in params else hostspec, params)
    database = params.get("dbname") or unquote(parts.path.lstrip("/"))
    if not database:
        raise ValueError("names no database, e.g. postgresql://host:5432/inventory")
    _check_values(params)
    passed = [(k, v) for k, v in query if k not in ("connect_timeout", "application_name")]
    scheme = "postgresql" if parts.scheme == "postgresql+asyncpg" else parts.scheme
    dsn = urlunsplit((scheme, parts.netloc, parts.path, urlencode(passed, quote_via=quote), ""))
    timeout = int(params.get("connect_timeout") or DEFAULT_CONNECT_TIMEOUT)
    return DatabaseUrl(
        dsn=dsn,
        hosts=hosts,
        ports=ports,
        user=params.get("user") or unquote(user),
        database=database,
        password=params.get("password") or unquote(password),
        application_name=params.get("application_name") or DEFAULT_APPLICATION_NAME,
        # libpq: 0 waits forever, and anything shorter than 2 s means 2 s.
        connect_timeout=max(timeout, 2) if timeout else 24 * 3600.0,
    )


def _unsupported(name: str) -> str:
    hint = "; use sslmode=require (libpq's name)" if name == "ssl" else ""
    return f"unsupported parameter {name!r}{hint} (supported: {', '.join(sorted(PARAMETERS))})"


def _hosts(hostspec: str, params: dict[str, str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The host list (unix-socket directories start with ``/``) and the port list."""
    hosts: list[str] = []
    ports: list[str] = []
    for spec in hostspec.split(",") if hostspec else []:
        spec = unquote(spec)
        if spec.startswith("/"):
            hosts.append(spec)
            ports.append("")
            continue
        if spec.startswith("["):
            host, _, rest = spec[1:].partition("]")
            port = rest.removeprefix(":")
        else:
            host, _, port = spec.partition(":")
        hosts.append(host)
        ports.append(port)
    if "port" in params:
        ports = params["port"].split(",")
    for port in ports:
        if port and not (port.isdigit() and 0 < int(port) < 65536):
            raise ValueError("has a bad port")
    if len(ports) > 1 and len(hosts) != len(ports):
        raise ValueError(f"lists {len(hosts)} hosts but {len(ports)} ports")
    return tuple(hosts), tuple(ports)


def _check_values(params: dict[str, str]) -> None:
    mode = params.get("sslmode")
    if mode is not None and mode not in SSLMODES:
        raise ValueError(f"sslmode={mode!r} is not one of {', '.join(SSLMODES)}")
    attrs = params.get("target_session_attrs")
    if attrs is not None and attrs not in SESSION_ATTRS:
        raise ValueError(f"target_session_attrs={attrs!r} is not one of {', '.join(SESSION_ATTRS)}")
    timeout = params.get("connect_timeout")
    if timeout is not None and not (timeout.isdigit() and int(timeout) <= 3600):
        raise ValueError(f"connect_timeout={timeout!r} is not a number of seconds (0-3600)")
    if params.get("sslrootcert") == "system":
        raise ValueError("sslrootcert=system is not supported: give the CA certificate's file")
    for name in FILE_PARAMETERS:
        path = params.get(name)
        if path and not os.access(os.path.expanduser(path), os.R_OK):
            raise ValueError(f"{name}: cannot read the file {path}")
