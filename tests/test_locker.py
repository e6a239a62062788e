"""Deciding a tick: first instance wins, the rest get ``None``; the locker's lifecycle."""

from __future__ import annotations

import asyncio
import os
import socket
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, inspect, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from aiocronlock import AsyncDBLocker, precision
from conftest import Backend, LockerFactory, StatementCounter, fetch_rows


def _tick(seconds_ago: int = 0) -> datetime:
    """A whole-second UTC instant, so every strategy maps it to a well-defined tick."""
    return datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=seconds_ago)


def _summary(rows: list[Any]) -> list[tuple[str, str, str, str]]:
    return [(r["job_name"], r["job_identifier"], r["worker"], r["status"]) for r in rows]


# -- who wins ----------------------------------------------------------------------------


async def test_first_instance_wins_the_others_get_none(
    backend: Backend, engine: AsyncEngine, make_locker: LockerFactory
) -> None:
    a = await make_locker(own_engine=True, worker="a")
    b = await make_locker(own_engine=True, worker="b")
    run_time = _tick()

    won = await a.lock("report", run_time)
    lost = await b.lock("report", run_time)

    assert won is not None
    assert lost is None
    identifier = precision()("report", run_time)
    assert _summary(await fetch_rows(engine, backend.table_name)) == [
        ("report", identifier, "a", "RUNNING")
    ]


async def test_a_finished_tick_stays_taken(
    backend: Backend, engine: AsyncEngine, make_locker: LockerFactory
) -> None:
    a = await make_locker(own_engine=True, worker="a")
    b = await make_locker(own_engine=True, worker="b")
    run_time = _tick()
    won = await a.lock("report", run_time)
    assert won is not None
    async with won:
        pass

    assert await b.lock("report", run_time) is None
    assert await a.lock("report", run_time) is None
    assert _summary(await fetch_rows(engine, backend.table_name)) == [
        ("report", won.identifier, "a", "FINISHED")
    ]


async def test_concurrent_lockers_win_each_tick_exactly_once(
    backend: Backend, engine: AsyncEngine, make_locker: LockerFactory
) -> None:
    lockers = [await make_locker(own_engine=True, worker=f"w{i}") for i in range(3)]
    base = _tick()
    ticks = [base - timedelta(seconds=i) for i in range(10)]

    winners: list[tuple[str, datetime]] = []
    for run_time in ticks:
        # All instances race for this tick at once (one connection each).
        results = await asyncio.gather(*(lk.lock("race", run_time) for lk in lockers))
        won = [(lk.worker, run_time) for lk, lock in zip(lockers, results, strict=True) if lock]
        assert len(won) == 1, (run_time, results)
        winners += won

    rows = await fetch_rows(engine, backend.table_name)
    assert len(rows) == len(ticks)
    assert {(r["worker"], r["job_identifier"]) for r in rows} == {
        (worker, precision()("race", t)) for worker, t in winners
    }


async def test_different_jobs_and_ticks_do_not_collide(
    backend: Backend, engine: AsyncEngine, make_locker: LockerFactory
) -> None:
    a = await make_locker(own_engine=True, worker="a")
    b = await make_locker(own_engine=True, worker="b")
    t = _tick()

    assert await a.lock("one", t) is not None
    assert await b.lock("two", t) is not None
    assert await b.lock("one", t + timedelta(seconds=1)) is not None
    assert await a.lock("one", t) is None

    rows = await fetch_rows(engine, backend.table_name)
    assert [(r["job_name"], r["worker"]) for r in rows] == [
        ("one", "a"),
        ("two", "b"),
        ("one", "b"),
    ]


# -- run_time ------------------------------------------------------------------------------


async def test_same_instant_in_other_time_zones_is_the_same_tick(
    backend: Backend, engine: AsyncEngine, make_locker: LockerFactory
) -> None:
    a = await make_locker(own_engine=True, worker="a")
    b = await make_locker(own_engine=True, worker="b")
    c = await make_locker(own_engine=True, worker="c")
    instant = _tick()
    tokyo = instant.astimezone(timezone(timedelta(hours=9)))
    new_york = instant.astimezone(timezone(timedelta(hours=-5)))
    kathmandu = instant.astimezone(timezone(timedelta(hours=5, minutes=45)))

    won = await a.lock("sync", tokyo)

    assert won is not None
    assert await b.lock("sync", new_york) is None
    assert await c.lock("sync", kathmandu) is None
    assert won.run_time == instant
    assert won.run_time.utcoffset() == timedelta(0)
    assert won.identifier == precision()("sync", instant)
    assert len(await fetch_rows(engine, backend.table_name)) == 1


