"""The describeImages simulator, exercised over real HTTP on a local port."""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import aiohttp
import orjson
import pytest
from yarl import URL

from service.jdcloud.signer import DEMO_ACCESS_KEY, DEMO_SECRET_KEY, encode_query, sign_headers
from service.simulator import Catalogue, Simulator, running_simulator
from service.simulator.catalogue import OFFLINE_SOURCES, TIME_FORMAT
from service.simulator.cli import add_arguments, faults_from_args

Params = Sequence[tuple[str, Any]]


class Reply:
    def __init__(self, status: int, headers: Any, body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body

    def json(self) -> Any:
        return orjson.loads(self.body)

    @property
    def error(self) -> dict[str, Any]:
        return self.json()["error"]  # type: ignore[no-any-return]

    @property
    def result(self) -> dict[str, Any]:
        return self.json()["result"]  # type: ignore[no-any-return]


async def call(
    session: aiohttp.ClientSession,
    sim: Simulator,
    params: Params,
    *,
    region: str = "cn-north-1",
    secret_key: str = DEMO_SECRET_KEY,
    sign: bool = True,
) -> Reply:
    path = f"/v1/regions/{region}/images"
    query = encode_query(params)
    headers = {"Content-Type": "application/json"}
    if sign:
        headers.update(
            sign_headers(
                method="GET",
                host=sim.endpoint,
                path=path,
                query=query,
                headers=headers,
                body=b"",
                access_key=DEMO_ACCESS_KEY,
                secret_key=secret_key,
                region=region,
            )
        )
    url = URL(f"{sim.url}{path}?{query}" if query else f"{sim.url}{path}", encoded=True)
    async with session.get(url, headers=headers) as response:
        return Reply(response.status, response.headers, await response.read())


async def list_all(
    session: aiohttp.ClientSession, sim: Simulator, params: Params, *, region: str = "cn-north-1"
) -> tuple[list[dict[str, Any]], int]:
    images: list[dict[str, Any]] = []
    page, total = 1, None
    while total is None or len(images) < total:
        reply = await call(
            session, sim, [*params, ("pageNumber", page), ("pageSize", 100)], region=region
        )
        assert reply.status == 200, reply.body
        total = reply.result["totalCount"]
        if not reply.result["images"]:
            break
        images.extend(reply.result["images"])
        page += 1
    assert total is not None
    return images, total


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    # No keep-alive: a dropped connection must not poison the next request.
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as client:
        yield client


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    async with running_simulator(seed=7, images=1200) as simulator:
        yield simulator


# --- catalogue -------------------------------------------------------------------------------

IMAGE_ID = re.compile(r"img-[a-z0-9]{10}")


def test_catalogue_is_deterministic_per_seed_and_apportions_the_skew() -> None:
    first = Catalogue(seed=3, images=400).snapshot()
    assert Catalogue(seed=3, images=400).snapshot() == first
    assert Catalogue(seed=4, images=400).snapshot() != first
    skewed = Catalogue(seed=3, images=1000, skew={("cn-north-1", "private"): 13})
    assert len(skewed) == 1000
    assert 380 <= skewed.count("cn-north-1", "private") <= 420
    assert skewed.count("cn-east-1", "public") < 50
    with pytest.raises(ValueError, match="unknown image source"):
        Catalogue(sources=["public", "marketplace"])


def test_catalogue_images_have_the_api_shape() -> None:
    catalogue = Catalogue(seed=11, images=2000)
    ids = set()
    for region, source in catalogue.partitions():
        for image in catalogue.images(region, source):
            ids.add(image["imageId"])
            assert IMAGE_ID.fullmatch(image["imageId"])
            assert image["imageSource"] == source
            time.strptime(image["createTime"], TIME_FORMAT)
            assert isinstance(image["sizeMB"], int) and isinstance(image["progress"], str)
            assert image["osType"] == ("windows" if "Windows" in image["platform"] else "linux")
            assert image["architecture"] in ("x86_64", "i386", "arm64")
            assert isinstance(image["uefiSupport"], bool)  # an unknown field clients must keep
            assert ("offline" in image) == (source in OFFLINE_SOURCES)
            if source in OFFLINE_SOURCES:
                assert image["launchPermission"] == "all"
            elif source == "private":
                assert image["launchPermission"] in ("ownerOnly", "specifiedUsers")
            disk = image["systemDisk"]
            if image["rootDeviceType"] == "cloudDisk":
                assert disk["diskCategory"] == "cloud"
                assert set(disk["cloudDisk"]) == {
                    "diskType",
                    "diskSizeGB",
                    "iops",
                    "snapshotId",
                    "encrypted",
                }
                assert disk["cloudDisk"]["snapshotId"] == image["snapshotId"] != ""
            else:
                assert image["rootDeviceType"] == "localDisk"
                assert disk["diskCategory"] == "local" and image["snapshotId"] == ""
                assert set(disk["localDisk"]) == {"diskType", "diskSizeGB"}
            assert len(image["dataDisks"]) <= 3
            assert all(d["diskCategory"] == "cloud" for d in image["dataDisks"])
    assert len(ids) == 2000
    every = [i for r, s in catalogue.partitions() for i in catalogue.images(r, s)]
    assert {i["status"] for i in every} >= {"ready", "creating"}
    assert {i["offline"] for i in every if "offline" in i} == {True, False}
    assert {i["rootDeviceType"] for i in every} == {"cloudDisk", "localDisk"}
    assert {len(i["dataDisks"]) for i in every} == {0, 1, 2, 3}
    assert any(i["name"] == "Windows Server 2019 数据中心版 64位中文版" for i in every)


def test_catalogue_mutations_and_snapshots() -> None:
    catalogue = Catalogue(seed=5, images=200)
    before = catalogue.snapshot()
    public_id = catalogue.images("cn-north-1", "public")[0]["imageId"]
    was_offline = before["cn-north-1", "public"][public_id]["offline"]
    catalogue.take_offline("cn-north-1", public_id)
    assert catalogue.get("cn-north-1", public_id)["offline"] is True  # type: ignore[index]
    catalogue.bring_online("cn-north-1", public_id)
    added = catalogue.add("cn-north-1", "private", name="fresh")
    assert catalogue.images("cn-north-1", "private")[0]["imageId"] == added["imageId"]  # newest
    catalogue.modify("cn-north-1", added["imageId"], desc="changed", uefiSupport=None)
    assert "uefiSupport" not in catalogue.get("cn-north-1", added["imageId"])  # type: ignore[operator]
    catalogue.delete("cn-north-1", added["imageId"])
    assert catalogue.get("cn-north-1", added["imageId"]) is None
    # The snapshot taken before is untouched by the changes (a deep copy).
    assert before["cn-north-1", "public"][public_id]["offline"] == was_offline
    assert added["imageId"] not in before["cn-north-1", "private"]
    snapshot = catalogue.snapshot()
    snapshot["cn-north-1", "public"][public_id]["name"] = "scribbled"
    assert catalogue.get("cn-north-1", public_id)["name"] != "scribbled"  # type: ignore[index]
    private_id = catalogue.images("cn-north-1", "private")[0]["imageId"]
    with pytest.raises(KeyError, match="has no offline flag"):
        catalogue.take_offline("cn-north-1", private_id)
    with pytest.raises(KeyError, match="no image img-nothere"):
        catalogue.delete("cn-north-1", "img-nothere")
    with pytest.raises(KeyError, match="imageId cannot be modified"):
        catalogue.modify("cn-north-1", private_id, imageId="img-other")


# --- the API ---------------------------------------------------------------------------------


async def test_a_page_has_the_documented_shape(
    session: aiohttp.ClientSession, sim: Simulator
) -> None:
    reply = await call(session, sim, [("imageSource", "public")])
    assert reply.status == 200
    body = reply.json()
    assert set(body) == {"requestId", "result"}
    assert reply.headers["x-jdcloud-request-id"] == body["requestId"]
    assert re.fullmatch(r"[0-9a-f]{32}", body["requestId"])
    assert set(body["result"]) == {"images", "totalCount"}
    assert len(body["result"]["images"]) == 20  # default page size
    expected = [i for i in sim.catalogue.images("cn-north-1", "public") if not i["offline"]]
    assert body["result"]["totalCount"] == len(expected)
    assert body["result"]["images"] == expected[:20]


async def test_paging_concatenates_to_exactly_total_count(
    session: aiohttp.ClientSession, sim: Simulator
) -> None:
    for page_size in (10, 33, 100):
        ids: list[str] = []
        page, total = 1, 0
        while True:
            reply = await call(
                session,
                sim,
                [("imageSource", "private"), ("pageNumber", page), ("pageSize", page_size)],
            )
            total = reply.result["totalCount"]
            if not reply.result["images"]:
                break
            ids.extend(i["imageId"] for i in reply.result["images"])
            page += 1
        assert len(ids) == len(set(ids)) == total == sim.catalogue.count("cn-north-1", "private")
        # Served order: createTime descending, then imageId.
        served = [i["imageId"] for i in sim.catalogue.images("cn-north-1", "private")]
        assert ids == served
        created = [sim.catalogue.get("cn-north-1", i)["createTime"] for i in ids]  # type: ignore[index]
        assert created == sorted(created, reverse=True)


def _expect(sim: Simulator, source: str, **conditions: Any) -> list[str]:
    images = sim.catalogue.images("cn-north-1", source)
    return [
        i["imageId"]
        for i in images
        if all(
            (value(i) if callable(value) else i.get(name) == value)
            for name, value in conditions.items()
        )
    ]


# Values a 60-image partition may lack by chance; test_filters adds one image with them.
RARE_VALUES = {"architecture": {"architecture": "i386"}, "bootMode": {"bootMode": "uefi"}}


@pytest.mark.parametrize(
    ("params", "source", "conditions"),
    [
        ([("offline", "false")], "public", {"offline": False}),
        ([("offline", "TRUE")], "public", {"offline": True}),
        ([("offline", "True")], "thirdparty", {"offline": True}),
        ([], "thirdparty", {"offline": False}),
        ([("offline", "true")], "private", {}),  # meaningless outside public/thirdparty
        ([("platform", "Windows Server")], "private", {"platform": "Windows Server"}),
        ([("platform", "CentOS")], "public", {"platform": "CentOS", "offline": False}),
        (
            [("imageName", "ubuntu 22")],
            "public",
            {"name": lambda i: "ubuntu 22" in i["name"].lower(), "offline": False},
        ),
        (
            [("imageName", "64位中文")],
            "thirdparty",
            {"name": lambda i: "64位中文" in i["name"], "offline": False},
        ),
        ([("imageName", "WEB-")], "shared", {"name": lambda i: "web-" in i["name"]}),
        ([("rootDeviceType", "localDisk")], "community", {"rootDeviceType": "localDisk"}),
        (
            [("launchPermission", "specifiedUsers")],
            "private",
            {"launchPermission": "specifiedUsers"},
        ),
        ([("launchPermission", "ownerOnly")], "public", {"offline": False}),  # private only
        ([("status", "ready")], "shared", {"status": "ready"}),
        ([("architecture", "i386")], "private", {"architecture": "i386"}),
        ([("bootMode", "uefi")], "private", {"bootMode": "uefi"}),
        (
            [("platform", "CentOS"), ("rootDeviceType", "cloudDisk"), ("status", "ready")],
            "private",
            {"platform": "CentOS", "rootDeviceType": "cloudDisk", "status": "ready"},
        ),
    ],
)
async def test_filters(
    session: aiohttp.ClientSession,
    sim: Simulator,
    params: Params,
    source: str,
    conditions: dict[str, Any],
) -> None:
    for name, _ in params:
        if name in RARE_VALUES:  # make sure the filter has something to find
            sim.catalogue.add("cn-north-1", source, **RARE_VALUES[name])
    images, total = await list_all(session, sim, [("imageSource", source), *params])
    expected = _expect(sim, source, **conditions)
    assert [i["imageId"] for i in images] == expected
    assert total == len(expected) > 0


async def test_ids_look_up_every_source_and_ignore_other_filters(
    session: aiohttp.ClientSession, sim: Simulator
) -> None:
    wanted = [
        sim.catalogue.images("cn-north-1", "private")[3]["imageId"],
        next(i["imageId"] for i in sim.catalogue.images("cn-north-1", "public") if i["offline"]),
        sim.catalogue.images("cn-north-1", "shared")[0]["imageId"],
        "img-doesnotexi",
    ]
    other_region = sim.catalogue.images("cn-east-1", "public")[0]["imageId"]
    reply = await call(
        session,
        sim,
        [("imageSource", "public"), ("platform", "Nope"), ("ids", [*wanted, other_region])],
    )
    assert reply.status == 200
    assert reply.result["totalCount"] == 3
    assert {i["imageId"] for i in reply.result["images"]} == set(wanted[:3])
    # Without imageSource, ids alone are enough.
    reply = await call(session, sim, [("ids", wanted[:1])])
    assert [i["imageId"] for i in reply.result["images"]] == wanted[:1]


@pytest.mark.parametrize(
    ("params", "code", "status", "message"),
    [
        ([("pageSize", 20)], 400, "FAILED_PRECONDITION", "Parameter ImageSource missing"),
        (
            [("imageSource", "public"), ("pageSize", 9)],
            400,
            "OUT_OF_RANGE",
            "PageSize out of range",
        ),
        (
            [("imageSource", "public"), ("pageSize", 101)],
            400,
            "OUT_OF_RANGE",
            "PageSize out of range",
        ),
        ([("ids", ["img-x"]), ("pageSize", 5)], 400, "OUT_OF_RANGE", "PageSize out of range"),
        ([("imageSource", "public"), ("pageSize", "x")], 400, "INVALID_ARGUMENT", None),
        ([("imageSource", "public"), ("pageNumber", 0)], 400, "INVALID_ARGUMENT", None),
        ([("imageSource", "market")], 400, "INVALID_ARGUMENT", None),
        ([("imageSource", "public"), ("offline", "yes")], 400, "INVALID_ARGUMENT", None),
    ],
)
async def test_parameter_errors(
    session: aiohttp.ClientSession,
    sim: Simulator,
    params: Params,
    code: int,
    status: str,
    message: str | None,
) -> None:
    reply = await call(session, sim, params)
    assert reply.status == code
    body = reply.json()
    assert set(body) == {"requestId", "error"}
    assert body["error"]["code"] == code and body["error"]["status"] == status
    if message is not None:
        assert body["error"]["message"] == message


async def test_page_bounds(session: aiohttp.ClientSession, sim: Simulator) -> None:
    for size in (10, 50):  # 60 images per partition
        reply = await call(session, sim, [("imageSource", "shared"), ("pageSize", size)])
        assert reply.status == 200 and len(reply.result["images"]) == size
    reply = await call(session, sim, [("imageSource", "shared"), ("pageNumber", 999)])
    assert reply.result == {"images": [], "totalCount": sim.catalogue.count("cn-north-1", "shared")}


async def test_unknown_region_and_path(session: aiohttp.ClientSession, sim: Simulator) -> None:
    reply = await call(session, sim, [("imageSource", "public")], region="eu-west-9")
    assert reply.status == 400 and reply.error["status"] == "INVALID_ARGUMENT"
    async with session.get(f"{sim.url}/v1/regions/cn-north-1/instances") as response:
        assert response.status == 404
        assert (await response.json())["error"]["status"] == "NOT_FOUND"


async def test_signature_failures_are_401(session: aiohttp.ClientSession, sim: Simulator) -> None:
    for reply in (
        await call(session, sim, [("imageSource", "public")], secret_key="wrong"),
        await call(session, sim, [("imageSource", "public")], sign=False),
    ):
        assert reply.status == 401
        assert reply.error["code"] == 401 and reply.error["status"] == "UNAUTHENTICATED"
        assert DEMO_SECRET_KEY not in reply.body.decode()
    # A valid signature over different parameters than the ones sent.
    path, query = "/v1/regions/cn-north-1/images", "imageSource=public"
    headers = sign_headers(
        method="GET",
        host=sim.endpoint,
        path=path,
        query=query,
        headers={},
        body=b"",
        access_key=DEMO_ACCESS_KEY,
        secret_key=DEMO_SECRET_KEY,
        region="cn-north-1",
    )
    tampered = URL(f"{sim.url}{path}?imageSource=private", encoded=True)
    async with session.get(tampered, headers=headers) as response:
        assert response.status == 401
    assert [entry["status"] for entry in sim.requests] == [401, 401, 401]


async def test_mutations_show_up_in_the_next_listing(
    session: aiohttp.ClientSession, sim: Simulator
) -> None:
    """Cached listings are invalidated by changes of their partition."""
    online, total = await list_all(session, sim, [("imageSource", "public")])
    victim = online[5]["imageId"]
    sim.catalogue.take_offline("cn-north-1", victim)
    after, after_total = await list_all(session, sim, [("imageSource", "public")])
    assert after_total == total - 1 and victim not in {i["imageId"] for i in after}
    offline, _ = await list_all(session, sim, [("imageSource", "public"), ("offline", "true")])
    assert victim in {i["imageId"] for i in offline}
    sim.catalogue.modify("cn-north-1", online[0]["imageId"], name="renamed 镜像")
    first = await call(session, sim, [("imageSource", "public")])
    assert first.result["images"][0]["name"] == "renamed 镜像"


# --- faults ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "code", "status"),
    [
        ("rate_limit", 429, "RATE_LIMIT"),
        ("quota", 429, "QUOTA_EXCEEDED"),
        ("internal", 500, "INTERNAL"),
        ("bad_gateway", 502, "SOURCE_UNAVAILABLE"),
        ("unavailable", 503, "UNAVAILABLE"),
        ("HTTP_FORBIDDEN", 403, "HTTP_FORBIDDEN"),
    ],
)
async def test_error_faults_then_recovery(
    session: aiohttp.ClientSession, sim: Simulator, kind: str, code: int, status: str
) -> None:
    sim.faults.update({"fail_first_n": [{"kind": kind, "n": 2, "source": "public"}]})
    params = [("imageSource", "public")]
    private = await call(session, sim, [("imageSource", "private")])
    assert private.status == 200  # the rule matches public only
    for _ in range(2):
        reply = await call(session, sim, params)
        assert reply.status == code
        assert reply.error == {"code": code, "status": status, "message": reply.error["message"]}
        assert ("Retry-After" in reply.headers) == (status == "RATE_LIMIT")
    assert (await call(session, sim, params)).status == 200
    assert [e["fault"] for e in sim.requests] == [None, kind, kind, None]


