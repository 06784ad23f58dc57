"""STS AssumeRole: the request byte-identical to the official SDK's StsClient, the
credentials cached per role and renewed before they expire, a 401 renewing once."""

from __future__ import annotations

import asyncio
import base64
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from jdcloud_sdk.core.config import Config
from jdcloud_sdk.core.credential import Credential
from jdcloud_sdk.core.logger import Logger
from jdcloud_sdk.services.sts.apis.AssumeRoleRequest import (
    AssumeRoleParameters,
    AssumeRoleRequest,
)
from jdcloud_sdk.services.sts.client.StsClient import StsClient as SdkStsClient
from jdcloud_sdk.services.sts.models.AssumeRoleInfo import AssumeRoleInfo

from service.errors import AuthError, PermanentApiError
from service.jdcloud.signer import Credentials, verify_request
from service.jdcloud.sts import RoleCredentials, RoleSpec, StsClient, assume_role_request
from tests.local_api import EMPTY_PAGE, local_api

pytestmark = pytest.mark.filterwarnings(
    "ignore:datetime.datetime.utcfromtimestamp:DeprecationWarning"
)

DATE = "20261202T011500Z"
NONCE = "0b9f3a52-3c1e-4f57-a7d4-6b2a1e0c9d11"
AK, SK = "AKBASE0123456789", "sk/base+secret=1"
ROLE = RoleSpec("jrn:iam::812345678:role/image-reader", "image-sync-audit", 3600)
ANSWER = {
    "requestId": "r1",
    "result": {
        "credentials": {
            "accessKey": "TMPAK000",
            "secretKey": "TMPSK-secret-000",
            "sessionToken": "session-token-000",
            "expiration": "2099-01-01 08:00:00",
        }
    },
}


async def _empty(request: web.Request) -> web.Response:
    return web.json_response(EMPTY_PAGE)


def _capturing(seen: list[dict[str, Any]], answer: Any = ANSWER, status: int = 200) -> Any:
    async def handler(request: web.Request) -> web.Response:
        seen.append(
            {
                "path": request.rel_url.raw_path,
                "host": request.host,
                "headers": dict(request.headers),
                "body": await request.read(),
            }
        )
        return web.json_response(answer, status=status)

    return handler


@pytest.mark.parametrize("token", [None, "base-session-token-7"])
async def test_assume_role_request_is_byte_identical_to_the_sdks(token: str | None) -> None:
    seen: list[dict[str, Any]] = []
    routes = {"POST /v1/sessionToken:assumeRole": _capturing(seen)}
    async with local_api(_empty, routes) as url:
        host_port = url.removeprefix("http://")
        header = {"x-jdcloud-date": DATE, "x-jdcloud-nonce": NONCE}
        if token:
            header["x-jdcloud-security-token"] = token
        sdk = SdkStsClient(
            Credential(AK, SK), Config(host_port, scheme="http", timeout=10), Logger(0)
        )
        info = AssumeRoleInfo(ROLE.role_jrn, ROLE.session_name, durationSeconds=3600)
        request = AssumeRoleRequest(AssumeRoleParameters(info), header=header)
        response = await asyncio.to_thread(sdk.send, request)
        assert response.error is None
        assert response.result["credentials"]["accessKey"] == "TMPAK000"
        (sent,) = seen
        ours = assume_role_request(
            endpoint=url,
            base=Credentials(AK, SK, token),
            role=ROLE,
            user_agent="x",
            date=DATE,
            nonce=NONCE,
        )
    assert ours.url == f"{url}{sent['path']}"
    assert ours.body == sent["body"]
    for name in ("Authorization", "x-jdcloud-content-sha256", "x-jdcloud-date", "x-jdcloud-nonce"):
        assert ours.headers[name] == sent["headers"][name], name
    if token:
        encoded = base64.b64encode(token.encode()).decode()
        assert ours.headers["x-jdcloud-security-token"] == encoded
        assert sent["headers"]["x-jdcloud-security-token"] == encoded
    assert "/jdcloud-api/sts/jdcloud3_request" in ours.headers["Authorization"]


