"""The status page in a real headless browser (Debian's ``chromium``), driven through the
DevTools protocol: it renders its charts and tables, logs no console error (CSP
violations included), fits a phone's width, and leaves screenshots in ``artifacts/``.

Skipped only when chromium is missing and ``CI`` is unset; under CI a missing chromium
fails (``deploy/tools/install-validators.sh`` installs it).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import random
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from service.app import open_runtime
from service.metrics import Metrics
from service.simulator.server import running_simulator
from service.sync import sync_once
from service.web.server import StatusContext, serve_status

pytestmark = pytest.mark.browser

ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--no-first-run",
    "--hide-scrollbars",
    "--remote-allow-origins=*",
    "--remote-debugging-port=0",
)
SEED_RUNS = 6
HOURS_BETWEEN_RUNS = 4


def chromium() -> str:
    if CHROMIUM:
        return CHROMIUM
    if os.environ.get("CI", "").lower() not in ("", "0", "false", "no"):
        pytest.fail("chromium is not installed (deploy/tools/install-validators.sh installs it)")
    pytest.skip("chromium is not installed (apt-get install -y chromium)")


class DevTools:
    """A minimal DevTools-protocol client over one websocket (flattened sessions)."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.events: list[dict[str, Any]] = []
        self._next = 0
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._seen = asyncio.Condition()
        self._reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        async for message in self.ws:
            data = message.json()
            if "id" in data:
                future = self._pending.pop(data["id"])
                if "error" in data:
                    future.set_exception(RuntimeError(f"DevTools: {data['error']}"))
                else:
                    future.set_result(data.get("result", {}))
            else:
                async with self._seen:
                    self.events.append(data)
                    self._seen.notify_all()

    async def send(self, method: str, session: str | None = None, **params: Any) -> dict[str, Any]:
        self._next += 1
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[self._next] = future
        message: dict[str, Any] = {"id": self._next, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        await self.ws.send_json(message)
        return await asyncio.wait_for(future, 20)

    async def wait_event(self, method: str, after: int) -> dict[str, Any]:
        async with self._seen:
            await asyncio.wait_for(
                self._seen.wait_for(
                    lambda: any(e["method"] == method for e in self.events[after:])
                ),
                20,
            )
            return next(e for e in self.events[after:] if e["method"] == method)

    async def close(self) -> None:
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader


@contextlib.asynccontextmanager
async def headless_chromium(tmp_path: Path) -> AsyncIterator[DevTools]:
    profile = tmp_path / "chromium-profile"
    process = await asyncio.create_subprocess_exec(
        chromium(),
        *CHROMIUM_FLAGS,
        f"--user-data-dir={profile}",
        "about:blank",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        active_port = profile / "DevToolsActivePort"
        for _ in range(300):
            if active_port.exists() and len(active_port.read_text().split()) >= 2:
                break
            await asyncio.sleep(0.05)
        port, path = active_port.read_text().split()[:2]
        async with (
            aiohttp.ClientSession() as http,
            http.ws_connect(f"ws://127.0.0.1:{port}{path}", max_msg_size=0) as ws,
        ):
            devtools = DevTools(ws)
            try:
                yield devtools
            finally:
                await devtools.close()
    finally:
        if process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), 10)
            except TimeoutError:
                process.kill()
                await process.wait()


async def seed_history(engine: AsyncEngine, make_settings: Any) -> None:
    """Real syncs of a changing catalogue, then spread over the last day (as if the
    daemon had run every few hours) so that the charts have a history to show."""
    rng = random.Random(11)
    async with running_simulator(seed=11, images=900) as simulator:
        catalogue = simulator.catalogue
        async with open_runtime(make_settings(simulator.url)) as rt:
            partitions = rt.partitions()
            for run in range(SEED_RUNS):
                if run == SEED_RUNS - 1:  # the last run: one partition refused by the API
                    simulator.faults.update(
                        {"fail_partitions": {"cn-south-1/shared": "QUOTA_EXCEEDED"}}
                    )
                await sync_once(rt.database.engine, rt.client, partitions, trigger="schedule")
                for region, source in catalogue.partitions():
                    if source not in ("public", "thirdparty"):
                        continue
                    for _ in range(rng.randint(0, 4)):
                        image_id = catalogue.random_image_id(region, source, rng, offline=False)
                        if image_id:
                            catalogue.take_offline(region, image_id)
                    for _ in range(rng.randint(0, 2)):
                        image_id = catalogue.random_image_id(region, source, rng, offline=True)
                        if image_id:
                            catalogue.bring_online(region, image_id)
                catalogue.add("cn-east-2", "private")
    async with engine.begin() as conn:
        runs = (
            await conn.scalars(sa.text("SELECT run_id FROM inventory.sync_runs ORDER BY 1"))
        ).all()
        for i, run_id in enumerate(runs):
            shift = {"r": run_id, "h": (len(runs) - 1 - i) * HOURS_BETWEEN_RUNS}
            await conn.execute(
                sa.text(
                    "UPDATE inventory.sync_runs SET started_at = started_at - make_interval(hours => :h),"
                    " finished_at = finished_at - make_interval(hours => :h) WHERE run_id = :r"
                ),
                shift,
            )
            await conn.execute(
                sa.text(
                    "UPDATE inventory.sync_partitions SET started_at = started_at - make_interval(hours => :h),"
                    " finished_at = finished_at - make_interval(hours => :h) WHERE run_id = :r"
                ),
                shift,
            )
            await conn.execute(
                sa.text(
                    "UPDATE inventory.image_events SET occurred_at = occurred_at - make_interval(hours => :h)"
                    " WHERE sync_run_id = :r"
                ),
                shift,
            )