async def test_run_time_none_means_now(
    backend: Backend, engine: AsyncEngine, make_locker: LockerFactory
) -> None:
    a = await make_locker(own_engine=True, worker="a")
    b = await make_locker(own_engine=True, worker="b")

    before = datetime.now(UTC)
    won = await a.lock("now-job")
    after = datetime.now(UTC)

    assert won is not None
    assert before <= won.run_time <= after
    assert won.identifier == precision()("now-job", won.run_time)
    # Another instance naming the same instant explicitly meets the same tick.
    assert await b.lock("now-job", won.run_time) is None


async def test_run_time_older_than_ttl_is_refused_without_sql(
    backend: Backend,
    engine: AsyncEngine,
    make_locker: LockerFactory,
    count_statements: StatementCounter,
) -> None:
    locker = await make_locker(worker="a", ttl=timedelta(hours=1))
    count_statements.statements.clear()

    refused = await locker.lock("late", datetime.now(UTC) - timedelta(hours=1, minutes=1))

    assert refused is None
    assert count_statements.statements == []
    assert await fetch_rows(engine, backend.table_name) == []
    # Just inside ttl is still a tick that can be won.
    inside = await locker.lock("late", datetime.now(UTC) - timedelta(minutes=59))
    assert inside is not None
    assert len(await fetch_rows(engine, backend.table_name)) == 1


# -- one statement -----------------------------------------------------------------------


async def test_acquiring_is_one_statement_won_or_lost(
    backend: Backend,
    engine: AsyncEngine,
    make_locker: LockerFactory,
    count_statements: StatementCounter,
) -> None:
    a = await make_locker(worker="a")
    b = await make_locker(worker="b")
    run_time = _tick()

    count_statements.statements.clear()
    won = await a.lock("single", run_time)
    won_statements = list(count_statements.statements)
    count_statements.statements.clear()
    lost = await b.lock("single", run_time)
    lost_statements = list(count_statements.statements)

    assert won is not None
    assert lost is None
    assert len(won_statements) == 1, won_statements
    assert len(lost_statements) == 1, lost_statements
    for statement in won_statements + lost_statements:
        words = statement.upper().split()
        assert words[0] == "INSERT"
        assert "BEGIN" not in words
        assert "COMMIT" not in words


async def test_a_won_tick_is_committed_when_lock_returns(
    backend: Backend, make_locker: LockerFactory
) -> None:
    # The locker shares the test's engine, which is not in autocommit by itself.
    locker = await make_locker(worker="a")
    observer = backend.engine()
    try:
        won = await locker.lock("visible", _tick())
        assert won is not None
        rows = await fetch_rows(observer, backend.table_name)
        assert _summary(rows) == [("visible", won.identifier, "a", "RUNNING")]
        await won.unlock()
        rows = await fetch_rows(observer, backend.table_name)
        assert _summary(rows) == [("visible", won.identifier, "a", "FINISHED")]
    finally:
        await observer.dispose()


# -- names are stored and compared verbatim ------------------------------------------------

TRICKY_NAMES = [
    "job",
    "Job",
    "JOB",
    "job ",
    " job",
    "resume",
    "résumé",
    "задача-ü-日本",
    "emoji 🕒",
    "a%b_c\\d'e\"f",
    "x" * 255,
]


async def test_names_are_distinct_ticks_and_stored_verbatim(
    backend: Backend, engine: AsyncEngine, make_locker: LockerFactory
) -> None:
    a = await make_locker(own_engine=True, worker="a")
    b = await make_locker(own_engine=True, worker="b")
    run_time = _tick()
    hostile = f"'; DROP TABLE {backend.table_name}; --"
    names = [*TRICKY_NAMES, hostile]

    won = [await a.lock(name, run_time) for name in names]
    lost = [await b.lock(name, run_time) for name in names]

    assert all(lock is not None for lock in won), [
        n for n, lk in zip(names, won, strict=True) if lk is None
    ]
    assert lost == [None] * len(names)
    rows = await fetch_rows(engine, backend.table_name)
    assert [r["job_name"] for r in rows] == names
    assert {r["worker"] for r in rows} == {"a"}
    for name in names:
        runs = await a.history(name)
        assert [run.job_name for run in runs] == [name]


