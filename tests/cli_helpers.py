"""Running ``image-sync`` in a subprocess, as a user would (not a test module)."""

from __future__ import annotations

import asyncio
import sys


async def run_cli(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    """``python -m service ARGS`` with exactly ``env``: (exit code, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "service", *args, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()