async def test_reset_drops_the_connection(session: aiohttp.ClientSession, sim: Simulator) -> None:
    # aiohttp retries an idempotent request once by itself after a disconnect: drop two.
    sim.faults.update({"fail_first_n": [{"kind": "reset", "n": 2}]})
    with pytest.raises((aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)):
        await call(session, sim, [("imageSource", "public")])
    assert [e["status"] for e in sim.requests] == ["reset", "reset"]
    assert (await call(session, sim, [("imageSource", "public")])).status == 200


async def test_truncated_body_breaks_mid_way(
    session: aiohttp.ClientSession, sim: Simulator
) -> None:
    sim.faults.update({"fail_first_n": [{"kind": "truncated", "n": 1}]})
    with pytest.raises(aiohttp.ClientPayloadError):
        await call(session, sim, [("imageSource", "public"), ("pageSize", 100)])
    assert (await call(session, sim, [("imageSource", "public")])).status == 200


async def test_broken_200_bodies(session: aiohttp.ClientSession, sim: Simulator) -> None:
    sim.faults.update(
        {
            "fail_first_n": [
                {"kind": "malformed", "n": 1},
                {"kind": "html", "n": 1},
                {"kind": "error_200", "n": 1},
            ]
        }
    )
    params = [("imageSource", "public")]
    malformed = await call(session, sim, params)
    assert malformed.status == 200
    with pytest.raises(orjson.JSONDecodeError):
        malformed.json()
    html = await call(session, sim, params)
    assert html.status == 200 and html.headers["Content-Type"].startswith("text/html")
    error = await call(session, sim, params)
    assert (
        error.status == 200 and error.error["status"] == "INTERNAL" and "result" not in error.json()
    )
    assert (await call(session, sim, params)).status == 200


