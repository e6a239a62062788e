"""Lifecycle edges a new user meets: one locker in one event loop after another, what
``lock.lost`` reads as, and a fake clock that is not drift."""

from __future__ import annotations

import asyncio
import gc
import logging
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from aiocronlock import AsyncDBLocker
from aiocronlock.testing import FakeClock, memory_locker
from conftest import Backend, fetch_rows


def _tick(seconds: int = 0) -> datetime:
    return datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=seconds)


async def _run_once(locker: AsyncDBLocker, tick: datetime) -> None:
    await locker.create_table()
    lock = await locker.lock("job", tick)
    assert lock is not None
    await lock.unlock()


async def _rows(backend: Backend) -> list[tuple[str, str]]:
    engine = create_async_engine(backend.url)
    try:
        rows = await fetch_rows(engine, backend.table_name)
    finally:
        await engine.dispose()
    return [(r["job_identifier"], r["status"]) for r in rows]


@pytest.mark.parametrize("given", ["url", "engine"])
def test_a_second_event_loop_is_refused_before_any_statement(backend: Backend, given: str) -> None:
    """One ``asyncio.run`` after another: the locker's connections belong to the first
    loop. It says so before sending anything, so no tick is won that nobody runs."""
    engine = create_async_engine(backend.url)
    target: AsyncEngine | str = engine if given == "engine" else backend.url
    locker = AsyncDBLocker(target, table_name=backend.table_name, clean_interval=None)
    first, second = _tick(), _tick(1)

    async def first_loop() -> None:
        await _run_once(locker, first)
        # Close the first loop's connections (not the locker), so that none outlives its
        # loop: the refusal below does not depend on them.
        await locker._acquirer.aclose()
        await locker.engine.dispose()
        await engine.dispose()

    asyncio.run(first_loop())

    async def second_loop() -> list[str]:
        refused = []
        calls = (locker.lock("job", second), locker.lock_many(["other"], second), locker.history())
        for call in calls:
            with pytest.raises(RuntimeError, match="another event loop") as raised:
                await call
            refused.append(str(raised.value))
        return refused

    refused = asyncio.run(second_loop())

    assert all("create the locker (and its engine) in the loop" in r for r in refused)
    rows = asyncio.run(_rows(backend))
    assert rows == [(locker.identifier("job", first), "FINISHED")]


# The first loop's connections cannot be closed any more: their loop is gone. Collected,
# they warn (SQLAlchemy's pool, the drivers, their sockets); that is the case under test,
# not a leak, so the warnings are ignored and the test collects them itself, while they are.
@pytest.mark.filterwarnings("ignore::ResourceWarning")
@pytest.mark.filterwarnings("ignore:The garbage collector:sqlalchemy.exc.SAWarning")
@pytest.mark.parametrize("given", ["url", "engine"])
def test_a_second_event_loop_is_refused_while_the_first_loops_connections_are_open(
    backend: Backend, given: str
) -> None:
    """The reported case: the first ``asyncio.run`` ends without ``aclose()``, so the
    locker still keeps connections of that loop. The next loop's ``lock()`` is refused
    before its INSERT is sent: no tick is won that nobody runs."""
    engine = create_async_engine(backend.url)
    target: AsyncEngine | str = engine if given == "engine" else backend.url
    locker = AsyncDBLocker(target, table_name=backend.table_name, clean_interval=None)
    first, second = _tick(), _tick(1)
    won = locker.identifier("job", first)

    async def second_loop(locker: AsyncDBLocker) -> str:
        # What lock() did, as text: a traceback would keep the locker from collection.
        try:
            await locker.lock("job", second)
        except Exception as error:
            return f"{type(error).__name__}: {error}"
        return "lock() returned"

    try:
        asyncio.run(_run_once(locker, first))  # no aclose(), no dispose()
        refused = asyncio.run(second_loop(locker))
    finally:
        del locker, engine, target
        for _ in range(3):  # a connection's finalizer frees more for the next pass
            gc.collect()

    assert refused.startswith("RuntimeError: ") and "another event loop" in refused, refused
    rows = asyncio.run(_rows(backend))  # read with a fresh engine, in a loop of its own
    assert rows == [(won, "FINISHED")]


async def test_lost_reads_false_until_the_lease_is_lost() -> None:
    async with memory_locker(worker="a") as locker:
        per_tick = await locker.lock("per-tick")
        assert per_tick is not None
        exclusive = await locker.lock("exclusive", exclusive=True, lease=0.6)
        assert exclusive is not None
        assert not per_tick.lost
        assert not exclusive.lost

        assert await locker.release("exclusive")
        async with asyncio.timeout(5):
            await exclusive.wait_lost()

        assert exclusive.lost
        assert not per_tick.lost
        await exclusive.wait_lost()  # returns at once once lost
        await per_tick.unlock()
        await exclusive.unlock()


async def test_a_fake_clock_far_from_now_is_not_reported_as_drift(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="aiocronlock")
    clock = FakeClock(datetime(2025, 1, 1, 12, 0, tzinfo=UTC))
    async with memory_locker(clock=clock) as locker:
        assert locker.clock_offset is not None
        assert locker.clock_offset > timedelta(days=300)  # measured all the same
    assert [r.getMessage() for r in caplog.records if "clock" in r.getMessage()] == []
