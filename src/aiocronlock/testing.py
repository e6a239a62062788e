"""Helpers for testing code that uses aiocronlock, without sleeping.

::

    from aiocronlock import Scheduler
    from aiocronlock.testing import FakeClock, memory_locker

    async def test_report_runs_every_five_minutes() -> None:
        clock = FakeClock(datetime(2025, 1, 1, tzinfo=timezone.utc))
        async with memory_locker(clock=clock) as locker:
            scheduler = Scheduler(locker, clock=clock)
            scheduler.add_job(send_report, CronTrigger("*/5 * * * *"), name="report")
            async with scheduler:
                await clock.advance(timedelta(minutes=15))
            runs = await locker.history(job_name="report")
            assert len(runs) == 3

``FakeClock.advance`` moves time forward step by step, waking every sleeper in
order and waiting for the job runs each step starts, so the outcome is the same
on every run of the test.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from typing import Any

from ._locker import AsyncDBLocker
from ._validation import require_timedelta, to_utc

__all__ = ["FakeClock", "memory_locker"]


class FakeClock:
    """A clock that only moves when told to."""

    #: A simulated time: its distance from the database's clock is not drift, so the
    #: locker measures it but does not warn about it.
    simulated = True

    def __init__(self, start: datetime) -> None:
        self._now = to_utc("start", start)
        self._sleepers: list[tuple[datetime, int, asyncio.Future[None]]] = []
        self._order = itertools.count()
        self._tracked: set[asyncio.Task[None]] = set()

    def now(self) -> datetime:
        return self._now

    async def sleep_until(self, moment: datetime) -> None:
        if moment <= self._now:
            await asyncio.sleep(0)
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (moment, next(self._order), waiter))
        await waiter

    def track(self, task: asyncio.Task[None]) -> None:
        self._tracked.add(task)
        task.add_done_callback(self._tracked.discard)

    async def advance(self, delta: timedelta | float) -> None:
        """Move time forward by ``delta``, running everything that falls due on the way."""
        target = self._now + require_timedelta("delta", delta)
        await self._settle()
        while self._sleepers and self._sleepers[0][0] <= target:
            self._now = max(self._now, self._sleepers[0][0])
            while self._sleepers and self._sleepers[0][0] <= self._now:
                _, _, waiter = heapq.heappop(self._sleepers)
                if not waiter.done():
                    waiter.set_result(None)
            await self._settle()
        self._now = target
        await self._settle()

    async def _settle(self) -> None:
        """Let woken tasks run until they sleep again and the runs they started end."""
        for _ in range(5):
            await asyncio.sleep(0)
        while self._tracked:
            await asyncio.gather(*self._tracked, return_exceptions=True)
            for _ in range(5):
                await asyncio.sleep(0)

    def __repr__(self) -> str:
        return f"FakeClock({self._now.isoformat()})"


@asynccontextmanager
async def memory_locker(**options: Any) -> AsyncIterator[AsyncDBLocker]:
    """An ``AsyncDBLocker`` on a private in-memory SQLite database, table created.

    Keyword arguments go to ``AsyncDBLocker`` (``worker``, ``identifier``, ``clock``...);
    the background cleaner is off unless ``clean_interval`` is given.
    """
    options.setdefault("clean_interval", None)
    async with AsyncDBLocker("sqlite+aiosqlite://", **options) as locker:
        await locker.create_table()
        yield locker
