"""Webhooks end to end: a real ``image-sync run`` daemon (SIGKILLed once) delivers the
change feed to a real aiohttp receiver that fails at random and is restarted once.
After dedupe by event id the receiver has every event exactly once, every signature
verifies, and each image's events arrive in order. Plus the configuration rules.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import random
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from io import StringIO
from typing import Any

import pytest
import sqlalchemy as sa
from aiohttp import web
from rich.console import Console
from sqlalchemy.ext.asyncio import AsyncEngine

from service.config import load_settings
from service.errors import ConfigError
from service.jdcloud.client import open_session
from service.metrics import Metrics
from service.report import print_status
from service.simulator import running_simulator
from service.store.feed import try_lock_subscriber, unlock_subscriber
from service.store.runs import release_run
from service.web.data import page_data
from service.web.page import render_page
from service.webhooks import Dispatcher, subscribers_of
from tests.fault_helpers import mutate
from tests.test_feed import _items, _merge, _run

SECRET = "whsec-test-3f9a"
REGIONS = "cn-north-1,cn-east-1,cn-south-1"
SOURCES = "public,private,community"


class Receiver:
    """An aiohttp webhook receiver failing ~30% of requests (500, too slow, dropped)."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.bodies: list[dict[str, Any]] = []
        self.bad_signatures = 0
        self.failures = 0
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        expected = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(request.headers.get("X-Image-Sync-Signature", ""), expected):
            self.bad_signatures += 1
            return web.Response(status=401)
        roll = self.rng.random()
        if roll < 0.3:
            self.failures += 1
            if roll < 0.1:
                return web.Response(status=500)
            if roll < 0.2:
                await asyncio.sleep(2)  # past the client's 1 s timeout
                return web.Response(status=200)  # never read: not counted as received
            assert request.transport is not None
            request.transport.close()  # dropped connection
            return web.Response(status=500)
        self.bodies.append(
            {"delivery": request.headers["X-Image-Sync-Delivery"], **json.loads(body)}
        )
        return web.Response(status=204)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hook", self.handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def event_ids(self) -> list[int]:
        return [e["event_id"] for b in self.bodies for e in b["events"]]


async def _daemon(env: dict[str, str]) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "service",
        "run",
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )


async def _until(predicate: Callable[[], Awaitable[bool]], what: str, within: float) -> None:
    deadline = time.monotonic() + within
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.2)


async def _scalar(engine: AsyncEngine, sql: str) -> Any:
    async with engine.connect() as conn:
        return await conn.scalar(sa.text(sql))


