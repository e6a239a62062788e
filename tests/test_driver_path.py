"""A locker built from a URL sends the acquire INSERT straight through the driver.

SQLAlchemy's event listeners do not see that statement, so these tests count what
reaches the database at the driver (PostgreSQL, SQLite) or at the server (MariaDB).
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import sys
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import MetaData, event
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from aiocronlock import AsyncDBLocker, BackendError, _driver, lock_table
from conftest import Backend, fetch_rows, server_url


@pytest.fixture
async def url_locker(backend: Backend) -> AsyncIterator[AsyncDBLocker]:
    locker = AsyncDBLocker(backend.url, worker="w", table_name=backend.table_name)
    await locker.create_table()
    assert locker._driver_acquire is not None, "a URL-built locker takes the driver path"
    try:
        yield locker
    finally:
        await locker.aclose()


def _kept(locker: AsyncDBLocker) -> list[Any]:
    """The connections the driver path keeps checked out between calls."""
    assert locker._driver_acquire is not None
    return [pooled for pooled, _, _ in locker._driver_acquire._idle]


async def _session_status(driver: Any, name: str = "Questions") -> int:
    """A MySQL/MariaDB session counter of an asyncmy connection."""
    async with driver.cursor() as cursor:
        await cursor.execute(f"SHOW SESSION STATUS LIKE '{name}'")
        return int((await cursor.fetchone())[1])


async def _statements_sent(locker: AsyncDBLocker, backend: Backend, calls: int) -> list[str]:
    """Run ``calls`` lock() calls one after another; what reached the database."""
    tick = datetime.now(UTC).replace(microsecond=0)
    assert await locker.lock("warm-up", tick) is not None  # opens the one connection used
    [pooled] = _kept(locker)
    driver: Any = pooled.driver_connection
    sent: list[str] = []
    if backend.name == "postgresql":
        driver.add_query_logger(lambda record: sent.append(record.query))
    elif backend.name == "sqlite":
        await driver.set_trace_callback(sent.append)
    else:
        before = await _session_status(driver)
    for _ in range(calls):
        await locker.lock("job", tick)  # the first wins, the others lose
    await asyncio.sleep(0)  # asyncpg hands a query to its loggers one turn later
    assert _kept(locker) == [pooled], "sequential calls reuse the one kept connection"
    if backend.name == "mysql":
        # Questions counts the SHOW itself too.
        return ["INSERT"] * (await _session_status(driver) - before - 1)
    return sent


async def test_won_and_lost_ticks_are_one_statement_each(
    backend: Backend, url_locker: AsyncDBLocker
) -> None:
    sent = await _statements_sent(url_locker, backend, calls=3)
    assert len(sent) == 3, sent
    assert all(statement.lstrip().upper().startswith("INSERT") for statement in sent), sent
    assert not any(
        "BEGIN" in statement.upper() or "COMMIT" in statement.upper() for statement in sent
    )


async def test_driver_path_rows_match_the_sqlalchemy_path(
    backend: Backend, engine: AsyncEngine, url_locker: AsyncDBLocker
) -> None:
    tick = datetime.now(UTC).replace(microsecond=0)
    name = "ünïcödé 'job'; --"
    won = await url_locker.lock(name, tick)
    assert won is not None
    async with won:
        pass
    assert await url_locker.lock(name, tick) is None
    rows = await fetch_rows(engine, backend.table_name)
    assert [(r["id"], r["job_name"], r["worker"], r["status"]) for r in rows] == [
        (won.id, name, "w", "FINISHED")
    ]


async def test_kept_connections_go_back_to_the_pool(
    backend: Backend, url_locker: AsyncDBLocker, monkeypatch: pytest.MonkeyPatch
) -> None:
    pool: Any = url_locker.engine.sync_engine.pool
    tick = datetime.now(UTC).replace(microsecond=0)
    assert await url_locker.lock("a", tick) is not None
    [first] = _kept(url_locker)
    assert pool.checkedout() == 1

    # Idle too long: handed back to the pool (which recycles it as it sees fit), not used.
    monkeypatch.setattr(_driver, "KEEP_IDLE_S", 0.0)
    assert await url_locker.lock("b", tick) is not None
    monkeypatch.undo()
    [second] = _kept(url_locker)
    assert second is not first
    assert pool.checkedout() == 1

    # Concurrent calls keep at most the pool's size.
    names = [f"c{i}" for i in range(pool.size() * 2)]
    results = await asyncio.gather(*(url_locker.lock(name, tick) for name in names))
    assert all(result is not None for result in results)
    assert 1 <= len(_kept(url_locker)) <= pool.size()
    assert pool.checkedout() == len(_kept(url_locker))

    await url_locker.aclose()
    assert _kept(url_locker) == []
    assert pool.checkedout() == 0


async def test_concurrent_calls_share_one_connection_on_sqlite_only(
    backend: Backend, url_locker: AsyncDBLocker
) -> None:
    """SQLite runs one writer at a time, so its calls share the kept connection, whose
    thread runs them back to back; on a server each call has a connection of its own."""
    driver_acquire = url_locker._driver_acquire
    assert driver_acquire is not None
    assert driver_acquire.shares is backend.is_sqlite
    pool: Any = url_locker.engine.sync_engine.pool
    tick = datetime.now(UTC).replace(microsecond=0)
    assert await url_locker.lock("warm-up", tick) is not None
    [first] = _kept(url_locker)
    sent: list[str] = []
    if backend.is_sqlite:
        await first.driver_connection.set_trace_callback(sent.append)

    names = [f"c{i}" for i in range(12)]
    results = await asyncio.gather(*(url_locker.lock(name, tick) for name in names))

    assert all(result is not None for result in results)
    if backend.is_sqlite:
        assert _kept(url_locker) == [first]
        assert pool.checkedout() == 1
        inserts = [s for s in sent if s.lstrip().upper().startswith("INSERT")]
        assert len(inserts) == len(names), sent
    else:
        assert 1 <= len(_kept(url_locker)) <= pool.size()


async def test_a_burst_opens_one_connection_on_sqlite_even_cold_or_after_idle(
    backend: Backend, url_locker: AsyncDBLocker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On SQLite one call opens the shared connection and the others wait for it, so a
    burst never spreads over several connections (which would wait on each other in
    SQLite's busy handler); on a server each call may open its own."""
    driver_acquire = url_locker._driver_acquire
    assert driver_acquire is not None
    pool: Any = url_locker.engine.sync_engine.pool
    tick = datetime.now(UTC).replace(microsecond=0)

    checkouts = 0

    def count(*args: Any) -> None:
        nonlocal checkouts
        checkouts += 1

    event.listen(pool, "checkout", count)

    async def burst(prefix: str) -> int:
        """How many connections the burst took from the pool."""
        before = checkouts
        names = [f"{prefix}{i}" for i in range(12)]
        results = await asyncio.gather(*(url_locker.lock(name, tick) for name in names))
        assert all(result is not None for result in results)
        if driver_acquire._returning:
            await asyncio.wait(set(driver_acquire._returning))
        return checkouts - before

    try:
        taken = await burst("cold")  # no connection kept yet
        if backend.is_sqlite:
            assert taken == 1
            [first] = _kept(url_locker)
            assert pool.checkedout() == 1
        else:
            assert 1 <= len(_kept(url_locker)) <= pool.size()

        monkeypatch.setattr(_driver, "KEEP_IDLE_S", 0.0)  # every kept connection is stale
        taken = await burst("stale")
        if backend.is_sqlite:
            assert taken == 1
            [second] = _kept(url_locker)
            assert second is not first
            assert pool.checkedout() == 1
    finally:
        event.remove(pool, "checkout", count)


