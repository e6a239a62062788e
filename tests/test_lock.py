"""A won tick: the ``Lock``, its fields, and how leaving it is recorded."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from sqlalchemy import MetaData, delete
from sqlalchemy.ext.asyncio import AsyncEngine

from aiocronlock import Lock, Status, lock_table, precision
from conftest import Backend, LockerFactory, StatementCounter, fetch_rows


def _tick(seconds_ago: int = 0) -> datetime:
    return datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=seconds_ago)


async def _statuses(engine: AsyncEngine, table: str) -> list[str]:
    return [row["status"] for row in await fetch_rows(engine, table)]


async def _won(make_locker: LockerFactory, job: str = "job", **kwargs: Any) -> Lock:
    locker = await make_locker(**kwargs)
    lock = await locker.lock(job, _tick())
    assert lock is not None
    return lock


# -- fields ---------------------------------------------------------------------------------


async def test_lock_exposes_the_tick(
    backend: Backend, engine: AsyncEngine, make_locker: LockerFactory
) -> None:
    locker = await make_locker(worker="worker-1")
    instant = _tick().replace(microsecond=345000)
    in_tokyo = instant.astimezone(timezone(timedelta(hours=9)))

    lock = await locker.lock("nightly", in_tokyo)

    assert lock is not None
    assert lock.job_name == "nightly"
    assert lock.worker == "worker-1"
    assert lock.identifier == precision()("nightly", instant)
    assert lock.run_time == instant
    assert lock.run_time.utcoffset() == timedelta(0)
    assert not lock.released
    rows = await fetch_rows(engine, backend.table_name)
    assert [(r["id"], r["job_identifier"]) for r in rows] == [(lock.id, lock.identifier)]


async def test_ids_increase_across_wins_as_fencing_tokens(
    backend: Backend, engine: AsyncEngine, make_locker: LockerFactory
) -> None:
    a = await make_locker(own_engine=True, worker="a")
    b = await make_locker(own_engine=True, worker="b")
    ids: list[int] = []
    base = _tick()
    for i in range(6):
        run_time = base - timedelta(seconds=i)
        winner, loser = (a, b) if i % 2 else (b, a)
        lock = await winner.lock("fenced", run_time)
        assert lock is not None
        assert await loser.lock("fenced", run_time) is None
        async with lock:
            ids.append(lock.id)

    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)
    rows = await fetch_rows(engine, backend.table_name)
    assert [r["id"] for r in rows] == ids


async def test_ids_stay_increasing_after_the_newest_row_is_deleted(
    backend: Backend, engine: AsyncEngine, make_locker: LockerFactory
) -> None:
    locker = await make_locker(worker="a")
    first = await locker.lock("fenced", _tick(seconds_ago=2))
    assert first is not None
    locks = lock_table(MetaData(), name=backend.table_name)
    async with engine.begin() as conn:
        await conn.execute(delete(locks).where(locks.c.id == first.id))

    second = await locker.lock("fenced", _tick(seconds_ago=1))

    assert second is not None
    assert second.id > first.id


# -- leaving the block --------------------------------------------------------------------


async def test_async_with_returns_the_lock_and_records_finished(
    backend: Backend, engine: AsyncEngine, make_locker: LockerFactory
) -> None:
    lock = await _won(make_locker)
    async with lock as entered:
        assert entered is lock
        assert await _statuses(engine, backend.table_name) == ["RUNNING"]
        assert not lock.released
    assert lock.released
    assert await _statuses(engine, backend.table_name) == ["FINISHED"]
    row = (await fetch_rows(engine, backend.table_name))[0]
    assert row["updated_at"] >= row["created_at"]


class JobFailed(Exception):
    pass


async def test_a_raising_body_records_failed_and_propagates(
    backend: Backend, engine: AsyncEngine, make_locker: LockerFactory
) -> None:
    lock = await _won(make_locker)
    error = JobFailed("boom")

    with pytest.raises(JobFailed) as info:
        async with lock:
            raise error

    assert info.value is error
    assert lock.released
    assert await _statuses(engine, backend.table_name) == ["FAILED"]


async def test_a_cancelled_body_records_failed(
    backend: Backend, engine: AsyncEngine, make_locker: LockerFactory
) -> None:
    lock = await _won(make_locker)
    inside = asyncio.Event()

    async def job() -> None:
        async with lock:
            inside.set()
            await asyncio.Event().wait()  # runs until cancelled

    task = asyncio.create_task(job())
    await inside.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    assert task.cancelled()
    assert lock.released
    assert await _statuses(engine, backend.table_name) == ["FAILED"]


async def test_a_cancelled_unlock_still_records_the_status(
    backend: Backend, engine: AsyncEngine, make_locker: LockerFactory
) -> None:
    lock = await _won(make_locker)

    task = asyncio.create_task(lock.unlock())
    await asyncio.sleep(0)  # let the update start
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    assert lock.released
    assert await _statuses(engine, backend.table_name) == ["FINISHED"]


async def test_unlock_twice_sends_nothing_the_second_time(
    backend: Backend,
    engine: AsyncEngine,
    make_locker: LockerFactory,
    count_statements: StatementCounter,
) -> None:
    lock = await _won(make_locker)

    count_statements.statements.clear()
    await lock.unlock()
    first = len(count_statements)
    await lock.unlock()
    await lock.unlock(failed=True)
    again = len(count_statements) - first

    assert first == 1
    assert again == 0
    assert lock.released
    assert await _statuses(engine, backend.table_name) == ["FINISHED"]


async def test_unlock_failed_records_failed(
    backend: Backend, engine: AsyncEngine, make_locker: LockerFactory
) -> None:
    lock = await _won(make_locker)
    await lock.unlock(failed=True)
    assert lock.released
    assert await _statuses(engine, backend.table_name) == [Status.FAILED.value]


async def test_unlock_after_async_with_does_not_change_the_status(
    backend: Backend,
    engine: AsyncEngine,
    make_locker: LockerFactory,
    count_statements: StatementCounter,
) -> None:
    lock = await _won(make_locker)
    with pytest.raises(JobFailed):
        async with lock:
            raise JobFailed
    count_statements.statements.clear()

    await lock.unlock()

    assert count_statements.statements == []
    assert await _statuses(engine, backend.table_name) == ["FAILED"]


async def test_unlocking_one_lock_leaves_the_others_running(
    backend: Backend, engine: AsyncEngine, make_locker: LockerFactory
) -> None:
    locker = await make_locker()
    locks = [await locker.lock(f"job-{i}", _tick()) for i in range(3)]
    assert all(lock is not None for lock in locks)
    middle = locks[1]
    assert middle is not None

    async with middle:
        pass

    assert await _statuses(engine, backend.table_name) == ["RUNNING", "FINISHED", "RUNNING"]


async def test_repr_names_the_job(make_locker: LockerFactory) -> None:
    lock = await _won(make_locker, job="repr-job", worker="repr-worker")
    text = repr(lock)
    assert "repr-job" in text
    assert "repr-worker" in text
    assert str(lock.id) in text