@pytest.mark.long
async def test_daemon_delivers_every_event_once_through_faults_and_sigkill(
    engine: AsyncEngine, cli_env: dict[str, str]
) -> None:
    receiver = Receiver(seed=16)
    await receiver.start()
    daemon: asyncio.subprocess.Process | None = None
    async with running_simulator(images=300, seed=5) as sim:
        env = {
            **cli_env,
            "JDCLOUD_ENDPOINT": sim.url,
            "IMAGE_SYNC_REGIONS": REGIONS,
            "IMAGE_SYNC_SOURCES": SOURCES,
            "IMAGE_SYNC_INTERVAL": "10",
            "IMAGE_SYNC_LOG_LEVEL": "warning",
            "IMAGE_SYNC_WEBHOOK_URL": f"http://127.0.0.1:{receiver.port}/hook",
            "IMAGE_SYNC_WEBHOOK_SECRET": SECRET,
            "IMAGE_SYNC_WEBHOOK_FROM": "beginning",
            "IMAGE_SYNC_WEBHOOK_MAX_ATTEMPTS": "3",
            "IMAGE_SYNC_WEBHOOK_TIMEOUT": "1",
        }

        async def runs_done(n: int) -> bool:
            done = await _scalar(
                engine, "SELECT count(*) FROM inventory.sync_runs WHERE finished_at IS NOT NULL"
            )
            return bool(done >= n)

        async def all_received() -> bool:
            total = await _scalar(engine, "SELECT count(*) FROM inventory.image_events")
            return len(set(receiver.event_ids())) >= total

        async def failing() -> bool:
            return bool(
                await _scalar(engine, "SELECT bool_or(failing) FROM inventory.webhook_cursors")
            )

        try:
            daemon = await _daemon(env)
            await _until(lambda: runs_done(1), "the start-up sync", 20)
            mutate(sim.catalogue, 0)
            await _until(lambda: runs_done(2), "the second sync", 15)
            daemon.send_signal(signal.SIGKILL)  # deliveries of run 2 may be in flight
            await daemon.wait()
            # The receiver goes away until the new daemon has given up on a batch (the
            # subscriber is failing); it comes back on its port and gets the rest.
            await receiver.stop()
            daemon = await _daemon(env)
            mutate(sim.catalogue, 1)
            await _until(lambda: runs_done(3), "the third sync", 15)
            await _until(failing, "the subscriber marked failing", 10)
            await receiver.start()
            await _until(all_received, "every event at the receiver", 15)
            subscriber = await _scalar(engine, "SELECT subscriber FROM inventory.webhook_cursors")
        finally:
            if daemon is not None and daemon.returncode is None:
                daemon.send_signal(signal.SIGTERM)
                _, err = await asyncio.wait_for(daemon.communicate(), 30)
                assert SECRET.encode() not in err
            await receiver.stop()
    async with engine.connect() as conn:
        events = (
            await conn.execute(
                sa.text(
                    "SELECT event_id, region_id, image_id FROM inventory.image_events"
                    " ORDER BY event_id"
                )
            )
        ).all()
    received = receiver.event_ids()
    first: dict[int, int] = {}
    for position, event_id in enumerate(received):
        first.setdefault(event_id, position)
    assert receiver.bad_signatures == 0
    assert receiver.failures > 0  # the faults did happen
    assert sorted(first) == [e.event_id for e in events]
    for key in {(e.region_id, e.image_id) for e in events}:
        ids = [e.event_id for e in events if (e.region_id, e.image_id) == key]
        assert sorted(ids, key=first.__getitem__) == ids, f"events of {key} out of order"
    assert all(len(b["events"]) <= 100 for b in receiver.bodies)
    assert subscriber.startswith("url-")
    # Each event object carries the image_events columns, its source and cursor.
    sample = receiver.bodies[0]["events"][0]
    assert {"event_id", "event_type", "image_source", "before", "after", "cursor"} <= set(sample)


def test_webhook_configuration_rules(tmp_path: Any) -> None:
    """https only (loopback may be http), the secret is required and never printed,
    [[webhooks]] secrets come from the variable secret_env names."""
    with pytest.raises(ConfigError, match="must be https"):
        load_settings(
            {
                "IMAGE_SYNC_WEBHOOK_URL": "http://hooks.example.com/x",
                "IMAGE_SYNC_WEBHOOK_SECRET": "s",
            },
            needs_api=False,
        )
    with pytest.raises(ConfigError, match="IMAGE_SYNC_WEBHOOK_SECRET"):
        load_settings({"IMAGE_SYNC_WEBHOOK_URL": "https://hooks.example.com/x"}, needs_api=False)
    toml = tmp_path / "hooks.toml"
    toml.write_text(
        '[[webhooks]]\nname = "tickets"\nurl = "https://user:pw@hooks.example.com/t?token=abc"\n'
        'secret_env = "TICKETS_SECRET"\nevent_types = ["went_offline"]\nsources = ["public"]\n'
        'from = "beginning"\n',
        encoding="utf-8",
    )
    with pytest.raises(ConfigError, match="TICKETS_SECRET is not set"):
        load_settings({}, toml, needs_api=False)
    settings = load_settings({"TICKETS_SECRET": "hush-123"}, toml, needs_api=False)
    (subscriber,) = subscribers_of(settings)
    assert subscriber.name == "tickets" and subscriber.from_beginning
    assert subscriber.display_url == "https://hooks.example.com/t"
    assert "hush-123" not in repr(settings) + repr(subscriber)
    toml.write_text(
        '[[webhooks]]\nurl = "https://h.example.com/"\nsecret_env = "S"\nevent_types = ["x"]\n',
        encoding="utf-8",
    )
    with pytest.raises(ConfigError, match="unknown event type"):
        subscribers_of(load_settings({"S": "s"}, toml, needs_api=False))


