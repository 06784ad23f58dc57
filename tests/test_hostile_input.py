"""Hostile describeImages answers (hypothesis): the sync never crashes, never writes a
corrupt row, reports each bad item with its partition, and valid items still land.

A raw in-process aiohttp server plays the API for one partition (cn-north-1/private).
Each example first syncs a valid catalogue, then serves a hostile version of it:
items corrupted in ways the API must not be trusted with (missing or non-string
``imageId``, wrong types, negative sizes, NUL characters, huge strings, bad times),
harmless oddities that must still land (numbers as strings, nulls, missing optional
fields, unknown fields, unicode), duplicate items across pages, ``totalCount`` lies,
and pages answered with an HTML page, a 200 carrying an ``error`` object, a body that
is not UTF-8, or a truncated body, once (retried) or always (the partition fails).

The expected outcome is computed here from what was served, independently of the
service's own code. Example counts are modest so the suite stays fast; the number run
is printed (``-s``).
"""

from __future__ import annotations

import copy
import logging
import math
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
import sqlalchemy as sa
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy.ext.asyncio import AsyncEngine

from service.jdcloud.client import ImagesClient, open_session
from service.jdcloud.listing import Partition
from service.normalize import normalize_image
from service.simulator import Catalogue
from service.sync import sync_once
from tests.fault_helpers import MEMBERS_ROUTE, assert_invariants, shared_with_no_one, truncate
from tests.local_api import local_api

pytestmark = pytest.mark.db

REGION, SOURCE = "cn-north-1", "private"
PARTITION = Partition(REGION, SOURCE)
PAGE_SIZE = 10
EXAMPLES = 40

# --- what the fake API serves -------------------------------------------------------------


@dataclass
class Script:
    """One hostile listing: the items in served order, the totalCount each page claims,
    and page faults (page number -> (kind, times; 0 = always))."""

    items: list[Any]
    total: int
    page_totals: dict[int, int] = field(default_factory=dict)
    faults: dict[int, tuple[str, int]] = field(default_factory=dict)
    served: Counter[int] = field(default_factory=Counter)


class FakeApi:
    def __init__(self) -> None:
        self.script = Script([], 0)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        script = self.script
        number = int(request.query.get("pageNumber", "1"))
        size = int(request.query.get("pageSize", "20"))
        script.served[number] += 1
        kind, times = script.faults.get(number, ("", 0))
        if kind and (times == 0 or script.served[number] <= times):
            return await _fault(request, kind)
        page = script.items[(number - 1) * size : number * size]
        body = b'{"requestId":"r","result":{"images":%s,"totalCount":%d}}' % (
            _encode(page),
            script.page_totals.get(number, script.total),
        )
        return web.Response(body=body, content_type="application/json")


def _encode(items: list[Any]) -> bytes:
    # A NonUtf8 marker becomes raw invalid bytes inside a JSON string.
    return orjson.dumps(items).replace(b'"@@NONUTF8@@"', b'"\xff\xfe bad"')


async def _fault(request: web.Request, kind: str) -> web.StreamResponse:
    if kind == "html":
        return web.Response(
            body=b"<html><body><h1>502 Bad Gateway</h1></body></html>", content_type="text/html"
        )
    if kind == "error_200":
        return web.Response(
            body=b'{"requestId":"r","error":{"code":500,"status":"INTERNAL","message":"oops"}}',
            content_type="application/json",
        )
    if kind == "non_utf8":
        return web.Response(
            body=b'{"requestId":"r","result":{"images":[{"imageId":"\xff\xfe"}],"totalCount":1}}',
            content_type="application/json",
        )
    assert kind == "truncated"
    return web.Response(body=b'{"requestId":"r","result":{"images":[{"imageId":"img-',
                        content_type="application/json")  # fmt: skip


@pytest.fixture(scope="module")
async def fake_api() -> AsyncIterator[tuple[FakeApi, str]]:
    api = FakeApi()
    async with local_api(api.handle, {MEMBERS_ROUTE: shared_with_no_one}) as url:
        yield api, url


# --- hostile items --------------------------------------------------------------------------

