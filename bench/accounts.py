"""``python -m bench --accounts N``: one daemon tick over an organisation of N accounts.

The simulator serves the catalogue and, added in one admin call
(``POST /__simulator__/organisation``), N accounts with ``images_per_region`` private
images each in every region, every ``share_every``-th shared with the next account.
Every ``key_pair_every``-th account is configured with its own key pair (in environment
variables the generated ``[[accounts]]`` TOML file names), the others as a role assumed
with the base pair. On a fresh database, ``daemons`` ``image-sync run`` processes start
together, then (on another fresh database) one alone; each time the start-up tick must
sync every partition (the catalogue once per region, private and shared per account and
region) exactly once. Measured from the database and the simulator's counters: the
tick's wall time (first partition started to last finished), the rows stored, and the
assumeRole calls (once per role and process per credential lifetime).
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psycopg

from bench.run import (
    ROOT,
    BackendCpu,
    _clean_env,
    fresh_database,
    log,
    migrate,
    postgres_server,
    simulator,
)
from bench.scenario import Scenario
from bench.soak.fleet import unexpected_errors
from service.config import ACCOUNT_SOURCES, CATALOGUE_SOURCES
from service.jdcloud.signer import DEMO_ACCESS_KEY, DEMO_SECRET_KEY
from service.simulator.catalogue import DEFAULT_REGIONS

TICK_TIMEOUT_S = 900.0


@dataclass(frozen=True, slots=True)
class AccountsScenario:
    """The organisation the simulator serves and how many daemons sync it."""

    name: str
    accounts: int
    images_per_region: int = 50
    share_every: int = 5
    key_pair_every: int = 10
    """Accounts 0, k, 2k, ... have their own key pair; the others are roles."""
    regions: tuple[str, ...] = DEFAULT_REGIONS
    daemons: int = 3
    catalogue: Scenario = field(
        default_factory=lambda: Scenario("accounts", images=10_000, latency_ms=20, skew=1)
    )

    @property
    def partitions(self) -> int:
        catalogue = len(self.regions) * len(CATALOGUE_SOURCES)
        return catalogue + self.accounts * len(self.regions) * len(ACCOUNT_SOURCES)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def scenario_for(accounts: int) -> AccountsScenario:
    return AccountsScenario(f"accounts-{accounts}", accounts=accounts)


CI = AccountsScenario(
    "accounts-ci",
    accounts=5,
    images_per_region=3,
    share_every=2,
    key_pair_every=3,
    regions=("cn-north-1", "cn-east-1"),
    catalogue=Scenario("accounts-ci", images=300, latency_ms=0, skew=1),
)


def run_accounts(scenario: AccountsScenario, *, server_url: str | None = None) -> dict[str, Any]:
    """The tick with ``scenario.daemons`` daemons, then with one; each on a fresh database."""
    log(
        f"accounts scenario: {scenario.accounts} accounts x {len(scenario.regions)} regions, "
        f"{scenario.images_per_region} private images each, {scenario.partitions} partitions"
    )
    regions = ["--regions", ",".join(scenario.regions)]
    with (
        postgres_server(server_url) as server,
        simulator(scenario.catalogue, extra=regions) as endpoint,
        tempfile.TemporaryDirectory(prefix="image-sync-bench-accounts-") as tmp,
    ):
        specs = account_specs(scenario)
        organisation = admin(
            endpoint,
            "organisation",
            {
                "accounts": specs,
                "images_per_region": scenario.images_per_region,
                "share_every": scenario.share_every,
            },
        )
        log(
            f"simulator: {organisation['private_images']} private images, "
            f"{organisation['shares']} shares, {len(organisation['roles'])} roles"
        )
        env = daemon_env(scenario, specs, organisation["roles"], endpoint, Path(tmp))
        ticks = {}
        for daemons in dict.fromkeys((scenario.daemons, 1)):
            with fresh_database(server) as database_url:
                migrate(database_url)
                log(f"one tick with {daemons} daemon(s)")
                ticks[str(daemons)] = measure_tick(
                    scenario, {**env, "DATABASE_URL": database_url}, endpoint, daemons, Path(tmp)
                )
        catalogue = admin(endpoint, "stats")["partitions"]
    expected = {
        "catalogue_images": sum(
            n for key, n in catalogue.items() if key.split("/")[1] in CATALOGUE_SOURCES
        ),
        "private_images": organisation["private_images"],
        "image_access": organisation["private_images"] + organisation["shares"],
        "roles": len(organisation["roles"]),
        "partitions": scenario.partitions,
    }
    return {"scenario": scenario.to_dict(), "expected": expected, "ticks": ticks}


def account_specs(scenario: AccountsScenario) -> list[dict[str, Any]]:
    specs = []
    for i in range(scenario.accounts):
        spec: dict[str, Any] = {
            "name": f"acct-{i:03d}",
            "pin": f"pin-acct-{i:03d}",
            "access_key": f"AKACCT{i:03d}",
            "secret_key": f"bench-secret-{i:03d}",
        }
        if i % scenario.key_pair_every:
            spec["role"] = "image-sync-reader"
        specs.append(spec)
    return specs


def daemon_env(
    scenario: AccountsScenario,
    specs: list[dict[str, Any]],
    roles: dict[str, str],
    endpoint: str,
    tmp: Path,
) -> dict[str, str]:
    """The daemons' environment: the [[accounts]] file, the key pairs it names, the base
    pair (the simulator's first account, which every role trusts)."""
    env = _clean_env()
    lines = []
    for spec in specs:
        lines += ["[[accounts]]", f'name = "{spec["name"]}"']
        if spec["name"] in roles:
            lines.append(f'role_jrn = "{roles[spec["name"]]}"')
        else:
            variable = spec["name"].upper().replace("-", "_")
            lines += [f'access_key_env = "{variable}_AK"', f'secret_key_env = "{variable}_SK"']
            env[f"{variable}_AK"] = spec["access_key"]
            env[f"{variable}_SK"] = spec["secret_key"]
        lines.append("")
    config = tmp / "accounts.toml"
    config.write_text("\n".join(lines))
    env.update(
        {
            "IMAGE_SYNC_CONFIG": str(config),
            "JDCLOUD_ENDPOINT": endpoint,
            "JDCLOUD_STS_ENDPOINT": endpoint,
            "JDCLOUD_ACCESS_KEY": DEMO_ACCESS_KEY,
            "JDCLOUD_SECRET_KEY": DEMO_SECRET_KEY,
            "IMAGE_SYNC_REGIONS": ",".join(scenario.regions),
            "IMAGE_SYNC_INTERVAL": "3600",  # the start-up tick only, within the measurement
            "IMAGE_SYNC_CONCURRENCY": str(scenario.catalogue.concurrency),
            "IMAGE_SYNC_RATE_LIMIT": "0",
            "IMAGE_SYNC_HTTP": "off",
            "IMAGE_SYNC_LOG_FORMAT": "json",
            "IMAGE_SYNC_GRACE_PERIOD": "5",
        }
    )
    return env


def measure_tick(
    scenario: AccountsScenario, env: dict[str, str], endpoint: str, daemons: int, logs: Path
) -> dict[str, Any]:
    """Start ``daemons`` daemons on an empty database, wait until their start-up ticks
    are over and every partition has a success, stop them; what the tick did."""
    assume_before = admin(endpoint, "stats")["counters"].get("sts:assumeRole", 0)
    processes = [daemon(env, logs / f"daemon-{daemons}-{n}.log") for n in range(daemons)]
    try:
        with (
            psycopg.connect(env["DATABASE_URL"], autocommit=True) as conn,
            BackendCpu(conn.info.dbname) as backends,
        ):
            wait_for_tick(conn, scenario, processes)
    finally:  # stopped before counting, so that anything they did after is counted too
        for _, process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        reaped_before = _children_cpu()
        codes = [process.wait(timeout=60) for _, process in processes]
        daemon_cpu = _children_cpu() - reaped_before  # only the daemons were reaped
    with psycopg.connect(env["DATABASE_URL"], autocommit=True) as conn:
        tick = tick_facts(conn)
    tick["daemon_cpu_seconds"] = daemon_cpu
    tick["postgres_cpu_seconds"] = backends.seconds
    tick["assume_role_calls"] = (
        admin(endpoint, "stats")["counters"].get("sts:assumeRole", 0) - assume_before
    )
    tick["daemons"] = daemons
    tick["exit_codes"] = codes
    tick["unexpected_log_lines"] = [
        line for path, _ in processes for line in unexpected_errors(path)
    ]
    log(
        f"  {daemons} daemon(s): {tick['seconds']:.2f}s, {tick['partitions_succeeded']} "
        f"partitions, {tick['assume_role_calls']} assumeRole calls"
    )
    return tick


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def daemon(env: dict[str, str], log_path: Path) -> tuple[Path, subprocess.Popen[bytes]]:
    """One ``image-sync run`` process logging to ``log_path``."""
    with log_path.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "service", "run"],
            env=env,
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    return log_path, process


