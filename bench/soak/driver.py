"""The driver: catalogue churn and fault toggles through the simulator's admin endpoint.

Each step changes a random 0-5 % of the catalogue: renames, offline/online flips (the
sources that have the flag), deletions, additions and reappearances (a deleted image
added back as it was). Within one window (between two checkpoints) the driver touches
an image at most once, so each of its changes must become exactly one event (see
:mod:`bench.soak.truth`); drift, when on, may still delete an image it touched.
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

from bench.soak.fleet import SimulatorProcess
from service.simulator.catalogue import OFFLINE_SOURCES

MAX_CHANGE_FRACTION = 0.05
ERROR_KINDS = ("rate_limit", "internal", "bad_gateway", "unavailable", "reset", "malformed",
               "truncated")  # fmt: skip
OPERATIONS = {"rename": 30, "flip": 25, "delete": 15, "add": 15, "reappear": 15}


class Driver:
    def __init__(self, sim: SimulatorProcess, rng: random.Random) -> None:
        self.sim = sim
        self.rng = rng
        self.touched: set[tuple[str, str]] = set()  # this window
        self.deleted: dict[tuple[str, str], dict[str, Any]] = {}  # by the driver, to reappear
        self.changes: Counter[str] = Counter()
        self.fault_toggles = 0
        self.faults_on = False

    def new_window(self) -> None:
        self.touched.clear()

    async def step(self) -> int:
        """One round of churn; returns how many changes it made."""
        data = await self.sim.admin("GET", "catalogue")
        images = [
            (region, source, image)
            for key, listed in data.items()
            for region, source in [key.split("/", 1)]
            for image in listed
            if (region, image["imageId"]) not in self.touched
        ]
        partitions = [tuple(key.split("/", 1)) for key in data]
        count = round(len(images) * self.rng.uniform(0, MAX_CHANGE_FRACTION))
        ops = self.rng.choices(list(OPERATIONS), weights=list(OPERATIONS.values()), k=count)
        targets = self.rng.sample(images, min(count, len(images)))
        made = 0
        for op, (region, source, image) in zip(ops, targets, strict=False):
            made += await self._apply(op, region, source, image, partitions)
        return made

    async def _apply(
        self, op: str, region: str, source: str, image: dict[str, Any], partitions: list[Any]
    ) -> int:
        key = (region, image["imageId"])
        if op == "flip" and source not in OFFLINE_SOURCES:
            op = "rename"
        if op == "reappear":
            candidates = sorted(k for k in self.deleted if k not in self.touched)
            if not candidates:
                op = "add"
            else:
                key = self.rng.choice(candidates)
                gone = self.deleted.pop(key)
                body = {"region": key[0], "source": gone["imageSource"], "fields": gone}
                return self._count(
                    "reappear", key, await self.sim.admin("POST", "catalogue/add", body)
                )
        if op == "add":
            region, source = self.rng.choice(partitions)
            answer = await self.sim.admin(
                "POST", "catalogue/add", {"region": region, "source": source}
            )
            if answer is not None:
                self.touched.add((region, answer["image"]["imageId"]))
            return self._count("add", None, answer)
        body: dict[str, Any] = {"region": region, "image_id": image["imageId"]}
        if op == "rename":
            body["fields"] = {"name": f"{image['name'][:60]} (renamed {self.rng.randrange(10**6)})"}
            return self._count(
                "rename", key, await self.sim.admin("POST", "catalogue/modify", body)
            )
        if op == "flip":
            path = "catalogue/bring_online" if image.get("offline") else "catalogue/take_offline"
            return self._count("offline" if not image.get("offline") else "online", key,
                               await self.sim.admin("POST", path, body))  # fmt: skip
        answer = await self.sim.admin("POST", "catalogue/delete", body)
        if answer is not None:
            self.deleted[key] = answer["image"]
        return self._count("delete", key, answer)

    def _count(self, what: str, key: tuple[str, str] | None, answer: Any) -> int:
        if answer is None:  # drift removed it meanwhile
            return 0
        if key is not None:
            self.touched.add(key)
        self.changes[what] += 1
        return 1

    async def toggle_faults(self) -> None:
        """Turn a random mix of faults and drift on, or everything off."""
        self.fault_toggles += 1
        if self.faults_on and self.rng.random() < 0.5:
            await self.faults_off()
            return
        kinds = self.rng.sample(ERROR_KINDS, self.rng.randint(1, 4))
        rates = {kind: round(self.rng.uniform(0.01, 0.04), 3) for kind in kinds}
        drift = round(self.rng.uniform(0.02, 0.1), 3) if self.rng.random() < 0.5 else 0.0
        await self.sim.admin("PUT", "faults", {"error_rates": rates, "drift": drift})
        self.faults_on = True

    async def faults_off(self) -> None:
        await self.sim.admin("PUT", "faults", {"error_rates": {}, "drift": 0.0})
        self.faults_on = False
