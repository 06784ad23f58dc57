"""The describeImages client against the simulator (and, where the simulator cannot
misbehave that way, a tiny in-process server): filters, ids lookups, timeouts,
signing time, argument validation."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import pytest
import sqlalchemy as sa
from aiohttp import web
from sqlalchemy.ext.asyncio import AsyncEngine

from service.app import open_runtime
from service.errors import PermanentApiError, TransientApiError
from service.jdcloud.client import USER_AGENT, ImagesClient, RequestStats, open_session
from service.jdcloud.listing import Partition
from service.jdcloud.signer import DEMO_ACCESS_KEY, DEMO_SECRET_KEY, Credentials
from service.simulator import Simulator, running_simulator
from service.sync import sync_once
from tests.local_api import EMPTY_PAGE, local_api

CREDENTIALS = Credentials(DEMO_ACCESS_KEY, DEMO_SECRET_KEY)


@asynccontextmanager
async def images_client(
    endpoint: str,
    *,
    request_timeout: float = 5,
    connect_timeout: float = 5,
    concurrency: int = 8,
    **options: Any,
) -> AsyncIterator[ImagesClient]:
    async with open_session(
        connect_timeout=connect_timeout, request_timeout=request_timeout, limit=concurrency
    ) as session:
        yield ImagesClient(
            session,
            endpoint=endpoint,
            credentials=CREDENTIALS,
            concurrency=concurrency,
            rate_limit=0,
            **options,
        )


async def list_all(client: ImagesClient, region: str, **filters: Any) -> list[dict[str, Any]]:
    """Every page of one listing, page by page (page size 10 so filters span pages)."""
    images: list[dict[str, Any]] = []
    number = 1
    while True:
        page = await client.describe_images(region, page_number=number, page_size=10, **filters)
        images.extend(page.images)
        if number * 10 >= page.total_count:
            assert len(images) == page.total_count
            return images
        number += 1


@pytest.fixture(scope="module")
async def sim() -> AsyncIterator[Simulator]:
    async with running_simulator(seed=5, images=3000) as simulator:
        yield simulator


# --- filters ---------------------------------------------------------------------------------


def _where(**wanted: Any) -> Callable[[dict[str, Any]], bool]:
    return lambda image: all(image.get(k) == v for k, v in wanted.items())


FILTER_CASES: list[tuple[str, dict[str, Any], Callable[[dict[str, Any]], bool]]] = [
    ("public", {"offline": False}, _where(offline=False)),
    ("public", {"offline": True}, _where(offline=True)),
    ("thirdparty", {"offline": True}, _where(offline=True)),
    ("public", {"offline": False, "platform": "CentOS"}, _where(offline=False, platform="CentOS")),
    (
        "private",
        {"platform": "Windows Server"},
        _where(platform="Windows Server"),
    ),
    (
        "public",
        {"offline": False, "image_name": "ubuntu 22.04"},  # fuzzy: a case-insensitive substring
        lambda i: i["offline"] is False and "ubuntu 22.04" in i["name"].lower(),
    ),
    ("private", {"root_device_type": "localDisk"}, _where(rootDeviceType="localDisk")),
    ("private", {"launch_permission": "specifiedUsers"}, _where(launchPermission="specifiedUsers")),
    ("private", {"launch_permission": "ownerOnly"}, _where(launchPermission="ownerOnly")),
    ("private", {"status": "creating"}, _where(status="creating")),
    (
        "community",
        {"status": "ready", "platform": "Ubuntu"},
        _where(status="ready", platform="Ubuntu"),
    ),
]


@pytest.mark.parametrize(
    ("source", "filters", "matches"),
    FILTER_CASES,
    ids=[f"{c[0]}-{'-'.join(c[1])}" for c in FILTER_CASES],
)
async def test_every_documented_filter_reaches_the_api(
    sim: Simulator,
    source: str,
    filters: dict[str, Any],
    matches: Callable[[dict[str, Any]], bool],
) -> None:
    region = "cn-east-1"
    async with images_client(sim.url) as client:
        got = await list_all(client, region, image_source=source, **filters)
    expected = [i for i in sim.catalogue.images(region, source) if matches(i)]
    assert expected, "the case must have something to find"
    assert len(expected) < len(sim.catalogue.images(region, source)), "and something to drop"
    assert [i["imageId"] for i in got] == [i["imageId"] for i in expected]
    assert got == expected


async def test_lookup_ids_splits_by_url_length_and_returns_every_id(sim: Simulator) -> None:
    region = "cn-south-1"
    known = [
        i["imageId"]
        for s in ("public", "private", "shared")
        for i in sim.catalogue.images(region, s)
    ]
    assert len(known) > 250
    unknown = [f"img-missing{n:04d}" for n in range(7)]
    wanted = known + unknown + known[:5]  # duplicates are asked once
    sim.requests.clear()
    async with images_client(sim.url, max_url_length=1024) as client:
        found = await client.lookup_ids(region, wanted)
    assert sorted(i["imageId"] for i in found) == sorted(known)
    log = list(sim.requests)
    urls = [f"{sim.url}/v1/regions/{region}/images?{entry['query']}" for entry in log]
    assert len(urls) >= 10, "300 ids do not fit in a 1024-byte URL: the lookup must split"
    assert max(len(u) for u in urls) <= 1024
    assert max(len(u) for u in urls) > 900, "chunks should use most of the allowed length"
    assert all(entry["status"] == 200 for entry in log)
    asked = [q.split("=", 1)[1] for e in log for q in e["query"].split("&") if q.startswith("ids.")]
    assert sorted(asked) == sorted(set(wanted)), "every id asked exactly once"


async def test_lookup_ids_with_the_default_limit(sim: Simulator) -> None:
    region = "cn-north-1"
    known = [i["imageId"] for i in sim.catalogue.images(region, "thirdparty")][:150]
    sim.requests.clear()
    async with images_client(sim.url) as client:
        found = await client.lookup_ids(region, known)
    assert [i["imageId"] for i in found] == known  # served order is the catalogue's order
    assert len(sim.requests) == 2  # at most 100 ids per request (one page each)
    assert all(
        len(f"{sim.url}/v1/regions/{region}/images?{e['query']}") <= 4096 for e in sim.requests
    )


async def test_arguments_the_api_would_refuse_are_refused_here(sim: Simulator) -> None:
    async with images_client(sim.url) as client:
        for bad in (
            {"page_size": 9},
            {"page_size": 101},
            {"page_number": 0},
            {"ids": "img-one"},
            {"ids": ["img-one", ""]},
        ):
            with pytest.raises(ValueError):
                await client.describe_images("cn-north-1", image_source="public", **bad)
        with pytest.raises(ValueError, match="region"):
            await client.describe_images("../admin", image_source="public")
        with pytest.raises(ValueError, match="region"):
            await client.lookup_ids("CN_NORTH", ["img-one"])
    async with open_session(connect_timeout=1, request_timeout=1, limit=1) as session:
        for options in ({"concurrency": 0}, {"max_attempts": 0}, {"rate_limit": -1}):
            with pytest.raises(ValueError):
                ImagesClient(session, endpoint=sim.url, credentials=CREDENTIALS, **options)
        with pytest.raises(ValueError, match="endpoint"):
            ImagesClient(session, endpoint="vm.jdcloud-api.com", credentials=CREDENTIALS)


# --- what leaves the client ------------------------------------------------------------------


@asynccontextmanager
async def recording_server(delay: float) -> AsyncIterator[tuple[str, list[dict[str, Any]]]]:
    """An empty describeImages that answers after ``delay`` s and records each request."""
    seen: list[dict[str, Any]] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append(
            {
                "arrived": time.time(),
                "date": request.headers.get("x-jdcloud-date"),
                "user_agent": request.headers.get("User-Agent"),
                "page": int(request.query["pageNumber"]),
            }
        )
        await asyncio.sleep(delay)
        return web.json_response(EMPTY_PAGE)

    async with local_api(handler) as url:
        yield url, seen


async def test_a_request_is_signed_when_it_leaves_not_when_it_queued() -> None:
    """With one slot and a slow server, the second request waits ~1.2 s for the slot;
    its x-jdcloud-date (second resolution) must be the time it left, not when it queued."""
    async with recording_server(1.2) as (url, seen), images_client(url, concurrency=1) as client:
        await asyncio.gather(
            *(client.describe_images("cn-north-1", image_source="private") for _ in range(2))
        )
    assert len(seen) == 2
    assert seen[1]["arrived"] - seen[0]["arrived"] >= 1.2
    for request in seen:
        signed = datetime.strptime(request["date"], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
        # < 1 s plus transit time; queued-then-sent it would be >= 1.2 s behind.
        assert 0 <= request["arrived"] - signed.timestamp() < 1.1
        assert request["user_agent"] == USER_AGENT


async def test_waiting_requests_are_served_by_priority_then_in_order() -> None:
    """One slot: while page 1 is out, pages queue with priorities; they leave lowest
    priority first, in arrival order within one; a waiter cancelled while queued is
    never sent and does not take the slot with it."""
    async with recording_server(0.2) as (url, seen), images_client(url, concurrency=1) as client:

        def page(number: int, priority: float) -> asyncio.Task[Any]:
            return asyncio.ensure_future(
                client.describe_images(
                    "cn-north-1", image_source="private", page_number=number, priority=priority
                )
            )

        first = page(1, 0)
        await asyncio.sleep(0.05)  # page 1 holds the slot
        queued = [page(2, 5), page(3, -1), page(4, 5), page(5, -1)]
        cancelled = page(6, -10)
        await asyncio.sleep(0.05)
        cancelled.cancel()
        await asyncio.gather(first, *queued)
        await asyncio.wait_for(page(7, 0), 2)  # the slot is free again
    assert cancelled.cancelled()
    assert [request["page"] for request in seen] == [1, 3, 5, 2, 4, 7]


async def test_read_timeout_is_retried_then_the_partition_fails_cleanly(
    engine: AsyncEngine, make_settings: Any
) -> None:
    """A server that never answers in time: TIMEOUT after IMAGE_SYNC_REQUEST_TIMEOUT,
    retried up to IMAGE_SYNC_MAX_ATTEMPTS, then the partition fails (recorded)."""
    async with running_simulator(seed=1, images=100, faults={"latency_ms": 3000}) as sim:
        settings = make_settings(
            sim.url, IMAGE_SYNC_REQUEST_TIMEOUT="0.3", IMAGE_SYNC_MAX_ATTEMPTS="2"
        )
        started = time.monotonic()
        async with open_runtime(settings) as rt:
            report = await sync_once(engine, rt.client, [Partition("cn-north-1", "private")])
        elapsed = time.monotonic() - started
        assert len(sim.requests) == 2
    (partition,) = report.partitions
    assert partition.status == "failed"
    assert partition.error_status == "TIMEOUT"
    assert (partition.api_requests, partition.retries) == (2, 1)
    assert 0.6 <= elapsed < 2.5  # two timeouts and one short backoff, not the server's 3 s
    async with engine.connect() as conn:
        row = (
            await conn.execute(
                sa.text("SELECT status, error_status, retries FROM inventory.sync_partitions")
            )
        ).one()
        images = await conn.scalar(sa.text("SELECT count(*) FROM inventory.images"))
    assert tuple(row) == ("failed", "TIMEOUT", 1)
    assert images == 0


async def test_connect_timeout_is_applied() -> None:
    """A listener whose accept queue is full never completes a TCP handshake: the client
    gives up after the connect timeout with a TransientApiError (TIMEOUT)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    try:
        for _ in range(4):  # fill the accept queue; later SYNs are dropped
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
            fillers.append(filler)
        await asyncio.sleep(0.1)
        async with images_client(
            f"http://127.0.0.1:{port}", connect_timeout=0.3, request_timeout=10, max_attempts=1
        ) as client:
            started = time.monotonic()
            with pytest.raises(TransientApiError) as caught:
                await client.describe_images("cn-north-1", image_source="public")
            elapsed = time.monotonic() - started
    finally:
        for sock in fillers:
            sock.close()
        listener.close()
    assert caught.value.status == "TIMEOUT"
    assert 0.25 <= elapsed < 2


