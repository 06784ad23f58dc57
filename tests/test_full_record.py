"""The full image record end to end: shares (describeImageMembers) and instance-type
constraints (describeImageConstraintsBatch) synced, changed through the simulator's
admin operations and synced again; a failing extra call fails its partition whole."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import sqlalchemy as sa
from aiohttp import web
from sqlalchemy.ext.asyncio import AsyncEngine

from service.app import open_runtime
from service.normalize import BEIJING
from service.simulator import Simulator, running_simulator
from service.simulator.catalogue import OFFLINE_SOURCES, Catalogue
from service.sync import SyncReport, sync_once
from tests.fault_helpers import MEMBERS_ROUTE, assert_invariants, row_versions
from tests.local_api import local_api

REGIONS = "cn-north-1,cn-east-1"
SOURCES = "public,thirdparty,private,shared"


async def sync(engine: AsyncEngine, sim: Simulator, make_settings: Any, **env: str) -> SyncReport:
    settings = make_settings(
        sim.url, **{"IMAGE_SYNC_REGIONS": REGIONS, "IMAGE_SYNC_SOURCES": SOURCES, **env}
    )
    async with open_runtime(settings) as rt:
        return await sync_once(engine, rt.client, rt.partitions())


def expected_columns(
    sim: Simulator, region: str, source: str, api: dict[str, Any]
) -> dict[str, Any]:
    """What the new columns should hold for one simulated image (from the SDK's model)."""
    image_id, charge = api["imageId"], api.get("chargeInfo")
    shared = source == "private" and api["launchPermission"] == "specifiedUsers"
    constraint = sim.catalogue.constraint(region, image_id) if source in OFFLINE_SOURCES else None
    expired = api.get("expiredTime")
    return {
        "login_name": api.get("loginName"),
        "imported": api.get("imported"),
        "expired_at": datetime.strptime(expired, "%Y-%m-%d %H:%M:%S").replace(tzinfo=BEIJING)
        if expired
        else None,
        "instance_id": api.get("instanceId"),
        "charge_service_code": charge["serviceCode"] if charge else None,
        "charge_formula": charge["formula"] if charge else None,
        "shared_with": sim.catalogue.members(region, image_id) if shared else None,
        "instance_types_constraint": constraint["constraintsType"] if constraint else None,
        "instance_types": constraint["instanceTypes"] if constraint else None,
    }


async def assert_columns_match(engine: AsyncEngine, sim: Simulator) -> None:
    async with engine.connect() as conn:
        rows = {
            (r.pop("region_id"), r.pop("image_id")): r
            for r in map(
                dict,
                (
                    await conn.execute(
                        sa.text(
                            "SELECT region_id, image_id, login_name, imported, expired_at,"
                            " instance_id, charge_service_code, charge_formula, shared_with,"
                            " instance_types_constraint, instance_types"
                            " FROM inventory.current_images"
                        )
                    )
                ).mappings(),
            )
        }
    expected = {
        (region, image["imageId"]): expected_columns(sim, region, source, image)
        for region in REGIONS.split(",")
        for source in SOURCES.split(",")
        for image in sim.catalogue.images(region, source)
    }
    assert rows.keys() == expected.keys()
    for key, want in expected.items():
        assert rows[key] == want, key


async def updated_events(engine: AsyncEngine, run_id: int) -> dict[str, tuple[Any, ...]]:
    async with engine.connect() as conn:
        result = await conn.execute(
            sa.text(
                "SELECT image_id, changed_fields, before, after FROM inventory.image_events"
                " WHERE sync_run_id = :run AND event_type = 'updated'"
            ),
            {"run": run_id},
        )
        return {r.image_id: (r.changed_fields, r.before, r.after) for r in result}


def extra_requests(sim: Simulator) -> dict[str, int]:
    counts = {"members": 0, "constraints": 0, "pages": 0}
    for entry in sim.requests:
        path = entry["path"]
        kind = (
            "members"
            if path.endswith("/members")
            else "constraints"
            if path.endswith("/imageConstraints")
            else "pages"
        )
        counts[kind] += 1
    return counts


async def test_shares_and_constraints_follow_the_simulator(
    engine: AsyncEngine, make_settings: Any
) -> None:
    async with running_simulator(seed=3, images=400) as sim:
        first = await sync(engine, sim, make_settings)
        assert first.ok
        await assert_columns_match(engine, sim)
        async with engine.connect() as conn:
            filled = (
                await conn.execute(
                    sa.text(
                        "SELECT count(shared_with), count(instance_types),"
                        " count(*) FILTER (WHERE offline AND instance_types IS NOT NULL),"
                        " count(*) FILTER (WHERE architecture = 'arm64')"
                        " FROM inventory.images"
                    )
                )
            ).one()
        assert all(filled), filled  # shares, constraints (offline ones too), arm64 seen

        # Change members and constraints through the admin endpoints.
        catalogue = sim.catalogue
        private = catalogue.images("cn-north-1", "private")
        # shared[1] has two pins or more: unsharing one leaves it shared.
        shared = sorted(
            (i["imageId"] for i in private if i["launchPermission"] == "specifiedUsers"),
            key=lambda i: -len(catalogue.members("cn-north-1", i)),
        )
        alone = [i["imageId"] for i in private if i["launchPermission"] == "ownerOnly"]
        public = [i["imageId"] for i in catalogue.images("cn-east-1", "public")]
        # with_c[1] excludes: setting new_c changes both constraint columns.
        with_c = sorted(
            (i for i in public if catalogue.constraint("cn-east-1", i)),
            key=lambda i: catalogue.constraint("cn-east-1", i)["constraintsType"] == "excludes",
            reverse=True,
        )
        with_c[0], with_c[1] = with_c[1], with_c[0]
        without_c = [i for i in public if not catalogue.constraint("cn-east-1", i)]
        before_members = {i: catalogue.members("cn-north-1", i) for i in shared[:2]}
        before_c = {i: catalogue.constraint("cn-east-1", i) for i in with_c[:2]}
        new_c = {"constraintsType": "includes", "instanceTypes": ["g.n2.large", "c.n2.large"]}
        async with open_runtime(make_settings(sim.url)) as rt:
            http = rt.session
            for path, method, body in (
                ("shares/share", "POST", {"image_id": shared[0], "pins": ["jd_new"]}),
                (
                    "shares/unshare",
                    "POST",
                    {"image_id": shared[1], "pins": before_members[shared[1]][:1]},
                ),
                ("shares/share", "POST", {"image_id": alone[0], "pins": ["jd_zed", "jd_amy"]}),
                ("constraints", "PUT", {"image_id": with_c[0], "constraint": None}),
                ("constraints", "PUT", {"image_id": with_c[1], "constraint": new_c}),
                ("constraints", "PUT", {"image_id": without_c[0], "constraint": new_c}),
            ):
                region = "cn-east-1" if path == "constraints" else "cn-north-1"
                async with http.request(
                    method, f"{sim.url}/__simulator__/{path}", json={"region": region, **body}
                ) as response:
                    assert response.status == 200, await response.text()

        second = await sync(engine, sim, make_settings)
        assert second.ok
        await assert_columns_match(engine, sim)
        events = await updated_events(engine, second.run_id)
        old_members = before_members[shared[1]]
        both = ["instance_types", "instance_types_constraint"]
        old = before_c[with_c[0]]
        assert len(old_members) > 1 and before_c[with_c[1]]["constraintsType"] == "excludes"
        assert events == {
            shared[0]: (
                ["shared_with"],
                {"shared_with": before_members[shared[0]]},
                {"shared_with": sorted([*before_members[shared[0]], "jd_new"])},
            ),
            shared[1]: (
                ["shared_with"],
                {"shared_with": old_members},
                {"shared_with": old_members[1:]},
            ),
            # Sharing an ownerOnly image changes its launchPermission too.
            alone[0]: (
                ["launch_permission", "shared_with"],
                {"launch_permission": "ownerOnly", "shared_with": None},
                {"launch_permission": "specifiedUsers", "shared_with": ["jd_amy", "jd_zed"]},
            ),
            with_c[0]: (
                both,
                {
                    "instance_types": old["instanceTypes"],
                    "instance_types_constraint": old["constraintsType"],
                },
                {"instance_types": None, "instance_types_constraint": None},
            ),
            with_c[1]: (
                both,
                {
                    "instance_types": before_c[with_c[1]]["instanceTypes"],
                    "instance_types_constraint": "excludes",
                },
                {"instance_types": new_c["instanceTypes"], "instance_types_constraint": "includes"},
            ),
            without_c[0]: (
                both,
                {"instance_types": None, "instance_types_constraint": None},
                {"instance_types": new_c["instanceTypes"], "instance_types_constraint": "includes"},
            ),
        }
        assert second.total("updated") == 6 and second.total("created") == 0

        # Nothing changed: the extra calls are made again, and not one row is written.
        versions = await row_versions(engine)
        sim.requests.clear()
        third = await sync(engine, sim, make_settings)
        assert third.ok and third.total("updated") == 0
        assert await row_versions(engine) == versions
        counts = extra_requests(sim)
        members_expected = sum(
            i["launchPermission"] == "specifiedUsers"
            for r in REGIONS.split(",")
            for i in sim.catalogue.images(r, "private")
        )
        assert counts["members"] == members_expected
        # One batch per public/thirdparty partition: each has under 100 images here.
        assert counts["constraints"] == 4
        assert sum(p.api_requests for p in third.partitions) == sum(counts.values())
    await assert_invariants(engine)  # images_as_of replays shares and constraints too


async def test_a_failing_members_call_fails_its_partition_with_nothing_applied(
    engine: AsyncEngine, make_settings: Any
) -> None:
    faults = {"fail_first_n": [{"kind": "quota", "n": 1, "source": "describeImageMembers"}]}
    async with running_simulator(seed=4, images=200, faults=faults) as sim:
        report = await sync(engine, sim, make_settings, IMAGE_SYNC_REGIONS="cn-north-1")
        failed = [p for p in report.partitions if p.status == "failed"]
        assert [str(p.partition) for p in failed] == ["cn-north-1/private"]
        assert failed[0].error_status == "QUOTA_EXCEEDED"
        assert "Quota exceeded" in (failed[0].error_message or "")
        async with engine.connect() as conn:
            written = await conn.scalar(
                sa.text(
                    "SELECT count(*) FROM inventory.images WHERE image_source = 'private'"
                    " AND region_id = 'cn-north-1'"
                )
            )
            recorded = (
                await conn.execute(
                    sa.text(
                        "SELECT status, error_status, api_requests FROM inventory.sync_partitions"
                        " WHERE image_source = 'private'"
                    )
                )
            ).one()
        assert written == 0  # the pages were staged, then rolled back with the partition
        assert recorded.status == "failed" and recorded.error_status == "QUOTA_EXCEEDED"
        assert recorded.api_requests == failed[0].api_requests > 1


async def test_extra_calls_are_retried_and_counted_like_pages(
    engine: AsyncEngine, make_settings: Any
) -> None:
    rules = [
        {"kind": "unavailable", "n": 2, "source": "describeImageConstraintsBatch"},
        {"kind": "internal", "n": 1, "source": "describeImageMembers"},
    ]
    async with running_simulator(seed=4, images=200, faults={"fail_first_n": rules}) as sim:
        report = await sync(engine, sim, make_settings, IMAGE_SYNC_REGIONS="cn-north-1")
        assert report.ok
        retries = {p.partition.source: p.retries for p in report.partitions}
        assert retries["private"] == 1
        assert retries["public"] + retries["thirdparty"] == 2
        await assert_columns_match_region(engine, sim, "cn-north-1")

    # Past the retries, a 5xx fails the partition with the API's status and message.
    always = {"fail_partitions": {"cn-north-1/describeImageConstraintsBatch": "internal"}}
    async with running_simulator(seed=4, images=200, faults=always) as sim:
        sim.catalogue.set_constraint(
            "cn-north-1",
            sim.catalogue.images("cn-north-1", "public")[0]["imageId"],
            {"constraintsType": "excludes", "instanceTypes": ["x.y"]},
        )
        versions = await row_versions(engine)
        report = await sync(
            engine, sim, make_settings, IMAGE_SYNC_REGIONS="cn-north-1", IMAGE_SYNC_MAX_ATTEMPTS="2"
        )
        failed = {p.partition.source: p for p in report.partitions if p.status == "failed"}
        assert set(failed) == {"public", "thirdparty"}
        assert failed["public"].error_status == "INTERNAL"
        assert (
            failed["public"].error_message
            and "Internal server error" in failed["public"].error_message
        )
        assert await row_versions(engine) == versions


async def assert_columns_match_region(engine: AsyncEngine, sim: Simulator, region: str) -> None:
    async with engine.connect() as conn:
        stored = {
            r.image_id: (r.shared_with, r.instance_types_constraint, r.instance_types)
            for r in await conn.execute(
                sa.text(
                    "SELECT image_id, shared_with, instance_types_constraint, instance_types"
                    " FROM inventory.images WHERE region_id = :r"
                ),
                {"r": region},
            )
        }
    for source in SOURCES.split(","):
        for image in sim.catalogue.images(region, source):
            want = expected_columns(sim, region, source, image)
            assert stored[image["imageId"]] == (
                want["shared_with"],
                want["instance_types_constraint"],
                want["instance_types"],
            )


async def test_constraint_batches_keep_their_urls_under_the_limit(
    engine: AsyncEngine, make_settings: Any
) -> None:
    async with running_simulator(seed=6, images=1600) as sim:
        report = await sync(
            engine,
            sim,
            make_settings,
            IMAGE_SYNC_REGIONS="cn-north-1",
            IMAGE_SYNC_MAX_URL_LENGTH="512",
        )
        assert report.ok
        urls = [
            f"{sim.url}{e['path']}?{e['query']}"
            for e in sim.requests
            if e["path"].endswith("/imageConstraints")
        ]
        asked = [q for u in urls for q in u.split("?", 1)[1].split("&")]
        listed = sum(sim.catalogue.count("cn-north-1", s) for s in ("public", "thirdparty"))
        assert len(asked) == listed  # every public/thirdparty image, once
        assert len(urls) > 2 and all(len(u) <= 512 for u in urls)
        await assert_columns_match_region(engine, sim, "cn-north-1")


async def test_an_image_deleted_before_its_members_call_keeps_its_stored_shares(
    engine: AsyncEngine, make_settings: Any
) -> None:
    """describeImageMembers answers 404 for an image listed a moment before: drift, not a
    failure; its stored shares stand until a listing shows it gone."""
    image = Catalogue(seed=2, images=40, regions=("cn-north-1",), sources=("private",)).images(
        "cn-north-1", "private"
    )[0]
    image["launchPermission"] = "specifiedUsers"
    state = {"gone": False}

    async def listing(request: web.Request) -> web.Response:
        return web.json_response({"requestId": "r", "result": {"images": [image], "totalCount": 1}})

    async def members(request: web.Request) -> web.Response:
        if state["gone"]:
            error = {"code": 404, "status": "NOT_FOUND", "message": "Image not found"}
            return web.json_response({"requestId": "r", "error": error}, status=404)
        return web.json_response({"requestId": "r", "result": {"pins": ["jd_b", "jd_a"]}})

    app = web.Application()
    app.router.add_get("/v1/regions/{region}/images", listing)
    app.router.add_get(MEMBERS_ROUTE, members)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    url = "http://{}:{}".format(*runner.addresses[0][:2])
    settings = make_settings(url, IMAGE_SYNC_REGIONS="cn-north-1", IMAGE_SYNC_SOURCES="private")
    try:
        async with open_runtime(settings) as rt:
            assert (await sync_once(engine, rt.client, rt.partitions())).ok
            versions = await row_versions(engine)
            state["gone"] = True
            report = await sync_once(engine, rt.client, rt.partitions())
    finally:
        await runner.cleanup()
    assert report.ok and report.total("updated") == 0
    assert await row_versions(engine) == versions
    async with engine.connect() as conn:
        shared = await conn.scalar(sa.text("SELECT shared_with FROM inventory.images"))
    assert shared == ["jd_a", "jd_b"]


CONSTRAINTS_BATCH_ROUTE = "/v1/regions/{region}/imageConstraints"
CONSTRAINT_ROUTE = "/v1/regions/{region}/images/{image_id}/constraints"


async def test_an_image_deleted_before_its_constraints_call_keeps_its_stored_constraint(
    engine: AsyncEngine, make_settings: Any
) -> None:
    """describeImageConstraintsBatch lists only images that exist and have a constraint: an
    image deleted between its listing and the batch is absent from the answer, which must
    not read as "its constraint was removed" (found by the soak: `updated`, then `removed`).
    The absent id is confirmed with describeImageConstraints: 404 keeps the stored value;
    an image that is still there and has no constraint any more is cleared."""
    image = Catalogue(seed=2, images=40, regions=("cn-north-1",), sources=("public",)).images(
        "cn-north-1", "public"
    )[0]
    constraint = {"constraintsType": "excludes", "instanceTypes": ["g.n2.large"]}
    state = {"batch_has_it": True, "exists": True}

    async def listing(request: web.Request) -> web.Response:
        online = request.query.get("offline") != "true"  # only the offline=false listing
        images = [image] if online else []
        return web.json_response(
            {"requestId": "r", "result": {"images": images, "totalCount": len(images)}}
        )

    def entry() -> dict[str, Any]:
        return {"imageId": image["imageId"], "imageInstanceTypeConstraint": constraint}

    async def batch(request: web.Request) -> web.Response:
        found = [entry()] if state["batch_has_it"] else []
        return web.json_response({"requestId": "r", "result": {"imageConstraints": found}})

    async def single(request: web.Request) -> web.Response:
        if not state["exists"]:
            error = {"code": 404, "status": "NOT_FOUND", "message": "Image not found"}
            return web.json_response({"requestId": "r", "error": error}, status=404)
        none = {"imageId": image["imageId"], "imageInstanceTypeConstraint": None}
        return web.json_response({"requestId": "r", "result": {"imageConstraints": none}})

    routes = {CONSTRAINTS_BATCH_ROUTE: batch, CONSTRAINT_ROUTE: single}
    async with local_api(listing, routes) as url:
        settings = make_settings(url, IMAGE_SYNC_REGIONS="cn-north-1", IMAGE_SYNC_SOURCES="public")
        async with open_runtime(settings) as rt:
            assert (await sync_once(engine, rt.client, rt.partitions())).ok
            versions = await row_versions(engine)
            state.update(batch_has_it=False, exists=False)  # deleted after its listing
            report = await sync_once(engine, rt.client, rt.partitions())
            assert report.ok and report.total("updated") == 0
            assert await row_versions(engine) == versions
            state["exists"] = True  # there, with its constraint lifted
            report = await sync_once(engine, rt.client, rt.partitions())
    assert report.ok and report.total("updated") == 1
    async with engine.connect() as conn:
        stored = (
            await conn.execute(
                sa.text("SELECT instance_types_constraint, instance_types FROM inventory.images")
            )
        ).one()
    assert tuple(stored) == (None, None)


async def test_an_image_listed_in_both_listings_with_changed_extras_is_merged_once(
    engine: AsyncEngine, make_settings: Any
) -> None:
    """An API that lists one unchanged image in both the online and the offline listing
    while its constraint changes: the image is staged as seen twice and promoted for its
    new extras once (it failed with "ON CONFLICT DO UPDATE command cannot affect row a
    second time")."""
    image = Catalogue(seed=3, images=40, regions=("cn-north-1",), sources=("public",)).images(
        "cn-north-1", "public"
    )[0]
    constraint: dict[str, Any] = {"constraintsType": "includes", "instanceTypes": ["g.n2.large"]}

    async def listing(request: web.Request) -> web.Response:
        return web.json_response({"requestId": "r", "result": {"images": [image], "totalCount": 1}})

    async def batch(request: web.Request) -> web.Response:
        found = {"imageId": image["imageId"], "imageInstanceTypeConstraint": constraint}
        return web.json_response({"requestId": "r", "result": {"imageConstraints": [found]}})

    async with local_api(listing, {CONSTRAINTS_BATCH_ROUTE: batch}) as url:
        settings = make_settings(url, IMAGE_SYNC_REGIONS="cn-north-1", IMAGE_SYNC_SOURCES="public")
        async with open_runtime(settings) as rt:
            assert (await sync_once(engine, rt.client, rt.partitions())).ok
            constraint["instanceTypes"] = ["g.n2.xlarge"]
            report = await sync_once(engine, rt.client, rt.partitions())
    assert report.ok and report.total("updated") == 1, report
    async with engine.connect() as conn:
        assert await conn.scalar(sa.text("SELECT instance_types FROM inventory.images")) == [
            "g.n2.xlarge"
        ]