async def test_failing_subscriber_is_visible_and_resumes(
    engine: AsyncEngine, make_settings: Any
) -> None:
    """A receiver answering 500: after the last attempt the subscriber is failing
    (webhook_cursors, metric, `image-sync status`, status page) with its cursor kept;
    once the receiver is back the next round delivers everything and clears it. A
    second dispatcher (another replica) skips a subscriber whose lock is held."""

    answers = [500, 500, 204]
    bodies: list[bytes] = []

    async def hook(request: web.Request) -> web.Response:
        bodies.append(await request.read())
        return web.Response(status=answers.pop(0) if len(answers) > 1 else answers[0])

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port = runner.addresses[0][1]
    settings = make_settings(
        IMAGE_SYNC_WEBHOOK_URL=f"http://127.0.0.1:{port}/hook",
        IMAGE_SYNC_WEBHOOK_SECRET=SECRET,
        IMAGE_SYNC_WEBHOOK_FROM="beginning",
        IMAGE_SYNC_WEBHOOK_MAX_ATTEMPTS="2",
    )
    (subscriber,) = subscribers_of(settings)
    lock_conn, run_id = await _run(engine)
    metrics = Metrics()
    try:
        await _merge(engine, run_id, "cn-north-1", _items("cn-north-1", ["w1", "w2"]))
        async with open_session(connect_timeout=2, request_timeout=5, limit=4) as session:
            dispatcher = Dispatcher(
                engine, session, [subscriber], max_attempts=2, timeout=2, metrics=metrics
            )
            assert not await dispatcher.deliver(subscriber)
            async with engine.connect() as conn:
                data = await page_data(conn)
            html = render_page(data, settings=settings, ready=True, reason="", error=None,
                               tick_interval=900)  # fmt: skip
            out = StringIO()
            await print_status(engine, console=Console(file=out, width=120))
            failing = metrics.webhook_failing.labels(subscriber.name)._value.get()
            lag = metrics.webhook_lag_events.labels(subscriber.name)._value.get()
            # Another replica holding the subscriber's lock: this one skips it.
            async with engine.connect() as holder:
                await holder.execution_options(isolation_level="AUTOCOMMIT")
                assert await try_lock_subscriber(holder, subscriber.name)
                assert not await dispatcher.deliver(subscriber)
                await unlock_subscriber(holder, subscriber.name)
            assert len(bodies) == 2
            assert await dispatcher.deliver(subscriber)
            recovered = metrics.webhook_failing.labels(subscriber.name)._value.get()
            lag_after = metrics.webhook_lag_events.labels(subscriber.name)._value.get()
        async with engine.connect() as conn:
            state = (
                await conn.execute(
                    sa.text("SELECT failing, failures FROM inventory.webhook_cursors")
                )
            ).one()
    finally:
        await release_run(lock_conn, run_id)
        await lock_conn.close()
        await runner.cleanup()
    assert (failing, lag) == (1, 2)
    assert subscriber.name in html and "failing" in html and "http_500" in html
    assert "failing" in out.getvalue() and subscriber.name in out.getvalue()
    assert SECRET not in html + out.getvalue()
    assert (recovered, lag_after) == (0, 0)
    assert tuple(state) == (False, 0)
    assert len(bodies) == 3 and bodies[0] == bodies[2]  # the same batch, redelivered
    assert [e["image_id"] for e in json.loads(bodies[2])["events"]] == ["img-w1", "img-w2"]
