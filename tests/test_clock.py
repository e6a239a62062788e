"""Clocks: the database's compared with this instance's, and the fake clock for tests."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import event

from aiocronlock import AsyncDBLocker, CronTrigger, Scheduler, current_lock
from aiocronlock.testing import FakeClock, memory_locker
from conftest import Backend, LockerFactory


class AheadClock:
    """The real clock, ``ahead`` in front: an instance whose clock has drifted."""

    def __init__(self, ahead: timedelta) -> None:
        self.ahead = ahead

    def now(self) -> datetime:
        return datetime.now(UTC) + self.ahead

    async def sleep_until(self, moment: datetime) -> None:
        await asyncio.sleep(max(0.0, (moment - self.now()).total_seconds()))

    def track(self, task: asyncio.Task[None]) -> None:
        pass


def _clock_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "aiocronlock" and r.levelno >= logging.WARNING and "clock" in r.getMessage()
    ]


async def test_starting_measures_the_offset_from_the_database_clock(
    backend: Backend, make_locker: LockerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="aiocronlock")
    locker = await make_locker(create=False)  # comparing clocks needs no table
    assert locker.clock_offset is None

    async with locker:
        offset = locker.clock_offset
        assert offset is not None
        assert abs(offset) < timedelta(seconds=1)
        again = await locker.check_clock()

    assert abs(again) < timedelta(seconds=1)
    assert locker.clock_offset == again
    assert _clock_warnings(caplog) == []


async def test_a_clock_ten_seconds_ahead_is_reported_on_start(
    backend: Backend, make_locker: LockerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="aiocronlock")
    locker = await make_locker(create=False, clock=AheadClock(timedelta(seconds=10)))

    async with locker:
        pass

    # Database minus this instance: the instance is ahead, so the offset is negative.
    assert locker.clock_offset is not None
    assert abs(locker.clock_offset + timedelta(seconds=10)) < timedelta(seconds=1)
    (warning,) = _clock_warnings(caplog)
    said = re.search(r"differs from the database's by (-?[\d.]+) s", warning)
    assert said is not None, warning
    assert abs(float(said[1]) + 10) < 1
    assert "synchronise the clocks" in warning


async def test_the_fake_clock_runs_a_quarter_hour_of_jobs_without_waiting() -> None:
    clock = FakeClock(datetime(2025, 1, 1, tzinfo=UTC))
    reports: list[datetime] = []
    beats: list[datetime] = []
    started = time.monotonic()

    async with memory_locker(clock=clock) as locker:
        scheduler = Scheduler(locker, clock=clock)

        async def report() -> None:
            reports.append(clock.now())

        scheduler.add_job(report, CronTrigger("*/5 * * * *"), name="report")

        @scheduler.every(timedelta(minutes=1), name="heartbeat")
        async def heartbeat() -> None:
            beats.append(clock.now())

        async with scheduler:
            await clock.advance(timedelta(minutes=15))

        report_runs = await locker.history(job_name="report")
        beat_runs = await locker.history(job_name="heartbeat")

    assert time.monotonic() - started < 5
    assert reports == [datetime(2025, 1, 1, 0, m, tzinfo=UTC) for m in (5, 10, 15)]
    assert beats == [datetime(2025, 1, 1, 0, m, tzinfo=UTC) for m in range(1, 16)]
    assert [run.identifier for run in reversed(report_runs)] == [
        "2025-01-01T00:05:00Z",
        "2025-01-01T00:10:00Z",
        "2025-01-01T00:15:00Z",
    ]
    assert [run.identifier for run in reversed(beat_runs)] == [
        f"2025-01-01T00:{m:02d}:00Z" for m in range(1, 16)
    ]
    assert {run.status for run in report_runs + beat_runs} == {"FINISHED"}


async def test_instances_five_seconds_apart_fire_every_tick_once(
    backend: Backend, make_locker: LockerFactory
) -> None:
    """Each scheduler fires by the database's clock: an instance 5 s ahead and one on
    time run each tick at the same moment, so exclusive runs do not crowd each other
    out and per-tick runs are neither doubled nor dropped."""
    ran: dict[str, list[tuple[datetime, str]]] = {"exclusive": [], "per-tick": []}
    schedulers = []
    for worker, ahead in (("ahead", timedelta(seconds=5)), ("on-time", timedelta(0))):
        locker = await make_locker(own_engine=True, worker=worker, clock=AheadClock(ahead))
        await locker.__aenter__()
        assert locker.clock_offset is not None
        scheduler = Scheduler(locker)
        for name, exclusive in (("exclusive", True), ("per-tick", False)):

            async def job(name: str = name, worker: str = worker) -> None:
                ran[name].append((current_lock().run_time, worker))
                await asyncio.sleep(0.2)

            scheduler.add_job(job, timedelta(seconds=1), name=name, exclusive=exclusive)
        schedulers.append(scheduler)

    started = datetime.now(UTC)
    for scheduler in schedulers:
        scheduler.start()
    await asyncio.sleep(5.5)
    for scheduler in schedulers:
        await scheduler.stop()
    ended = datetime.now(UTC)

    # Every whole second strictly inside the window, by the database's (here: real) clock.
    first = started.replace(microsecond=0) + timedelta(seconds=1)
    expected = [first + timedelta(seconds=i) for i in range(int((ended - first).total_seconds()))]
    for name, runs in ran.items():
        ticks = sorted(tick for tick, _ in runs)
        assert len(ticks) == len(set(ticks)), f"{name}: a tick ran twice: {ticks}"
        missing = [t for t in expected if t not in ticks]
        assert missing == [], f"{name}: ticks never run: {missing}; ran {runs}"
        assert {worker for _, worker in runs} <= {"ahead", "on-time"}


async def test_the_clock_offset_leaves_out_the_time_to_connect(backend: Backend) -> None:
    """A first connection that takes half a second to open does not show as an offset
    between the clocks (by half that time, as when the first reading was kept)."""
    locker = AsyncDBLocker(backend.url, table_name=backend.table_name, clean_interval=None)
    event.listen(locker.engine.sync_engine, "connect", lambda *_: time.sleep(0.5))
    try:
        offset = await locker.check_clock()
    finally:
        await locker.aclose()
    assert abs(offset) < timedelta(seconds=0.1), offset
