"""The image API client: signing, limits, retries, typed errors. One per process.

It calls describeImages (pages and id lookups), describeImageMembers and
describeImageConstraintsBatch; every call goes through the same limits and retries.

It owns no session: the caller builds one :class:`aiohttp.ClientSession` at start-up
(see :func:`open_session`) and hands it over. Two limits hold every request:

* a global gate: at most ``concurrency`` requests in flight, all regions together,
  waiters served by ``priority`` (lowest first; the listing puts the pages of big
  listings first, so their merges overlap the fetching of the small ones), first come
  first served within one priority;
* a per-region sliding window: at most ``rate_limit`` requests (its integer part;
  one per ``1/rate_limit`` s below 1/s) reach the gateway in any one second (a strict
  window, not a leaky bucket: the API throttles per second).

A request first waits for room in its region's window, then (still first in its
region's queue) for a global slot, and only then is it signed and sent: a request
waiting for its region's rate holds no global slot, and none carries a stale
``x-jdcloud-date``. The window counts a request as pending from its admission until
its response begins (or its attempt fails), and then stamps it at that moment: the
latest time the gateway can have counted it. So the limit holds as the gateway
measures it, whatever stalls our event loop, the network or the gateway's own queue
put between admission and arrival; the price is that a slot of the window is held for
one round trip longer than strictly needed.

Transient failures (429 ``RATE_LIMIT``, 500/502/503/504, timeouts, broken connections,
unreadable bodies) are retried with exponential backoff and full jitter, honouring
``Retry-After``; everything else raises at once. Every attempt is counted in the
caller's :class:`RequestStats` and in the Prometheus metrics.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import random
import re
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar
from urllib.parse import urlsplit

import aiohttp
import orjson
from yarl import URL

from service import __version__
from service.config import REGION_RE
from service.errors import (
    ApiError,
    AuthError,
    MalformedResponse,
    PermanentApiError,
    TransientApiError,
)
from service.jdcloud.signer import Credentials, encode_query, sign_headers
from service.jdcloud.sts import RoleCredentials
from service.metrics import Metrics

USER_AGENT = f"jdcloud-image-sync/{__version__}"
BACKOFF_BASE = 0.25
"""Seconds: the first retry waits up to this long (full jitter), doubling each attempt."""
BACKOFF_CAP = 20.0
"""Seconds: no single backoff waits longer (except a longer ``Retry-After``)."""
RETRY_AFTER_CAP = 120.0
"""Seconds: a ``Retry-After`` longer than this is capped."""
RATE_WINDOW_MARGIN = 0.01
"""Seconds added to the rate window: our clock and the gateway's tick differently."""
TRANSIENT_HTTP = frozenset({500, 502, 503, 504})
TRANSIENT_STATUSES = frozenset({"INTERNAL", "UNKNOWN", "UNAVAILABLE", "SOURCE_UNAVAILABLE"})
"""``error.status`` values of JD Cloud's common error table that are retried."""
MIN_PAGE_SIZE, MAX_PAGE_SIZE = 10, 100
"""describeImages' documented ``pageSize`` range."""
_IMAGE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_R = TypeVar("_R")


@dataclass(slots=True)
class RequestStats:
    """Counters of one partition's requests (owned by the caller, updated here)."""

    requests: int = 0
    retries: int = 0
    throttled: int = 0
    pages: int = 0


@dataclass(frozen=True, slots=True)
class _Call(Generic[_R]):
    """One API call: ``GET /v1/regions/{region}{tail}?{query}``, its 200 body decoded by
    ``parse``; waiting for a global slot, lower ``priority`` goes first."""

    region: str
    tail: str
    query: str
    parse: Callable[[bytes, str], _R]
    priority: float


@dataclass(frozen=True, slots=True)
class InstanceTypeConstraint:
    """One ``imageConstraints`` entry: ``constraints_type`` ``includes``/``excludes`` and
    the ``instance_types`` it lists (None where the API gives none)."""

    image_id: str
    constraints_type: str | None
    instance_types: tuple[str, ...] | None