async def test_random_faults_are_reproducible_with_the_seed(session: aiohttp.ClientSession) -> None:
    outcomes = []
    for _ in range(2):
        config = {"error_rates": {"internal": 0.3, "unavailable": 0.2}, "seed": 42}
        async with running_simulator(seed=1, images=100, faults=config) as simulator:
            statuses = [
                (await call(session, simulator, [("imageSource", "public")])).status
                for _ in range(30)
            ]
        outcomes.append(statuses)
    assert outcomes[0] == outcomes[1]
    assert {200, 500, 503} == set(outcomes[0])


async def test_failed_partition_fails_every_time(
    session: aiohttp.ClientSession, sim: Simulator
) -> None:
    sim.faults.update({"fail_partitions": {"cn-north-1/private": "QUOTA_EXCEEDED"}})
    for _ in range(3):
        reply = await call(session, sim, [("imageSource", "private")])
        assert reply.status == 429 and reply.error["status"] == "QUOTA_EXCEEDED"
    assert (await call(session, sim, [("imageSource", "public")])).status == 200
    assert (
        await call(session, sim, [("imageSource", "private")], region="cn-east-1")
    ).status == 200


async def test_rate_limit_per_region(session: aiohttp.ClientSession, sim: Simulator) -> None:
    sim.faults.update({"rate_limit": 5, "retry_after_s": 2})
    replies = await asyncio.gather(
        *(call(session, sim, [("imageSource", "public")]) for _ in range(12))
    )
    statuses = sorted(reply.status for reply in replies)
    assert statuses == [200] * 5 + [429] * 7
    limited = next(reply for reply in replies if reply.status == 429)
    assert limited.error["status"] == "RATE_LIMIT" and limited.headers["Retry-After"] == "2"
    # Another region has its own budget.
    assert (
        await call(session, sim, [("imageSource", "public")], region="cn-south-1")
    ).status == 200
    logged = [e for e in sim.requests if e["region"] == "cn-north-1"]
    assert sorted(e["status"] for e in logged) == statuses


