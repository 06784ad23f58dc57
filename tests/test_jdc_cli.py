"""The JD Cloud CLI (``jdc``, PyPI ``jdcloud-cli``), unchanged, against the simulator:
configured in a temporary HOME with ``jdc configure add --endpoint 127.0.0.1:PORT
--scheme http``, its ``vm describe-images``, ``describe-image``,
``describe-image-members`` and ``describe-image-constraints-batch`` exit 0 with the
simulator's answers.

``jdc`` lives in ``.venv-jdc/`` (``make jdc``; ``.ci/run`` runs it): its pinned
dependencies conflict with the project's venv. Missing, the test fails under CI and is
skipped elsewhere with the command that installs it.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from service.jdcloud.signer import DEMO_ACCESS_KEY, DEMO_SECRET_KEY
from service.simulator import Simulator, simulator_in_thread

ROOT = Path(__file__).resolve().parent.parent
JDC = Path(os.environ.get("JDC_CLI", ROOT / ".venv-jdc" / "bin" / "jdc"))
REGION = "cn-north-1"


@pytest.fixture(scope="module")
def jdc_home(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Simulator, dict[str, str]]]:
    if not JDC.exists():
        message = f"the jdc CLI is not installed at {JDC}: run `make jdc`"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    home = tmp_path_factory.mktemp("jdc-home")
    env = {"HOME": str(home), "PATH": os.environ.get("PATH", ""), "COLUMNS": "200"}
    with simulator_in_thread(seed=8, images=300) as sim:
        configured = subprocess.run(
            [
                str(JDC), "configure", "add", "--profile", "simulator",
                "--access-key", DEMO_ACCESS_KEY, "--secret-key", DEMO_SECRET_KEY,
                "--region-id", REGION, "--endpoint", sim.endpoint, "--scheme", "http",
            ],
            env=env, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert configured.returncode == 0, configured.stderr
        yield sim, env


def jdc(env: dict[str, str], *args: str) -> Any:
    done = subprocess.run(
        [str(JDC), "--output", "json", "vm", *args],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert answer["error"] is None, answer
    return answer["result"]


def test_jdc_describe_images(jdc_home: tuple[Simulator, dict[str, str]]) -> None:
    sim, env = jdc_home
    result = jdc(env, "describe-images", "--image-source", "private", "--page-size", "100")
    assert result["images"] == sim.catalogue.images(REGION, "private")
    assert result["totalCount"] == len(result["images"]) > 0


def test_jdc_describe_image_and_members(jdc_home: tuple[Simulator, dict[str, str]]) -> None:
    sim, env = jdc_home
    private = sim.catalogue.images(REGION, "private")
    shared = next(i for i in private if i["launchPermission"] == "specifiedUsers")
    assert jdc(env, "describe-image", "--image-id", shared["imageId"]) == {"image": shared}
    pins = sim.catalogue.members(REGION, shared["imageId"])
    assert pins
    assert jdc(env, "describe-image-members", "--image-id", shared["imageId"]) == {"pins": pins}


def test_jdc_describe_image_constraints_batch(jdc_home: tuple[Simulator, dict[str, str]]) -> None:
    sim, env = jdc_home
    public = [i["imageId"] for i in sim.catalogue.images(REGION, "public")]
    with_constraint = [i for i in public if sim.catalogue.constraint(REGION, i)]
    assert with_constraint
    ids = public[:20] + with_constraint[:2]
    result = jdc(env, "describe-image-constraints-batch", "--ids", json.dumps(ids))
    expected = [
        {"imageId": i, "imageInstanceTypeConstraint": sim.catalogue.constraint(REGION, i)}
        for i in dict.fromkeys(ids)
        if sim.catalogue.constraint(REGION, i)
    ]
    assert result == {"imageConstraints": expected}
