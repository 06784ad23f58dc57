"""Several accounts in one inventory (DESIGN.md, Accounts), synced against the simulator:
three accounts (two key pairs, one role) with an image shared from one to another;
after each change (unshare, delete, a new share, a deletion seen by two accounts, a
refused key) the images, image_access, image_events and sync_partitions rows are what
the simulator's state implies, image by image, and catalogue images are stored once."""

from __future__ import annotations

import asyncio
import re
from collections import Counter
from html import unescape
from pathlib import Path
from typing import Any

import orjson
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from service.app import open_runtime
from service.check import check_invariants
from service.config import Settings, load_settings
from service.errors import AuthError
from service.jdcloud.signer import DEMO_ACCESS_KEY, DEMO_SECRET_KEY
from service.simulator import Catalogue, Simulator, running_simulator
from service.simulator.catalogue import ListingQuery
from service.sync import SyncReport, sync_once
from service.web.data import page_data
from service.web.page import render_page
from tests.cli_helpers import run_cli

REGIONS = ("cn-north-1", "cn-east-2")
NORTH = "cn-north-1"
B_KEYS = ("AKBETA00000000", "SK-beta-secret-0")
C_KEYS = ("AKGAMMA0000000", "SK-gamma-secret-0")
PINS = {"alpha": "demo-user", "beta": "pin-beta", "gamma": "pin-gamma"}
SIM_ACCOUNT = {"alpha": "demo", "beta": "b", "gamma": "c"}
ACCOUNT_REGIONS = {"alpha": REGIONS, "beta": (NORTH,), "gamma": REGIONS}


def _settings(tmp_path: Path, sim: Simulator, database_url: str) -> Settings:
    role = next(r.jrn for r in sim.state.accounts.roles())
    config = tmp_path / "accounts.toml"
    config.write_text(
        f"""
IMAGE_SYNC_REGIONS = "{",".join(REGIONS)}"

[[accounts]]
name = "alpha"

[[accounts]]
name = "beta"
access_key_env = "BETA_AK"
secret_key_env = "BETA_SK"
regions = ["{NORTH}"]

[[accounts]]
name = "gamma"
role_jrn = "{role}"
""",
        encoding="utf-8",
    )
    env = {
        "DATABASE_URL": database_url,
        "IMAGE_SYNC_RATE_LIMIT": "0",
        "IMAGE_SYNC_HTTP": "off",
        **_account_env(sim),
    }
    return load_settings(env, config)


def _account_env(sim: Simulator) -> dict[str, str]:
    """The endpoints and the key pairs the configuration's accounts name."""
    return {
        "JDCLOUD_ENDPOINT": sim.url,
        "JDCLOUD_STS_ENDPOINT": sim.url,
        "JDCLOUD_ACCESS_KEY": DEMO_ACCESS_KEY,
        "JDCLOUD_SECRET_KEY": DEMO_SECRET_KEY,
        "BETA_AK": B_KEYS[0],
        "BETA_SK": B_KEYS[1],
    }


def _simulated_accounts(sim: Simulator) -> None:
    accounts = sim.state.accounts
    accounts.add("b", pin=PINS["beta"], access_key=B_KEYS[0], secret_key=B_KEYS[1])
    accounts.add("c", pin=PINS["gamma"], access_key=C_KEYS[0], secret_key=C_KEYS[1])
    accounts.add_role("c", "image-reader", trusts=["demo"])


def _private(sim: Simulator, account: str, **fields: Any) -> str:
    fields = {"ownerPin": PINS[account], "launchPermission": "ownerOnly", **fields}
    return str(sim.catalogue.add(NORTH, "private", **fields)["imageId"])


async def _sync(
    settings: Settings, engine: AsyncEngine
) -> tuple[SyncReport | None, AuthError | None]:
    async with open_runtime(settings) as rt:
        partitions = rt.partitions()
        await rt.register(partitions)
        try:
            report = await sync_once(engine, rt.client, partitions, accounts=rt.accounts)
        except AuthError as exc:
            return None, exc
    return report, None