async def test_latency_is_added(session: aiohttp.ClientSession, sim: Simulator) -> None:
    sim.faults.update({"latency_ms": 150})
    started = time.monotonic()
    assert (await call(session, sim, [("imageSource", "public")])).status == 200
    assert time.monotonic() - started >= 0.15


async def test_drift_changes_the_partition_between_pages(
    session: aiohttp.ClientSession, sim: Simulator
) -> None:
    before = sim.catalogue.snapshot()["cn-north-1", "private"]
    shared_before = sim.catalogue.snapshot()["cn-north-1", "shared"]
    sim.faults.update({"drift": 1.0})
    totals = [
        (await call(session, sim, [("imageSource", "private"), ("pageNumber", page)])).result[
            "totalCount"
        ]
        for page in (1, 2, 3, 4, 5, 6)
    ]
    after = sim.catalogue.snapshot()["cn-north-1", "private"]
    assert after != before
    assert totals[-1] == len(after)
    assert len(set(totals)) > 1  # inserts and deletes change the total while paging
    stats = (await (await session.get(f"{sim.url}/__simulator__/stats")).json())["counters"]
    assert stats.get("drift:add", 0) + stats.get("drift:delete", 0) == 6
    # Other partitions are untouched.
    assert sim.catalogue.snapshot()["cn-north-1", "shared"] == shared_before