async def test_sts_client_sends_a_request_the_gateway_accepts() -> None:
    seen: list[dict[str, Any]] = []
    routes = {"POST /v1/sessionToken:assumeRole": _capturing(seen)}
    async with local_api(_empty, routes) as url, aiohttp.ClientSession() as session:
        issued = await StsClient(session, endpoint=url, base=Credentials(AK, SK)).assume_role(ROLE)
    assert issued.credentials == Credentials("TMPAK000", "TMPSK-secret-000", "session-token-000")
    assert issued.expires_at.isoformat() == "2099-01-01T08:00:00+08:00"
    (sent,) = seen
    reason = verify_request(
        method="POST",
        host=sent["host"],
        path=sent["path"],
        query="",
        headers=sent["headers"],
        body=sent["body"],
        secret_for=lambda key: SK if key == AK else None,
    )
    assert reason is None


@pytest.mark.parametrize(
    ("status", "error", "kind"),
    [
        (403, "HTTP_FORBIDDEN", AuthError),
        (401, "UNAUTHENTICATED", AuthError),
        (404, "NOT_FOUND", PermanentApiError),
    ],
)
async def test_refusals_are_typed_and_never_echo_a_secret(
    status: int, error: str, kind: type[Exception]
) -> None:
    answer = {"requestId": "r", "error": {"code": status, "status": error, "message": "no role"}}
    routes = {"POST /v1/sessionToken:assumeRole": _capturing([], answer, status)}
    async with local_api(_empty, routes) as url, aiohttp.ClientSession() as session:
        with pytest.raises(kind) as caught:
            await StsClient(session, endpoint=url, base=Credentials(AK, SK)).assume_role(ROLE)
    assert ROLE.role_jrn in str(caught.value) and "no role" in str(caught.value)
    assert SK not in str(caught.value)


async def test_role_credentials_are_cached_renewed_early_and_once() -> None:
    """A first lifetime of 2-3 s (whole seconds), shorter than a request's 1 s plus the
    margin: used for its first half, by one assumeRole however many callers wait; then
    renewed before it expires; a refusal renews once however many requests saw it."""
    issued = 0

    async def answer(request: web.Request) -> web.Response:
        nonlocal issued
        issued += 1
        await asyncio.sleep(0.05)  # concurrent callers pile up on the renewal
        expires = datetime.now(UTC) + timedelta(seconds=30 if issued > 1 else 3)
        beijing = expires.astimezone(timezone(timedelta(hours=8)))
        creds = {
            "accessKey": f"TMP{issued}",
            "secretKey": f"secret-{issued}",
            "sessionToken": f"token-{issued}",
            "expiration": beijing.strftime("%Y-%m-%d %H:%M:%S"),
        }
        return web.json_response({"requestId": "r", "result": {"credentials": creds}})

    routes = {"POST /v1/sessionToken:assumeRole": answer}
    secrets: list[str] = []
    async with local_api(_empty, routes) as url, aiohttp.ClientSession() as session:
        sts = StsClient(session, endpoint=url, base=Credentials(AK, SK))
        role = RoleCredentials(sts, ROLE, valid_for=1.0, on_secret=secrets.append)
        first = await asyncio.gather(*(role.get() for _ in range(20)))
        assert {c.access_key for c in first} == {"TMP1"} and sts.calls == 1
        # Past half its lifetime: renewed on the next get.
        await asyncio.sleep(2.0)
        again = await asyncio.gather(*(role.get() for _ in range(5)))
        assert {c.access_key for c in again} == {"TMP2"} and sts.calls == 2
        # Ten requests refused with the same credentials: one renewal.
        retried = await asyncio.gather(*(role.renew_after_refusal(again[0]) for _ in range(10)))
        assert {c.access_key for c in retried} == {"TMP3"} and sts.calls == 3
        # A refusal of credentials already replaced renews nothing.
        assert (await role.renew_after_refusal(first[0])).access_key == "TMP3"
        assert sts.calls == 3
    assert {"secret-1", "token-1", "secret-3", "token-3"} <= set(secrets)
