"""The scheduler: jobs on epoch-aligned ticks, each tick run by exactly one instance."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Self

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from aiocronlock import (
    AsyncDBLocker,
    BackendError,
    CronTrigger,
    EventKind,
    IntervalTrigger,
    LockEvent,
    Scheduler,
    current_lock,
    precision,
)
from conftest import Backend, LockerFactory, fetch_rows

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
#: The interval of most tests here, and the identifier precision that allows it.
STEP = timedelta(milliseconds=200)
FAST = precision(STEP)
LOGGER = "aiocronlock.scheduler"


class LogWatch(logging.Handler):
    """Sets ``reached`` once ``count`` records of the ``aiocronlock`` loggers contain ``text``.

    Lets a test wait for the scheduler to have decided some ticks, without polling.
    """

    def __init__(self, text: str, count: int) -> None:
        super().__init__(logging.DEBUG)
        self.text = text
        self.count = count
        self.seen = 0
        self.reached = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._logger = logging.getLogger("aiocronlock")

    def __enter__(self) -> Self:
        self._logger.addHandler(self)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._logger.removeHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.seen += 1
            if self.seen >= self.count:
                self._loop.call_soon_threadsafe(self.reached.set)

    async def wait(self) -> None:
        await asyncio.wait_for(self.reached.wait(), timeout=5)


def _aligned(moment: datetime, step: timedelta) -> bool:
    return (moment - EPOCH) % step == timedelta(0)


def _records(
    caplog: pytest.LogCaptureFixture, level: int, text: str = ""
) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.name.startswith("aiocronlock") and r.levelno == level and text in r.getMessage()
    ]


def _warnings_or_worse(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        f"{r.levelname}: {r.getMessage()}"
        for r in caplog.records
        if r.name.startswith("aiocronlock") and r.levelno >= logging.WARNING
    ]


def _tasks_left(before: set[asyncio.Task[Any]]) -> list[str]:
    """Tasks started since ``before``, but the open locker's own acquire workers (they
    end with the locker: see test_locker)."""
    left = asyncio.all_tasks() - before
    return sorted(t.get_name() for t in left if t.get_name() != "aiocronlock acquire")


@pytest.fixture
async def offline_locker(tmp_path: Path) -> AsyncIterator[AsyncDBLocker]:
    """A locker that is never asked to decide a tick: for checks made when adding jobs."""
    locker = AsyncDBLocker(f"sqlite:///{tmp_path / 'unused.db'}", clean_interval=None)
    yield locker
    await locker.aclose()


async def _nothing() -> None:
    pass


# -- declaring jobs -------------------------------------------------------------------------


async def test_every_cron_and_add_job_declare_jobs(offline_locker: AsyncDBLocker) -> None:
    scheduler = Scheduler(offline_locker)

    @scheduler.every(timedelta(seconds=30), name="half-minute")
    async def half_minute() -> None:
        pass

    @scheduler.cron("*/5 * * * *", name="five", tz="Europe/Berlin")
    async def five() -> None:
        pass

    def sync_job() -> None:
        pass

    added = scheduler.add_job(sync_job, 2.5, name="sync", skip_if_running=False)

    assert [job.name for job in scheduler.jobs] == ["half-minute", "five", "sync"]
    by_name = {job.name: job for job in scheduler.jobs}
    assert by_name["half-minute"].func is half_minute  # the decorator returns the function
    assert by_name["half-minute"].trigger == IntervalTrigger(30)
    cron = by_name["five"].trigger
    assert isinstance(cron, CronTrigger)
    assert (cron.expression, cron.tz.key) == ("*/5 * * * *", "Europe/Berlin")
    assert added is by_name["sync"]
    assert added.trigger == IntervalTrigger(timedelta(seconds=2.5))
    assert (added.skip_if_running, by_name["five"].skip_if_running) == (False, True)


async def test_default_job_name_is_module_and_qualified_name(
    offline_locker: AsyncDBLocker,
) -> None:
    scheduler = Scheduler(offline_locker)
    job = scheduler.add_job(_nothing, 60)
    assert job.name == f"{__name__}._nothing"
    with pytest.raises(ValueError, match="already scheduled"):
        scheduler.add_job(_nothing, 120)


async def test_duplicate_job_name_raises_value_error_naming_it(
    offline_locker: AsyncDBLocker,
) -> None:
    scheduler = Scheduler(offline_locker)
    first = scheduler.add_job(_nothing, 60, name="dup")

    with pytest.raises(ValueError, match=r"^name: .*'dup'"):
        scheduler.add_job(_nothing, 30, name="dup")
    with pytest.raises(ValueError, match=r"^name: .*'dup'"):
        scheduler.every(10, name="dup")(_nothing)
    with pytest.raises(ValueError, match=r"^name: .*'dup'"):
        scheduler.cron("* * * * *", name="dup")(_nothing)

    assert scheduler.jobs == [first]


async def test_interval_shorter_than_the_identifier_precision_is_refused(
    offline_locker: AsyncDBLocker, tmp_path: Path
) -> None:
    scheduler = Scheduler(offline_locker)  # precision(1 second)
    with pytest.raises(ValueError, match=r"^interval: .*precision"):
        scheduler.every(0.5, name="too-fast")(_nothing)
    with pytest.raises(ValueError, match="interval"):
        scheduler.add_job(_nothing, timedelta(milliseconds=999), name="still-too-fast")
    assert scheduler.jobs == []
    scheduler.every(1, name="ok")(_nothing)

    fine = AsyncDBLocker(
        f"sqlite:///{tmp_path / 'fine.db'}",
        clean_interval=None,
        identifier=precision(timedelta(milliseconds=500)),
    )
    try:
        sub_second = Scheduler(fine)
        sub_second.every(0.5, name="half")(_nothing)
        with pytest.raises(ValueError, match="interval"):
            sub_second.every(0.4, name="faster")(_nothing)
        assert [job.name for job in sub_second.jobs] == ["half"]
    finally:
        await fine.aclose()


async def test_bad_cron_and_time_zone_are_refused_when_declaring(
    offline_locker: AsyncDBLocker,
) -> None:
    scheduler = Scheduler(offline_locker)
    with pytest.raises(ValueError, match="cron expression"):
        scheduler.cron("every day", name="bad")
    with pytest.raises(ValueError, match="'Nowhere/Special'"):
        scheduler.cron("0 3 * * *", name="bad", tz="Nowhere/Special")
    with pytest.raises(TypeError, match="trigger"):
        scheduler.add_job(_nothing, "5 minutes", name="bad")  # type: ignore[arg-type]
    assert scheduler.jobs == []


async def test_adding_a_job_after_start_raises_runtime_error(
    offline_locker: AsyncDBLocker,
) -> None:
    scheduler = Scheduler(offline_locker)
    scheduler.every(3600, name="hourly")(_nothing)
    async with scheduler:
        with pytest.raises(RuntimeError, match="before the scheduler starts"):
            scheduler.add_job(_nothing, 60, name="late")
        with pytest.raises(RuntimeError):
            scheduler.every(60, name="late-too")(_nothing)
    assert [job.name for job in scheduler.jobs] == ["hourly"]


# -- ticks ------------------------------------------------------------------------------------


async def test_ticks_are_aligned_and_the_scheduled_time_names_them(
    backend: Backend, engine: AsyncEngine, make_locker: LockerFactory
) -> None:
    locker = await make_locker(worker="a")  # precision(1 second)
    scheduler = Scheduler(locker)
    runs: list[tuple[datetime, datetime]] = []
    two = asyncio.Event()

    @scheduler.every(timedelta(seconds=1), name="aligned")
    async def aligned() -> None:
        runs.append((current_lock().run_time, datetime.now(UTC)))
        if len(runs) == 2:
            two.set()

    async with scheduler:
        await asyncio.wait_for(two.wait(), timeout=5)

    for run_time, woke in runs:
        assert run_time.microsecond == 0, run_time
        assert _aligned(run_time, timedelta(seconds=1))
        assert run_time <= woke  # the scheduled time, not the (later) wake-up time
    assert runs[1][0] - runs[0][0] == timedelta(seconds=1)
    rows = await fetch_rows(engine, backend.table_name)
    assert [(r["job_name"], r["job_identifier"], r["status"]) for r in rows] == [
        ("aligned", precision()("aligned", run_time), "FINISHED") for run_time, _ in runs
    ]


async def test_two_instances_run_every_tick_exactly_once(
    backend: Backend,
    engine: AsyncEngine,
    make_locker: LockerFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    step = timedelta(milliseconds=500)
    runs: list[tuple[str, datetime]] = []
    schedulers: list[Scheduler] = []
    # Ticks an instance skipped because its run of the previous one was still going
    # (a disk stall of half a second does that on a loaded machine).
    busy: dict[str, set[datetime]] = {"a": set(), "b": set()}
    for worker in ("a", "b"):
        locker = await make_locker(own_engine=True, worker=worker, identifier=precision(step))

        def note_busy(event: LockEvent, skipped: set[datetime] = busy[worker]) -> None:
            if event.kind == EventKind.SKIPPED and event.reason == "running":
                assert event.run_time is not None
                skipped.add(event.run_time)

        locker.subscribe(note_busy)
        scheduler = Scheduler(locker)

        @scheduler.every(step, name="shared")
        async def shared() -> None:
            lock = current_lock()
            runs.append((lock.worker, lock.run_time))

        schedulers.append(scheduler)

    started = datetime.now(UTC)
    async with schedulers[0], schedulers[1]:
        await asyncio.sleep(3)
        stopping = datetime.now(UTC)

    run_times = sorted(run_time for _, run_time in runs)
    assert len(run_times) == len(set(run_times)), "a tick ran twice"
    expected = [
        tick
        for tick in (IntervalTrigger(step).next_after(started) + step * i for i in range(10))
        if started + timedelta(milliseconds=50) < tick < stopping - timedelta(milliseconds=300)
    ]
    assert len(expected) >= 4
    # Every tick ran, unless both instances were still busy with the one before.
    assert set(expected) - (busy["a"] & busy["b"]) <= set(run_times), "a tick did not run"
    assert len(set(expected) & set(run_times)) > len(expected) // 2
    assert all(started < t <= stopping + step for t in run_times)
    rows = await fetch_rows(engine, backend.table_name)
    assert sorted((r["worker"], r["job_identifier"]) for r in rows) == sorted(
        (worker, precision(step)("shared", t)) for worker, t in runs
    )
    assert {r["status"] for r in rows} == {"FINISHED"}
    # Losing a tick to the other instance is normal: nothing to warn about.
    assert _warnings_or_worse(caplog) == []


async def test_a_tick_lost_to_another_instance_is_skipped_quietly(
    backend: Backend,
    engine: AsyncEngine,
    make_locker: LockerFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="aiocronlock")
    other = await make_locker(own_engine=True, worker="other", identifier=FAST)
    mine = await make_locker(own_engine=True, worker="mine", identifier=FAST)
    # The other instance has already won the next two seconds of ticks.
    first = IntervalTrigger(STEP).next_after(datetime.now(UTC))
    for i in range(10):
        assert await other.lock("contested", first + STEP * i) is not None
    scheduler = Scheduler(mine)
    calls = 0

    @scheduler.every(STEP, name="contested")
    async def contested() -> None:
        nonlocal calls
        calls += 1

    with LogWatch("another worker's", count=3) as decided:
        async with scheduler:
            await decided.wait()

    assert calls == 0
    assert _warnings_or_worse(caplog) == []
    rows = await fetch_rows(engine, backend.table_name)
    assert {r["worker"] for r in rows} == {"other"}
    assert len(rows) == 10


# -- failures ---------------------------------------------------------------------------------


async def test_a_failing_job_is_logged_marked_failed_and_the_scheduler_goes_on(
    backend: Backend,
    engine: AsyncEngine,
    make_locker: LockerFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    locker = await make_locker(worker="a", identifier=FAST)
    scheduler = Scheduler(locker)
    runs: list[datetime] = []
    recovered = asyncio.Event()

    @scheduler.every(STEP, name="flaky")
    async def flaky() -> None:
        runs.append(current_lock().run_time)
        if len(runs) == 1:
            raise RuntimeError("boom on the first run")
        recovered.set()

    async with scheduler:
        await asyncio.wait_for(recovered.wait(), timeout=5)

    errors = [r for r in caplog.records if r.name == LOGGER and r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert "flaky" in errors[0].getMessage()
    assert runs[0].isoformat() in errors[0].getMessage()
    assert errors[0].exc_info is not None
    assert isinstance(errors[0].exc_info[1], RuntimeError)
    assert "boom on the first run" in caplog.text  # the traceback was logged
    rows = await fetch_rows(engine, backend.table_name)
    assert [(r["job_identifier"], r["status"]) for r in rows][:2] == [
        (FAST("flaky", runs[0]), "FAILED"),
        (FAST("flaky", runs[1]), "FINISHED"),
    ]
    assert {r["status"] for r in rows[1:]} == {"FINISHED"}


async def test_a_run_whose_outcome_cannot_be_recorded_is_not_called_failed(
    backend: Backend,
    engine: AsyncEngine,
    make_locker: LockerFactory,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The job did its work and only recording FINISHED failed: a warning that says
    so, not "the run failed"; the outcome is recorded once the database answers."""
    locker = await make_locker(worker="a", identifier=FAST)
    scheduler = Scheduler(locker)
    finish = locker.store.finish
    refused: list[int] = []

    async def finish_refused_once(lock_id: int, *args: Any, **kwargs: Any) -> None:
        if not refused:
            refused.append(lock_id)
            raise BackendError("unlock()", "the database went away (for this test)")
        await finish(lock_id, *args, **kwargs)

    monkeypatch.setattr(locker.store, "finish", finish_refused_once)
    ran = asyncio.Event()

    @scheduler.every(STEP, name="recorded-later")
    async def recorded_later() -> None:
        ran.set()

    with LogWatch("not recorded yet", count=1) as warned:
        async with scheduler:
            await asyncio.wait_for(ran.wait(), timeout=5)
            await warned.wait()

    assert _records(caplog, logging.ERROR) == []
    [warning] = _records(caplog, logging.WARNING, "not recorded yet")
    assert "recorded-later" in warning.getMessage()
    assert "finished" in warning.getMessage()

    async def recorded() -> bool:
        rows = await fetch_rows(engine, backend.table_name)
        return any(r["id"] == refused[0] and r["status"] == "FINISHED" for r in rows)

    for _ in range(50):  # the background retry comes after 0.5 s
        if await recorded():
            break
        await asyncio.sleep(0.1)
    assert await recorded()