def _visible(catalogue: Catalogue, account: str, region: str, source: str) -> set[str]:
    """What the simulator lists for the account: the truth the database must match."""
    ids: set[str] = set()
    page = 1
    while True:
        body, total = catalogue.list_page(
            region, ListingQuery(source), page_number=page, page_size=100, viewer=PINS[account]
        )
        ids |= {image["imageId"] for image in orjson.loads(body)}
        if page * 100 >= total:
            return ids
        page += 1


def _expected_access(catalogue: Catalogue, refused: set[str] = frozenset()) -> set[tuple[str, ...]]:
    return {
        (account, region, image_id, source)
        for account, regions in ACCOUNT_REGIONS.items()
        if account not in refused
        for region in regions
        for source in ("private", "shared")
        for image_id in _visible(catalogue, account, region, source)
    }


async def _rows(engine: AsyncEngine, sql: str) -> list[Any]:
    async with engine.connect() as conn:
        return list((await conn.execute(sa.text(sql))).all())


async def _assert_state(
    engine: AsyncEngine, sim: Simulator, refused: set[str] = frozenset()
) -> None:
    """images, image_access and the catalogue partitions as the simulator implies."""
    catalogue = sim.catalogue
    access = {
        tuple(row)
        for row in await _rows(
            engine,
            "SELECT account, region_id, image_id, image_source FROM inventory.image_access"
            " WHERE removed_at IS NULL",
        )
    }
    expected = _expected_access(catalogue)
    if refused:  # a refused account's rows are kept as they were, not revoked
        expected = {a for a in expected if a[0] not in refused} | {
            a for a in access if a[0] in refused
        }
    assert access == expected
    listed = {
        (region, image_id): source
        for region, image_id, source in await _rows(
            engine,
            "SELECT region_id, image_id, image_source FROM inventory.images"
            " WHERE removed_at IS NULL",
        )
    }
    # Catalogue images once each, with their source.
    for region in REGIONS:
        for source in ("public", "thirdparty", "community"):
            truth = {i["imageId"] for i in catalogue.images(region, source)}
            mine = {i for (r, i), s in listed.items() if r == region and s == source}
            assert mine == truth, (region, source)
    # An account-sourced image is listed while some account lists it; private while a
    # configured account owns it.
    by_image: dict[tuple[str, str], set[str]] = {}
    for _, region, image_id, source in expected:
        by_image.setdefault((region, image_id), set()).add(source)
    account_rows = {k: s for k, s in listed.items() if s in ("private", "shared")}
    assert set(account_rows) == set(by_image)
    for key, sources in by_image.items():
        assert account_rows[key] == ("private" if "private" in sources else "shared"), key
    # Stored once: no image is in images twice, whatever number of accounts see it.
    counts = await _rows(
        engine,
        "SELECT count(*), count(DISTINCT (region_id, image_id)) FROM inventory.images",
    )
    assert counts[0][0] == counts[0][1]
    # Each batch of the change feed names the account of its partition: the account of
    # every one of its events.
    batches = await _rows(
        engine,
        "SELECT count(*) FROM inventory.change_batches b"
        " JOIN inventory.image_events e ON e.event_id = ANY (b.event_ids)"
        " WHERE b.account IS DISTINCT FROM e.account",
    )
    assert batches == [(0,)]
    # The versions follow the images (source rewritten by the accounts' rule included).
    assert await check_invariants(engine) == []


async def _events(engine: AsyncEngine, run_id: int) -> list[tuple[str, str, str | None]]:
    return [
        tuple(row)
        for row in await _rows(
            engine,
            "SELECT image_id, event_type, account FROM inventory.image_events"
            f" WHERE sync_run_id = {run_id} ORDER BY event_id",
        )
    ]