def wait_for_tick(
    conn: psycopg.Connection,
    scenario: AccountsScenario,
    processes: list[tuple[Path, subprocess.Popen[bytes]]],
) -> None:
    """Until every daemon has ticked, every partition identity has a success and no run
    is still running."""
    deadline = time.monotonic() + TICK_TIMEOUT_S
    while time.monotonic() < deadline:
        exited = [p.returncode for _, p in processes if p.poll() is not None]
        if exited:
            raise RuntimeError(f"a daemon exited ({exited[0]}) before the tick was over")
        ticked = all('"tick: ' in path.read_text(errors="replace") for path, _ in processes)
        done, running = conn.execute(
            "SELECT (SELECT count(DISTINCT (region_id, image_source, coalesce(account, '')))"
            "          FROM inventory.sync_partitions WHERE status = 'succeeded'),"
            "       (SELECT count(*) FROM inventory.sync_runs WHERE finished_at IS NULL)"
        ).fetchone() or (0, 0)
        if ticked and done >= scenario.partitions and not running:
            return
        time.sleep(0.25)
    raise RuntimeError(f"the tick did not end within {TICK_TIMEOUT_S:.0f} s")


def tick_facts(conn: psycopg.Connection) -> dict[str, Any]:
    """From the database: successes per partition identity, the wall time, the rows."""
    per_identity = conn.execute(
        "SELECT count(*) FILTER (WHERE status = 'succeeded'),"
        "       count(*) FILTER (WHERE status NOT IN ('succeeded', 'skipped_locked'))"
        "  FROM inventory.sync_partitions GROUP BY region_id, image_source, account"
    ).fetchall()
    (seconds,) = conn.execute(
        "SELECT extract(epoch FROM max(finished_at) - min(started_at))::float"
        "  FROM inventory.sync_partitions WHERE status = 'succeeded'"
    ).fetchone() or (0.0,)
    by_source = dict(
        conn.execute(
            "SELECT image_source, count(*) FROM inventory.images GROUP BY image_source"
        ).fetchall()
    )
    runs = conn.execute("SELECT count(*), count(DISTINCT pid) FROM inventory.sync_runs").fetchone()
    requests = conn.execute(
        "SELECT sum(api_requests), avg(extract(epoch FROM finished_at - started_at))::float"
        "  FROM inventory.sync_partitions WHERE status = 'succeeded'"
    ).fetchone()
    access = conn.execute("SELECT count(*) FROM inventory.image_access").fetchone()
    assert runs is not None and access is not None and requests is not None
    return {
        "seconds": seconds,
        "partitions_succeeded": sum(1 for ok, _ in per_identity if ok),
        "succeeded_twice": sum(1 for ok, _ in per_identity if ok > 1),
        "partitions_not_succeeded": sum(1 for ok, _ in per_identity if not ok),
        "failed_rows": sum(bad for _, bad in per_identity),
        "skipped_locked_rows": conn.execute(
            "SELECT count(*) FROM inventory.sync_partitions WHERE status = 'skipped_locked'"
        ).fetchone()[0],  # type: ignore[index]
        "api_requests": int(requests[0] or 0),
        "mean_partition_seconds": requests[1] or 0.0,
        "runs": runs[0],
        "processes_that_ran": runs[1],
        "images_by_source": by_source,
        "catalogue_images": sum(by_source.get(s, 0) for s in CATALOGUE_SOURCES),
        "images": sum(by_source.values()),
        "image_access": access[0],
    }