async def test_sqlite_calls_that_time_out_queued_send_nothing_past_the_window(
    tmp_path: Path,
) -> None:
    """A request handed to aiosqlite's thread runs even after its caller gave up, so
    only a window of them is handed over at a time: calls that time out while waiting
    their turn leave no row behind."""
    path = tmp_path / "locks.db"
    locker = AsyncDBLocker(f"sqlite+aiosqlite:///{path}", worker="w", timeout=0.3)
    await locker.create_table()
    tick = datetime.now(UTC).replace(microsecond=0)
    try:
        assert await locker.lock("warm-up", tick) is not None
        [shared] = _kept(locker)
        blocker = sqlite3.connect(path, isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")  # another process writing, for longer than 0.3 s
        try:
            results = await asyncio.gather(
                *(locker.lock(f"queued-{i}", tick) for i in range(8)), return_exceptions=True
            )
        finally:
            blocker.execute("COMMIT")
            blocker.close()
        assert all(isinstance(result, BackendError) for result in results), results
        # What was handed over runs now; a request on the same connection runs after it.
        await shared.driver_connection.execute_fetchall("SELECT 1")
        assert _kept(locker) == [shared], "a timeout leaves the shared connection in use"
        rows = await shared.driver_connection.execute_fetchall(
            "SELECT count(*) FROM cron_job_locks WHERE job_name LIKE 'queued-%'"
        )
        assert 1 <= rows[0][0] <= _driver.SQLITE_WINDOW
    finally:
        await locker.aclose()


async def test_a_failed_call_releases_every_kept_connection(
    backend: Backend, url_locker: AsyncDBLocker
) -> None:
    pool: Any = url_locker.engine.sync_engine.pool
    tick = datetime.now(UTC).replace(microsecond=0)
    await asyncio.gather(*(url_locker.lock(f"j{i}", tick) for i in range(4)))
    assert len(_kept(url_locker)) >= 1
    driver_acquire = url_locker._driver_acquire
    assert driver_acquire is not None
    good_sql = driver_acquire.sql
    driver_acquire.sql = "INSERT INTO no_such_table_here VALUES (1)"
    try:
        with pytest.raises(BackendError):
            await url_locker.lock("broken", tick)
    finally:
        driver_acquire.sql = good_sql
    assert _kept(url_locker) == []
    # They go back in tasks of their own, the failed call does not wait for them.
    if driver_acquire._returning:
        await asyncio.wait(set(driver_acquire._returning))
    assert pool.checkedout() == 0
    # The pool reconnects as needed: the next call works.
    assert await url_locker.lock("after", tick) is not None


async def test_lock_many_through_the_driver_in_chunks(
    backend: Backend,
    engine: AsyncEngine,
    url_locker: AsyncDBLocker,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """More jobs than one statement takes: several multi-row INSERTs, same outcome."""
    other = AsyncDBLocker(backend.url, worker="other", table_name=backend.table_name)
    tick = datetime.now(UTC).replace(microsecond=0)
    names = [f"job-{n:04d}" for n in range(_driver.MANY_CHUNK * 2 + 201)]
    try:
        assert await url_locker.lock_many(names[:3], tick)  # opens the connection
        driver_acquire = url_locker._driver_acquire
        assert driver_acquire is not None and driver_acquire.decides_many
        taken = await other.lock_many(names[::7], tick)
        with caplog.at_level(logging.DEBUG):
            won = await url_locker.lock_many(names, tick)
    finally:
        await other.aclose()

    expected = set(names[3:]) - set(taken)
    assert set(won) == expected
    assert sorted(driver_acquire._many) == [3, 201, _driver.MANY_CHUNK]
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    rows = await fetch_rows(engine, backend.table_name)
    by_name = {row["job_name"]: row for row in rows}
    assert len(rows) == len(names)
    assert {name: by_name[name]["id"] for name in won} == {n: lock.id for n, lock in won.items()}
    assert {by_name[name]["worker"] for name in won} == {"w"}
    assert {by_name[name]["worker"] for name in taken} == {"other"}


async def test_lock_many_compiles_each_size_once_and_keeps_a_few(url_locker: AsyncDBLocker) -> None:
    tick = datetime.now(UTC).replace(microsecond=0)
    driver_acquire = url_locker._driver_acquire
    assert driver_acquire is not None
    for size in range(1, _driver._MANY_CACHED + 3):
        assert len(await url_locker.lock_many([f"s{size}-{i}" for i in range(size)], tick)) == size
    assert len(driver_acquire._many) == _driver._MANY_CACHED
    assert list(driver_acquire._many) == list(range(3, _driver._MANY_CACHED + 3))


async def test_lock_many_failing_part_way_marks_the_rows_it_won_failed(
    backend: Backend,
    engine: AsyncEngine,
    url_locker: AsyncDBLocker,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The first statement wins its rows, the second fails: nobody will run the first's."""
    tick = datetime.now(UTC).replace(microsecond=0)
    assert await url_locker.lock_many(["warm-up"], tick)
    real_send = _driver.DriverAcquire._send
    sent = 0

    async def second_fails(self: Any, sql: str, arguments: list[Any], *, rows: bool) -> Any:
        nonlocal sent
        if rows:
            sent += 1
            if sent == 2:
                raise OSError("connection reset by peer")
        return await real_send(self, sql, arguments, rows=rows)

    monkeypatch.setattr(_driver.DriverAcquire, "_send", second_fails)
    names = [f"job-{n:04d}" for n in range(_driver.MANY_CHUNK + 3)]
    with pytest.raises(BackendError) as info:
        await url_locker.lock_many(names, tick)
    assert info.value.operation.startswith(f"lock_many({len(names)} jobs) on ")

    rows = await fetch_rows(engine, backend.table_name)
    statuses = {row["job_name"]: row["status"] for row in rows if row["job_name"] != "warm-up"}
    assert statuses == dict.fromkeys(names[: _driver.MANY_CHUNK], "FAILED")


async def test_lock_many_refuses_job_names_it_did_not_send(
    url_locker: AsyncDBLocker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a lock table with a narrower job_name column would do under INSERT IGNORE."""
    tick = datetime.now(UTC).replace(microsecond=0)
    real_many = _driver.DriverAcquire.many

    async def truncating(self: Any, names: Any, identifiers: Any, worker: str, won: Any) -> None:
        await real_many(self, names, identifiers, worker, won)
        won["job-"] = won.pop("job-long-name")

    monkeypatch.setattr(_driver.DriverAcquire, "many", truncating)
    with pytest.raises(BackendError, match="returned job names that were not sent") as info:
        await url_locker.lock_many(["job-long-name", "other"], tick)
    assert info.value.operation.startswith("lock_many(2 jobs) on ")
    assert info.value.hint is not None and "create_table()" in info.value.hint
    history = {run.job_name: run.status for run in await url_locker.history()}
    assert history == {"job-long-name": "FAILED", "other": "FAILED"}


async def test_an_attempt_whose_error_reached_the_caller_is_abandoned_quietly(
    url_locker: AsyncDBLocker, caplog: pytest.LogCaptureFixture
) -> None:
    """Cancelled after the INSERT failed: nothing was won, and nothing is unknown."""

    async def handed_over() -> None:
        return None  # what _settle returns once it gave the error to the caller

    attempt: Any = asyncio.ensure_future(handed_over())
    with caplog.at_level(logging.INFO, logger="aiocronlock"):
        await url_locker._abandon(attempt, "job", "ident", exclusive=False)
        await url_locker._abandon_many(asyncio.ensure_future(handed_over()), {"job": "ident"})
    assert [r.getMessage() for r in caplog.records] == []


def test_an_acquire_runs_in_its_own_task_where_the_driver_would_cancel_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """From Python 3.12, asyncmy's read and write timeouts cancel the task they run
    in, which an acquire in its caller's task would take for its caller's cancel."""
    urls = {
        "mysql+asyncmy://root@127.0.0.1:3306/test?read_timeout=5": (True, False),
        "mysql+asyncmy://root@127.0.0.1:3306/test?write_timeout=5": (True, False),
        "mysql+asyncmy://root@127.0.0.1:3306/test": (True, True),
        "postgresql+asyncpg://postgres@127.0.0.1:5432/test?command_timeout=5": (True, True),
    }
    for version, index in (((3, 11, 7), 0), ((3, 12, 0), 1)):
        monkeypatch.setattr(sys, "version_info", version)
        for url, expected in urls.items():
            locker = AsyncDBLocker(url, clean_interval=None)  # connects to nothing yet
            assert locker._driver_acquire is not None
            assert locker._driver_acquire.runs_inline is expected[index], (version, url)


async def _server_prepares(locker: AsyncDBLocker) -> int:
    """Statements prepared on the server so far, by any session."""
    async with locker.engine.connect() as conn:
        row: Any = (await conn.exec_driver_sql("SHOW GLOBAL STATUS LIKE 'Com_stmt_prepare'")).one()
        return int(row[1])


@pytest.mark.parametrize("query", [{}, {"stmt_cache_size": "0"}], ids=["default", "url-says-none"])
async def test_mysql_acquires_are_one_prepared_statement_unless_the_url_says_not(
    query: dict[str, str],
) -> None:
    # The acquire alone is prepared, once per connection: the other statements (an
    # exclusive lock's, unlock's, history()'s) go as text, as asyncmy sends them.
    url = make_url(server_url("mysql")).update_query_dict(query)
    locker = AsyncDBLocker(url, worker="w", table_name=f"t_{uuid.uuid4().hex[:12]}")
    try:
        await locker.create_table()
        tick = datetime.now(UTC).replace(microsecond=0)
        assert await locker.lock("warm-up", tick) is not None  # prepares, where it does
        [pooled] = _kept(locker)
        driver: Any = pooled.driver_connection
        prepares = await _session_status(driver, "Com_stmt_prepare")
        before = await _session_status(driver, "Com_stmt_execute")
        won = await locker.lock("job", tick)
        assert won is not None
        assert await locker.lock("job", tick) is None
        await won.unlock()
        executed = await _session_status(driver, "Com_stmt_execute") - before
        assert executed == (0 if query else 2)
        assert await _session_status(driver, "Com_stmt_prepare") == prepares
        global_prepares = await _server_prepares(locker)
        exclusive = await locker.lock("other", tick, exclusive=True)
        assert exclusive is not None
        await exclusive.unlock()
        assert [row.status for row in await locker.history("job")] == ["FINISHED"]
        assert await _server_prepares(locker) == global_prepares
    finally:
        tables = MetaData()
        lock_table(tables, name=locker.table.name)  # and its leases table
        async with locker.engine.begin() as conn:
            await conn.run_sync(lambda sync: tables.drop_all(sync, checkfirst=True))
        await locker.aclose()