@pytest.mark.filterwarnings("ignore::ResourceWarning")
async def test_three_accounts_share_unshare_delete_and_a_refused_key(
    engine: AsyncEngine, database_url: str, tmp_path: Path
) -> None:
    catalogue = Catalogue(seed=61, images=150, regions=REGIONS)
    async with running_simulator(catalogue) as sim:
        _simulated_accounts(sim)
        b1 = _private(sim, "beta")
        b2 = _private(sim, "beta")
        c1 = _private(sim, "gamma")
        catalogue.share(NORTH, b1, [PINS["gamma"]])
        settings = _settings(tmp_path, sim, database_url)

        # 1. First sync: everything created once; b1 seen by beta (private) and gamma
        # (shared) is one images row, two access rows, one created + one access_granted.
        report, refused = await _sync(settings, engine)
        assert refused is None and report is not None and report.ok, report
        await _assert_state(engine, sim)
        parts = await _rows(
            engine,
            "SELECT coalesce(account, '-'), region_id, image_source, status"
            " FROM inventory.sync_partitions",
        )
        assert Counter(p[0] for p in parts) == {"-": 6, "alpha": 4, "beta": 2, "gamma": 4}
        assert {p[3] for p in parts} == {"succeeded"}
        first = await _events(engine, report.run_id)
        b1_events = sorted((t, a) for i, t, a in first if i == b1)
        assert [t for t, _ in b1_events] == ["access_granted", "created"]
        assert {a for _, a in b1_events} == {"beta", "gamma"}
        assert [(t, a) for i, t, a in first if i == b2] == [("created", "beta")]
        assert [(t, a) for i, t, a in first if i == c1] == [("created", "gamma")]
        assert {a for i, t, a in first if t == "created"} >= {None, "alpha"}

        # 2. A resync of nothing new writes nothing.
        report, _ = await _sync(settings, engine)
        assert report is not None and report.ok
        assert await _events(engine, report.run_id) == []

        # 3. Unshare b1 from gamma: access_revoked (gamma), not a removal; for beta, its
        # owner, the image changed (launchPermission ownerOnly, shared with no one).
        catalogue.unshare(NORTH, b1, [PINS["gamma"]])
        report, _ = await _sync(settings, engine)
        assert report is not None and report.ok
        assert sorted((t, a) for i, t, a in await _events(engine, report.run_id) if i == b1) == [
            ("access_revoked", "gamma"),
            ("updated", "beta"),
        ]
        await _assert_state(engine, sim)

        # 4. Delete b2 at beta (no one else sees it): removed (beta).
        catalogue.delete(NORTH, b2)
        report, _ = await _sync(settings, engine)
        assert report is not None and report.ok
        assert await _events(engine, report.run_id) == [(b2, "removed", "beta")]
        await _assert_state(engine, sim)

        # 5. A new image shared from beta to gamma: created once, access_granted once.
        b3 = _private(sim, "beta")
        catalogue.share(NORTH, b3, [PINS["gamma"]])
        report, _ = await _sync(settings, engine)
        assert report is not None and report.ok
        new = sorted(t for i, t, _ in await _events(engine, report.run_id) if i == b3)
        assert new == ["access_granted", "created"]
        await _assert_state(engine, sim)

        # 6. b3 deleted at beta, so both listings lose it in one sync: one account's loss
        # is access_revoked, the last one's the removal.
        catalogue.delete(NORTH, b3)
        report, _ = await _sync(settings, engine)
        assert report is not None and report.ok
        gone = sorted(t for i, t, _ in await _events(engine, report.run_id) if i == b3)
        assert gone == ["access_revoked", "removed"]
        await _assert_state(engine, sim)

        # 7. Beta's key refused: its partitions fail with the API's status, the others
        # succeed, and nothing of beta is revoked (b1 is deleted meanwhile).
        catalogue.delete(NORTH, b1)
        before = await _rows(engine, "SELECT * FROM inventory.image_access WHERE account = 'beta'")
        sim.state.accounts.refuse("b")
        report, refused = await _sync(settings, engine)
        assert refused is not None and set(refused.by_account or {}) == {"beta"}
        assert refused.status == "UNAUTHENTICATED"
        latest = await _rows(
            engine,
            "SELECT coalesce(account, '-'), status, error_status FROM inventory.sync_partitions"
            " WHERE run_id = (SELECT max(run_id) FROM inventory.sync_runs)",
        )
        assert {(a, s, e) for a, s, e in latest if a == "beta"} == {
            ("beta", "failed", "UNAUTHENTICATED")
        }
        assert {s for a, s, _ in latest if a != "beta"} == {"succeeded"}
        assert len([row for row in latest if row[0] == "beta"]) == 2
        assert (
            await _rows(engine, "SELECT * FROM inventory.image_access WHERE account = 'beta'")
            == before
        )
        assert await _rows(
            engine,
            "SELECT status FROM inventory.sync_runs ORDER BY run_id DESC LIMIT 1",
        ) == [("partial",)]
        await _assert_state(engine, sim, refused={"beta"})

    # The reader's view: each account's usable images.
    usable = await _rows(
        engine,
        "SELECT account, count(*) FROM inventory.account_images GROUP BY 1 ORDER BY 1",
    )
    assert [a for a, _ in usable] == ["alpha", "beta", "gamma"]


