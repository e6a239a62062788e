"""Plain functions and exclusive leases: a thread cannot be stopped when a lease is lost."""

from __future__ import annotations

import asyncio
import threading

import pytest

from _lease_support import EventLog
from aiocronlock import EventKind, Scheduler, locked, precision
from aiocronlock.testing import memory_locker
from conftest import LockerFactory
from test_scheduler import FAST, STEP


def plain() -> None:
    pass


async def coroutine() -> None:
    pass


async def test_the_scheduler_refuses_an_exclusive_plain_function() -> None:
    async with memory_locker(identifier=FAST) as locker:
        scheduler = Scheduler(locker)
        with pytest.raises(TypeError, match="async def") as raised:
            scheduler.add_job(plain, STEP, exclusive=True)
        assert "exclusive=True" in str(raised.value)
        scheduler.add_job(plain, STEP, name="per-tick")  # a thread is fine per tick
        scheduler.add_job(coroutine, STEP, exclusive=True)


async def test_locked_refuses_an_exclusive_plain_function() -> None:
    async with memory_locker() as locker:
        guard = locked(locker, "plain", exclusive=True)
        with pytest.raises(TypeError, match="async def"):
            guard(plain)  # type: ignore[arg-type]
        guard(coroutine)


async def test_no_new_run_starts_beside_the_thread_of_a_cancelled_run(
    make_locker: LockerFactory,
) -> None:
    """A run's task is cancelled while its function still runs in a thread: the next
    ticks are skipped on this instance until that thread has returned."""
    locker = await make_locker(worker="a", identifier=precision(STEP))
    events = EventLog(locker)
    scheduler = Scheduler(locker)
    release = threading.Event()
    loop = asyncio.get_running_loop()
    started: list[int] = []
    starts: asyncio.Queue[None] = asyncio.Queue()

    def blocking() -> None:
        started.append(threading.get_ident())
        loop.call_soon_threadsafe(starts.put_nowait, None)
        release.wait(10)

    scheduler.add_job(blocking, STEP, name="blocking", skip_if_running=False)
    async with scheduler:
        async with asyncio.timeout(5):
            await starts.get()
        (run,) = [t for t in asyncio.all_tasks() if t.get_name().startswith("aiocronlock blocking")]
        run.cancel()
        await asyncio.gather(run, return_exceptions=True)
        skipped_before = len(events.of(EventKind.SKIPPED))
        await asyncio.sleep(STEP.total_seconds() * 4)
        assert len(started) == 1, "a second run started beside the orphaned thread"
        assert len(events.of(EventKind.SKIPPED)) > skipped_before
        release.set()
        async with asyncio.timeout(5):
            await starts.get()  # the next run, once the thread has returned
    assert len(started) >= 2
