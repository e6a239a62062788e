"""SQLite while another process holds the file's write lock.

A statement then waits in aiosqlite's thread for SQLite's busy timeout (30 s on a
locker's own engine), and no cancellation reaches it there. The locker must answer
within its own timeout, and leave nothing behind that outlives the wait: no task
stuck for ever, which would hang the event loop's shutdown (``asyncio.run``).
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiosqlite
import pytest

from aiocronlock import AsyncDBLocker, BackendError

TIMEOUT = 0.5


@pytest.mark.parametrize("calls", [1, 3])
async def test_a_statement_waiting_for_the_file_times_out_and_leaves_no_task(
    tmp_path: Path, calls: int
) -> None:
    path = tmp_path / "busy.db"
    locker = AsyncDBLocker(
        f"sqlite+aiosqlite:///{path}", worker="a", timeout=TIMEOUT, clean_interval=None
    )
    await locker.create_table()
    now = datetime.now(UTC).replace(microsecond=0)
    locks = [await locker.lock("nightly", now - timedelta(seconds=i)) for i in range(calls + 1)]
    before = asyncio.all_tasks()
    async with aiosqlite.connect(path, isolation_level=None) as blocker:
        await blocker.execute("BEGIN IMMEDIATE")  # the write lock, until the ROLLBACK
        for lock in locks[:calls]:
            assert lock is not None
            started = time.monotonic()
            with pytest.raises(BackendError, match=r"no answer within 0\.5 s"):
                await lock.unlock()  # an UPDATE: it waits for the lock
            assert time.monotonic() - started < TIMEOUT + 0.5
        # Cancelled rather than timed out: the update still has its timeout to end.
        assert locks[-1] is not None
        unlocking = asyncio.ensure_future(locks[-1].unlock())
        await asyncio.sleep(0.1)
        unlocking.cancel()
        with pytest.raises(asyncio.CancelledError):
            await unlocking
        await blocker.execute("ROLLBACK")

    # The statements left waiting end once the file is free, and the outcomes still
    # to record are given up by aclose(): no task is left, none waits for ever.
    await locker.aclose()
    left = asyncio.all_tasks() - before - {asyncio.current_task()}
    if left:
        _, pending = await asyncio.wait(left, timeout=5)
        assert not pending, pending