async def test_worker_name_is_stored_verbatim(
    backend: Backend, engine: AsyncEngine, make_locker: LockerFactory
) -> None:
    worker = "wörker-日本 #1 ' \" ;"
    locker = await make_locker(worker=worker)
    lock = await locker.lock("job", _tick())
    assert lock is not None
    assert lock.worker == worker
    rows = await fetch_rows(engine, backend.table_name)
    assert [r["worker"] for r in rows] == [worker]


# -- create_table ----------------------------------------------------------------------------


async def test_create_table_concurrently_from_many_instances(
    backend: Backend, engine: AsyncEngine, make_locker: LockerFactory
) -> None:
    lockers = [await make_locker(own_engine=True, create=False, worker=f"w{i}") for i in range(5)]

    await asyncio.gather(*(locker.create_table() for locker in lockers))

    async with engine.connect() as conn:
        indexes = await conn.run_sync(lambda sync: inspect(sync).get_indexes(backend.table_name))
    assert [ix["column_names"] for ix in indexes if not ix.get("unique")] == [["created_at"]]
    run_time = _tick()
    results = await asyncio.gather(*(locker.lock("after-create", run_time) for locker in lockers))
    assert sum(lock is not None for lock in results) == 1


async def test_create_table_is_idempotent_and_keeps_rows(
    backend: Backend, engine: AsyncEngine, make_locker: LockerFactory
) -> None:
    locker = await make_locker(worker="a")
    won = await locker.lock("kept", _tick())
    assert won is not None

    await locker.create_table()
    await asyncio.gather(*(locker.create_table() for _ in range(3)))
    other = await make_locker(own_engine=True, worker="b")
    await other.create_table()

    assert _summary(await fetch_rows(engine, backend.table_name)) == [
        ("kept", won.identifier, "a", "RUNNING")
    ]


# -- lifecycle --------------------------------------------------------------------------------


async def test_async_with_returns_the_locker_and_closes_it(make_locker: LockerFactory) -> None:
    locker = await make_locker()
    assert not locker.closed
    async with locker as entered:
        assert entered is locker
        assert await locker.lock("inside", _tick()) is not None
    assert locker.closed


async def test_lock_after_close_raises_runtime_error(
    backend: Backend,
    engine: AsyncEngine,
    make_locker: LockerFactory,
    count_statements: StatementCounter,
) -> None:
    locker = await make_locker()
    await locker.aclose()
    count_statements.statements.clear()

    with pytest.raises(RuntimeError, match="closed"):
        await locker.lock("late", _tick())
    assert count_statements.statements == []
    assert await fetch_rows(engine, backend.table_name) == []


async def test_aclose_twice_is_harmless(make_locker: LockerFactory) -> None:
    locker = await make_locker(clean_interval=timedelta(minutes=5))
    async with locker:
        pass
    await locker.aclose()
    await locker.aclose()
    assert locker.closed


async def test_entering_twice_raises_runtime_error(make_locker: LockerFactory) -> None:
    locker = await make_locker()
    async with locker:
        with pytest.raises(RuntimeError, match="once"):
            await locker.__aenter__()
        # The failed second entry did not close the working locker.
        assert not locker.closed
        assert await locker.lock("still-works", _tick()) is not None


async def test_entering_after_close_raises_runtime_error(make_locker: LockerFactory) -> None:
    locker = await make_locker()
    await locker.aclose()
    with pytest.raises(RuntimeError, match="closed"):
        async with locker:
            pass


async def test_an_engine_passed_in_is_not_disposed(backend: Backend) -> None:
    engine = backend.engine()
    disposals: list[object] = []
    event.listen(engine.sync_engine, "engine_disposed", disposals.append)
    try:
        pool = engine.pool
        async with AsyncDBLocker(
            engine, table_name=backend.table_name, clean_interval=None
        ) as locker:
            await locker.create_table()
            assert await locker.lock("job", _tick()) is not None
        assert locker.engine is engine
        assert disposals == []
        assert engine.pool is pool
        assert pool.checkedin() >= 1  # type: ignore[attr-defined]
        async with engine.connect() as conn:
            assert (await conn.execute(text("SELECT 1"))).scalar_one() == 1
    finally:
        await engine.dispose()