HUGE = "x" * (300 * 1024)

# name -> (field, value): the item cannot be trusted and must be rejected.
INVALID = {
    "negative_size": ("systemDiskSizeGB", -40),
    "negative_size_mb": ("sizeMB", "-1"),
    "size_not_number": ("systemDiskSizeGB", "forty"),
    "size_object": ("sizeMB", {"v": 1}),
    "size_bool": ("systemDiskSizeGB", True),
    "size_overflow": ("sizeMB", 2**40),
    "name_object": ("name", {"first": "a"}),
    "name_list": ("name", ["a"]),
    "nul_in_name": ("name", "evil\x00name"),
    "nul_in_desc": ("desc", "\x00"),
    "huge_desc": ("desc", HUGE),
    "bad_time": ("createTime", "yesterday"),
    "time_before_utc_year_1": ("createTime", "0001-01-01 00:00:00"),  # crashed the COPY once
    "time_at_the_end": ("createTime", "9999-12-31T23:59:59.999999+00:00"),  # -> 'infinity'
    "offline_word": ("offline", "maybe"),
    "disks_not_list": ("dataDisks", "vdb"),
    "system_disk_str": ("systemDisk", "vda"),
}
# name -> (field, value): odd but valid; the item must land as served.
BENIGN = {
    "size_as_string": ("systemDiskSizeGB", "40"),
    "progress_number": ("progress", 100),
    "name_null": ("name", None),
    "desc_missing": ("desc", ...),
    "platform_missing": ("platform", ...),
    "unicode_name": ("name", "镜像 🚀 \u202e"),
    "long_name": ("name", "n" * 5000),
    "unknown_field": ("futureField", {"nested": [1, None, "x"]}),
    "disks_null": ("dataDisks", None),
    "system_disk_null": ("systemDisk", None),
}
# name -> item: no usable imageId at all.
IDLESS = {
    "id_missing": ...,
    "id_null": None,
    "id_number": 42,
    "id_empty": "",
    "id_object": {"id": "img-x"},
}