def tick_problems(tick: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    """What is wrong with a measured tick (empty: every partition succeeded exactly once,
    the catalogue and the private images stored once, assumeRole once per role and
    process that used it)."""
    daemons = tick["daemons"]
    checks = {
        "every partition succeeded": tick["partitions_succeeded"] == expected["partitions"],
        "no partition succeeded twice": tick["succeeded_twice"] == 0,
        "no partition failed": tick["failed_rows"] == 0,
        "catalogue rows = catalogue images": tick["catalogue_images"]
        == expected["catalogue_images"],
        "private rows = private images": tick["images_by_source"].get("private", 0)
        == expected["private_images"],
        "no shared row (a shared image is its owner's private row)": "shared"
        not in tick["images_by_source"],
        "image_access rows = owners + shares": tick["image_access"] == expected["image_access"],
        "assumeRole between roles and roles x daemons": expected["roles"]
        <= tick["assume_role_calls"]
        <= expected["roles"] * daemons,
        "daemons exited 0": all(code == 0 for code in tick["exit_codes"]),
        "no unexpected log line": not tick["unexpected_log_lines"],
    }
    return [f"{daemons} daemon(s): {name}" for name, ok in checks.items() if not ok]


def admin(endpoint: str, path: str, body: dict[str, Any] | None = None) -> Any:
    request = urllib.request.Request(
        f"{endpoint}/__simulator__/{path}",
        data=None if body is None else json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="GET" if body is None else "POST",
    )
    with urllib.request.urlopen(request, timeout=300) as response:
        return json.loads(response.read())


def print_accounts(result: dict[str, Any]) -> None:
    s, expected = result["scenario"], result["expected"]
    print(
        f"\n{s['name']}: {s['accounts']} accounts x {len(s['regions'])} regions, "
        f"{expected['private_images']} private images, {expected['catalogue_images']} catalogue "
        f"images, {expected['partitions']} partitions, {expected['roles']} roles, "
        f"{s['catalogue']['latency_ms']:g} ms latency, {os.cpu_count()} CPUs"
    )
    header = (
        f"{'daemons':>7} {'tick s':>8} {'succeeded':>10} {'twice':>6} {'skipped':>8} "
        f"{'catalogue rows':>15} {'images':>8} {'image_access':>13} {'assumeRole':>11} "
        f"{'requests':>9} {'partition s':>12} {'CPU s (daemons/PG)':>19}"
    )
    print(header)
    print("-" * len(header))
    for tick in result["ticks"].values():
        print(
            f"{tick['daemons']:>7} {tick['seconds']:>8.2f} {tick['partitions_succeeded']:>10} "
            f"{tick['succeeded_twice']:>6} {tick['skipped_locked_rows']:>8} "
            f"{tick['catalogue_images']:>15} {tick['images']:>8} {tick['image_access']:>13} "
            f"{tick['assume_role_calls']:>11} {tick['api_requests']:>9} "
            f"{tick['mean_partition_seconds']:>12.2f} "
            f"{tick['daemon_cpu_seconds']:>10.1f}/{tick['postgres_cpu_seconds']:.1f}"
        )
    ticks = list(result["ticks"].values())
    if len(ticks) > 1:
        print(
            f"one daemon / {ticks[0]['daemons']} daemons: {ticks[1]['seconds'] / ticks[0]['seconds']:.2f}x"
        )
    print(f"load: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}")
