"""Behind PgBouncer in transaction mode: every supported way to connect, no errors.

Each transaction may get another server connection, so a prepared statement made
on one is missing on the next ("prepared statement ... does not exist"). The server
is found through ``AIOCRONLOCK_TEST_PGBOUNCER_URL`` (``.ci/run`` starts one; default:
the port ``docker compose up`` publishes); the tests skip when it is not running,
except under ``CI=true``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import MetaData, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from aiocronlock import AsyncDBLocker, lock_table
from conftest import IN_CI, _drop_table, _reachable, server_url

PGBOUNCER_URL = os.environ.get(
    "AIOCRONLOCK_TEST_PGBOUNCER_URL", "postgresql://postgres@127.0.0.1:6432/test"
)
#: Enough calls that, on a locker still using named prepared statements, many fail.
TICKS = 200
WORKERS = 3
JOBS = 2
#: A short lease, renewed every third of it, for the exclusive test.
LEASE = timedelta(seconds=0.9)


def _driver(driver: str) -> URL:
    return make_url(PGBOUNCER_URL).set(drivername=f"postgresql+{driver}")


#: Each way to connect: a locker's argument (a URL, or a user's engine made from one).
WAYS: dict[str, Callable[[], URL | str | AsyncEngine]] = {
    "asyncpg url": lambda: (
        make_url(PGBOUNCER_URL).set(drivername="postgresql").render_as_string(hide_password=False)
    ),
    "psycopg url": lambda: _driver("psycopg"),
    # As SQLAlchemy documents for PgBouncer: no statement caches, or no pool at all.
    "asyncpg engine": lambda: create_async_engine(
        _driver("asyncpg"),
        connect_args={"statement_cache_size": 0, "prepared_statement_cache_size": 0},
    ),
    "asyncpg engine, NullPool": lambda: create_async_engine(
        _driver("asyncpg"),
        poolclass=NullPool,
        connect_args={"statement_cache_size": 0, "prepared_statement_cache_size": 0},
    ),
    "psycopg engine": lambda: create_async_engine(
        _driver("psycopg"), connect_args={"prepare_threshold": None}
    ),
}


@pytest.fixture(scope="module")
def pgbouncer_url() -> str:
    if not _reachable(PGBOUNCER_URL):
        where = make_url(PGBOUNCER_URL).render_as_string(hide_password=True)
        message = f"PgBouncer not reachable at {where} (.ci/run starts one)"
        if IN_CI:
            pytest.fail(f"{message} (CI=true: a missing server is a failure)")
        pytest.skip(message)
    return PGBOUNCER_URL


@pytest.fixture
async def lockers(
    request: pytest.FixtureRequest, pgbouncer_url: str
) -> AsyncIterator[list[AsyncDBLocker]]:
    """``WORKERS`` lockers on one new table, each connected the way the test names."""
    table = f"t_{uuid.uuid4().hex[:12]}"
    make = WAYS[request.param]
    targets = [make() for _ in range(WORKERS)]
    lockers = [
        AsyncDBLocker(target, worker=f"w{i}", table_name=table, clean_interval=None)
        for i, target in enumerate(targets)
    ]
    print(f"\n{request.param}: ", end="")  # what the test prints next (-s or -rA)
    try:
        yield lockers
    finally:
        for locker in lockers:
            await locker.aclose()
        for target in targets:
            if isinstance(target, AsyncEngine):
                checked_out = getattr(target.pool, "checkedout", lambda: 0)()  # not NullPool
                assert checked_out == 0, "connection leaked"
                await target.dispose()
        await _drop(table)


async def _drop(table: str) -> None:
    metadata = MetaData()
    lock_table(metadata, name=table)
    engine = WAYS["asyncpg engine, NullPool"]()
    assert isinstance(engine, AsyncEngine)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(lambda sync: metadata.drop_all(sync, checkfirst=True))
    finally:
        await engine.dispose()


async def exercise(lockers: list[AsyncDBLocker]) -> dict[str, Any]:
    """Race the lockers for ``TICKS`` ticks of each kind of call; count what happened."""
    errors: list[BaseException] = []
    runs: dict[str, int] = {}
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=30)

    def outcome(results: Sequence[Any]) -> list[Any]:
        errors.extend(r for r in results if isinstance(r, BaseException))
        return [r for r in results if not isinstance(r, BaseException)]

    outcome(await asyncio.gather(*(lk.create_table() for lk in lockers), return_exceptions=True))

    async def run(lock: Any, key: str) -> None:
        try:
            async with lock:  # unlock() on the way out
                runs[key] = runs.get(key, 0) + 1
        except Exception as error:
            errors.append(error)

    async def one_tick(n: int) -> None:
        tick = start + timedelta(seconds=n)
        kind = n % 4
        if kind == 0:  # lock_many()
            names = [f"many-{j}" for j in range(JOBS)]
            calls = [lk.lock_many(names, tick) for lk in lockers]
            for won in outcome(await asyncio.gather(*calls, return_exceptions=True)):
                for name, lock in won.items():
                    await run(lock, f"{name}@{n}")
        else:  # lock(), exclusive every other time
            exclusive = kind == 2
            attempts = [
                lk.lock(f"job-{j}", tick, exclusive=exclusive)
                for lk in lockers
                for j in range(JOBS)
            ]
            won_locks = outcome(await asyncio.gather(*attempts, return_exceptions=True))
            finished = [run(lock, f"{lock.job_name}@{n}") for lock in won_locks if lock is not None]
            outcome(await asyncio.gather(*finished, return_exceptions=True))
        if n % 10 == 0:
            outcome(
                await asyncio.gather(
                    *(lk.history(limit=5) for lk in lockers), return_exceptions=True
                )
            )

    # A few ticks at once, so that the pooler hands server connections around.
    for first in range(0, TICKS, 4):
        await asyncio.gather(*(one_tick(n) for n in range(first, min(first + 4, TICKS))))
    history = outcome(
        await asyncio.gather(lockers[0].history(limit=10_000), return_exceptions=True)
    )
    return {"errors": errors, "runs": runs, "rows": len(history[0]) if history else None}


@pytest.mark.parametrize("lockers", list(WAYS), indirect=True)
async def test_every_call_works_through_pgbouncer(lockers: list[AsyncDBLocker]) -> None:
    result = await exercise(lockers)

    print(f"{len(result['errors'])} errors in {TICKS} ticks x {JOBS} jobs x {WORKERS} workers")
    assert [repr(e) for e in result["errors"][:3]] == [], f"{len(result['errors'])} errors"
    runs = result["runs"]
    assert set(runs.values()) == {1}, "a tick ran twice"
    # Every tick of every job ran once: lock_many() on a quarter, lock() on the rest.
    assert len(runs) == TICKS * JOBS
    assert result["rows"] == TICKS * JOBS


@pytest.mark.parametrize("lockers", list(WAYS), indirect=True)
async def test_an_exclusive_lease_is_renewed_through_pgbouncer(
    lockers: list[AsyncDBLocker],
) -> None:
    """Held for over three leases, an exclusive lock keeps its lease (renewed every
    third of it, each renewal maybe on another server connection): a rival never
    takes the job meanwhile, and takes it once the lock is released."""
    holder, rival = lockers[0], lockers[1]
    await holder.create_table()
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=30)
    lock = await holder.lock("exclusive", start, exclusive=True, lease=LEASE)
    assert lock is not None
    async with lock:
        for n in range(1, 9):
            await asyncio.sleep(LEASE.total_seconds() / 2)
            tick = start + timedelta(seconds=n)
            assert await rival.lock("exclusive", tick, exclusive=True, lease=LEASE) is None, n
        assert not lock.lost
    after = await rival.lock("exclusive", start + timedelta(seconds=10), exclusive=True)
    assert after is not None
    await after.unlock()
    print(f"lease {LEASE.total_seconds():g} s kept for {8 * LEASE.total_seconds() / 2:g} s")


async def test_a_direct_connection_keeps_the_acquire_statement_prepared(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Without a pooler, lock() stays on its fast path: the acquire INSERT prepared
    once, by name, on the connection kept for it (and no switch to unnamed ones)."""
    caplog.set_level(logging.INFO, logger="aiocronlock")
    url, table = server_url("postgresql"), f"t_{uuid.uuid4().hex[:12]}"
    locker = AsyncDBLocker(url, table_name=table, clean_interval=None)
    opened: list[Any] = []
    event.listen(locker.engine.sync_engine, "connect", lambda dbapi, _record: opened.append(dbapi))
    try:
        await locker.create_table()
        tick = datetime.now(UTC).replace(microsecond=0)
        for n in range(20):  # won, then lost
            assert (await locker.lock(f"job-{n}", tick)) is not None
            assert await locker.lock(f"job-{n}", tick) is None
        prepared = [
            await dbapi.driver_connection.fetchval(
                "SELECT count(*) FROM pg_prepared_statements WHERE name LIKE 'aiocronlock_%'"
            )
            for dbapi in opened
            if not dbapi.driver_connection.is_closed()
        ]
        assert 1 in prepared, prepared
        assert "unnamed statements" not in caplog.text
    finally:
        await locker.aclose()
        await _drop_table(url, table)