# --- admin endpoints -------------------------------------------------------------------------


async def test_admin_faults_endpoint(session: aiohttp.ClientSession, sim: Simulator) -> None:
    base = f"{sim.url}/__simulator__/faults"
    async with session.put(base, json={"latency_ms": 5, "error_rates": {"html": 0.1}}) as response:
        assert response.status == 200
        assert (await response.json())["error_rates"] == {"html": 0.1}
    async with session.put(base, json={"drift": 0.5}) as response:
        data = await response.json()
        assert data["drift"] == 0.5 and data["latency_ms"] == 5  # merged, not replaced
    async with session.put(base, json={"error_rates": {"teapot": 0.1}}) as response:
        assert response.status == 400 and "teapot" in (await response.json())["error"]
    async with session.put(base, json={"reset": True}) as response:
        assert (await response.json())["latency_ms"] == 0
    async with session.get(base) as response:
        assert (await response.json())["drift"] == 0
    assert sim.faults.config.drift == 0


async def test_admin_catalogue_endpoints(session: aiohttp.ClientSession, sim: Simulator) -> None:
    base = f"{sim.url}/__simulator__/catalogue"
    public_id = sim.catalogue.images("cn-north-1", "public")[0]["imageId"]

    async def post(op: str, **body: Any) -> tuple[int, dict[str, Any]]:
        async with session.post(f"{base}/{op}", json=body) as response:
            return response.status, await response.json()

    status, data = await post("take_offline", region="cn-north-1", image_id=public_id)
    assert status == 200 and data["image"]["offline"] is True
    assert sim.catalogue.get("cn-north-1", public_id)["offline"] is True  # type: ignore[index]
    status, data = await post("bring_online", region="cn-north-1", image_id=public_id)
    assert data["image"]["offline"] is False
    status, data = await post("add", region="cn-east-2", source="shared", fields={"name": "新镜像"})
    new_id = data["image"]["imageId"]
    assert status == 200 and sim.catalogue.get("cn-east-2", new_id)["name"] == "新镜像"  # type: ignore[index]
    reply = await call(session, sim, [("ids", [new_id])], region="cn-east-2")
    assert reply.result["images"][0]["name"] == "新镜像"
    status, data = await post(
        "modify", region="cn-east-2", image_id=new_id, fields={"status": "error"}
    )
    assert data["image"]["status"] == "error"
    status, data = await post("delete", region="cn-east-2", image_id=new_id)
    assert status == 200 and sim.catalogue.get("cn-east-2", new_id) is None
    assert (await post("delete", region="cn-east-2", image_id=new_id))[0] == 404
    assert (await post("explode", region="cn-east-2"))[0] == 404
    assert (await post("delete", region="cn-east-2"))[0] == 400