async def test_overlapping_merges_of_shared_images_record_each_event_once(
    engine: AsyncEngine, database_url: str, tmp_path: Path
) -> None:
    """Beta's private and gamma's shared listing hold the same 40 new images and are
    fetched at the same pace, so their merges meet: each image is created once and
    granted once, and neither partition fails (they take turns, or rerun on a deadlock)."""
    catalogue = Catalogue(seed=62, images=40, regions=REGIONS)
    async with running_simulator(catalogue, faults={"latency_ms": 60}) as sim:
        _simulated_accounts(sim)
        shared = [_private(sim, "beta") for _ in range(40)]
        for image_id in shared:
            catalogue.share(NORTH, image_id, [PINS["gamma"]])
        settings = _settings(tmp_path, sim, database_url)
        settings = settings.model_copy(update={"page_size": 10})
        async with open_runtime(settings) as rt:
            partitions = [p for p in rt.partitions() if p.region == NORTH and p.account]
            report = await sync_once(
                engine, rt.client, partitions, accounts=rt.accounts, page_size=10
            )
    assert report.ok, report
    spans = {
        (account, source): (start, end)
        for account, source, start, end in await _rows(
            engine,
            "SELECT account, image_source, started_at, finished_at FROM inventory.sync_partitions"
            " WHERE account IN ('beta', 'gamma') AND region_id = 'cn-north-1'",
        )
    }
    beta, gamma = spans["beta", "private"], spans["gamma", "shared"]
    assert beta[0] < gamma[1] and gamma[0] < beta[1], "the two partitions did not overlap"
    events = Counter((i, t) for i, t, _ in await _events(engine, report.run_id) if i in set(shared))
    assert events == Counter(
        {**{(i, "created"): 1 for i in shared}, **{(i, "access_granted"): 1 for i in shared}}
    )


async def test_a_role_account_keeps_syncing_across_credential_renewals(
    engine: AsyncEngine, database_url: str, tmp_path: Path
) -> None:
    """Temporary credentials live 3 s; four syncs over about 8 s renew them and no
    request is signed with expired ones (the simulator counts them)."""
    catalogue = Catalogue(seed=63, images=60, regions=REGIONS)
    async with running_simulator(catalogue, sts_lifetime=3.0) as sim:
        _simulated_accounts(sim)
        c1 = _private(sim, "gamma")
        settings = _settings(tmp_path, sim, database_url).model_copy(
            update={"request_timeout": 1.0}
        )
        gamma_requests = 0
        async with open_runtime(settings) as rt:
            partitions = [p for p in rt.partitions() if p.account == "gamma"]
            for _ in range(4):
                report = await sync_once(engine, rt.client, partitions, accounts=rt.accounts)
                assert report.ok, report
                gamma_requests += sum(p.api_requests for p in report.partitions)
                await asyncio.sleep(2.0)
        counters = sim.state.counters
        assert counters["sts:signed_expired"] == 0
        assert counters["refused:c"] == 0
        calls = sim.state.accounts.assume_role_calls
    assert 2 <= calls < gamma_requests, (calls, gamma_requests)
    access = await _rows(
        engine, "SELECT image_id FROM inventory.image_access WHERE account = 'gamma'"
    )
    assert (c1,) in access