# --- one classification for an error, however it arrives ------------------------------------


@asynccontextmanager
async def scripted_server(answers: list[tuple[int, dict[str, Any]]]) -> AsyncIterator[str]:
    """Answers each request with the next (HTTP status, JSON body), then an empty page."""
    queue = list(answers)

    async def handler(request: web.Request) -> web.Response:
        if queue:
            status, body = queue.pop(0)
            return web.json_response(body, status=status)
        return web.json_response(EMPTY_PAGE)

    async with local_api(handler) as url:
        yield url


def _error_body(code: int, status: str) -> dict[str, Any]:
    return {"requestId": "r1", "error": {"code": code, "status": status, "message": "slow down"}}


@pytest.mark.parametrize(
    ("code", "status", "transient", "throttled"),
    [
        (429, "", True, 1),
        (429, "RATE_LIMIT", True, 1),
        (429, "QUOTA_EXCEEDED", False, 0),
        (503, "", True, 0),
        (400, "INVALID_ARGUMENT", False, 0),
    ],
)
@pytest.mark.parametrize("carried_by", ["http_status", "error_in_200"])
async def test_an_error_is_classified_alike_in_a_200_and_as_an_http_status(
    code: int, status: str, transient: bool, throttled: int, carried_by: str
) -> None:
    """The gateway sometimes answers 200 with an error object: its ``code`` is judged
    exactly as the same HTTP status would be (retried, counted as throttling, or not)."""
    http_status = code if carried_by == "http_status" else 200
    async with (
        scripted_server([(http_status, _error_body(code, status))]) as url,
        images_client(url, max_attempts=2) as client,
    ):
        stats = RequestStats()
        if transient:
            page = await client.describe_images("cn-north-1", image_source="private", stats=stats)
            assert page.total_count == 0
            assert (stats.requests, stats.retries) == (2, 1)
        else:
            with pytest.raises(PermanentApiError) as caught:
                await client.describe_images("cn-north-1", image_source="private", stats=stats)
            assert (caught.value.http_status, caught.value.status) == (code, status)
            assert (stats.requests, stats.retries) == (1, 0)
    assert stats.throttled == throttled


