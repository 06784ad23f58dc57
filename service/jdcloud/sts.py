"""STS AssumeRole: temporary credentials of a role, cached and renewed before they expire.

JD Cloud reaches other accounts through roles (there is no organisation API): the base
pair calls ``POST {JDCLOUD_STS_ENDPOINT}/v1/sessionToken:assumeRole`` with the JSON body
the SDK's ``StsClient`` + ``AssumeRoleRequest`` send (``{"assumeRoleInfo": {"roleJrn",
"roleSessionName", "policy": null, "durationSeconds"}}``, serialised as ``json.dumps``
does), signed JDCLOUD3 with service ``sts`` and region ``jdcloud-api``. The answer's
``result.credentials`` ``{accessKey, secretKey, sessionToken, expiration}`` (expiration
``yyyy-MM-dd HH:mm:ss``, Beijing time) become :class:`~service.jdcloud.signer.Credentials`.

:class:`RoleCredentials` owns one role's credentials: :meth:`~RoleCredentials.get` hands
out credentials valid for at least the time a request may take (renewing first when they
would expire sooner, one renewal at a time however many requests wait), and
:meth:`~RoleCredentials.renew_after_refusal` renews once after a 401 unless another
request already did. The session token and secret never reach a log line or message:
every new secret is passed to ``on_secret`` (the CLI's log redactor) before it is used.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from urllib.parse import urlsplit

import aiohttp
import orjson

from service.errors import ApiError, AuthError, PermanentApiError, TransientApiError
from service.jdcloud.signer import Credentials, sign_headers

__all__ = [
    "ASSUME_ROLE_PATH",
    "STS_REGION",
    "STS_SERVICE",
    "AssumeRoleRequest",
    "RoleCredentials",
    "RoleSpec",
    "StsClient",
    "TemporaryCredentials",
    "assume_role_request",
]

STS_SERVICE = "sts"
STS_REGION = "jdcloud-api"
"""The signing scope of STS calls (the SDK's StsClient: service ``sts``, no regionId)."""
ASSUME_ROLE_PATH = "/v1/sessionToken:assumeRole"
BEIJING = timezone(timedelta(hours=8))
EXPIRATION_FORMAT = "%Y-%m-%d %H:%M:%S"
RENEW_MARGIN = 5.0
"""Seconds of validity kept in reserve beyond a request's own timeout (clock skew)."""


@dataclass(frozen=True, slots=True)
class RoleSpec:
    """A role assumed through STS with the base pair."""

    role_jrn: str
    session_name: str
    duration_seconds: int


@dataclass(frozen=True, slots=True)
class TemporaryCredentials:
    """Credentials from AssumeRole and when they stop working (``expires_at``, UTC)."""

    credentials: Credentials
    expires_at: datetime

    def seconds_left(self, now: float | None = None) -> float:
        return self.expires_at.timestamp() - (time.time() if now is None else now)


@dataclass(frozen=True, slots=True)
class AssumeRoleRequest:
    """One signed assumeRole request, ready to send: ``url``, ``headers``, ``body``."""

    url: str
    headers: dict[str, str]
    body: bytes


def assume_role_request(
    *,
    endpoint: str,
    base: Credentials,
    role: RoleSpec,
    user_agent: str,
    date: str | None = None,
    nonce: str | None = None,
) -> AssumeRoleRequest:
    """The assumeRole request as the SDK's StsClient builds and signs it (``date`` and
    ``nonce`` default to now and a random UUID; tests fix them)."""
    parts = urlsplit(endpoint)
    body = json.dumps(
        {
            "assumeRoleInfo": {
                "roleJrn": role.role_jrn,
                "roleSessionName": role.session_name,
                "policy": None,
                "durationSeconds": role.duration_seconds,
            }
        }
    ).encode()
    path = parts.path.rstrip("/") + ASSUME_ROLE_PATH
    headers = {"Content-Type": "application/json"}
    headers.update(
        sign_headers(
            method="POST",
            host=parts.netloc,
            path=path,
            query="",
            headers=headers,
            body=body,
            access_key=base.access_key,
            secret_key=base.secret_key,
            region=STS_REGION,
            service=STS_SERVICE,
            security_token=base.security_token,
            date=date,
            nonce=nonce,
        )
    )
    headers["User-Agent"] = user_agent  # not signed, as in the SDK
    return AssumeRoleRequest(f"{endpoint.rstrip('/')}{ASSUME_ROLE_PATH}", headers, body)


class StsClient:
    """AssumeRole over the process's session, signed with the base pair."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        endpoint: str,
        base: Credentials,
        user_agent: str = "jdcloud-image-sync",
    ) -> None:
        parts = urlsplit(endpoint)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"STS endpoint must be an http(s) URL, got {endpoint!r}")
        self._session = session
        self._endpoint = endpoint.rstrip("/")
        self._base = base
        self._user_agent = user_agent
        self.calls = 0
        """assumeRole requests sent (the benchmark reports them per tick)."""

    async def assume_role(self, role: RoleSpec) -> TemporaryCredentials:
        """Temporary credentials of ``role``. Raises :class:`AuthError` when STS refuses
        the base pair or the role (401/403), :class:`TransientApiError` for 5xx, 429 and
        network failures, :class:`PermanentApiError` for the rest; messages name the role
        and never a secret."""
        request = assume_role_request(
            endpoint=self._endpoint, base=self._base, role=role, user_agent=self._user_agent
        )
        self.calls += 1
        where = f"assumeRole {role.role_jrn}"
        try:
            async with self._session.post(
                request.url, data=request.body, headers=request.headers, allow_redirects=False
            ) as resp:
                status, body = resp.status, await resp.read()
        except TimeoutError:
            raise TransientApiError(f"{where}: request timed out", status="TIMEOUT") from None
        except aiohttp.ClientError as exc:
            raise TransientApiError(
                f"{where}: connection failed: {type(exc).__name__}", status="NETWORK"
            ) from None
        data = _json_object(body)
        error = data.get("error") if data is not None else None
        if status != 200 or isinstance(error, dict):
            api_status = str(error.get("status") or "") if isinstance(error, dict) else ""
            message = str(error.get("message") or "")[:300] if isinstance(error, dict) else ""
            code = error.get("code") if isinstance(error, dict) and status == 200 else status
            http = code if isinstance(code, int) and not isinstance(code, bool) else status
            kind: type[ApiError]
            if http in (401, 403):
                kind = AuthError
            elif http == 429 or http >= 500:
                kind = TransientApiError
            else:
                kind = PermanentApiError
            raise kind(f"{where}: {message or f'HTTP {http}'}", http_status=http, status=api_status)
        return _parse_credentials(data, where)


def _json_object(body: bytes) -> dict[str, object] | None:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return data if isinstance(data, dict) else None


def _parse_credentials(data: dict[str, object] | None, where: str) -> TemporaryCredentials:
    result = data.get("result") if data is not None else None
    creds = result.get("credentials") if isinstance(result, dict) else None
    if not isinstance(creds, dict):
        raise TransientApiError(f"{where}: no result.credentials in the answer", status="MALFORMED")
    fields = [creds.get(name) for name in ("accessKey", "secretKey", "sessionToken", "expiration")]
    if not all(isinstance(value, str) and value for value in fields):
        raise TransientApiError(
            f"{where}: incomplete credentials in the answer", status="MALFORMED"
        )
    access_key, secret_key, token, expiration = (str(value) for value in fields)
    try:
        expires = datetime.strptime(expiration, EXPIRATION_FORMAT).replace(tzinfo=BEIJING)
    except ValueError:
        raise TransientApiError(
            f"{where}: expiration {expiration[:30]!r} is not yyyy-MM-dd HH:mm:ss",
            status="MALFORMED",
        ) from None
    return TemporaryCredentials(Credentials(access_key, secret_key, token), expires)


class RoleCredentials:
    """The credentials of one role account, cached; renewed before they expire.

    ``valid_for`` (seconds) is how long a request signed now may still be under way:
    :meth:`get` never returns credentials that expire sooner (plus
    :data:`RENEW_MARGIN`), except freshly issued ones whose whole lifetime is shorter.
    """

    def __init__(
        self,
        sts: StsClient,
        role: RoleSpec,
        *,
        valid_for: float,
        on_secret: Callable[[str], None] | None = None,
    ) -> None:
        self._sts = sts
        self.role = role
        self._valid_for = valid_for
        self._on_secret = on_secret
        self._current: TemporaryCredentials | None = None
        self._threshold = valid_for + RENEW_MARGIN
        self._lock = asyncio.Lock()
        self.renewals = 0

    def _fresh(self) -> TemporaryCredentials | None:
        current = self._current
        if current is not None and current.seconds_left() > self._threshold:
            return current
        return None

    async def get(self) -> Credentials:
        """Credentials to sign a request with now."""
        current = self._fresh()
        if current is not None:
            return current.credentials
        async with self._lock:
            current = self._fresh() or await self._renew()
            return current.credentials

    async def renew_after_refusal(self, refused: object | None) -> Credentials:
        """After a 401 on ``refused``: renew, unless another request already replaced
        them, and return the credentials to retry with."""
        async with self._lock:
            current = self._current
            if current is not None and current.credentials != refused:
                return current.credentials
            return (await self._renew()).credentials

    async def _renew(self) -> TemporaryCredentials:
        fresh = await self._sts.assume_role(self.role)
        if self._on_secret is not None:
            self._on_secret(fresh.credentials.secret_key)
            if fresh.credentials.security_token:
                self._on_secret(fresh.credentials.security_token)
        # Credentials whose whole lifetime is shorter than a request may take are used
        # for the first half of it (renewing on every request would not help).
        self._threshold = min(self._valid_for + RENEW_MARGIN, fresh.seconds_left() / 2)
        self._current = fresh
        self.renewals += 1
        return fresh