async def test_the_cli_names_each_refused_account_and_exits_1(
    engine: AsyncEngine, cli_env: dict[str, str], database_url: str, tmp_path: Path
) -> None:
    catalogue = Catalogue(seed=64, images=60, regions=REGIONS)
    async with running_simulator(catalogue) as sim:
        _simulated_accounts(sim)
        settings = _settings(tmp_path, sim, database_url)
        assert settings.config is not None
        sim.state.accounts.refuse("b")
        env = {**cli_env, **_account_env(sim)}
        code, out, err = await run_cli(env, "--config", str(settings.config), "sync", "--once")
    assert code == 1, err
    refused = [line for line in err.splitlines() if line.startswith("image-sync: ")]
    assert len(refused) == 1 and "account beta" in refused[0], err
    assert "UNAUTHENTICATED" in refused[0]
    assert "Traceback" not in err
    assert B_KEYS[1] not in err + out and DEMO_SECRET_KEY not in err + out
    rows = await _rows(
        engine,
        "SELECT coalesce(account, '-'), status FROM inventory.sync_partitions",
    )
    assert {s for a, s in rows if a == "beta"} == {"failed"}
    assert {s for a, s in rows if a != "beta"} == {"succeeded"}
    code, out, err = await run_cli(cli_env, "status")
    assert code == 0, err
    assert "beta:cn-north-1/private" in out and "gamma:cn-east-2/shared" in out


async def test_a_catalogue_partition_is_listed_with_the_next_account_when_the_first_is_refused(
    engine: AsyncEngine, database_url: str, tmp_path: Path
) -> None:
    """The base pair refused: alpha (the pair itself) and gamma (a role it assumes) fail;
    cn-north-1's catalogue is listed with beta, cn-east-2's (no other account) fails."""
    catalogue = Catalogue(seed=65, images=60, regions=REGIONS)
    async with running_simulator(catalogue) as sim:
        _simulated_accounts(sim)
        settings = _settings(tmp_path, sim, database_url)
        sim.state.accounts.refuse("demo")
        report, refused = await _sync(settings, engine)
    assert report is None and refused is not None
    assert set(refused.by_account or {}) == {"alpha", "gamma"}
    rows = await _rows(
        engine,
        "SELECT coalesce(account, '-'), region_id, image_source, status"
        " FROM inventory.sync_partitions",
    )
    catalogue_rows = {(r, s): st for a, r, s, st in rows if a == "-"}
    assert {s for (r, _), s in catalogue_rows.items() if r == NORTH} == {"succeeded"}
    assert {s for (r, _), s in catalogue_rows.items() if r != NORTH} == {"failed"}
    assert {st for a, _, _, st in rows if a in ("alpha", "gamma")} == {"failed"}
    assert {st for a, _, _, st in rows if a == "beta"} == {"succeeded"}


async def test_the_status_page_shows_every_accounts_partition(
    engine: AsyncEngine, database_url: str, tmp_path: Path
) -> None:
    """Three accounts sync cn-north-1/private; one is refused. Its grid cell holds the
    three partitions (it showed whichever row came last): the worst state, "1 of 3
    accounts failing", each account in the tip; the error list names the account; the
    cards count every partition identity."""
    catalogue = Catalogue(seed=65, images=60, regions=REGIONS)
    async with running_simulator(catalogue) as sim:
        _simulated_accounts(sim)
        settings = _settings(tmp_path, sim, database_url)
        sim.state.accounts.refuse("b")
        report, refused = await _sync(settings, engine)
        async with open_runtime(settings) as rt:
            identities = len(rt.partitions())
    assert report is None and refused is not None  # the run is recorded, then raises
    async with engine.connect() as conn:
        data = await page_data(conn)
    html = render_page(data, settings=settings, ready=True, reason="", error=None,
                       tick_interval=60)  # fmt: skip
    cell = re.search(r'<div class="cell (\w+)" title="([^"]*cn-north-1/private \(alpha\)[^"]*)"'
                     r">[^<]*<small>([^<]*)</small>", html)  # fmt: skip
    assert cell, html
    css, tip, sub = cell.groups()
    assert css == "bad" and sub == "1 of 3 accounts failing"  # beta never succeeded
    for account in ("alpha", "beta", "gamma"):
        assert f"cn-north-1/private ({account})" in unescape(tip)
    assert "<b>cn-north-1/private (beta)</b> failed" in html
    fresh = re.search(r"<b>(\d+)/(\d+)</b><span>partitions fresh", html)
    assert fresh and int(fresh.group(2)) == identities
    assert int(fresh.group(1)) == identities - 2  # beta's private and shared partitions
