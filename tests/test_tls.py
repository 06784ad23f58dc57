"""TLS: the default endpoint is https and certificates are verified; a self-signed
https server is refused with a clear error; no setting turns verification off."""

from __future__ import annotations

import asyncio
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from service.config import DEFAULT_ENDPOINT, VARIABLES, Settings, load_settings
from service.errors import TransientApiError
from service.jdcloud.client import ImagesClient, open_session


def test_default_endpoint_is_https() -> None:
    assert DEFAULT_ENDPOINT.startswith("https://")
    settings = load_settings({"JDCLOUD_ACCESS_KEY": "ak", "JDCLOUD_SECRET_KEY": "sk"})
    assert settings.endpoint == DEFAULT_ENDPOINT and not settings.is_local_endpoint


def test_no_option_disables_verification() -> None:
    words = ("verify", "insecure", "ssl", "tls", "cert", "ca_")
    assert not [v for v in VARIABLES if any(w in v.lower() for w in words)]
    assert not [f for f in Settings.model_fields if any(w in f for w in words)]
    for name in ("IMAGE_SYNC_INSECURE", "IMAGE_SYNC_VERIFY_SSL", "IMAGE_SYNC_TLS_VERIFY"):
        # Unknown variables are simply not configuration: they cannot switch anything off.
        assert name not in VARIABLES
    source = Path("service/jdcloud/client.py").read_text()
    assert "ssl=False" not in source and "verify_ssl" not in source and "CERT_NONE" not in source


def _self_signed(tmp: Path) -> ssl.SSLContext:
    key, cert = tmp / "key.pem", tmp / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context


@pytest.fixture
async def https_server(tmp_path: Path) -> Any:
    async def images(request: web.Request) -> web.Response:
        return web.json_response({"requestId": "r", "result": {"images": [], "totalCount": 0}})

    app = web.Application()
    app.router.add_get("/v1/regions/{region}/images", images)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=_self_signed(tmp_path))
    await site.start()
    yield f"https://127.0.0.1:{runner.addresses[0][1]}"
    await runner.cleanup()


async def test_self_signed_https_is_refused(https_server: str) -> None:
    from service.jdcloud.signer import Credentials

    async with open_session(connect_timeout=5, request_timeout=5, limit=2) as session:
        client = ImagesClient(session, endpoint=https_server, credentials=Credentials("ak", "sk"),
                              rate_limit=0, max_attempts=1)  # fmt: skip
        with pytest.raises(TransientApiError) as caught:
            await client.describe_images("cn-north-1", image_source="public")
    assert "certificate" in str(caught.value).lower(), str(caught.value)


@pytest.mark.db
async def test_cli_refuses_self_signed_endpoint(
    https_server: str, cli_env: dict[str, str], engine: Any
) -> None:
    """Through the CLI: a clear per-partition certificate error, exit 1, no traceback."""
    env = {**cli_env, "JDCLOUD_ENDPOINT": https_server, "JDCLOUD_ACCESS_KEY": "ak",
           "JDCLOUD_SECRET_KEY": "sk", "IMAGE_SYNC_MAX_ATTEMPTS": "1",
           "IMAGE_SYNC_REGIONS": "cn-north-1", "IMAGE_SYNC_SOURCES": "private"}  # fmt: skip
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "service", "sync", "--once", env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _out, err = await asyncio.wait_for(proc.communicate(), 60)
    stderr = err.decode()
    assert proc.returncode == 1, stderr
    assert "Traceback" not in stderr
    assert "certificate" in stderr.lower(), stderr