async def test_admin_change_log_and_catalogue(
    session: aiohttp.ClientSession, sim: Simulator
) -> None:
    """Every mutation, through the admin endpoint or by drift, is in the change log."""
    base = f"{sim.url}/__simulator__"
    public_id = sim.catalogue.images("cn-north-1", "public")[0]["imageId"]
    async with session.post(
        f"{base}/catalogue/take_offline", json={"region": "cn-north-1", "image_id": public_id}
    ):
        pass
    async with session.post(
        f"{base}/catalogue/delete", json={"region": "cn-north-1", "image_id": "img-nosuchimage"}
    ) as response:
        assert response.status == 404  # a refused change is not logged
    sim.faults.update({"drift": 1.0})
    await call(session, sim, [("imageSource", "private")])
    async with session.get(f"{base}/changes") as response:
        log = await response.json()
    changes = log["changes"]
    assert [c["seq"] for c in changes] == [1, 2] and log["last"] == 2
    assert changes[0]["op"] == "take_offline" and changes[0]["image_id"] == public_id
    assert changes[0]["image"]["offline"] is True and changes[0]["source"] == "public"
    drifted = changes[1]
    assert drifted["op"] in ("add", "delete") and drifted["source"] == "private"
    now = sim.catalogue.get("cn-north-1", drifted["image_id"])
    assert (now is None) == (drifted["op"] == "delete")
    async with session.get(f"{base}/changes?since=1") as response:
        assert [c["seq"] for c in (await response.json())["changes"]] == [2]
    async with session.get(f"{base}/changes?since=x") as response:
        assert response.status == 400
    async with session.get(f"{base}/catalogue") as response:
        served = await response.json()
    assert served == {
        f"{region}/{source}": sim.catalogue.images(region, source)
        for region, source in sim.catalogue.partitions()
    }


