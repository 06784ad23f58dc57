"""``image-sync check`` must not call a run crashed because it finished during the check.

The data checks read one repeatable-read snapshot, but a run's liveness is its advisory
lock in ``pg_locks``, which is live state, not part of any snapshot. A run that
commits its final status and releases its lock while the check runs was seen
``running`` in the (older) snapshot and without a lock in ``pg_locks``: a false
"crashed" alarm. The soak (bench/soak) hit it at a checkpoint; here the interleaving
is forced with a table lock.
"""

from __future__ import annotations

import asyncio

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from service.check import check_invariants
from service.store.runs import release_run, start_run


async def _someone_waits_on_a_lock(engine: AsyncEngine) -> bool:
    async with engine.connect() as conn:
        waiting = await conn.scalar(
            sa.text(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND wait_event_type = 'Lock'"
            )
        )
    return bool(waiting)


async def test_a_run_finishing_during_the_check_is_not_reported_crashed(
    engine: AsyncEngine,
) -> None:
    lock_conn = await engine.connect()
    await lock_conn.execution_options(isolation_level="AUTOCOMMIT")
    run_id = await start_run(lock_conn, trigger="cli")
    try:
        async with engine.connect() as blocker:
            trans = await blocker.begin()
            await blocker.execute(
                sa.text("LOCK TABLE inventory.sync_runs IN ACCESS EXCLUSIVE MODE")
            )
            check = asyncio.ensure_future(check_invariants(engine))
            for _ in range(500):
                if await _someone_waits_on_a_lock(engine) or check.done():
                    break
                await asyncio.sleep(0.01)
            # The run finishes the way sync_once finishes it: status first, then the lock.
            await blocker.execute(
                sa.text(
                    "UPDATE inventory.sync_runs SET status = 'succeeded', finished_at = now()"
                    " WHERE run_id = :id"
                ),
                {"id": run_id},
            )
            await release_run(lock_conn, run_id)
            await trans.commit()
            problems = await check
    finally:
        await lock_conn.close()
    assert problems == []