# --- pages ahead -----------------------------------------------------------------------------


async def test_listings_share_the_runs_window_of_pages_and_give_it_back(sim: Simulator) -> None:
    """Two listings at once hold the shared window's permits for their unconsumed pages
    (never more than it has); one ended by its sink's error gives its permits back."""
    from service.jdcloud.listing import Listing, list_pages

    window = asyncio.Semaphore(3)
    in_use: list[int] = []
    calls = 0

    async def sink(images: list[Any]) -> None:
        in_use.append(3 - window._value)
        await asyncio.sleep(0.01)

    async def failing(images: list[Any]) -> None:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.01)
        if calls >= 2:  # the first page is written; the later pages hold permits
            raise RuntimeError("the sink failed")

    async with images_client(sim.url) as client:
        stats = RequestStats()
        outcome, failure = await asyncio.gather(
            list_pages(
                client, Listing("cn-north-1", "private", None, 0), page_size=10,
                stats=stats, on_page=sink, window=window,
            ),
            list_pages(
                client, Listing("cn-east-1", "private", None, 0), page_size=10,
                stats=stats, on_page=failing, window=window,
            ),
            return_exceptions=True,
        )  # fmt: skip
    assert isinstance(failure, RuntimeError), failure
    assert not isinstance(outcome, BaseException) and outcome.pages > 10
    assert max(in_use) > 0  # the listing took its pages' permits from the shared window
    assert window._value == 3
