"""Helpers shared by the lease, event and clock tests: not a test module."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

from sqlalchemy import MetaData, Table
from sqlalchemy.ext.asyncio import create_async_engine

from aiocronlock import AsyncDBLocker, EventKind, LockEvent
from conftest import Backend


def tick(seconds_from_now: int = 0) -> datetime:
    """A whole-second scheduled time, ``seconds_from_now`` seconds from now."""
    return datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=seconds_from_now)


class EventLog:
    """Subscribes to a locker's events, with the loop time of each; awaitable by kind."""

    def __init__(self, locker: AsyncDBLocker) -> None:
        self.events: list[LockEvent] = []
        #: ``loop.time()`` when each event arrived, in the same order.
        self.times: list[float] = []
        self._arrived = asyncio.Event()
        self.unsubscribe = locker.subscribe(self._record)

    def _record(self, event: LockEvent) -> None:
        self.events.append(event)
        self.times.append(asyncio.get_running_loop().time())
        self._arrived.set()

    def of(self, kind: EventKind) -> list[LockEvent]:
        return [event for event in self.events if event.kind == kind]

    def time_of(self, kind: EventKind) -> float:
        """When the first event of ``kind`` arrived."""
        return next(t for e, t in zip(self.events, self.times, strict=True) if e.kind == kind)

    async def wait_for(self, kind: EventKind, count: int = 1) -> list[LockEvent]:
        """Wait until ``count`` events of ``kind`` have arrived (bound it with a timeout)."""
        while len(self.of(kind)) < count:
            self._arrived.clear()
            await self._arrived.wait()
        return self.of(kind)


async def drop_leases_table(backend: Backend) -> None:
    """Drop ``<table>_leases``, which ``create_table()`` makes and conftest does not drop."""
    if backend.is_sqlite:
        return  # the file goes with tmp_path
    engine = create_async_engine(backend.url)
    name = f"{backend.table_name}_leases"
    try:
        async with engine.begin() as conn:
            await conn.run_sync(lambda sync: Table(name, MetaData()).drop(sync, checkfirst=True))
    finally:
        await engine.dispose()
