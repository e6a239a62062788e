"""Pruning old rows: ``clean()`` and the background loop that calls it on one instance.

Each interval is itself a tick of the reserved job ``aiocronlock.cleaner``, decided
through the same table, so with N instances one of them prunes per interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from ._clock import Clock
from ._identifiers import Precision
from ._store import Store

if TYPE_CHECKING:
    from ._lock import Lock

logger = logging.getLogger("aiocronlock.cleaner")

#: How the cleaner's loop decides a tick: ``(job_name, identifier, tick)`` to a lock.
Decide = Callable[[str, str, datetime], Awaitable["Lock | None"]]

#: The job name under which cleaner ticks are recorded.
CLEAN_JOB_NAME = "aiocronlock.cleaner"

#: The most rows one pruning DELETE removes, so no statement holds its locks for long.
DEFAULT_CLEAN_BATCH_SIZE = 2000
#: The longest a pruning DELETE should take: batches halve while one takes longer and
#: double again (up to ``clean_batch_size``) once one takes under half of it.
CLEAN_STATEMENT_S = 0.05
#: The share of the time a prune keeps the database busy: after a batch that took
#: ``d`` seconds the cleaner rests ``d * (1 - share) / share``, at most a second.
CLEAN_BUSY_SHARE = 0.05
#: The fewest rows a pruning DELETE removes, however slow the database.
_MIN_CLEAN_BATCH = 50


def rest_after(took: float) -> float:
    """The seconds the cleaner rests after a pruning batch that took ``took`` seconds."""
    return min(took * (1 - CLEAN_BUSY_SHARE) / CLEAN_BUSY_SHARE, 1.0)


def next_batch(batch: int, took: float, most: int) -> int:
    """The next pruning batch: halved or doubled toward ``CLEAN_STATEMENT_S`` per DELETE."""
    if took > CLEAN_STATEMENT_S and batch > _MIN_CLEAN_BATCH:
        return max(_MIN_CLEAN_BATCH, batch // 2)
    if took < CLEAN_STATEMENT_S / 2 and batch < most:
        return min(most, batch * 2)
    return batch


class Cleaner:
    """Deletes rows older than ``ttl``, now (:meth:`clean`) or every ``interval``."""

    def __init__(
        self,
        store: Store,
        *,
        ttl: timedelta,
        batch_size: int,
        interval: timedelta | None,
        clock: Clock,
    ) -> None:
        self.store = store
        self.ttl = ttl
        self.batch_size = batch_size
        #: Names the cleaner's own ticks; None when there is no background loop.
        self.steps = Precision(interval) if interval is not None else None
        self.clock = clock
        self._task: asyncio.Task[None] | None = None
        self._idle = asyncio.Event()
        self._idle.set()

    async def clean(self) -> int:
        """Delete the expired rows in paced batches; return how many were deleted."""
        cutoff = await self.store.now("clean()") - self.ttl
        total = 0
        batch = min(self.batch_size, 500)
        floor: datetime | None = None
        while True:
            started = time.monotonic()
            deleted, floor = await self.store.prune(
                self.store.sql.prune_batch(cutoff, batch, floor)
            )
            took = time.monotonic() - started
            total += deleted
            if deleted < batch:
                break
            await asyncio.sleep(rest_after(took))
            batch = next_batch(batch, took, self.batch_size)
        if total:
            logger.info(
                "pruned %d rows older than %s from %s", total, self.ttl, self.store.sql.table.name
            )
        return total

    def start(self, lock: Decide, clean: Callable[[], Awaitable[int]], *, name: str) -> None:
        """Start the background loop: ``lock(job_name, identifier, tick)`` decides each
        interval's tick, and ``clean()`` prunes when this instance won it."""
        if self.steps is not None:
            self._task = asyncio.create_task(self._run(self.steps, lock, clean), name=name)

    async def stop(self, grace: float) -> None:
        """Let an interval in progress finish (within ``grace`` seconds), then stop."""
        task, self._task = self._task, None
        if task is None:
            return
        # Cancelling a query midway can strand its connection in some drivers.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace):
                await self._idle.wait()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def _run(
        self, steps: Precision, lock: Decide, clean: Callable[[], Awaitable[int]]
    ) -> None:
        """Prune at every multiple of the interval since the epoch; a failed interval is
        logged and the loop waits for the next one."""
        while True:
            tick = steps.truncate(self.clock.now()) + steps.step
            await self.clock.sleep_until(tick)
            self._idle.clear()
            try:
                won = await lock(CLEAN_JOB_NAME, steps(CLEAN_JOB_NAME, tick), tick)
                deleted = None
                if won is not None:
                    async with won:
                        deleted = await clean()
            except Exception as error:
                logger.warning(
                    "pruning for the tick at %s failed, next try in %s: %s",
                    tick.isoformat(),
                    steps.step,
                    error,
                )
                continue
            finally:
                self._idle.set()
            if deleted is None:
                logger.debug("another worker prunes the tick at %s", tick.isoformat())
            else:
                logger.debug("pruned %d rows for the tick at %s", deleted, tick.isoformat())
