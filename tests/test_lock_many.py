"""``lock_many()``: one tick of many jobs, decided together."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from aiocronlock import Status
from aiocronlock._sql import mysql_duplicates_quiet
from conftest import Backend, LockerFactory, StatementCounter, fetch_rows


def _tick() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


async def test_returns_the_jobs_won_and_skips_those_taken(
    backend: Backend, engine: AsyncEngine, make_locker: LockerFactory
) -> None:
    a = await make_locker(worker="a", own_engine=True)
    b = await make_locker(worker="b", own_engine=True)
    tick = _tick()
    taken = await a.lock("job-1", tick)
    assert taken is not None

    won = await b.lock_many([f"job-{n}" for n in range(5)], tick)

    assert sorted(won) == ["job-0", "job-2", "job-3", "job-4"]
    for name, lock in won.items():
        assert (lock.job_name, lock.worker, lock.run_time) == (name, "b", tick)
    rows = {row["job_name"]: row for row in await fetch_rows(engine, backend.table_name)}
    assert rows["job-1"]["worker"] == "a"
    assert {rows[name]["id"] for name in won} == {lock.id for lock in won.values()}
    assert all(rows[name]["worker"] == "b" for name in won)


async def test_locks_from_lock_many_record_their_outcome(
    backend: Backend, engine: AsyncEngine, make_locker: LockerFactory
) -> None:
    locker = await make_locker()
    won = await locker.lock_many(["ok", "boom"], _tick())
    async with won["ok"]:
        pass
    with pytest.raises(RuntimeError):
        async with won["boom"]:
            raise RuntimeError("boom")
    rows = await fetch_rows(engine, backend.table_name)
    statuses = {row["job_name"]: row["status"] for row in rows}
    assert statuses == {"ok": Status.FINISHED, "boom": Status.FAILED}


async def test_five_hundred_jobs_in_one_statement_where_the_backend_allows(
    backend: Backend,
    engine: AsyncEngine,
    make_locker: LockerFactory,
    count_statements: StatementCounter,
) -> None:
    locker = await make_locker()
    names = [f"job-{n}" for n in range(500)]
    before = len(count_statements)

    won = await locker.lock_many(names, _tick())

    assert sorted(won) == sorted(names)
    assert len(count_statements) - before == 1  # MariaDB (10.5+) too: INSERT ... RETURNING
    assert len(await fetch_rows(engine, backend.table_name)) == 500


async def test_taken_ticks_log_nothing_and_other_jobs_still_win(
    make_locker: LockerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """On MariaDB each taken tick is a duplicate-key warning that the driver would log."""
    a = await make_locker(worker="a", own_engine=True)
    b = await make_locker(worker="b", own_engine=True)
    tick = _tick()
    names = [f"job-{n}" for n in range(20)]
    assert len(await a.lock_many(names[::2], tick)) == 10
    with caplog.at_level(logging.DEBUG):
        won = await b.lock_many(names, tick)
    assert sorted(won) == sorted(names[1::2])
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


@pytest.mark.parametrize("backend", ["mysql"], indirect=True)
async def test_mysql_without_returning_decides_job_by_job(
    backend: Backend,
    engine: AsyncEngine,
    make_locker: LockerFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """MySQL (and MariaDB before 10.5) has no INSERT ... RETURNING: one INSERT per job."""
    a = await make_locker(worker="a", own_engine=True)
    b = await make_locker(worker="b", own_engine=True)
    tick = _tick()
    assert await a.lock("job-1", tick) is not None
    monkeypatch.setattr(b.engine.dialect, "insert_returning", False)  # b's own engine
    sent = StatementCounter(b.engine)
    try:
        won = await b.lock_many([f"job-{n}" for n in range(5)], tick)
    finally:
        sent.close()

    assert sorted(won) == ["job-0", "job-2", "job-3", "job-4"]
    assert len(sent) == 5
    rows = {row["job_name"]: row for row in await fetch_rows(engine, backend.table_name)}
    assert {name: rows[name]["id"] for name in won} == {n: lock.id for n, lock in won.items()}


def test_only_expected_duplicate_warnings_are_dropped(caplog: pytest.LogCaptureFixture) -> None:
    driver = logging.getLogger("asyncmy")
    with caplog.at_level(logging.WARNING, logger="asyncmy"):
        with mysql_duplicates_quiet():
            driver.warning("Duplicate entry 'a-b' for key 'uq'")
            driver.warning("Data truncated for column 'x' at row 1")
        driver.warning("Duplicate entry 'c-d' for key 'uq'")
    assert [r.getMessage() for r in caplog.records] == [
        "Data truncated for column 'x' at row 1",
        "Duplicate entry 'c-d' for key 'uq'",
    ]


async def test_a_second_call_for_the_same_tick_wins_nothing(make_locker: LockerFactory) -> None:
    locker = await make_locker()
    tick = _tick()
    assert len(await locker.lock_many(["x", "y"], tick)) == 2
    assert await locker.lock_many(["x", "y"], tick) == {}


@pytest.mark.parametrize(
    ("names", "error", "fragment"),
    [
        (["a", "a"], ValueError, "repeat"),
        (["a", ""], ValueError, "job_names"),
        (["a", 3], TypeError, "job_names"),
        (["x" * 256], ValueError, "job_names"),
    ],
)
async def test_bad_names_are_refused_before_any_sql(
    make_locker: LockerFactory,
    count_statements: StatementCounter,
    names: list[object],
    error: type[Exception],
    fragment: str,
) -> None:
    locker = await make_locker()
    before = len(count_statements)
    with pytest.raises(error, match=fragment):
        await locker.lock_many(names, _tick())  # type: ignore[arg-type]
    assert len(count_statements) == before


async def test_nothing_to_decide(make_locker: LockerFactory) -> None:
    locker = await make_locker()
    assert await locker.lock_many([], _tick()) == {}
    assert await locker.lock_many(["stale"], _tick() - timedelta(days=2)) == {}
