"""The simulator's admin operations from a blocking test (the simulator in a thread)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

from service.simulator import Simulator


def admin(sim: Simulator, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    """``(HTTP status, JSON answer)`` of ``{method} /__simulator__/{path}``."""
    request = urllib.request.Request(
        f"{sim.url}/__simulator__/{path}",
        data=None if body is None else json.dumps(body).encode(),
        method=method,
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def admin_ok(sim: Simulator, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    """The JSON answer of an admin operation that must succeed."""
    status, answer = admin(sim, method, path, body)
    assert status == 200, (path, status, answer)
    return answer