async def test_a_locker_built_from_a_url_disposes_its_engine(backend: Backend) -> None:
    locker = AsyncDBLocker(backend.url, table_name=backend.table_name, clean_interval=None)
    disposals: list[object] = []
    event.listen(locker.engine.sync_engine, "engine_disposed", disposals.append)
    async with locker:
        await locker.create_table()
        assert await locker.lock("job", _tick()) is not None
        assert disposals == []
        pool = locker.engine.sync_engine.pool
        # create_table's connection is back in the pool; lock()'s is kept for the next call.
        assert pool.checkedin() + pool.checkedout() >= 1  # type: ignore[attr-defined]
    assert len(disposals) == 1
    assert pool.checkedin() == 0  # type: ignore[attr-defined]
    assert pool.checkedout() == 0  # type: ignore[attr-defined]


# -- URLs -------------------------------------------------------------------------------------


async def test_a_url_without_driver_gets_the_asyncio_driver(
    backend: Backend, engine: AsyncEngine
) -> None:
    bare = make_url(backend.url).set(drivername=backend.dialect)
    expected = {
        "sqlite": "sqlite+aiosqlite",
        "postgresql": "postgresql+asyncpg",
        "mysql": "mysql+asyncmy",
    }[backend.dialect]
    async with AsyncDBLocker(
        bare.render_as_string(hide_password=False),
        table_name=backend.table_name,
        clean_interval=None,
    ) as locker:
        assert locker.engine.url.drivername == expected
        await locker.create_table()
        won = await locker.lock("bare-url", _tick())
        assert won is not None
    rows = await fetch_rows(engine, backend.table_name)
    assert [r["job_name"] for r in rows] == ["bare-url"]


@pytest.mark.parametrize(
    ("url", "drivername"),
    [
        ("postgresql://postgres@127.0.0.1:5432/test", "postgresql+asyncpg"),
        ("postgres://postgres@127.0.0.1:5432/test", "postgresql+asyncpg"),
        ("mysql://root@127.0.0.1:3306/test", "mysql+asyncmy"),
        ("mariadb://root@127.0.0.1:3306/test", "mariadb+asyncmy"),
        ("sqlite:///{tmp}/locks.db", "sqlite+aiosqlite"),
        ("postgresql+asyncpg://postgres@127.0.0.1:5432/test", "postgresql+asyncpg"),
    ],
)
async def test_url_driver_is_filled_in(url: str, drivername: str, tmp_path: Path) -> None:
    locker = AsyncDBLocker(url.format(tmp=tmp_path), clean_interval=None)
    try:
        assert locker.engine.url.drivername == drivername
    finally:
        await locker.aclose()


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        pytest.param("not a url", "not a database URL", id="garbage"),
        pytest.param("://", "not a database URL", id="scheme-only"),
        pytest.param("nosuchdb://host/db", "nosuchdb", id="unknown-database"),
        pytest.param("postgresql+psycopg2://u@127.0.0.1/db", "asyncio", id="psycopg2"),
        pytest.param("mysql+pymysql://u@127.0.0.1/db", "asyncio", id="pymysql"),
        pytest.param("sqlite+pysqlite:///locks.db", "asyncio", id="pysqlite"),
        pytest.param("sqlite://somehost/locks.db", "sqlite", id="sqlite-with-host"),
    ],
)
def test_unusable_url_raises_value_error(url: str, expected: str) -> None:
    with pytest.raises(ValueError, match="engine") as info:
        AsyncDBLocker(url)
    # A sync driver must be reported as such (installing it would not help).
    assert expected in str(info.value)


async def test_repr_names_the_worker_and_table(backend: Backend, engine: AsyncEngine) -> None:
    locker = AsyncDBLocker(engine, worker="w-1", table_name=backend.table_name, clean_interval=None)
    text_ = repr(locker)
    assert "w-1" in text_
    assert backend.table_name in text_
    await locker.aclose()


async def test_default_worker_names_host_and_process(engine: AsyncEngine) -> None:
    locker = AsyncDBLocker(engine, clean_interval=None)
    assert locker.worker == f"{socket.gethostname()}:{os.getpid()}"[:255]
    await locker.aclose()


async def test_a_url_object_is_accepted(backend: Backend, engine: AsyncEngine) -> None:
    async with AsyncDBLocker(
        make_url(backend.url), table_name=backend.table_name, clean_interval=None
    ) as locker:
        await locker.create_table()
        assert await locker.lock("url-object", _tick()) is not None
    assert [r["job_name"] for r in await fetch_rows(engine, backend.table_name)] == ["url-object"]
