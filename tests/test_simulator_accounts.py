"""The simulator's accounts: a key pair and PIN each, private images and shares between
them, roles trusting the base account, STS with a configurable lifetime, 401 for expired
or refused credentials; the official SDK's StsClient + AssumeRoleRequest against it, and
our ImagesClient renewing a role's credentials once after a 401."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
from jdcloud_sdk.core.config import Config
from jdcloud_sdk.core.credential import Credential
from jdcloud_sdk.core.logger import Logger
from jdcloud_sdk.services.sts.apis.AssumeRoleRequest import (
    AssumeRoleParameters,
    AssumeRoleRequest,
)
from jdcloud_sdk.services.sts.client.StsClient import StsClient as SdkStsClient
from jdcloud_sdk.services.sts.models.AssumeRoleInfo import AssumeRoleInfo
from jdcloud_sdk.services.vm.apis.DescribeImagesRequest import (
    DescribeImagesParameters,
    DescribeImagesRequest,
)
from jdcloud_sdk.services.vm.client.VmClient import VmClient

from service.errors import AuthError
from service.jdcloud.client import ImagesClient
from service.jdcloud.signer import DEMO_ACCESS_KEY, DEMO_SECRET_KEY, Credentials
from service.jdcloud.sts import RoleCredentials, RoleSpec, StsClient
from service.simulator import Catalogue, Simulator, running_simulator, simulator_in_thread
from tests.sim_admin import admin, admin_ok

pytestmark = pytest.mark.filterwarnings(
    "ignore:datetime.datetime.utcfromtimestamp:DeprecationWarning"
)
REGION = "cn-north-1"
B = {"name": "team-b", "pin": "pin-team-b", "access_key": "AKTEAMB000", "secret_key": "SK-b-secret"}
C = {"name": "team-c", "pin": "pin-team-c", "access_key": "AKTEAMC000", "secret_key": "SK-c-secret"}


def _setup(sim: Simulator) -> dict[str, Any]:
    """Accounts B and C besides the demo account; one private image each, B's shared
    with C; a role of C trusting the demo (base) account. Through the admin operations
    (the objects belong to the simulator's thread)."""
    for spec in (B, C):
        admin_ok(sim, "POST", "accounts", spec)
    made = {}
    for key, spec in (("b", B), ("c", C)):
        fields = {"ownerPin": spec["pin"], "launchPermission": "ownerOnly"}
        added = admin_ok(sim, "POST", "catalogue/add",
                      {"region": REGION, "source": "private", "fields": fields})  # fmt: skip
        made[key] = added["image"]["imageId"]
    admin_ok(
        sim, "POST", "shares/share", {"region": REGION, "image_id": made["b"], "pins": [C["pin"]]}
    )
    role = admin_ok(sim, "POST", "roles", {"account": "team-c", "name": "image-reader",
                                        "trusts": ["demo"]})  # fmt: skip
    return {**made, "role": role["jrn"]}


def _ids(images: list[dict[str, Any]]) -> set[str]:
    return {image["imageId"] for image in images}


@pytest.fixture
def sim() -> Iterator[Simulator]:
    with simulator_in_thread(seed=3, images=200, regions=[REGION], sts_lifetime=2.0) as sim:
        yield sim


def _vm(sim: Simulator, ak: str, sk: str) -> VmClient:
    return VmClient(Credential(ak, sk), Config(sim.endpoint, scheme="http", timeout=10), Logger(0))


def _list(client: VmClient, source: str, token: str | None = None) -> Any:
    params = DescribeImagesParameters(REGION)
    params.setImageSource(source)
    params.setPageSize(100)
    header = {"x-jdcloud-security-token": token} if token else None
    return client.send(DescribeImagesRequest(params, header=header))


def test_sdk_assume_role_and_list_as_the_role_account(sim: Simulator) -> None:
    ids = _setup(sim)
    sts = SdkStsClient(
        Credential(DEMO_ACCESS_KEY, DEMO_SECRET_KEY),
        Config(sim.endpoint, scheme="http", timeout=10),
        Logger(0),
    )
    info = AssumeRoleInfo(ids["role"], "sdk-session", durationSeconds=3600)
    answer = sts.send(AssumeRoleRequest(AssumeRoleParameters(info)))
    assert answer.error is None, answer.error
    creds = answer.result["credentials"]
    assert set(creds) >= {"accessKey", "secretKey", "sessionToken", "expiration"}
    as_c = _vm(sim, creds["accessKey"], creds["secretKey"])
    private = _list(as_c, "private", creds["sessionToken"])
    assert private.error is None and _ids(private.result["images"]) == {ids["c"]}
    shared = _list(as_c, "shared", creds["sessionToken"]).result["images"]
    assert _ids(shared) == {ids["b"]} and shared[0]["imageSource"] == "shared"
    assert shared[0]["ownerPin"] == B["pin"]
    # Without the token, or once expired (lifetime 2 s): 401.
    assert _list(as_c, "private").error.code == 401
    time.sleep(2.2)
    expired = _list(as_c, "private", creds["sessionToken"])
    assert expired.error.code == 401 and "expired" in expired.error.message
    # B lists only its own private image; the demo account sees neither.
    as_b = _vm(sim, B["access_key"], B["secret_key"])
    assert _ids(_list(as_b, "private").result["images"]) == {ids["b"]}
    demo = _vm(sim, DEMO_ACCESS_KEY, DEMO_SECRET_KEY)
    demo_private = _ids(_list(demo, "private").result["images"])
    assert ids["b"] not in demo_private and ids["c"] not in demo_private
    # A role that does not trust the caller: 403; an unknown role: 404.
    b_sts = SdkStsClient(
        Credential(B["access_key"], B["secret_key"]),
        Config(sim.endpoint, scheme="http", timeout=10),
        Logger(0),
    )
    refused = b_sts.send(AssumeRoleRequest(AssumeRoleParameters(info)))
    assert refused.error.code == 403
    unknown = AssumeRoleInfo("jrn:iam::nobody:role/none", "s")
    assert sts.send(AssumeRoleRequest(AssumeRoleParameters(unknown))).error.code == 404


async def test_images_client_renews_role_credentials_in_time_and_after_a_401() -> None:
    catalogue = Catalogue(seed=4, images=100, regions=[REGION])
    async with running_simulator(catalogue, sts_lifetime=3.0) as sim, aiohttp.ClientSession() as s:
        ids = await asyncio.to_thread(_setup, sim)
        sts = StsClient(s, endpoint=sim.url, base=Credentials(DEMO_ACCESS_KEY, DEMO_SECRET_KEY))
        role = RoleCredentials(sts, RoleSpec(ids["role"], "test", 3600), valid_for=0.5)
        client = ImagesClient(s, endpoint=sim.url, credentials=role, rate_limit=0)
        # The expiration comes in whole seconds, so a 3 s session arrives with 2-3 s
        # left and is used for half of that: 1.0-1.5 s. Over 5.5 s that is 1 + 3 to
        # 1 + 5 assumeRole calls, within the bounds below whatever the rounding (7.0 s
        # allowed 1 + 6, and CI once saw 7).
        deadline = time.monotonic() + 5.5
        pages = 0
        while time.monotonic() < deadline:
            page = await client.describe_images(REGION, image_source="private")
            assert [image["imageId"] for image in page.images] == [ids["c"]]
            pages += 1
            await asyncio.sleep(0.05)
        counters = sim.state.counters
        assert counters["sts:signed_expired"] == 0, counters
        assert counters["refused:team-c"] == 0
        assert 3 <= sts.calls <= 6, sts.calls  # renewed per lifetime, not per request
        assert pages > 50
        # The gateway ends the sessions early: one 401, one renewal, the retry succeeds.
        calls = sts.calls
        sim.state.accounts.expire_sessions()
        page = await client.describe_images(REGION, image_source="shared")
        assert [image["imageId"] for image in page.images] == [ids["b"]]
        assert sts.calls == calls + 1 and counters["refused:team-c"] == 1
        # The base pair refused: renewal fails, the error is the account's (no retry loop).
        sim.state.accounts.refuse("demo")
        sim.state.accounts.expire_sessions()
        with pytest.raises(AuthError) as refused:
            await client.describe_images(REGION, image_source="private")
        assert refused.value.http_status == 401
        assert sts.calls == calls + 2


async def test_a_refused_key_pair_is_401_for_that_account_only() -> None:
    catalogue = Catalogue(seed=5, images=100, regions=[REGION])
    async with running_simulator(catalogue) as sim, aiohttp.ClientSession() as s:
        ids = await asyncio.to_thread(_setup, sim)
        await asyncio.to_thread(admin_ok, sim, "POST", "accounts/team-b/refuse", {})
        as_b = ImagesClient(
            s, endpoint=sim.url, credentials=Credentials(B["access_key"], B["secret_key"])
        )
        as_demo = as_b.with_credentials(Credentials(DEMO_ACCESS_KEY, DEMO_SECRET_KEY))
        with pytest.raises(AuthError) as caught:
            await as_b.describe_images(REGION, image_source="private")
        assert caught.value.status == "UNAUTHENTICATED"
        page = await as_demo.describe_images(REGION, image_source="private")
        assert ids["b"] not in {image["imageId"] for image in page.images}
        listed = await asyncio.to_thread(admin_ok, sim, "GET", "accounts")
        assert {a["name"]: a["refused"] for a in listed["accounts"]} == {
            "demo": False, "team-b": True, "team-c": False,
        }  # fmt: skip
        assert B["secret_key"] not in json.dumps(listed)


def test_organisation_adds_accounts_roles_private_images_and_shares_in_one_call(
    sim: Simulator,
) -> None:
    specs = [
        {
            "name": f"org-{i}",
            "pin": f"pin-org-{i}",
            "access_key": f"AKORG{i}",
            "secret_key": f"SK{i}",
        }
        for i in range(3)
    ]
    specs[1]["role"] = "image-reader"
    answer = admin_ok(
        sim,
        "POST",
        "organisation",
        {"accounts": specs, "images_per_region": 4, "share_every": 2},
    )
    assert answer["accounts"] == 3 and answer["private_images"] == 12 and answer["shares"] == 6
    assert answer["roles"] == {"org-1": "jrn:iam::pin-org-1:role/image-reader"}
    listed = {a["name"] for a in admin_ok(sim, "GET", "accounts")["accounts"]}
    assert {"demo", "org-0", "org-1", "org-2"} <= listed
    changes = admin_ok(sim, "GET", "changes")["changes"]
    assert sum(c["op"] == "add" and c["source"] == "private" for c in changes) == 12
    as_0, as_2 = (_vm(sim, f"AKORG{i}", f"SK{i}") for i in (0, 2))
    private_0 = _list(as_0, "private").result["images"]
    assert len(private_0) == 4 and {i["ownerPin"] for i in private_0} == {"pin-org-0"}
    # org-0 shares every 2nd image with org-1; org-2 with org-0 (the last with the first).
    shared_0 = _list(as_0, "shared").result["images"]
    assert len(shared_0) == 2 and {i["ownerPin"] for i in shared_0} == {"pin-org-2"}
    assert _ids(shared_0) <= _ids(_list(as_2, "private").result["images"])
    # The role trusts the demo (base) account only.
    sts = SdkStsClient(
        Credential(DEMO_ACCESS_KEY, DEMO_SECRET_KEY),
        Config(sim.endpoint, scheme="http", timeout=10),
        Logger(0),
    )
    info = AssumeRoleInfo(answer["roles"]["org-1"], "org", durationSeconds=3600)
    assumed = sts.send(AssumeRoleRequest(AssumeRoleParameters(info)))
    assert assumed.error is None, assumed.error
    # A duplicate account is one clear 400.
    status, error = admin(
        sim, "POST", "organisation", {"accounts": specs[:1], "images_per_region": 1}
    )
    assert status == 400 and "exists" in error["error"]
