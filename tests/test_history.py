"""``history()``: the most recent runs, newest first."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from aiocronlock import JobRun, Status
from conftest import Backend, LockerFactory, StatementCounter


def _tick() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


class Boom(Exception):
    pass


async def test_history_lists_runs_newest_first(make_locker: LockerFactory) -> None:
    a = await make_locker(own_engine=True, worker="a")
    b = await make_locker(own_engine=True, worker="b")
    before = datetime.now(UTC) - timedelta(seconds=5)  # the database clock may lag a little

    base = _tick()
    finished = await a.lock("report", base - timedelta(seconds=2))
    assert finished is not None
    async with finished:
        pass
    failed = await b.lock("backup", base - timedelta(seconds=1))
    assert failed is not None
    with pytest.raises(Boom):
        async with failed:
            raise Boom
    running = await a.lock("report", base)
    assert running is not None

    runs = await b.history()

    assert all(isinstance(run, JobRun) for run in runs)
    assert [(r.id, r.job_name, r.identifier, r.worker, r.status) for r in runs] == [
        (running.id, "report", running.identifier, "a", "RUNNING"),
        (failed.id, "backup", failed.identifier, "b", "FAILED"),
        (finished.id, "report", finished.identifier, "a", "FINISHED"),
    ]
    assert runs[0].status == Status.RUNNING
    after = datetime.now(UTC) + timedelta(seconds=5)
    for run in runs:
        assert run.started_at.utcoffset() == timedelta(0)
        assert before <= run.started_at <= after
    newest, middle, oldest = runs
    assert newest.finished_at is None
    assert newest.duration is None
    for done in (middle, oldest):
        assert done.finished_at is not None
        assert done.finished_at.utcoffset() == timedelta(0)
        assert done.finished_at >= done.started_at
        assert done.duration == done.finished_at - done.started_at
        assert done.duration >= timedelta(0)
    assert oldest.started_at <= middle.started_at <= newest.started_at


async def test_history_filters_by_job(make_locker: LockerFactory) -> None:
    locker = await make_locker()
    wanted = []
    base = _tick()
    for i in range(3):
        lock = await locker.lock("wanted", base - timedelta(seconds=i))
        assert lock is not None
        wanted.append(lock)
        assert await locker.lock("other", base - timedelta(seconds=i)) is not None
    assert await locker.lock("Wanted", base) is not None

    runs = await locker.history("wanted")

    assert [(r.id, r.job_name, r.identifier) for r in runs] == [
        (lock.id, "wanted", lock.identifier) for lock in reversed(wanted)
    ]
    assert await locker.history("nobody") == []


async def test_history_respects_limit(make_locker: LockerFactory) -> None:
    locker = await make_locker()
    ids = []
    base = _tick()
    for i in range(7):
        lock = await locker.lock("many", base - timedelta(seconds=i))
        assert lock is not None
        ids.append(lock.id)

    assert [r.id for r in await locker.history(limit=3)] == ids[::-1][:3]
    assert [r.id for r in await locker.history("many", limit=1)] == [ids[-1]]
    assert len(await locker.history(limit=100)) == 7
    assert len(await locker.history()) == 7


async def test_history_default_limit_is_50(make_locker: LockerFactory) -> None:
    locker = await make_locker()
    base = _tick()
    for i in range(55):
        assert await locker.lock("lots", base - timedelta(seconds=i)) is not None
    assert len(await locker.history()) == 50


async def test_history_of_an_empty_table(make_locker: LockerFactory) -> None:
    locker = await make_locker()
    assert await locker.history() == []


@pytest.mark.parametrize(
    ("kwargs", "error", "parameter"),
    [
        pytest.param({"limit": 0}, ValueError, "limit", id="limit-zero"),
        pytest.param({"limit": -1}, ValueError, "limit", id="limit-negative"),
        pytest.param({"limit": "5"}, TypeError, "limit", id="limit-str"),
        pytest.param({"limit": 2.0}, TypeError, "limit", id="limit-float"),
        pytest.param({"limit": True}, TypeError, "limit", id="limit-bool"),
        pytest.param({"job_name": ""}, ValueError, "job_name", id="job-empty"),
        pytest.param({"job_name": "  "}, ValueError, "job_name", id="job-blank"),
        pytest.param({"job_name": "x" * 256}, ValueError, "job_name", id="job-256"),
        pytest.param({"job_name": 3}, TypeError, "job_name", id="job-int"),
    ],
)
async def test_bad_history_arguments(
    make_locker: LockerFactory,
    count_statements: StatementCounter,
    engine: AsyncEngine,
    backend: Backend,
    kwargs: dict[str, Any],
    error: type[Exception],
    parameter: str,
) -> None:
    locker = await make_locker()
    count_statements.statements.clear()
    with pytest.raises(error) as info:
        await locker.history(**kwargs)
    assert parameter in str(info.value)
    assert count_statements.statements == []
