"""Pruning: ``clean()`` and the background cleaner that runs it once per interval."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import MetaData, update
from sqlalchemy.ext.asyncio import AsyncEngine

import aiocronlock._locker
from aiocronlock import AsyncDBLocker, lock_table
from aiocronlock._cleaner import CLEAN_BUSY_SHARE, CLEAN_STATEMENT_S, next_batch, rest_after
from conftest import Backend, LockerFactory, StatementCounter, fetch_rows, watch_log

CLEANER_JOB = "aiocronlock.cleaner"
INTERVAL = 0.3


async def _age(
    engine: AsyncEngine, table: str, ids: list[int], by: timedelta = timedelta(days=2)
) -> None:
    """Make rows look created ``by`` ago, as if they had been in the table that long."""
    locks = lock_table(MetaData(), name=table)
    async with engine.begin() as conn:
        await conn.execute(
            update(locks).where(locks.c.id.in_(ids)).values(created_at=datetime.now(UTC) - by)
        )


async def _win(locker: AsyncDBLocker, count: int, job: str) -> list[int]:
    """Win ``count`` distinct ticks of ``job`` and return the row ids."""
    ids = []
    for i in range(count):
        lock = await locker.lock(f"{job}-{i}")
        assert lock is not None
        ids.append(lock.id)
    return ids


async def _ids(engine: AsyncEngine, table: str, *, cleaner: bool = False) -> list[int]:
    rows = await fetch_rows(engine, table)
    return [r["id"] for r in rows if (r["job_name"] == CLEANER_JOB) == cleaner]


class CleanSpy:
    """Wraps one locker's ``clean`` to count calls and report each result."""

    def __init__(self, locker: AsyncDBLocker, monkeypatch: pytest.MonkeyPatch) -> None:
        self.results: list[int] = []
        self._original = locker.clean
        self._waiters: list[asyncio.Future[int]] = []
        monkeypatch.setattr(locker, "clean", self._clean)

    @property
    def calls(self) -> int:
        return len(self.results)

    async def _clean(self) -> int:
        deleted = await self._original()
        self.results.append(deleted)
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(deleted)
        self._waiters.clear()
        return deleted

    async def next_result(self) -> int:
        """What the next call to finish returned; fails the test if none comes within 10 s."""
        waiter: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        async with asyncio.timeout(10):
            return await waiter


# -- clean() ----------------------------------------------------------------------------------


async def test_clean_deletes_rows_older_than_ttl(
    backend: Backend, engine: AsyncEngine, make_locker: LockerFactory
) -> None:
    locker = await make_locker(ttl=timedelta(hours=1))
    ids = await _win(locker, 5, "job")
    await _age(engine, backend.table_name, ids[:3])

    assert await locker.clean() == 3
    assert await _ids(engine, backend.table_name) == ids[3:]
    assert await locker.clean() == 0
    assert await _ids(engine, backend.table_name) == ids[3:]


async def test_clean_measures_age_against_ttl(
    backend: Backend, engine: AsyncEngine, make_locker: LockerFactory
) -> None:
    locker = await make_locker(ttl=timedelta(hours=1))
    younger, older, fresh = await _win(locker, 3, "job")
    await _age(engine, backend.table_name, [younger], by=timedelta(minutes=50))
    await _age(engine, backend.table_name, [older], by=timedelta(minutes=70))

    assert await locker.clean() == 1
    assert await _ids(engine, backend.table_name) == [younger, fresh]


async def test_clean_with_a_short_ttl_after_waiting(
    backend: Backend, engine: AsyncEngine, make_locker: LockerFactory
) -> None:
    locker = await make_locker(ttl=0.3)
    await _win(locker, 2, "old")
    await asyncio.sleep(0.5)
    young = await _win(locker, 1, "young")

    assert await locker.clean() == 2
    assert await _ids(engine, backend.table_name) == young


async def test_clean_on_an_empty_table(make_locker: LockerFactory) -> None:
    locker = await make_locker()
    assert await locker.clean() == 0


