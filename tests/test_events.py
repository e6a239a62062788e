"""``locker.subscribe()``: a callback told what became of every tick, for metrics and audits."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import MetaData, update
from sqlalchemy.ext.asyncio import AsyncEngine

from _lease_support import EventLog, drop_leases_table, tick
from aiocronlock import EventKind, LockEvent, Scheduler, lock_table
from aiocronlock._events import Events
from aiocronlock.testing import memory_locker
from conftest import Backend, LockerFactory


@pytest.fixture(autouse=True)
async def _drop_leases(request: pytest.FixtureRequest) -> AsyncIterator[None]:
    backend: Backend | None = (
        request.getfixturevalue("backend") if "backend" in request.fixturenames else None
    )
    yield
    if backend is not None:
        await drop_leases_table(backend)


class JobError(Exception):
    pass


async def test_each_outcome_of_a_tick_is_an_event(make_locker: LockerFactory) -> None:
    a = await make_locker(worker="a")
    b = await make_locker(worker="b")
    seen: list[LockEvent] = []
    a.subscribe(seen.append)
    b.subscribe(seen.append)
    t1 = tick()
    t2 = t1 + timedelta(seconds=1)
    stale = datetime.now(UTC) - a.ttl - timedelta(minutes=1)

    won = await a.lock("report", t1)
    assert won is not None
    assert await b.lock("report", t1) is None
    async with won:
        pass
    failing = await a.lock("report", t2)
    assert failing is not None
    with pytest.raises(JobError):
        async with failing:
            raise JobError
    assert await a.lock("report", stale) is None

    def event(
        kind: EventKind,
        worker: str,
        run_time: datetime,
        lock_id: int | None = None,
        reason: str | None = None,
    ) -> LockEvent:
        return LockEvent(
            kind=kind,
            worker=worker,
            job_name="report",
            identifier=a.identifier("report", run_time),
            lock_id=lock_id,
            reason=reason,
            run_time=run_time,
        )

    assert seen == [
        event(EventKind.ACQUIRED, "a", t1, lock_id=won.id),
        event(EventKind.LOST_RACE, "b", t1),
        event(EventKind.FINISHED, "a", t1, lock_id=won.id),
        event(EventKind.ACQUIRED, "a", t2, lock_id=failing.id),
        event(EventKind.FAILED, "a", t2, lock_id=failing.id),
        event(EventKind.SKIPPED, "a", stale, reason="stale"),
    ]


async def test_clean_reports_how_many_rows_it_deleted(
    backend: Backend, engine: AsyncEngine, make_locker: LockerFactory
) -> None:
    a = await make_locker(worker="a", ttl=timedelta(hours=1))
    ids = []
    for seconds in range(3):
        lock = await a.lock("report", tick(seconds))
        assert lock is not None
        await lock.unlock()
        ids.append(lock.id)
    locks = lock_table(MetaData(), name=backend.table_name)
    async with engine.begin() as conn:
        await conn.execute(
            update(locks)
            .where(locks.c.id.in_(ids[:2]))
            .values(created_at=datetime.now(UTC) - timedelta(hours=2))
        )
    seen: list[LockEvent] = []
    a.subscribe(seen.append)

    assert await a.clean() == 2
    assert await a.clean() == 0
    assert seen == [
        LockEvent(kind=EventKind.CLEANED, worker="a", rows=2),
        LockEvent(kind=EventKind.CLEANED, worker="a", rows=0),
    ]
    assert [run.id for run in await a.history()] == [ids[2]]


async def test_the_scheduler_reports_a_tick_skipped_because_the_last_run_is_still_going() -> None:
    async with memory_locker(worker="a") as locker:
        events = EventLog(locker)
        scheduler = Scheduler(locker, grace_period=5)
        release = asyncio.Event()
        runs: list[datetime] = []

        @scheduler.every(1, name="slow")
        async def slow() -> None:
            runs.append(datetime.now(UTC))
            await release.wait()

        async with scheduler:
            async with asyncio.timeout(10):
                (skipped,) = await events.wait_for(EventKind.SKIPPED)
            release.set()

    assert (skipped.worker, skipped.job_name, skipped.reason) == ("a", "slow", "running")
    assert skipped.identifier is None
    (started,) = events.of(EventKind.ACQUIRED)
    assert started.run_time is not None
    assert skipped.run_time == started.run_time + timedelta(seconds=1)
    assert len(runs) == 1
    assert [e.lock_id for e in events.of(EventKind.FINISHED)] == [started.lock_id]


async def test_unsubscribe_stops_delivery(make_locker: LockerFactory) -> None:
    a = await make_locker(worker="a")
    seen: list[EventKind] = []

    def record(event: LockEvent) -> None:
        seen.append(event.kind)

    unsubscribe = a.subscribe(record)
    t1 = tick()
    first = await a.lock("report", t1)
    assert first is not None
    unsubscribe()
    unsubscribe()  # a second call does nothing
    await first.unlock()
    second = await a.lock("report", t1 + timedelta(seconds=1))
    assert second is not None
    await second.unlock()

    assert seen == [EventKind.ACQUIRED]


async def test_a_failing_subscriber_is_logged_and_does_not_break_lock(
    make_locker: LockerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="aiocronlock.events")
    a = await make_locker(worker="a")
    after: list[EventKind] = []

    def broken(event: LockEvent) -> None:
        raise RuntimeError(f"metrics backend down ({event.kind})")

    a.subscribe(broken)
    a.subscribe(lambda event: after.append(event.kind))

    lock = await a.lock("report", tick())
    assert lock is not None
    async with lock:
        pass

    assert after == [EventKind.ACQUIRED, EventKind.FINISHED]
    assert lock.released
    failures = [r for r in caplog.records if r.name == "aiocronlock.events"]
    assert [r.levelno for r in failures] == [logging.ERROR, logging.ERROR]
    assert all("event subscriber" in r.getMessage() for r in failures)
    assert [str(r.exc_info[1]) for r in failures if r.exc_info] == [
        "metrics backend down (acquired)",
        "metrics backend down (finished)",
    ]


def test_a_failing_recorder_is_logged_and_subscribers_still_hear(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The recorder is the locker's own telemetry; it gets the fields, not a LockEvent.
    caplog.set_level(logging.ERROR, logger="aiocronlock.events")
    events = Events()
    assert not events
    recorded: list[tuple[EventKind, str | None, str | None, dict[str, object]]] = []

    def broken(kind: EventKind, job: str | None, identifier: str | None, details: Any) -> None:
        recorded.append((kind, job, identifier, details))
        raise RuntimeError("exporter down")

    stop = events.record_with(broken)
    assert events  # a recorder alone is listening
    with pytest.raises(RuntimeError, match="recorder already"):
        events.record_with(broken)
    heard: list[LockEvent] = []
    events.subscribe(heard.append)
    events.emit(EventKind.LOST_RACE, "w", "report", "2026-01-01T00:00:00", {"run_time": None})

    assert recorded == [(EventKind.LOST_RACE, "report", "2026-01-01T00:00:00", {"run_time": None})]
    assert heard == [
        LockEvent(
            kind=EventKind.LOST_RACE,
            worker="w",
            job_name="report",
            identifier="2026-01-01T00:00:00",
        )
    ]
    (failure,) = [r for r in caplog.records if r.name == "aiocronlock.events"]
    assert "recorder" in failure.getMessage()
    stop()
    events.emit(EventKind.LOST_RACE, "w", "report", "x", {})
    assert len(recorded) == 1 and len(heard) == 2
