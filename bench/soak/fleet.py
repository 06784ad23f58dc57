"""The processes the soak runs: one simulator and the ``image-sync run`` replicas."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import aiohttp

from bench.run import ROOT, _clean_env
from bench.soak.cluster import free_port
from service.config import SOURCES


async def _spawn(argv: list[str], env: dict[str, str], log: Path) -> asyncio.subprocess.Process:
    with log.open("ab") as out:
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "service", *argv,
            env=env, cwd=ROOT, stdout=out, stderr=asyncio.subprocess.STDOUT,
            stdin=asyncio.subprocess.DEVNULL,
        )  # fmt: skip


async def _stop(process: asyncio.subprocess.Process, within_s: float = 30) -> int:
    if process.returncode is None:
        process.send_signal(signal.SIGTERM)
    try:
        return await asyncio.wait_for(process.wait(), within_s)
    except TimeoutError:
        process.kill()
        return await process.wait()


@dataclass
class SimulatorProcess:
    """``image-sync simulate`` with its admin endpoint wrapped."""

    logs: Path
    images: int
    seed: int
    latency_ms: float
    jitter_ms: float
    port: int = field(default_factory=free_port)
    process: asyncio.subprocess.Process | None = None
    session: aiohttp.ClientSession | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self.process = await _spawn(
            [
                "simulate", "--port", str(self.port), "--seed", str(self.seed),
                "--images", str(self.images), "--latency-ms", str(self.latency_ms),
                "--jitter-ms", str(self.jitter_ms),
            ],
            _clean_env(),
            self.logs / "simulator.log",
        )  # fmt: skip
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60))
        for _ in range(600):
            if self.process.returncode is not None:
                raise RuntimeError(f"the simulator exited; see {self.logs / 'simulator.log'}")
            try:
                await self.admin("GET", "stats")
                return
            except aiohttp.ClientError:
                await asyncio.sleep(0.2)
        raise RuntimeError("the simulator did not answer within 120 s")

    async def admin(self, method: str, path: str, body: Any = None) -> Any:
        """One admin call; returns the decoded JSON, or None for a 404 (a vanished image)."""
        assert self.session is not None
        async with self.session.request(
            method, f"{self.url}/__simulator__/{path}", json=body
        ) as response:
            if response.status == 404:
                return None
            response.raise_for_status()
            return await response.json()

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
        if self.process is not None:
            await _stop(self.process)


@dataclass
class Replica:
    """One ``image-sync run`` process; a restart is a new Replica with a new name."""

    name: str
    process: asyncio.subprocess.Process
    port: int
    log: Path
    exit_code: int | None = None
    how_ended: str | None = None  # sigkill | sigterm | end

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def alive(self) -> bool:
        return self.process.returncode is None


class Fleet:
    """The replicas, each with its own status server port and log file."""

    def __init__(self, database_url: str, endpoint: str, logs: Path, interval: int) -> None:
        self.database_url = database_url
        self.endpoint = endpoint
        self.logs = logs
        self.interval = interval
        self.replicas: list[Replica] = []
        self._started = 0

    def env(self, http: str = "off") -> dict[str, str]:
        env = _clean_env()
        env.update(
            {
                "DATABASE_URL": self.database_url,
                "JDCLOUD_ENDPOINT": self.endpoint,
                "IMAGE_SYNC_INTERVAL": str(self.interval),
                **{f"IMAGE_SYNC_INTERVAL_{s.upper()}": str(self.interval) for s in SOURCES},
                "IMAGE_SYNC_HTTP": http,
                "IMAGE_SYNC_LOG_FORMAT": "json",
                "IMAGE_SYNC_LOG_LEVEL": "info",
                "IMAGE_SYNC_GRACE_PERIOD": "5",
            }
        )
        return env

    async def command(self, *argv: str) -> tuple[int, str]:
        """A one-off CLI command on the soak's database (migrate, check)."""
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "service", *argv, env=self.env(), cwd=ROOT,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        out, _ = await process.communicate()
        return process.returncode or 0, out.decode(errors="replace")

    async def start_one(self) -> Replica:
        self._started += 1
        name = f"r{self._started}"
        port = free_port()
        log = self.logs / f"replica-{name}.log"
        process = await _spawn(["run"], self.env(f"127.0.0.1:{port}"), log)
        replica = Replica(name, process, port, log)
        self.replicas.append(replica)
        return replica

    @property
    def alive(self) -> list[Replica]:
        return [r for r in self.replicas if r.alive]

    async def sigkill(self, replica: Replica) -> None:
        replica.process.send_signal(signal.SIGKILL)
        replica.exit_code = await replica.process.wait()
        replica.how_ended = "sigkill"

    async def sigterm(self, replica: Replica, how: str = "sigterm") -> None:
        replica.exit_code = await _stop(replica.process)
        replica.how_ended = how

    async def stop_all(self) -> None:
        for replica in self.alive:
            await self.sigterm(replica, "end")


def unexpected_errors(log: Path) -> list[str]:
    """Lines of a replica's log that mean a bug rather than an expected failure."""
    markers = ("Traceback", "tick failed unexpectedly", '"level":"critical"', '"exception":')
    out: list[str] = []
    handle: IO[str]
    with log.open(errors="replace") as handle:
        out = [_summary(line) for line in handle if any(m in line for m in markers)]
    return out


def _summary(line: str) -> str:
    """One log line as the report shows it: a JSON record's message and the last line of
    its traceback (the exception itself, which the report would otherwise cut off)."""
    try:
        record = json.loads(line)
    except ValueError:
        return line.strip()[:300]
    exception = str(record.get("exception") or "").strip().splitlines()
    raised = f" -> {exception[-1][:200]}" if exception else ""
    return f"{str(record.get('message'))[:200]}{raised}"


def pid_alive(pid: int) -> bool:
    return os.path.exists(f"/proc/{pid}")