@dataclass(frozen=True, slots=True)
class Page:
    """One decoded describeImages page."""

    images: list[Any]
    total_count: int
    request_id: str | None


class _Slots:
    """A semaphore whose waiters are served lowest ``priority`` first, FIFO within one."""

    __slots__ = ("_free", "_order", "_waiters")

    def __init__(self, size: int) -> None:
        self._free = size
        self._waiters: list[tuple[float, int, asyncio.Future[None]]] = []
        self._order = itertools.count()

    async def acquire(self, priority: float = 0.0) -> None:
        if self._free > 0 and not self._waiters:
            self._free -= 1
            return
        granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (priority, next(self._order), granted))
        try:
            await granted
        except asyncio.CancelledError:
            # Cancelled after the slot was handed over: pass it on. Cancelled while
            # waiting: the entry stays in the heap, done, and release() skips it.
            if granted.done() and not granted.cancelled():
                self.release()
            raise

    def release(self) -> None:
        while self._waiters:
            granted = heapq.heappop(self._waiters)[2]
            if not granted.done():
                granted.set_result(None)
                return
        self._free += 1


class _Admission:
    """One admitted request's place in its region's window, stamped once."""

    __slots__ = ("_done", "_window")

    def __init__(self, window: _SlidingWindow) -> None:
        self._window = window
        self._done = False

    def settle(self) -> None:
        """The request reached the gateway (its response began) or never will."""
        if not self._done:
            self._done = True
            self._window.stamp()


@dataclass(slots=True)
class _SlidingWindow:
    """At most ``limit`` requests reach the gateway in any ``period`` seconds, per region.

    Admitted requests not yet answered count as pending; each is stamped when its
    response begins, an upper bound of when the gateway saw it. Pending plus stamped
    within the last ``period`` never exceeds ``limit``.
    """

    limit: int
    period: float = 1.0
    _starts: deque[float] = field(default_factory=deque)
    _pending: int = 0
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _stamped: asyncio.Event = field(default_factory=asyncio.Event)

    async def admit(self, in_flight: _Slots, priority: float = 0.0) -> _Admission:
        """Wait for room in the window, then for a slot of ``in_flight``.

        The caller owns the acquired ``in_flight`` slot and must ``settle()`` the result
        when the response begins or the attempt ends. Requests of one region are
        admitted one at a time (FIFO).
        """
        async with self._lock:
            while True:
                now = time.monotonic()
                while self._starts and now - self._starts[0] >= self.period:
                    self._starts.popleft()
                if len(self._starts) + self._pending < self.limit:
                    break
                # Full: wait for the oldest stamp to age out, or for a pending request
                # to be answered (its stamp then ages out in turn).
                timeout = self._starts[0] + self.period - now if self._starts else None
                self._stamped.clear()
                with suppress(TimeoutError):
                    await asyncio.wait_for(self._stamped.wait(), timeout)
            await in_flight.acquire(priority)
            self._pending += 1
        return _Admission(self)

    def stamp(self) -> None:
        self._pending -= 1
        self._starts.append(time.monotonic())
        self._stamped.set()


def open_session(
    *, connect_timeout: float, request_timeout: float, limit: int
) -> aiohttp.ClientSession:
    """The process's one HTTP session (TLS verification always on for https)."""
    return aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(
            total=request_timeout, connect=connect_timeout, sock_read=request_timeout
        ),
        connector=aiohttp.TCPConnector(limit=limit, limit_per_host=limit, ttl_dns_cache=300),
        headers={"User-Agent": USER_AGENT},
        json_serialize=lambda obj: orjson.dumps(obj).decode(),
        raise_for_status=False,
    )