async def load(
    devtools: DevTools, session: str, url: str, width: int, height: int, mobile: bool
) -> None:
    await devtools.send(
        "Emulation.setDeviceMetricsOverride",
        session,
        width=width,
        height=height,
        deviceScaleFactor=1,
        mobile=mobile,
    )
    mark = len(devtools.events)
    await devtools.send("Page.navigate", session, url=url)
    await devtools.wait_event("Page.loadEventFired", mark)


async def evaluate(devtools: DevTools, session: str, expression: str) -> Any:
    result = await devtools.send(
        "Runtime.evaluate", session, expression=expression, returnByValue=True
    )
    assert "exceptionDetails" not in result, result
    return result["result"]["value"]


async def screenshot(devtools: DevTools, session: str, path: Path, width: int) -> None:
    metrics = await devtools.send("Page.getLayoutMetrics", session)
    height = int(metrics["cssContentSize"]["height"]) + 1
    shot = await devtools.send(
        "Page.captureScreenshot",
        session,
        format="png",
        captureBeyondViewport=True,
        clip={"x": 0, "y": 0, "width": width, "height": height, "scale": 1},
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    await asyncio.to_thread(path.write_bytes, base64.b64decode(shot["data"]))


def console_errors(events: list[dict[str, Any]]) -> list[Any]:
    errors: list[Any] = []
    for event in events:
        method, params = event["method"], event.get("params", {})
        if method == "Runtime.exceptionThrown":
            errors.append(params["exceptionDetails"])
        elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            errors.append(params)
        elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
            errors.append(params["entry"])
    return errors


async def test_status_page_renders_in_chromium_without_console_errors(
    engine: AsyncEngine, make_settings: Any, tmp_path: Path
) -> None:
    chromium()
    await seed_history(engine, make_settings)
    settings = make_settings(IMAGE_SYNC_INTERVAL="900", IMAGE_SYNC_INTERVAL_PUBLIC="3600")
    context = StatusContext(engine=engine, settings=settings, metrics=Metrics())
    async with (
        serve_status(context, "127.0.0.1", 0) as url,
        headless_chromium(tmp_path) as devtools,
    ):
        target = await devtools.send("Target.createTarget", url="about:blank")
        attached = await devtools.send(
            "Target.attachToTarget", targetId=target["targetId"], flatten=True
        )
        session = attached["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            await devtools.send(f"{domain}.enable", session)

        await load(devtools, session, url + "/", 1280, 900, mobile=False)
        page = await evaluate(
            devtools,
            session,
            """({
                title: document.title,
                charts: [...document.querySelectorAll('svg.chart')].map(s => ({
                    label: s.getAttribute('aria-label'),
                    width: s.getBoundingClientRect().width,
                    bars: s.querySelectorAll('rect').length})),
                healthCells: document.querySelectorAll('.cell').length,
                runs: document.querySelectorAll('section.wide:last-of-type tr').length,
                ready: document.querySelector('.pill').textContent,
                errors: document.querySelectorAll('.errors li').length,
                stylesheets: document.styleSheets.length,
                external: [...document.querySelectorAll('[src],[href]')].map(e => e.src || e.href)
                    .filter(u => !u.startsWith('data:')),
            })""",
        )
        await screenshot(devtools, session, ARTIFACTS / "status-page-desktop.png", 1280)

        await load(devtools, session, url + "/", 390, 844, mobile=True)
        phone = await evaluate(
            devtools,
            session,
            """({scrollWidth: document.documentElement.scrollWidth, innerWidth: window.innerWidth,
                 charts: [...document.querySelectorAll('svg.chart')]
                    .map(s => s.getBoundingClientRect().right)})""",
        )
        await screenshot(devtools, session, ARTIFACTS / "status-page-phone.png", 390)

    print(
        f"\nscreenshots: {ARTIFACTS / 'status-page-desktop.png'}, {ARTIFACTS / 'status-page-phone.png'}"
    )
    assert console_errors(devtools.events) == []
    assert page["title"] == "image-sync status"
    assert page["ready"] == "ready"
    assert page["healthCells"] == 20
    assert page["errors"] == 1  # cn-south-1/shared: QUOTA_EXCEEDED
    assert page["stylesheets"] == 1 and page["external"] == []
    labels = {chart["label"] for chart in page["charts"]}
    assert labels == {
        "Listed images per region, by source",
        "Offline transitions over time",
        "Sync run durations",
    }
    assert all(chart["bars"] > 0 and chart["width"] > 300 for chart in page["charts"])
    assert phone["scrollWidth"] <= phone["innerWidth"] == 390
    assert all(right <= 390 for right in phone["charts"])
    assert (ARTIFACTS / "status-page-desktop.png").stat().st_size > 10_000
