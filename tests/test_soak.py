"""The soak's CI mode: ``python -m bench.soak --minutes 2``, the real thing, small.

Not ``db``-marked: the soak starts (and restarts) a PostgreSQL of its own, so CI's
second pass on the system PostgreSQL has nothing to add. Linux only (``/proc``).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.run import ROOT, _clean_env

pytestmark = pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")


@pytest.mark.long
def test_two_minute_soak_passes_every_check(tmp_path: Path) -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "bench.soak", "--minutes", "2", "--results-dir", str(tmp_path)],
        cwd=ROOT,
        env=_clean_env(),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert completed.returncode == 0, completed.stdout[-6000:] + completed.stderr[-3000:]
    result = json.loads((tmp_path / "soak-latest.json").read_text())
    assert result["ok"] and all(check["ok"] for check in result["checks"])
    assert (tmp_path / "soak-latest.svg").read_text().startswith("<svg")
    # The run did what a soak is for: churn, every incident, and windows judged event by event.
    assert sorted(i["incident"] for i in result["incidents"]) == [
        "pg_restart",
        "sigkill",
        "sigterm",
    ]
    assert sum(result["changes"].values()) > 100
    judged = [w for w in result["windows"] if w["label"].startswith("window")]
    assert len(judged) >= 2 and all(w["strict"] > 0 for w in judged)
    assert len(result["replicas"]) == 5  # three, a replacement for the killed, a restart
    assert result["resources"]["replicas"] and result["samples"]