def _apply(item: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    item = copy.deepcopy(item)
    if value is ...:
        item.pop(key, None)
    else:
        item[key] = value
    return item


@st.composite
def scripts(draw: Any) -> tuple[list[dict[str, Any]], Script, dict[str, Any]]:
    """(base catalogue, hostile script, expectations)."""
    n = draw(st.integers(min_value=3, max_value=28))
    base = Catalogue(
        seed=draw(st.integers(0, 10_000)), images=n, regions=[REGION], sources=[SOURCE]
    ).images(REGION, SOURCE)
    served: list[Any] = []
    valid: dict[str, dict[str, Any]] = {}  # id -> item as served (must land)
    invalid_ids: set[str] = set()
    idless = 0
    for item in base:
        fate = draw(st.sampled_from(["keep", "keep", "invalid", "benign", "drop"]))
        if fate == "drop":
            continue
        if fate == "invalid":
            key, value = INVALID[draw(st.sampled_from(sorted(INVALID)))]
            served.append(_apply(item, key, value))
            invalid_ids.add(item["imageId"])
            continue
        if fate == "benign":
            key, value = BENIGN[draw(st.sampled_from(sorted(BENIGN)))]
            item = _apply(item, key, value)
        served.append(item)
        valid[item["imageId"]] = item
    for i in range(draw(st.integers(0, 3))):  # brand-new hostile items
        template = copy.deepcopy(base[0])
        kind = draw(st.sampled_from(["invalid", "idless", "benign", "not_object"]))
        if kind == "not_object":
            served.append(draw(st.sampled_from([None, 7, "img-str", [1, 2]])))
            idless += 1
            continue
        template["imageId"] = f"img-new{i}"
        if kind == "idless":
            template = _apply(template, "imageId", IDLESS[draw(st.sampled_from(sorted(IDLESS)))])
            idless += 1
        elif kind == "invalid":
            key, value = INVALID[draw(st.sampled_from(sorted(INVALID)))]
            template = _apply(template, key, value)
            invalid_ids.add(template["imageId"])
        else:
            valid[template["imageId"]] = template
        served.insert(draw(st.integers(0, len(served))), template)
    order = draw(st.permutations(range(len(served))))
    served = [served[i] for i in order]
    # Duplicates: an item served again on a later page, as page shifts do.
    duplicates = 0
    for _ in range(draw(st.integers(0, 2))):
        candidates = [x for x in served if isinstance(x, dict) and str(x.get("imageId")) in valid]
        if candidates:
            served.insert(len(served), copy.deepcopy(draw(st.sampled_from(candidates))))
            duplicates += 1
    distinct = len(valid) + len(invalid_ids) + idless
    # totalCount: the truth (distinct items), counting the duplicates, or a lie.
    total = draw(
        st.sampled_from(
            [
                distinct,
                distinct,
                len(served),
                distinct + draw(st.integers(1, 15)),
                max(0, distinct - draw(st.integers(1, 3))),
                0,
            ]
        )
    )
    script = Script(served, total)
    pages = max(1, math.ceil(total / PAGE_SIZE))
    if pages > 1 and draw(st.booleans()):
        script.page_totals[draw(st.integers(2, pages))] = total + 1  # changes while paging
    for _ in range(draw(st.integers(0, 2))):
        page = draw(st.integers(1, pages))
        kind = draw(st.sampled_from(["html", "error_200", "non_utf8", "truncated"]))
        script.faults[page] = (kind, draw(st.sampled_from([1, 1, 0])))  # once, or always
    if draw(st.booleans()) and valid:  # a NonUtf8 string inside an item: the page is unreadable
        victim = draw(st.sampled_from(sorted(valid)))
        index = next(
            i for i, x in enumerate(served) if isinstance(x, dict) and x.get("imageId") == victim
        )
        served[index] = _apply(served[index], "desc", "@@NONUTF8@@")
        page = index // PAGE_SIZE + 1
        if page <= _pages_read(total):
            script.faults[page] = ("non_utf8", 0)
    return base, script, {"valid": valid, "invalid_ids": invalid_ids, "idless": idless}


def _pages_read(total: int) -> int:
    """Pages a listing reads for a totalCount: when the last page is full, one more, so
    that a totalCount hiding whole pages cannot make the partition look complete."""
    pages = max(1, math.ceil(total / PAGE_SIZE))
    return pages + 1 if total and total % PAGE_SIZE == 0 else pages


def _expect(script: Script, facts: dict[str, Any]) -> dict[str, Any]:
    """The outcome, from the listing rules (DESIGN.md) applied to what was served."""
    pages = _pages_read(script.total)
    if any(times == 0 and page <= pages for page, (_k, times) in script.faults.items()):
        return {"status": "failed"}
    fetched = script.items[: pages * PAGE_SIZE]
    ids: set[str] = set()
    idless = 0
    for x in fetched:
        image_id = x.get("imageId") if isinstance(x, dict) else None
        if isinstance(image_id, str) and image_id.strip():
            ids.add(image_id)
        else:
            idless += 1
    settled = len(ids) + idless == script.total and not script.page_totals
    landed = {i: facts["valid"][i] for i in ids if i in facts["valid"]}
    rejected = ids & facts["invalid_ids"]
    complete = settled and idless == 0
    return {
        "status": "succeeded" if complete else "incomplete",
        "landed": landed,
        "rejected": rejected,
        "listed_ids": ids,
        "bad_items": len(rejected) + idless,
    }


# --- the property -------------------------------------------------------------------------


async def _state(engine: AsyncEngine) -> dict[str, dict[str, Any]]:
    async with engine.connect() as conn:
        rows = (await conn.execute(sa.text("SELECT * FROM inventory.images"))).mappings()
        return {r["image_id"]: dict(r) for r in rows}


examples_run = 0


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(case=scripts())
async def test_hostile_listing(
    case: Any,
    engine: AsyncEngine,
    fake_api: tuple[FakeApi, str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    global examples_run
    examples_run += 1
    base, script, facts = case
    api, url = fake_api
    await truncate(engine)
    async with open_session(connect_timeout=5, request_timeout=5, limit=8) as session:
        from service.jdcloud.signer import Credentials

        client = ImagesClient(
            session, endpoint=url, credentials=Credentials("ak", "sk"), rate_limit=0,
            max_attempts=2,
        )  # fmt: skip
        api.script = Script(base, len(base))
        first = await sync_once(engine, client, [PARTITION], page_size=PAGE_SIZE)
        assert first.ok
        before = await _state(engine)
        api.script = script
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="service.sync"):
            report = await sync_once(engine, client, [PARTITION], page_size=PAGE_SIZE)
    expected = _expect(script, facts)
    (outcome,) = report.partitions
    after = await _state(engine)
    await assert_invariants(engine)
    # No row is corrupt: every row re-validates from its raw object and agrees with it.
    for image_id, row in after.items():
        again = normalize_image(row["raw"], region_id=REGION, image_source=SOURCE)
        assert (again.name, again.size_mb, again.system_disk_size_gb, again.offline) == (
            row["name"], row["size_mb"], row["system_disk_size_gb"], row["offline"]
        ), image_id  # fmt: skip
    assert outcome.status == expected["status"], (outcome, script.faults, script.total)
    if expected["status"] == "failed":
        assert after == before  # rolled back whole: nothing lost, nothing invented
        return
    # Valid items landed exactly as served.
    for image_id, item in expected["landed"].items():
        assert image_id in after and after[image_id]["removed_at"] is None, image_id
        assert after[image_id]["raw"] == item, image_id
    # Rejected items wrote nothing: a known one keeps its old row, listed; a new one has none.
    for image_id in expected["rejected"]:
        if image_id in before:
            assert after[image_id] == before[image_id], image_id
        else:
            assert image_id not in after, image_id
    # Only a complete listing removes, and only what it did not list.
    removed = {i for i, r in after.items() if r["removed_at"] is not None}
    if expected["status"] == "succeeded":
        assert removed == set(before) - expected["listed_ids"]
    else:
        assert removed == set()
    # Each bad item is counted in its partition's record and logged with the partition.
    async with engine.connect() as conn:
        recorded = await conn.scalar(
            sa.text(
                "SELECT invalid_items FROM inventory.sync_partitions WHERE run_id = :r"
                " AND region_id = :g AND image_source = :s"
            ),
            {"r": report.run_id, "g": REGION, "s": SOURCE},
        )
    assert recorded == expected["bad_items"] == outcome.invalid_items
    logged = [r.getMessage() for r in caplog.records if "invalid item skipped" in r.getMessage()]
    assert all(f"partition {REGION}/{SOURCE}" in line for line in logged)
    for image_id in expected["rejected"]:
        assert any(image_id in line for line in logged), image_id


def test_zz_report_examples_run() -> None:
    """Printed for the closing note (run with -s)."""
    print(f"hostile listing examples run: {examples_run}")
    assert examples_run == 0 or examples_run >= 1


@pytest.mark.parametrize("kind", ["html", "error_200", "truncated", "non_utf8"])
async def test_unreadable_200_is_retried(
    engine: AsyncEngine, fake_api: tuple[FakeApi, str], kind: str
) -> None:
    """A 200 whose body is HTML, an error object, cut short or not UTF-8 is transient:
    retried like a 5xx (it used to fail the partition at the first occurrence)."""
    from service.jdcloud.signer import Credentials

    api, url = fake_api
    base = Catalogue(seed=1, images=25, regions=[REGION], sources=[SOURCE]).images(REGION, SOURCE)
    api.script = Script(base, len(base), faults={2: (kind, 1)})
    async with open_session(connect_timeout=5, request_timeout=5, limit=8) as session:
        client = ImagesClient(
            session, endpoint=url, credentials=Credentials("ak", "sk"), rate_limit=0,
            max_attempts=2,
        )  # fmt: skip
        report = await sync_once(engine, client, [PARTITION], page_size=PAGE_SIZE)
    assert report.ok, report.partitions
    assert report.partitions[0].retries == 1
    assert report.total("created") == 25
