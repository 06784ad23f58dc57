"""The official SDK (VmClient + DescribeImagesRequest), unchanged, against the simulator.

The SDK is blocking (requests), so the simulator runs in a background thread with
its own event loop; the catalogue is read only after the SDK calls returned.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from jdcloud_sdk.core.config import Config
from jdcloud_sdk.core.credential import Credential
from jdcloud_sdk.core.logger import Logger
from jdcloud_sdk.services.vm.apis.DescribeImagesRequest import (
    DescribeImagesParameters,
    DescribeImagesRequest,
)
from jdcloud_sdk.services.vm.client.VmClient import VmClient

from service.jdcloud.signer import DEMO_ACCESS_KEY, DEMO_SECRET_KEY
from service.simulator import Simulator, simulator_in_thread

# The SDK computes utcnow() on every call (deprecated on 3.12+).
pytestmark = pytest.mark.filterwarnings(
    "ignore:datetime.datetime.utcfromtimestamp:DeprecationWarning"
)

QUIET = Logger(0)  # the SDK prints every request at its default level


@pytest.fixture(scope="module")
def sim() -> Iterator[Simulator]:
    with simulator_in_thread(seed=21, images=1500) as simulator:
        yield simulator


def client(sim: Simulator, secret_key: str = DEMO_SECRET_KEY) -> VmClient:
    config = Config(sim.endpoint, scheme="http", timeout=10)
    return VmClient(Credential(DEMO_ACCESS_KEY, secret_key), config, QUIET)


def describe(sim: Simulator, region: str = "cn-north-1", **parameters: Any) -> Any:
    request_parameters = DescribeImagesParameters(region)
    for name, value in parameters.items():
        getattr(request_parameters, "set" + name[0].upper() + name[1:])(value)
    return client(sim).send(DescribeImagesRequest(request_parameters))


def test_the_sdk_lists_every_page(sim: Simulator) -> None:
    ids: list[str] = []
    page = 1
    while True:
        response = describe(sim, imageSource="private", pageNumber=page, pageSize=50)
        assert response.error is None
        assert len(response.request_id) == 32
        ids.extend(image["imageId"] for image in response.result["images"])
        if page * 50 >= response.result["totalCount"]:
            break
        page += 1
    expected = [image["imageId"] for image in sim.catalogue.images("cn-north-1", "private")]
    assert ids == expected and len(set(ids)) == response.result["totalCount"] > 50


def test_the_sdk_filters(sim: Simulator) -> None:
    response = describe(
        sim,
        region="cn-east-1",
        imageSource="public",
        offline=True,  # the SDK sends "True"
        platform="Windows Server",
        pageSize=100,
    )
    assert response.error is None
    expected = [
        image["imageId"]
        for image in sim.catalogue.images("cn-east-1", "public")
        if image["offline"] and image["platform"] == "Windows Server"
    ]
    assert [image["imageId"] for image in response.result["images"]] == expected
    assert response.result["totalCount"] == len(expected)

    named = describe(sim, imageSource="thirdparty", imageName="Ubuntu 22.04 64位", pageSize=100)
    assert named.error is None and named.result["images"]
    assert all("Ubuntu 22.04 64位" in image["name"] for image in named.result["images"])
    assert all(image["offline"] is False for image in named.result["images"])


def test_the_sdk_looks_up_ids(sim: Simulator) -> None:
    wanted = [
        sim.catalogue.images("cn-south-1", "shared")[0]["imageId"],
        sim.catalogue.images("cn-south-1", "community")[1]["imageId"],
    ]
    response = describe(sim, region="cn-south-1", ids=wanted)
    assert response.error is None
    assert sorted(image["imageId"] for image in response.result["images"]) == sorted(wanted)
    assert response.result["totalCount"] == 2


def test_the_sdk_sees_api_errors(sim: Simulator) -> None:
    missing_source = describe(sim, pageSize=10)
    assert missing_source.result is None
    assert missing_source.error.code == 400
    assert missing_source.error.status == "FAILED_PRECONDITION"
    assert missing_source.error.message == "Parameter ImageSource missing"
    out_of_range = describe(sim, imageSource="public", pageSize=500)
    assert out_of_range.error.status == "OUT_OF_RANGE"


def test_a_wrong_secret_gets_401(sim: Simulator) -> None:
    parameters = DescribeImagesParameters("cn-north-1")
    parameters.setImageSource("public")
    response = client(sim, secret_key="not-the-secret").send(DescribeImagesRequest(parameters))
    assert response.result is None
    assert response.error.code == 401
    assert response.error.status == "UNAUTHENTICATED"
    assert "not-the-secret" not in response.error.message


def test_the_sdk_pages_an_ids_lookup(sim: Simulator) -> None:
    """120 ids (of every source, plus unknown ones) over two pages, as the SDK sends them."""
    region = "cn-east-2"
    known = [
        image["imageId"]
        for source in ("public", "thirdparty", "private", "shared", "community")
        for image in sim.catalogue.images(region, source)
    ][:120]
    assert len(known) == 120
    wanted = [*known, "img-notthere01", "img-notthere02"]
    found: list[str] = []
    for page in (1, 2):
        response = describe(sim, region=region, ids=wanted, pageNumber=page, pageSize=100)
        assert response.error is None
        assert response.result["totalCount"] == 120
        found.extend(image["imageId"] for image in response.result["images"])
    assert len(found) == 120 and set(found) == set(known)