async def test_database_outage_fails_closed_then_recovers_by_itself(
    backend: Backend,
    engine: AsyncEngine,
    make_locker: LockerFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    locker = await make_locker(worker="a", identifier=FAST, create=False)
    scheduler = Scheduler(locker)
    calls = 0
    ran: list[datetime] = []
    back = asyncio.Event()

    @scheduler.every(STEP, name="needs-db")
    async def needs_db() -> None:
        nonlocal calls
        calls += 1  # counted before anything that needs the lock
        ran.append(current_lock().run_time)
        if len(ran) == 2:
            back.set()

    with LogWatch("could not be decided", count=2) as skipped_twice:
        async with scheduler:
            await skipped_twice.wait()
            assert calls == 0  # never run without the lock
            await locker.create_table()
            await asyncio.wait_for(back.wait(), timeout=5)

    assert calls == len(ran)
    skipped = _records(caplog, logging.WARNING, "could not be decided")
    assert all("needs-db" in r.getMessage() for r in skipped)
    assert any("does not exist" in r.getMessage() for r in skipped)
    rows = await fetch_rows(engine, backend.table_name)
    assert [(r["job_identifier"], r["status"]) for r in rows] == [
        (FAST("needs-db", t), "FINISHED") for t in ran
    ]


# -- overlapping runs --------------------------------------------------------------------------


async def test_a_slow_job_is_not_started_again_while_running(
    backend: Backend,
    engine: AsyncEngine,
    make_locker: LockerFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="aiocronlock")
    locker = await make_locker(worker="a", identifier=FAST)
    scheduler = Scheduler(locker)
    started: list[datetime] = []
    release = asyncio.Event()
    again = asyncio.Event()

    @scheduler.every(STEP, name="slow")
    async def slow() -> None:
        started.append(current_lock().run_time)
        if len(started) > 1:
            again.set()
        await release.wait()

    with LogWatch("still going", count=3) as three_ticks_passed:
        async with scheduler:
            # Three more ticks come while the first run is still going.
            await three_ticks_passed.wait()
            assert len(started) == 1
            release.set()
            await asyncio.wait_for(again.wait(), timeout=5)

    assert started[1] - started[0] >= STEP * 4
    rows = await fetch_rows(engine, backend.table_name)
    # The skipped ticks were not even asked for.
    assert [r["job_identifier"] for r in rows] == [FAST("slow", t) for t in started]
    assert {r["status"] for r in rows} == {"FINISHED"}


async def test_without_skip_if_running_runs_overlap(
    backend: Backend, engine: AsyncEngine, make_locker: LockerFactory
) -> None:
    locker = await make_locker(worker="a", identifier=FAST)
    scheduler = Scheduler(locker)
    active: list[datetime] = []
    most = 0
    release = asyncio.Event()
    three_at_once = asyncio.Event()

    async def slow() -> None:
        nonlocal most
        active.append(current_lock().run_time)
        most = max(most, len(active))
        if most >= 3:
            three_at_once.set()
        try:
            await release.wait()
        finally:
            active.remove(current_lock().run_time)

    scheduler.add_job(slow, STEP, name="overlapping", skip_if_running=False)
    async with scheduler:
        await asyncio.wait_for(three_at_once.wait(), timeout=5)
        release.set()

    assert most >= 3
    rows = await fetch_rows(engine, backend.table_name)
    assert len(rows) >= 3
    assert len({r["job_identifier"] for r in rows}) == len(rows)
    assert {r["status"] for r in rows} == {"FINISHED"}


# -- stopping -------------------------------------------------------------------------------------


async def test_leaving_starts_no_new_ticks_and_leaves_no_tasks(
    backend: Backend, engine: AsyncEngine, make_locker: LockerFactory
) -> None:
    before = asyncio.all_tasks()
    locker = await make_locker(worker="a", identifier=FAST)
    scheduler = Scheduler(locker)
    ran: list[datetime] = []
    two = asyncio.Event()

    @scheduler.every(STEP, name="stops")
    async def stops() -> None:
        ran.append(current_lock().run_time)
        if len(ran) == 2:
            two.set()

    async with scheduler:
        await asyncio.wait_for(two.wait(), timeout=5)
    assert _tasks_left(before) == []
    count = len(ran)
    rows = await fetch_rows(engine, backend.table_name)

    await asyncio.sleep(STEP.total_seconds() * 3)

    assert len(ran) == count
    assert await fetch_rows(engine, backend.table_name) == rows
    assert [r["status"] for r in rows] == ["FINISHED"] * count


async def test_a_running_job_gets_the_grace_period_to_finish(
    backend: Backend, engine: AsyncEngine, make_locker: LockerFactory
) -> None:
    before = asyncio.all_tasks()
    locker = await make_locker(worker="a", identifier=FAST)
    scheduler = Scheduler(locker, grace_period=5)
    started = asyncio.Event()
    finished: list[datetime] = []

    @scheduler.every(STEP, name="finishing")
    async def finishing() -> None:
        started.set()
        await asyncio.sleep(0.4)
        finished.append(current_lock().run_time)

    async with scheduler:
        await asyncio.wait_for(started.wait(), timeout=5)

    assert len(finished) == 1  # it was allowed to complete, and nothing started after it
    assert _tasks_left(before) == []
    rows = await fetch_rows(engine, backend.table_name)
    assert [(r["job_identifier"], r["status"]) for r in rows] == [
        (FAST("finishing", finished[0]), "FINISHED")
    ]


async def test_a_job_outliving_the_grace_period_is_cancelled_and_marked_failed(
    backend: Backend,
    engine: AsyncEngine,
    make_locker: LockerFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    before = asyncio.all_tasks()
    locker = await make_locker(worker="a", identifier=FAST)
    scheduler = Scheduler(locker, grace_period=timedelta(milliseconds=300))
    started = asyncio.Event()
    cancelled: list[datetime] = []

    @scheduler.every(STEP, name="stuck")
    async def stuck() -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.append(current_lock().run_time)
            raise

    async with scheduler:
        await asyncio.wait_for(started.wait(), timeout=5)
        leaving = asyncio.get_running_loop().time()
    took = asyncio.get_running_loop().time() - leaving

    assert 0.3 <= took < 3
    assert len(cancelled) == 1
    assert _tasks_left(before) == []
    rows = await fetch_rows(engine, backend.table_name)
    assert [(r["job_identifier"], r["status"]) for r in rows] == [
        (FAST("stuck", cancelled[0]), "FAILED")
    ]
    warnings = _records(caplog, logging.WARNING, "grace period")
    assert len(warnings) == 1
    assert "stuck" in warnings[0].getMessage()


# -- kinds of job function, and run() -------------------------------------------------------------


async def test_a_synchronous_job_runs_in_a_thread_and_sees_its_lock(
    backend: Backend, engine: AsyncEngine, make_locker: LockerFactory
) -> None:
    locker = await make_locker(worker="a", identifier=FAST)
    scheduler = Scheduler(locker)
    loop = asyncio.get_running_loop()
    ran = asyncio.Event()
    seen: list[tuple[int, str, datetime]] = []

    def blocking() -> None:
        lock = current_lock()
        seen.append((threading.get_ident(), lock.job_name, lock.run_time))
        loop.call_soon_threadsafe(ran.set)

    scheduler.add_job(blocking, STEP, name="in-a-thread")
    async with scheduler:
        await asyncio.wait_for(ran.wait(), timeout=5)

    thread, job_name, run_time = seen[0]
    assert thread != threading.get_ident()
    assert job_name == "in-a-thread"
    assert _aligned(run_time, STEP)
    rows = await fetch_rows(engine, backend.table_name)
    assert (rows[0]["job_identifier"], rows[0]["status"]) == (
        FAST("in-a-thread", run_time),
        "FINISHED",
    )


async def test_cancelling_run_stops_cleanly(
    backend: Backend, engine: AsyncEngine, make_locker: LockerFactory
) -> None:
    before = asyncio.all_tasks()
    locker = await make_locker(worker="a", identifier=FAST)
    scheduler = Scheduler(locker, grace_period=5)
    started = asyncio.Event()
    finished: list[datetime] = []

    @scheduler.every(STEP, name="served")
    async def served() -> None:
        started.set()
        await asyncio.sleep(0.3)
        finished.append(current_lock().run_time)

    task = asyncio.create_task(scheduler.run())
    await asyncio.wait_for(started.wait(), timeout=5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    assert _tasks_left(before) == []
    assert len(finished) == 1  # the run in progress was given its grace period
    rows = await fetch_rows(engine, backend.table_name)
    assert [(r["job_identifier"], r["status"]) for r in rows] == [
        (FAST("served", finished[0]), "FINISHED")
    ]
    count = len(rows)
    await asyncio.sleep(STEP.total_seconds() * 2)
    assert len(await fetch_rows(engine, backend.table_name)) == count