async def test_admin_request_log_and_stats(session: aiohttp.ClientSession, sim: Simulator) -> None:
    await call(session, sim, [("imageSource", "public"), ("pageSize", 10)])
    await call(session, sim, [("imageSource", "public"), ("pageSize", 5)])
    async with session.get(f"{sim.url}/__simulator__/requests") as response:
        log = (await response.json())["requests"]
    assert [(e["region"], e["query"], e["status"]) for e in log] == [
        ("cn-north-1", "imageSource=public&pageSize=10", 200),
        ("cn-north-1", "imageSource=public&pageSize=5", 400),
    ]
    async with session.get(f"{sim.url}/__simulator__/stats") as response:
        stats = await response.json()
    assert stats["counters"]["requests"] == 2
    assert stats["logged_by_status"] == {"200": 1, "400": 1}
    assert stats["images"] == 1200 and sum(stats["partitions"].values()) == 1200
    async with session.delete(f"{sim.url}/__simulator__/requests"):
        pass
    assert len(sim.requests) == 0


# --- CLI -------------------------------------------------------------------------------------


def test_cli_options_build_the_fault_config() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(
        [
            "--latency-ms=50",
            "--jitter-ms=10",
            "--rate-limit=10",
            "--error-rate",
            "internal=0.1",
            "--error-rate=reset=0.05",
            "--drift=0.01",
            "--fail-partition=cn-north-1/private",
            "--fail-partition=cn-east-1/public=QUOTA_EXCEEDED",
            "--fail-first=unavailable=3@cn-south-1/shared",
            "--skew=cn-north-1/private=13",
        ]
    )
    config = faults_from_args(args)
    assert config.latency_ms == 50 and config.jitter_ms == 10 and config.rate_limit == 10
    assert config.error_rates == {"internal": 0.1, "reset": 0.05}
    assert config.fail_partitions == {
        "cn-north-1/private": "INTERNAL",
        "cn-east-1/public": "QUOTA_EXCEEDED",
    }
    assert config.fail_first_n[0].region == "cn-south-1" and config.fail_first_n[0].n == 3
    with pytest.raises(ValueError, match="--error-rate"):
        faults_from_args(parser.parse_args(["--error-rate=internal"]))
    with pytest.raises(ValueError, match="unknown fault kind"):
        faults_from_args(parser.parse_args(["--error-rate=boom=0.1"]))


def test_cli_serves_until_sigterm(tmp_path: Any) -> None:
    script = (
        "import argparse, sys\n"
        "from service.simulator.cli import add_arguments, run\n"
        "parser = argparse.ArgumentParser(); add_arguments(parser)\n"
        "sys.exit(run(parser.parse_args(sys.argv[1:])))\n"
    )
    env = {**os.environ, "JDCLOUD_ACCESS_KEY": "", "JDCLOUD_SECRET_KEY": ""}
    process = subprocess.Popen(
        [sys.executable, "-c", script, "--port=0", "--images=50", "--seed=3"],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        match = re.search(r"(http://127\.0\.0\.1:\d+)", line)
        assert match, line
        import urllib.request

        with urllib.request.urlopen(f"{match[1]}/__simulator__/stats", timeout=5) as response:
            assert orjson.loads(response.read())["images"] == 50
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()