class ImagesClient:
    """describeImages over one shared session, within the global and per-region limits."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        endpoint: str,
        credentials: Credentials | RoleCredentials,
        concurrency: int = 16,
        rate_limit: float = 10,
        max_attempts: int = 6,
        max_url_length: int = 4096,
        metrics: Metrics | None = None,
        rng: random.Random | None = None,
    ) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
        if rate_limit < 0 or math.isnan(rate_limit):
            raise ValueError(f"rate_limit must be >= 0 (0: off), got {rate_limit}")
        if max_url_length < 256:
            raise ValueError(f"max_url_length must be >= 256, got {max_url_length}")
        parts = urlsplit(endpoint)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"endpoint must be an http(s) URL, got {endpoint!r}")
        self._session = session
        self._base = endpoint.rstrip("/")
        self._host = parts.netloc
        self._path_prefix = parts.path.rstrip("/")
        self._credentials = credentials
        self._in_flight = _Slots(concurrency)
        self._rate = rate_limit
        self._windows: dict[str, _SlidingWindow] = {}
        self._max_attempts = max_attempts
        self._max_url_length = max_url_length
        self._metrics = metrics
        self._rng = rng or random.Random()

    def with_credentials(self, credentials: Credentials | RoleCredentials) -> ImagesClient:
        """A client for another account: the same session, endpoint, settings and global
        in-flight limit, its own credentials and its own per-region rate windows (the
        gateway counts each account's calls separately)."""
        other = ImagesClient.__new__(ImagesClient)
        for name in (
            "_session", "_base", "_host", "_path_prefix", "_in_flight", "_rate",
            "_max_attempts", "_max_url_length", "_metrics", "_rng",
        ):  # fmt: skip
            setattr(other, name, getattr(self, name))
        other._credentials = credentials
        other._windows = {}
        return other

    # -- public API ------------------------------------------------------------------

    async def describe_images(
        self,
        region: str,
        *,
        image_source: str | None = None,
        offline: bool | None = None,
        page_number: int = 1,
        page_size: int = 100,
        platform: str | None = None,
        ids: Sequence[str] | None = None,
        image_name: str | None = None,
        root_device_type: str | None = None,
        launch_permission: str | None = None,
        status: str | None = None,
        stats: RequestStats | None = None,
        priority: float = 0.0,
    ) -> Page:
        """One page of ``GET /v1/regions/{region}/images`` with the documented filters.

        ``ids`` are sent as ``ids.1=..&ids.2=..`` (as the SDK does); the other filters
        then have no effect at the API. Raises :class:`ValueError` for arguments the API
        would refuse (a malformed region, ``page_size`` outside 10..100, a
        ``page_number`` below 1, an empty id). Requests waiting for a global slot are
        served lowest ``priority`` first.
        """
        _check_region(region)
        if not MIN_PAGE_SIZE <= page_size <= MAX_PAGE_SIZE:
            raise ValueError(
                f"page_size must be within {MIN_PAGE_SIZE}..{MAX_PAGE_SIZE}, got {page_size}"
            )
        if page_number < 1:
            raise ValueError(f"page_number must be >= 1, got {page_number}")
        if ids is not None and isinstance(ids, str):
            raise ValueError("ids must be a sequence of image ids, not one string")
        if ids and not all(isinstance(i, str) and i for i in ids):
            raise ValueError("ids must be non-empty strings")
        params: list[tuple[str, str | int | bool | Sequence[str]]] = []
        for name, value in (
            ("imageSource", image_source),
            ("offline", offline),
            ("platform", platform),
            ("imageName", image_name),
            ("rootDeviceType", root_device_type),
            ("launchPermission", launch_permission),
            ("status", status),
        ):
            if value is not None:
                params.append((name, value))
        if ids:
            params.append(("ids", list(ids)))
        params.append(("pageNumber", page_number))
        params.append(("pageSize", page_size))
        return await self._get(
            region, "/images", encode_query(params), stats or RequestStats(), _parse_page, priority
        )

    async def describe_image_members(
        self, region: str, image_id: str, *, stats: RequestStats | None = None
    ) -> tuple[str, ...]:
        """``GET /v1/regions/{region}/images/{imageId}/members`` (describeImageMembers): the
        pins a private image of the caller's is shared with, sorted."""
        _check_region(region)
        _check_image_id(image_id)
        return await self._get(
            region, f"/images/{image_id}/members", "", stats or RequestStats(), _parse_members
        )

    async def describe_image_constraint(
        self, region: str, image_id: str, *, stats: RequestStats | None = None
    ) -> InstanceTypeConstraint:
        """``GET /v1/regions/{region}/images/{imageId}/constraints``
        (describeImageConstraints): one image's constraint (``constraints_type`` None when
        it has none); 404 (:class:`PermanentApiError`) when the image does not exist."""
        _check_region(region)
        _check_image_id(image_id)
        return await self._get(
            region,
            f"/images/{image_id}/constraints",
            "",
            stats or RequestStats(),
            _parse_constraint,
        )

    async def describe_image_constraints(
        self, region: str, ids: Sequence[str], *, stats: RequestStats | None = None
    ) -> list[InstanceTypeConstraint]:
        """describeImageConstraintsBatch (``GET /v1/regions/{region}/imageConstraints``,
        ``ids.1=..``) for every id, split into requests whose URL stays under
        ``max_url_length``: the constraints the API gives (images without one are absent
        or have ``constraints_type`` None)."""
        _check_region(region)
        if isinstance(ids, str):
            raise ValueError("ids must be a sequence of image ids, not one string")
        for image_id in ids:
            _check_image_id(image_id)
        found: list[InstanceTypeConstraint] = []
        base = len(self._url(region, "/imageConstraints", ""))
        for chunk in self._id_chunks(base, list(dict.fromkeys(ids))):
            query = encode_query([("ids", chunk)])
            found.extend(
                await self._get(
                    region,
                    "/imageConstraints",
                    query,
                    stats or RequestStats(),
                    _parse_constraints,
                )
            )
        return found

    async def lookup_ids(
        self, region: str, ids: Sequence[str], *, stats: RequestStats | None = None
    ) -> list[Any]:
        """Images by id, split into requests whose URL stays under ``max_url_length``."""
        _check_region(region)
        if isinstance(ids, str):
            raise ValueError("ids must be a sequence of image ids, not one string")
        found: list[Any] = []
        base = len(self._url(region, "/images", "pageNumber=1&pageSize=100&"))
        for chunk in self._id_chunks(base, list(dict.fromkeys(ids))):
            page_number = 1
            while True:
                page = await self.describe_images(
                    region, ids=chunk, page_number=page_number, page_size=100, stats=stats
                )
                found.extend(page.images)
                if page_number * 100 >= page.total_count or not page.images:
                    break
                page_number += 1
        return found

    # -- internals -------------------------------------------------------------------

    def _id_chunks(self, base: int, ids: list[str]) -> list[list[str]]:
        """``ids`` in chunks of at most 100 whose ``ids.N=`` query, after a URL of
        ``base`` characters, stays under ``max_url_length``."""
        chunks: list[list[str]] = []
        current: list[str] = []
        length = base
        for image_id in ids:
            piece = len(encode_query([("ids", [image_id])]).replace("ids.1=", "")) + len(
                f"&ids.{len(current) + 1}="
            )
            if current and (length + piece > self._max_url_length or len(current) >= 100):
                chunks.append(current)
                current, length = [], base
            current.append(image_id)
            length += piece
        if current:
            chunks.append(current)
        return chunks

    def _path(self, region: str, tail: str) -> str:
        return f"{self._path_prefix}/v1/regions/{region}{tail}"

    def _url(self, region: str, tail: str, query: str) -> str:
        return f"{self._base}/v1/regions/{region}{tail}" + (f"?{query}" if query else "")

    def _window(self, region: str) -> _SlidingWindow | None:
        if self._rate <= 0:
            return None
        window = self._windows.get(region)
        if window is None:
            # Below 1/s: one request per 1/rate seconds; otherwise floor(rate) per second,
            # so no one-second window ever holds more than the configured rate.
            limit = max(1, int(self._rate))
            period = (1.0 if self._rate >= 1 else 1.0 / self._rate) + RATE_WINDOW_MARGIN
            window = self._windows[region] = _SlidingWindow(limit, period)
        return window

    @asynccontextmanager
    async def _slot(self, region: str, priority: float) -> AsyncIterator[_Admission | None]:
        """Hold a global in-flight slot, admitted by the region's rate window; yields the
        admission to settle when the response begins (None without a rate limit)."""
        window = self._window(region)
        if window is None:
            await self._in_flight.acquire(priority)
            admission = None
        else:
            admission = await window.admit(self._in_flight, priority)
        try:
            yield admission
        finally:
            if admission is not None:
                admission.settle()  # no-op once the response began
            self._in_flight.release()

    async def _get(
        self,
        region: str,
        tail: str,
        query: str,
        stats: RequestStats,
        parse: Callable[[bytes, str], _R],
        priority: float = 0.0,
    ) -> _R:
        """One API call (``GET /v1/regions/{region}{tail}?{query}``) with retries; a 200
        body is decoded by ``parse`` inside the retry loop."""
        call = _Call(region, tail, query, parse, priority)
        attempt = 0
        renewed = False
        while True:
            attempt += 1
            try:
                return await self._attempt(call, stats)
            except AuthError as exc:
                # A role's temporary credentials refused (expired or revoked early):
                # renew once and retry once; a second refusal is the account's failure.
                role = self._credentials
                if renewed or exc.http_status != 401 or not isinstance(role, RoleCredentials):
                    raise
                renewed = True
                await role.renew_after_refusal(exc.signed_with)
            except TransientApiError as exc:
                if attempt >= self._max_attempts:
                    raise
                stats.retries += 1
                reason = exc.status or (
                    "http_" + str(exc.http_status) if exc.http_status else "network"
                )
                if self._metrics:
                    self._metrics.api_retries.labels(region, reason).inc()
                delay = self._rng.uniform(0, min(BACKOFF_CAP, BACKOFF_BASE * 2 ** (attempt - 1)))
                if exc.retry_after is not None:
                    delay = max(delay, min(exc.retry_after, RETRY_AFTER_CAP))
                await asyncio.sleep(delay)

    async def _attempt(self, call: _Call[_R], stats: RequestStats) -> _R:
        region, tail, query = call.region, call.tail, call.query
        url = URL(self._url(region, tail, query), encoded=True)
        async with self._slot(region, call.priority) as admission:
            # Signed only now, when the request leaves: however long it queued for the
            # rate window or a global slot, x-jdcloud-date is within the gateway's skew.
            creds = await self._signing_credentials()
            headers = self._signed_headers(creds, self._path(region, tail), region, query)
            stats.requests += 1
            try:
                async with self._session.get(url, headers=headers, allow_redirects=False) as resp:
                    if admission is not None:
                        admission.settle()
                    body = await resp.read()
                    status = resp.status
                    retry_after = _retry_after(resp.headers.get("Retry-After"))
                    request_id = resp.headers.get("x-jdcloud-request-id")
            except TimeoutError as exc:
                self._count(region, "error")
                detail = str(exc) or type(exc).__name__
                raise TransientApiError(
                    f"request timed out: {detail}", status="TIMEOUT", region=region
                ) from exc
            except aiohttp.ClientError as exc:
                self._count(region, "error")
                raise TransientApiError(
                    f"connection failed: {type(exc).__name__}: {exc}",
                    status="NETWORK",
                    region=region,
                ) from exc
        self._count(region, str(status))
        if status == 200:
            # Parsed inside the retry loop: a 200 that is HTML or truncated
            # (MalformedResponse, transient) is retried like any other.
            try:
                return call.parse(body, region)
            except _ErrorInBody as in_body:
                error = self._classify(
                    in_body.code,
                    in_body.status,
                    in_body.message,
                    region=region,
                    request_id=in_body.request_id or request_id,
                    retry_after=retry_after,
                    stats=stats,
                )
        else:
            error = self._error(status, body, region, retry_after, request_id, stats)
        if isinstance(error, AuthError):
            error.signed_with = creds  # which credentials were refused (a role renews)
        raise error

    async def _signing_credentials(self) -> Credentials:
        creds = self._credentials
        return await creds.get() if isinstance(creds, RoleCredentials) else creds

    def _signed_headers(
        self, creds: Credentials, path: str, region: str, query: str
    ) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        headers.update(
            sign_headers(
                method="GET",
                host=self._host,
                path=path,
                query=query,
                headers=headers,
                body="",
                access_key=creds.access_key,
                secret_key=creds.secret_key,
                region=region,
                security_token=creds.security_token,
            )
        )
        # Not signed (the gateway ignores it); sent even on a session built elsewhere.
        headers["User-Agent"] = USER_AGENT
        return headers

    def _count(self, region: str, status: str) -> None:
        if self._metrics:
            self._metrics.api_requests.labels(region, status).inc()

    def _error(
        self,
        http_status: int,
        body: bytes,
        region: str,
        retry_after: float | None,
        request_id: str | None,
        stats: RequestStats,
    ) -> ApiError:
        api_status, message, body_request_id = _error_fields(body)
        return self._classify(
            http_status,
            api_status,
            message or f"HTTP {http_status}",
            region=region,
            request_id=body_request_id or request_id,
            retry_after=retry_after,
            stats=stats,
        )

    def _classify(
        self,
        http_status: int,
        api_status: str,
        message: str,
        *,
        region: str,
        request_id: str | None,
        retry_after: float | None,
        stats: RequestStats,
    ) -> ApiError:
        """The one rule for an API error, whether it came as an HTTP status or as an
        error object inside a 200 (judged by its ``code``): 401/403 end the run,
        throttling and 5xx are retried (throttling counted), the rest is permanent."""
        kwargs: dict[str, Any] = {
            "http_status": http_status,
            "status": api_status,
            "request_id": request_id,
            "region": region,
            "retry_after": retry_after,
        }
        if http_status in (401, 403):
            return AuthError(message, **kwargs)
        if http_status == 429 or api_status == "RATE_LIMIT":
            if api_status == "QUOTA_EXCEEDED":
                return PermanentApiError(message, **kwargs)
            stats.throttled += 1
            if self._metrics:
                self._metrics.api_throttled.labels(region).inc()
            kwargs["status"] = api_status or "RATE_LIMIT"
            return TransientApiError(message, **kwargs)
        if http_status in TRANSIENT_HTTP or api_status in TRANSIENT_STATUSES:
            return TransientApiError(message, **kwargs)
        return PermanentApiError(message, **kwargs)


def is_plain_image_id(image_id: str) -> bool:
    """An id that can go into a URL path as it is (every real one: ``img-m5s0abcd29``)."""
    return isinstance(image_id, str) and _IMAGE_ID_RE.match(image_id) is not None


def _check_image_id(image_id: str) -> None:
    if not is_plain_image_id(image_id):
        raise ValueError(f"image id must look like img-m5s0abcd29, got {image_id!r:.60}")


def _check_region(region: str) -> None:
    if not isinstance(region, str) or not REGION_RE.match(region):
        raise ValueError(f"region must be a region id like cn-north-1, got {region!r}")


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # an HTTP date: rare from this API; fall back to our backoff


def _error_fields(body: bytes) -> tuple[str, str, str | None]:
    """(error.status, error.message, requestId) from an error body, best effort."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return "", "", None
    if not isinstance(data, dict):
        return "", "", None
    error = data.get("error")
    request_id = data.get("requestId")
    if not isinstance(error, dict):
        return "", "", request_id if isinstance(request_id, str) else None
    return (
        str(error.get("status") or ""),
        str(error.get("message") or "")[:500],
        request_id if isinstance(request_id, str) else None,
    )


class _ErrorInBody(Exception):
    """An error object found inside a 200 response: the client classifies it as the
    same HTTP status would be (:meth:`ImagesClient._classify`)."""

    def __init__(self, code: int, status: str, message: str, request_id: str | None) -> None:
        super().__init__(message)
        self.code, self.status, self.message, self.request_id = code, status, message, request_id


def _malformed(reason: str, region: str, request_id: str | None = None) -> MalformedResponse:
    return MalformedResponse(
        reason, http_status=200, status="MALFORMED", request_id=request_id, region=region
    )


def _parse_result(body: bytes, region: str) -> tuple[dict[str, Any], str | None]:
    """A 200 body's ``result`` object and ``requestId``; anything but the documented
    envelope is :class:`MalformedResponse`, an ``error`` object raises as its code says."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        snippet = body[:60].decode("utf-8", "replace")
        raise _malformed(
            f"body is not JSON ({len(body)} bytes, starts {snippet!r})", region
        ) from exc
    if not isinstance(data, dict):
        raise _malformed("body is not a JSON object", region)
    request_id = data.get("requestId") if isinstance(data.get("requestId"), str) else None
    error = data.get("error")
    if isinstance(error, dict):
        # A 200 carrying an error object: the caller judges it by the error's own code.
        code = error.get("code")
        raise _ErrorInBody(
            code if isinstance(code, int) and not isinstance(code, bool) else 500,
            str(error.get("status") or ""),
            str(error.get("message") or "error in a 200 response")[:500],
            request_id,
        )
    result = data.get("result")
    if not isinstance(result, dict):
        raise _malformed("no result object", region, request_id)
    return result, request_id


def _parse_page(body: bytes, region: str) -> Page:
    """A describeImages page: ``result.images`` and ``result.totalCount``."""
    result, request_id = _parse_result(body, region)
    images = result.get("images")
    total = result.get("totalCount")
    if images is None:
        images = []
    if not isinstance(images, list):
        raise _malformed("result.images is not a list", region, request_id)
    if isinstance(total, str) and total.isdigit():
        total = int(total)
    if not isinstance(total, int) or isinstance(total, bool) or total < 0:
        raise _malformed(f"result.totalCount is not a count: {total!r:.40}", region, request_id)
    return Page(images, total, request_id)


def _strings(value: Any) -> tuple[str, ...] | None:
    """A JSON list of strings as a tuple; None when it is anything else."""
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    return None


def _parse_members(body: bytes, region: str) -> tuple[str, ...]:
    """describeImageMembers: ``result.pins`` (absent or null: shared with no one), sorted."""
    result, request_id = _parse_result(body, region)
    raw = result.get("pins")
    pins = () if raw is None else _strings(raw)
    if pins is None:
        raise _malformed("result.pins is not a list of pins", region, request_id)
    return tuple(sorted(set(pins)))


def _parse_constraints(body: bytes, region: str) -> list[InstanceTypeConstraint]:
    """describeImageConstraintsBatch: ``result.imageConstraints[]``."""
    result, request_id = _parse_result(body, region)
    entries = result.get("imageConstraints") or []
    if not isinstance(entries, list):
        raise _malformed("result.imageConstraints is not a list", region, request_id)
    return [_constraint_entry(entry, region, request_id) for entry in entries]


def _parse_constraint(body: bytes, region: str) -> InstanceTypeConstraint:
    """describeImageConstraints: ``result.imageConstraints``, one entry (not a list)."""
    result, request_id = _parse_result(body, region)
    return _constraint_entry(result.get("imageConstraints"), region, request_id)


def _constraint_entry(entry: Any, region: str, request_id: str | None) -> InstanceTypeConstraint:
    """One ``{imageId, imageInstanceTypeConstraint}`` entry."""
    image_id = entry.get("imageId") if isinstance(entry, dict) else None
    if not isinstance(image_id, str) or not image_id:
        raise _malformed("an imageConstraints entry has no imageId", region, request_id)
    constraint = entry.get("imageInstanceTypeConstraint")
    if constraint is None:
        return InstanceTypeConstraint(image_id, None, None)
    kind = constraint.get("constraintsType") if isinstance(constraint, dict) else None
    raw_types = constraint.get("instanceTypes") if isinstance(constraint, dict) else None
    types = None if raw_types is None else _strings(raw_types)
    if not isinstance(kind, str | None) or (raw_types is not None and types is None):
        raise _malformed(f"the constraint of {image_id:.60} is not one", region, request_id)
    return InstanceTypeConstraint(image_id, kind, types)