async def test_clean_uses_the_database_clock(
    backend: Backend,
    engine: AsyncEngine,
    make_locker: LockerFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    locker = await make_locker(ttl=timedelta(hours=1))
    ids = await _win(locker, 2, "job")

    class Skewed(datetime):
        """This instance's clock runs two days ahead of the database's."""

        @classmethod
        def now(cls, tz: Any = None) -> Skewed:
            real = datetime.now(tz) + timedelta(days=2)
            return cls.fromtimestamp(real.timestamp(), tz)

    monkeypatch.setattr(aiocronlock._locker, "datetime", Skewed)

    assert await locker.clean() == 0
    assert await _ids(engine, backend.table_name) == ids


@pytest.mark.parametrize("old", [10, 9, 2, 0])
async def test_clean_deletes_in_batches(
    backend: Backend,
    engine: AsyncEngine,
    make_locker: LockerFactory,
    count_statements: StatementCounter,
    old: int,
) -> None:
    batch = 3
    locker = await make_locker(ttl=timedelta(hours=1), clean_batch_size=batch)
    old_ids = await _win(locker, old, "old")
    live_ids = await _win(locker, 4, "live")
    await _age(engine, backend.table_name, old_ids)
    count_statements.statements.clear()

    assert await locker.clean() == old

    # On PostgreSQL the DELETE sits in a WITH that reports the newest row it deleted.
    deletes = [s for s in count_statements.statements if "DELETE FROM" in s.upper()]
    needed = max(1, math.ceil(old / batch))
    assert needed <= len(deletes) <= needed + 1, deletes
    assert await _ids(engine, backend.table_name) == live_ids


async def test_clean_checkpoints_the_sqlite_log_after_each_batch(
    backend: Backend,
    engine: AsyncEngine,
    make_locker: LockerFactory,
    count_statements: StatementCounter,
) -> None:
    """On SQLite each DELETE that deleted rows is followed by a WAL checkpoint in the
    cleaner's own turn, so no lock() commit is left to copy a batch's pages into the
    database; the last DELETE, which found nothing, is not."""
    locker = await make_locker(ttl=timedelta(hours=1), clean_batch_size=2)
    await _age(engine, backend.table_name, await _win(locker, 4, "old"))
    count_statements.statements.clear()

    assert await locker.clean() == 4

    kinds = [
        "delete" if "DELETE FROM" in s.upper() else "checkpoint"
        for s in count_statements.statements
        if "DELETE FROM" in s.upper() or "WAL_CHECKPOINT" in s.upper()
    ]
    if backend.is_sqlite:
        assert kinds == ["delete", "checkpoint", "delete", "checkpoint", "delete"]
    else:
        assert kinds == ["delete"] * 3


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
async def test_a_postgresql_batch_turns_synchronous_commit_off_for_itself_only(
    backend: Backend, engine: AsyncEngine
) -> None:
    """clean() sends each batch with ``synchronous_commit`` off for the batch's own
    transaction (its commit then does not wait for the WAL flush). The locker's one
    pooled connection, which every other statement of the locker uses too, keeps
    the setting it had before, whatever that is."""
    single = backend.engine(pool_size=1, max_overflow=0)
    locker = AsyncDBLocker(
        single, table_name=backend.table_name, ttl=timedelta(hours=1), clean_interval=None
    )
    counter = StatementCounter(single)
    try:
        await locker.create_table()
        async with single.connect() as conn:
            await conn.exec_driver_sql("SET synchronous_commit TO remote_write")
            await conn.commit()
        await _age(engine, backend.table_name, await _win(locker, 3, "old"))
        counter.statements.clear()

        assert await locker.clean() == 3

        async with single.connect() as conn:
            after = (await conn.exec_driver_sql("SHOW synchronous_commit")).scalar_one()
    finally:
        counter.close()
        await locker.aclose()
        await single.dispose()
    batches = [s for s in counter.statements if "DELETE FROM" in s.upper()]
    assert batches and all("set_config" in s for s in batches), batches
    assert after == "remote_write"


async def test_batches_walk_up_through_ages_that_do_not_follow_ids(
    backend: Backend, engine: AsyncEngine, make_locker: LockerFactory
) -> None:
    """Each batch starts where the last ended (on PostgreSQL, at its newest created_at)."""
    locker = await make_locker(ttl=timedelta(hours=1), clean_batch_size=2)
    old_ids = await _win(locker, 7, "old")
    live_ids = await _win(locker, 3, "live")
    for row_id, days in zip(old_ids, [5, 1, 4, 2, 3, 2, 5], strict=True):
        await _age(engine, backend.table_name, [row_id], by=timedelta(days=days))

    assert await locker.clean() == 7
    assert await _ids(engine, backend.table_name) == live_ids


# -- the background cleaner --------------------------------------------------------------------


async def test_background_cleaner_prunes_old_rows(
    backend: Backend,
    engine: AsyncEngine,
    make_locker: LockerFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    locker = await make_locker(worker="bg", ttl=timedelta(hours=1), clean_interval=INTERVAL)
    spy = CleanSpy(locker, monkeypatch)
    old = await _win(locker, 3, "old")
    live = await _win(locker, 2, "live")
    await _age(engine, backend.table_name, old)

    async with locker:
        deleted = [await spy.next_result()]
        while sum(deleted) < len(old):
            deleted.append(await spy.next_result())

    assert sum(deleted) == 3
    assert await _ids(engine, backend.table_name) == live
    cleaner_rows = [
        r for r in await fetch_rows(engine, backend.table_name) if r["job_name"] == CLEANER_JOB
    ]
    assert cleaner_rows
    assert {r["worker"] for r in cleaner_rows} == {"bg"}


async def test_closing_right_after_a_prune_records_the_cleaner_tick(
    backend: Backend,
    engine: AsyncEngine,
    make_locker: LockerFactory,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    locker = await make_locker(worker="closing", ttl=timedelta(hours=1), clean_interval=INTERVAL)
    spy = CleanSpy(locker, monkeypatch)

    async with locker:
        await spy.next_result()  # the prune is done; its tick is being recorded as we leave

    rows = await fetch_rows(engine, backend.table_name)
    assert [(r["job_name"], r["status"]) for r in rows] == [(CLEANER_JOB, "FINISHED")]
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


async def test_closing_during_a_prune_records_the_cleaner_tick_as_failed(
    backend: Backend,
    engine: AsyncEngine,
    make_locker: LockerFactory,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    locker = await make_locker(worker="closing", ttl=timedelta(hours=1), clean_interval=INTERVAL)
    pruning = asyncio.Event()

    async def endless_clean() -> int:
        pruning.set()
        await asyncio.Event().wait()
        return 0

    monkeypatch.setattr(locker, "clean", endless_clean)

    async with locker:
        async with asyncio.timeout(10):
            await pruning.wait()

    rows = await fetch_rows(engine, backend.table_name)
    assert [(r["job_name"], r["status"]) for r in rows] == [(CLEANER_JOB, "FAILED")]
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


async def test_one_instance_prunes_per_interval(
    backend: Backend,
    engine: AsyncEngine,
    make_locker: LockerFactory,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    lockers = [
        await make_locker(
            own_engine=True, worker=f"w{i}", ttl=timedelta(hours=1), clean_interval=INTERVAL
        )
        for i in range(3)
    ]
    spies = [CleanSpy(locker, monkeypatch) for locker in lockers]
    old = await _win(lockers[0], 4, "old")
    await _age(engine, backend.table_name, old)

    async with contextlib.AsyncExitStack() as stack:
        for locker in lockers:
            await stack.enter_async_context(locker)
        started = time.monotonic()
        await asyncio.sleep(6 * INTERVAL)
        # Leave half-way between two ticks, while every cleaner sleeps: this test is
        # about pruning per interval (closing mid-prune has tests of its own).
        await asyncio.sleep((INTERVAL / 2 - time.time() % INTERVAL) % INTERVAL)
        elapsed = time.monotonic() - started
        warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]

    intervals = elapsed / INTERVAL
    calls = sum(spy.calls for spy in spies)
    # Not three prunes per interval; and the cleaner did run (a loaded machine may
    # skip a tick, hence the loose lower bound).
    assert 2 <= calls <= intervals + 1, (calls, intervals)
    assert sum(sum(spy.results) for spy in spies) == len(old)
    rows = await fetch_rows(engine, backend.table_name)
    cleaner_rows = [r for r in rows if r["job_name"] == CLEANER_JOB]
    assert len(cleaner_rows) == calls
    assert {r["status"] for r in cleaner_rows} == {"FINISHED"}
    assert {r["worker"] for r in cleaner_rows} <= {"w0", "w1", "w2"}
    ticks = sorted(datetime.fromisoformat(r["job_identifier"]) for r in cleaner_rows)
    step = timedelta(seconds=INTERVAL)
    for earlier, later in itertools.pairwise(ticks):
        assert later > earlier
        assert (later - earlier) % step == timedelta(0), (earlier, later)
    assert [r for r in rows if r["job_name"] != CLEANER_JOB] == []
    assert warnings == []


async def test_cleaner_survives_errors(
    backend: Backend,
    engine: AsyncEngine,
    make_locker: LockerFactory,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    locker = await make_locker(
        create=False, worker="survivor", ttl=timedelta(hours=1), clean_interval=0.2
    )
    spy = CleanSpy(locker, monkeypatch)
    before = asyncio.all_tasks()

    with watch_log("aiocronlock.cleaner") as log:
        async with locker:
            (cleaner,) = asyncio.all_tasks() - before
            async with asyncio.timeout(10):
                await log.wait_for(3)
            assert not cleaner.done()
            warnings = [
                r
                for r in caplog.records
                if r.name == "aiocronlock.cleaner" and r.levelno == logging.WARNING
            ]
            assert len(warnings) >= 3
            assert backend.table_name in warnings[0].getMessage()

            # The table appears: the same cleaner task now prunes.
            await locker.create_table()
            old = await _win(locker, 3, "old")
            live = await _win(locker, 1, "live")
            await _age(engine, backend.table_name, old)
            while await spy.next_result() == 0:
                pass

            assert not cleaner.done()
            assert await _ids(engine, backend.table_name) == live
    assert cleaner.done()


async def test_leaving_async_with_stops_the_cleaner(
    backend: Backend,
    engine: AsyncEngine,
    make_locker: LockerFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    locker = await make_locker(worker="stopper", clean_interval=INTERVAL)
    spy = CleanSpy(locker, monkeypatch)
    before = asyncio.all_tasks()

    async with locker:
        (cleaner,) = asyncio.all_tasks() - before
        await spy.next_result()
        assert not cleaner.done()

    assert cleaner.done()
    assert asyncio.all_tasks() - before == set()
    rows = await _ids(engine, backend.table_name, cleaner=True)
    await asyncio.sleep(3 * INTERVAL)
    assert await _ids(engine, backend.table_name, cleaner=True) == rows
    assert spy.calls == len(rows)
    await locker.aclose()
    await locker.aclose()
    assert cleaner.done()


async def test_aclose_stops_the_cleaner(
    backend: Backend,
    engine: AsyncEngine,
    make_locker: LockerFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    locker = await make_locker(worker="closer", clean_interval=INTERVAL)
    spy = CleanSpy(locker, monkeypatch)
    before = asyncio.all_tasks()
    await locker.__aenter__()
    (cleaner,) = asyncio.all_tasks() - before
    await spy.next_result()

    await locker.aclose()

    assert cleaner.done()
    calls = spy.calls
    await asyncio.sleep(3 * INTERVAL)
    assert spy.calls == calls


def test_batches_shrink_while_deletes_are_slow_and_grow_back_to_the_maximum() -> None:
    slow, fast, fine = 2 * CLEAN_STATEMENT_S, CLEAN_STATEMENT_S / 4, CLEAN_STATEMENT_S * 0.75
    assert next_batch(2000, slow, 2000) == 1000
    assert next_batch(60, slow, 2000) == 50  # never below the floor
    assert next_batch(50, slow, 2000) == 50
    assert next_batch(500, fast, 2000) == 1000
    assert next_batch(1500, fast, 2000) == 2000  # never above clean_batch_size
    assert next_batch(3, fast, 3) == 3
    assert next_batch(700, fine, 2000) == 700


def test_the_cleaner_rests_so_that_its_deletes_keep_only_their_share_of_the_time() -> None:
    for took in (0.001, 0.02, CLEAN_STATEMENT_S):
        rest = rest_after(took)
        assert took / (took + rest) == pytest.approx(CLEAN_BUSY_SHARE)
    # Never more than a second, so that a prune does not outlast its interval.
    assert rest_after(10 * CLEAN_STATEMENT_S) == 1.0
