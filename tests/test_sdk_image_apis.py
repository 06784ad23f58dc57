"""The official SDK's describeImage, describeImageMembers, describeImageConstraints and
describeImageConstraintsBatch requests, unchanged, against the simulator; and the
simulator's admin operations for shares and constraints.

Like tests/test_sdk_against_simulator.py: the SDK is blocking, so the simulator runs in
a background thread, changed through its admin endpoints and read after the calls."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from jdcloud_sdk.core.config import Config
from jdcloud_sdk.core.credential import Credential
from jdcloud_sdk.core.jdcloudrequest import JDCloudRequest
from jdcloud_sdk.core.logger import Logger
from jdcloud_sdk.services.vm.apis.DescribeImageConstraintsBatchRequest import (
    DescribeImageConstraintsBatchParameters,
    DescribeImageConstraintsBatchRequest,
)
from jdcloud_sdk.services.vm.apis.DescribeImageConstraintsRequest import (
    DescribeImageConstraintsParameters,
    DescribeImageConstraintsRequest,
)
from jdcloud_sdk.services.vm.apis.DescribeImageMembersRequest import (
    DescribeImageMembersParameters,
    DescribeImageMembersRequest,
)
from jdcloud_sdk.services.vm.apis.DescribeImageRequest import (
    DescribeImageParameters,
    DescribeImageRequest,
)
from jdcloud_sdk.services.vm.client.VmClient import VmClient

from service.jdcloud.signer import DEMO_ACCESS_KEY, DEMO_SECRET_KEY
from service.simulator import Simulator, simulator_in_thread
from tests.sim_admin import admin

pytestmark = pytest.mark.filterwarnings(
    "ignore:datetime.datetime.utcfromtimestamp:DeprecationWarning"
)
REGION = "cn-north-1"


@pytest.fixture(scope="module")
def sim() -> Iterator[Simulator]:
    with simulator_in_thread(seed=8, images=400) as simulator:
        yield simulator


def send(sim: Simulator, request: JDCloudRequest) -> Any:
    config = Config(sim.endpoint, scheme="http", timeout=10)
    client = VmClient(Credential(DEMO_ACCESS_KEY, DEMO_SECRET_KEY), config, Logger(0))
    return client.send(request)


def members(sim: Simulator, image_id: str) -> Any:
    return send(sim, DescribeImageMembersRequest(DescribeImageMembersParameters(REGION, image_id)))


def batch(sim: Simulator, ids: list[str]) -> Any:
    parameters = DescribeImageConstraintsBatchParameters(REGION)
    parameters.setIds(ids)
    return send(sim, DescribeImageConstraintsBatchRequest(parameters))


def test_describe_image_answers_the_listed_object(sim: Simulator) -> None:
    for source in ("public", "thirdparty", "private", "shared", "community"):
        image = sim.catalogue.images(REGION, source)[0]
        response = send(
            sim, DescribeImageRequest(DescribeImageParameters(REGION, image["imageId"]))
        )
        assert response.error is None
        assert response.result == {"image": image}
    missing = send(sim, DescribeImageRequest(DescribeImageParameters(REGION, "img-nothere")))
    assert (missing.error.code, missing.error.status) == (404, "NOT_FOUND")


def test_the_generated_catalogue_has_the_full_record(sim: Simulator) -> None:
    private = sim.catalogue.images(REGION, "private")
    thirdparty = sim.catalogue.images(REGION, "thirdparty")
    assert all(image["loginName"] == image["ownerPin"] for image in private)
    assert any(image.get("instanceId") for image in private)
    assert any(image["imported"] for image in private)
    assert all(image["chargeInfo"]["serviceCode"] == "vm" for image in thirdparty)
    everything = [i for key in sim.catalogue.partitions() for i in sim.catalogue.images(*key)]
    assert any(image["architecture"] == "arm64" for image in everything)


def test_members_of_shared_private_images_and_only_those(sim: Simulator) -> None:
    private = sim.catalogue.images(REGION, "private")
    shared = [i for i in private if i["launchPermission"] == "specifiedUsers"]
    alone = [i for i in private if i["launchPermission"] == "ownerOnly"]
    assert shared and alone
    for image in shared:
        response = members(sim, image["imageId"])
        assert response.error is None
        pins = response.result["pins"]
        assert pins and pins == sorted(pins) == sim.catalogue.members(REGION, image["imageId"])
    assert members(sim, alone[0]["imageId"]).result == {"pins": []}
    # Not the caller's image (a public one, another user's shared one): the API's error.
    for source in ("public", "shared"):
        other = sim.catalogue.images(REGION, source)[0]["imageId"]
        response = members(sim, other)
        assert response.result is None
        assert (response.error.code, response.error.status) == (404, "NOT_FOUND")
        assert other in response.error.message


def test_share_and_unshare_through_the_admin_endpoint(sim: Simulator) -> None:
    image = next(
        i for i in sim.catalogue.images(REGION, "private") if i["launchPermission"] == "ownerOnly"
    )
    image_id = image["imageId"]
    body = {"region": REGION, "image_id": image_id, "pins": ["jd_bob", "jd_alice"]}
    assert admin(sim, "POST", "shares/share", body) == (200, {"pins": ["jd_alice", "jd_bob"]})
    assert members(sim, image_id).result == {"pins": ["jd_alice", "jd_bob"]}
    # Sharing makes the image specifiedUsers, as JD Cloud does.
    described = send(sim, DescribeImageRequest(DescribeImageParameters(REGION, image_id)))
    assert described.result["image"]["launchPermission"] == "specifiedUsers"
    body["pins"] = ["jd_alice", "jd_bob"]
    assert admin(sim, "POST", "shares/unshare", body) == (200, {"pins": []})
    described = send(sim, DescribeImageRequest(DescribeImageParameters(REGION, image_id)))
    assert described.result["image"]["launchPermission"] == "ownerOnly"
    public = sim.catalogue.images(REGION, "public")[0]["imageId"]
    status, answer = admin(
        sim, "POST", "shares/share", {"region": REGION, "image_id": public, "pins": ["jd_x"]}
    )
    assert status == 404 and "not a private image" in answer["error"]
    assert admin(sim, "POST", "shares/share", {"region": REGION})[0] == 400
    assert admin(sim, "POST", "shares/lend", body)[0] == 404


def test_constraints_single_and_batch(sim: Simulator) -> None:
    images = sim.catalogue.images(REGION, "public") + sim.catalogue.images(REGION, "thirdparty")
    with_constraint = [
        i["imageId"] for i in images if sim.catalogue.constraint(REGION, i["imageId"])
    ]
    without = [i["imageId"] for i in images if not sim.catalogue.constraint(REGION, i["imageId"])]
    assert with_constraint and without
    target = without[0]
    constraint = {"constraintsType": "excludes", "instanceTypes": ["g.n2.medium", "c.n2.large"]}
    status, _ = admin(
        sim, "PUT", "constraints", {"region": REGION, "image_id": target, "constraint": constraint}
    )
    assert status == 200
    single = send(
        sim, DescribeImageConstraintsRequest(DescribeImageConstraintsParameters(REGION, target))
    )
    assert single.error is None
    assert single.result == {
        "imageConstraints": {"imageId": target, "imageInstanceTypeConstraint": constraint}
    }
    ids = [*with_constraint, target, without[1], "img-nothere"]
    response = batch(sim, ids)
    assert response.error is None
    answered = {
        c["imageId"]: c["imageInstanceTypeConstraint"] for c in response.result["imageConstraints"]
    }
    assert set(answered) == {*with_constraint, target}
    for image_id, value in answered.items():
        assert value == sim.catalogue.constraint(REGION, image_id)
        assert value["constraintsType"] in ("includes", "excludes") and value["instanceTypes"]
    status, _ = admin(
        sim, "PUT", "constraints", {"region": REGION, "image_id": target, "constraint": None}
    )
    assert status == 200
    unset = send(
        sim, DescribeImageConstraintsRequest(DescribeImageConstraintsParameters(REGION, target))
    )
    assert unset.result["imageConstraints"]["imageInstanceTypeConstraint"] is None
    bad = {"constraintsType": "sometimes", "instanceTypes": []}
    assert (
        admin(sim, "PUT", "constraints", {"region": REGION, "image_id": target, "constraint": bad})[
            0
        ]
        == 400
    )
    private = sim.catalogue.images(REGION, "private")[0]["imageId"]
    assert (
        admin(
            sim,
            "PUT",
            "constraints",
            {"region": REGION, "image_id": private, "constraint": constraint},
        )[0]
        == 404
    )


def test_faults_apply_to_the_new_apis(sim: Simulator) -> None:
    image = sim.catalogue.images(REGION, "private")[0]["imageId"]
    rule = {"kind": "unavailable", "n": 1, "source": "describeImageMembers"}
    assert admin(sim, "PUT", "faults", {"reset": True, "fail_first_n": [rule]})[0] == 200
    try:
        failed = members(sim, image)
        assert (failed.error.code, failed.error.status) == (503, "UNAVAILABLE")
        assert members(sim, image).error is None  # only the first one
        admin(sim, "PUT", "faults", {"reset": True, "error_rates": {"internal": 1.0}})
        for response in (
            batch(sim, [image]),
            send(sim, DescribeImageRequest(DescribeImageParameters(REGION, image))),
        ):
            assert (response.error.code, response.error.status) == (500, "INTERNAL")
    finally:
        admin(sim, "PUT", "faults", {"reset": True})
