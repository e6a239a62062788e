"""The acquire path: the connections a locker keeps for its INSERTs, as a user sees them.

A locker acquires on connections of a pool of its own, made from the engine's pool,
so pool events on the engine's pool (registered before the locker's first call) see
them too; ``Connections`` records them with their server-side ids, so the tests can
look at the server's sessions: ``pg_stat_activity`` and MariaDB's process list.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import MetaData, bindparam, event, insert, text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import StaticPool

import aiocronlock._acquire
from aiocronlock import AsyncDBLocker, BackendError, TableMissingError, lock_table
from conftest import Backend, LockerFactory, StatementCounter, fetch_rows, watch_log

#: What a locker keeps for acquiring at most: one connection on SQLite (one writer).
_MAX = aiocronlock._acquire.MAX_CONNECTIONS
MOST = {"sqlite": 1, "postgresql": _MAX, "mysql": _MAX}

#: The hint of an error whose connection the server closed.
DROPPED = "the connection was dropped (the server closed it or went away); the next call reconnects"


def _tick(seconds: int = 0) -> datetime:
    return datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=seconds)


async def _until(check: Callable[[], Awaitable[bool]], what: str, within: float = 2.0) -> None:
    """Poll ``check`` until it holds, failing with ``what`` after ``within`` seconds."""
    try:
        async with asyncio.timeout(within):
            while True:
                if await check():
                    return
                await asyncio.sleep(0.02)  # a server's catalog: nothing to wait on
    except TimeoutError:
        pytest.fail(f"not within {within:g} s: {what}")


class Connections:
    """Every connection opened from the engine's pool, or from a pool recreated from it."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.opened: list[Any] = []  # driver connections, oldest first
        self.closed: list[Any] = []
        self._pids: dict[int, int] = {}
        self._pool = engine.sync_engine.pool
        event.listen(self._pool, "connect", self._connect)
        event.listen(self._pool, "close", self._close)

    def _connect(self, dbapi_connection: Any, record: Any) -> None:
        self.opened.append(dbapi_connection.driver_connection)
        if self.engine.dialect.driver == "psycopg":  # it cannot tell once closed
            self._pids[id(dbapi_connection.driver_connection)] = dbapi_connection.info.backend_pid

    def _close(self, dbapi_connection: Any, record: Any) -> None:
        self.closed.append(dbapi_connection.driver_connection)

    def detach(self) -> None:
        event.remove(self._pool, "connect", self._connect)
        event.remove(self._pool, "close", self._close)

    def since(self, start: int) -> list[Any]:
        """The connections opened after the first ``start``."""
        return self.opened[start:]

    def open(self, connections: list[Any]) -> list[Any]:
        """Those of ``connections`` not closed yet (as the pool saw it)."""
        return [c for c in connections if not any(c is gone for gone in self.closed)]

    def server_id(self, connection: Any) -> int:
        """The server's id of a driver connection (PostgreSQL pid, MariaDB thread id)."""
        if self.engine.dialect.driver == "psycopg":
            return self._pids[id(connection)]
        if self.engine.dialect.name == "postgresql":
            return int(connection.get_server_pid())
        return int(connection.thread_id())

    async def on_server(self, connections: list[Any]) -> int:
        """How many of ``connections`` the server still has a session for."""
        if self.engine.dialect.name == "sqlite" or not connections:
            return 0
        ids = [self.server_id(c) for c in connections]
        if self.engine.dialect.name == "postgresql":
            query = "SELECT count(*) FROM pg_stat_activity WHERE pid IN :ids"
        else:
            query = "SELECT count(*) FROM information_schema.processlist WHERE id IN :ids"
        statement = text(query).bindparams(bindparam("ids", expanding=True))
        async with self.engine.connect() as conn:
            return int((await conn.execute(statement, {"ids": ids})).scalar_one())

    async def close_on_server(self, connection: Any) -> None:
        """End one session from the server's side, as an operator or a restart would."""
        server_id = self.server_id(connection)
        async with self.engine.connect() as conn:
            if self.engine.dialect.name == "postgresql":
                await conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": server_id})
            else:
                await conn.exec_driver_sql(f"KILL {server_id}")
        await _until(
            lambda: self._gone(connection), f"the server ended session {server_id}", within=3
        )

    async def _gone(self, connection: Any) -> bool:
        return await self.on_server([connection]) == 0


@pytest.fixture
def connections(engine: AsyncEngine) -> Iterator[Connections]:
    """Connections the test's engine opens, and the lockers sharing it (set up first)."""
    watched = Connections(engine)
    yield watched
    watched.detach()


def _needs_server(backend: Backend) -> None:
    if backend.is_sqlite:
        pytest.skip("SQLite has no server to look at or to end a session")


# -- whose connections ----------------------------------------------------------------------


async def test_the_users_pool_lends_no_connection_to_acquire(
    backend: Backend, engine: AsyncEngine, make_locker: LockerFactory
) -> None:
    locker = await make_locker(worker="a")
    tick = _tick()
    warm = await locker.lock("warm-up", tick)  # the locker's own pool is made now
    assert warm is not None
    checkouts: list[Any] = []

    def checkout(*args: Any) -> None:
        checkouts.append(args)

    pool: Any = engine.sync_engine.pool
    event.listen(pool, "checkout", checkout)
    try:
        won = await locker.lock("job", tick)
        assert won is not None
        assert await locker.lock("job", tick) is None
        if engine.dialect.insert_returning:  # else (MySQL) lock_many goes through the pool
            many = await locker.lock_many(["m1", "m2"], tick)
            assert sorted(many) == ["m1", "m2"]
        assert checkouts == []
        assert pool.checkedout() == 0
        await asyncio.sleep(0.05)  # idle: nothing taken in the background either
        assert checkouts == []
        assert pool.checkedout() == 0
        # The other statements do use the user's pool, and give the connection back.
        await won.unlock()
        assert len(checkouts) == 1
    finally:
        event.remove(pool, "checkout", checkout)
    assert pool.checkedout() == 0


async def test_consecutive_calls_reuse_one_connection(
    backend: Backend, make_locker: LockerFactory, connections: Connections
) -> None:
    locker = await make_locker(worker="a")
    start = len(connections.opened)
    tick = _tick()
    for i in range(3):
        assert await locker.lock(f"job-{i}", tick) is not None
        assert await locker.lock(f"job-{i}", tick) is None
    kept = connections.since(start)
    assert len(kept) == 1
    assert connections.open(kept) == kept
    if not backend.is_sqlite:
        assert await connections.on_server(kept) == 1


async def test_concurrent_calls_open_at_most_the_limit_and_keep_them(
    backend: Backend, make_locker: LockerFactory, connections: Connections
) -> None:
    locker = await make_locker(worker="a")
    start = len(connections.opened)
    most = MOST[backend.dialect]
    tick = _tick()
    for burst in range(2):
        names = [f"burst{burst}-{i}" for i in range(3 * most + 1)]
        results = await asyncio.gather(*(locker.lock(name, tick) for name in names))
        assert all(result is not None for result in results)
        kept = connections.since(start)
        assert 1 <= len(kept) <= most, f"burst {burst} opened {len(kept)} connections"
    # The second burst opened none: the first one's connections are kept, and open.
    assert len(connections.since(start)) == len(kept)
    assert connections.open(kept) == kept
    if not backend.is_sqlite:
        assert await connections.on_server(kept) == len(kept)


async def test_in_memory_sqlite_shares_the_engines_one_connection() -> None:
    """An in-memory database lives in its one connection, which the locker shares with
    the user: the user's own work on the engine, and closing the locker, leave it be."""
    engine = create_async_engine("sqlite+aiosqlite://", poolclass=StaticPool)
    watched = Connections(engine)
    try:
        locker = AsyncDBLocker(engine, worker="a", clean_interval=None)
        await locker.create_table()
        tick = _tick()
        assert await locker.lock("job", tick) is not None
        async with engine.connect() as conn:  # rolled back when closed
            await conn.execute(text("SELECT 1"))
        assert await locker.lock("job", tick) is None, "the tick was won twice"
        await locker.aclose()
        rows = await fetch_rows(engine, "cron_job_locks")
        assert [(r["job_name"], r["worker"]) for r in rows] == [("job", "a")]
        assert len(watched.opened) == 1
        assert watched.closed == []
    finally:
        watched.detach()
        await engine.dispose()


# -- connections that must not be reused ------------------------------------------------------


async def test_a_connection_the_server_ended_is_not_reused(
    backend: Backend, engine: AsyncEngine, make_locker: LockerFactory, connections: Connections
) -> None:
    """PostgreSQL tells asyncpg when it ends a session, and the next call reconnects.

    MariaDB closes the socket of a KILLed session, but asyncmy's ``connected`` stays
    True: the next call may then fail with BackendError (the connection was dropped),
    before anything reached the server (no row), and the call after it reconnects.
    """
    _needs_server(backend)
    locker = await make_locker(worker="a")
    start = len(connections.opened)
    assert await locker.lock("warm-up", _tick()) is not None
    [first] = connections.since(start)

    await connections.close_on_server(first)
    if backend.name == "postgresql":

        async def noticed() -> bool:
            return bool(first.is_closed())

        await _until(noticed, "asyncpg noticed the session ended")

    tick = _tick()
    try:
        lock = await locker.lock("job", tick)
    except BackendError as error:
        if backend.name == "postgresql":
            raise
        assert error.hint == DROPPED
        assert [
            r for r in await fetch_rows(engine, backend.table_name) if r["job_name"] == "job"
        ] == []
        lock = await locker.lock("job", tick)
    assert lock is not None
    [second] = connections.since(start + 1)
    assert connections.open([first, second]) == [second]
    assert await connections.on_server([second]) == 1


async def test_a_connection_idle_too_long_is_replaced_and_closed(
    backend: Backend,
    make_locker: LockerFactory,
    connections: Connections,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(aiocronlock._acquire, "KEEP_IDLE_S", 0.0)
    locker = await make_locker(worker="a")
    start = len(connections.opened)
    tick = _tick()
    for i in range(4):
        assert await locker.lock(f"job-{i}", tick) is not None
    opened = connections.since(start)
    assert len(opened) == 4, "each call should have replaced the idle connection"

    async def only_the_last_is_open() -> bool:
        return connections.open(opened) == opened[-1:]

    await _until(only_the_last_is_open, "the replaced connections were closed")
    if not backend.is_sqlite:

        async def one_session() -> bool:
            return await connections.on_server(opened) == 1

        await _until(one_session, "the server has one session of the locker's left")


async def test_a_refused_statement_keeps_its_connection(
    backend: Backend, engine: AsyncEngine, make_locker: LockerFactory, connections: Connections
) -> None:
    locker = await make_locker(worker="a")
    start = len(connections.opened)
    tick = _tick()
    assert await locker.lock("warm-up", tick) is not None
    [kept] = connections.since(start)
    async with engine.begin() as conn:
        await conn.exec_driver_sql(f"DROP TABLE {backend.table_name}")

    with pytest.raises(TableMissingError) as info:
        await locker.lock("job", tick)
    assert info.value.operation.startswith("lock('job') on ")
    with pytest.raises(BackendError):
        await locker.lock_many(["a", "b"], tick)

    await locker.create_table()
    assert await locker.lock("job", tick) is not None
    assert connections.since(start) == [kept], "the server's refusal left it usable"
    assert connections.open([kept]) == [kept]


# -- what reaches the database -------------------------------------------------------------


async def test_a_tick_is_one_statement_won_or_lost(
    make_locker: LockerFactory, count_statements: StatementCounter
) -> None:
    locker = await make_locker(worker="a")
    tick = _tick()
    assert await locker.lock("warm-up", tick) is not None
    count_statements.statements.clear()
    assert await locker.lock("job", tick) is not None
    assert await locker.lock("job", tick) is None
    sent = count_statements.statements
    assert len(sent) == 2, sent
    assert all(s.lstrip().upper().startswith("INSERT") for s in sent), sent


async def test_lock_many_is_one_statement_per_500_jobs(
    backend: Backend,
    engine: AsyncEngine,
    make_locker: LockerFactory,
    count_statements: StatementCounter,
) -> None:
    locker = await make_locker(worker="a")
    if not engine.dialect.insert_returning:
        pytest.skip("MySQL cannot say which rows of a multi-row INSERT went in")
    names = [f"job-{i:04d}" for i in range(1200)]
    tick = _tick()
    count_statements.statements.clear()
    won = await locker.lock_many(names, tick)
    assert sorted(won) == names
    assert len(count_statements) == 3, count_statements.statements[:5]

    count_statements.statements.clear()
    assert await locker.lock_many(names, tick) == {}
    assert len(count_statements) == 3
    rows = await fetch_rows(engine, backend.table_name)
    assert sorted((r["job_name"], r["id"]) for r in rows) == sorted(
        (name, lock.id) for name, lock in won.items()
    )


async def _session_counter(connection: Any, name: str) -> int:
    """A MariaDB session status counter, read on a driver connection while it is idle."""
    async with connection.cursor() as cursor:
        await cursor.execute(f"SHOW SESSION STATUS LIKE '{name}'")
        return int((await cursor.fetchone())[1])


async def test_mysql_acquires_with_one_prepared_statement_per_connection(
    backend: Backend, make_locker: LockerFactory, connections: Connections
) -> None:
    if backend.name != "mysql":
        pytest.skip("server-side prepared statements are the MySQL acquire's")
    locker = await make_locker(worker="a")
    start = len(connections.opened)
    tick = _tick()
    names = [f"burst-{i}" for i in range(3 * MOST["mysql"])]
    assert all(await asyncio.gather(*(locker.lock(name, tick) for name in names)))
    for name in names[:3]:
        assert await locker.lock(name, tick) is None
    kept = connections.since(start)
    assert kept

    prepared = [await _session_counter(c, "Com_stmt_prepare") for c in kept]
    executed = [await _session_counter(c, "Com_stmt_execute") for c in kept]
    assert prepared == [1] * len(kept)
    assert sum(executed) == len(names) + 3


# -- cancelling and closing ---------------------------------------------------------------------


async def _waiting_on_a_lock(engine: AsyncEngine, server_id: int) -> bool:
    """Whether the server session ``server_id`` is running a statement that waits for a
    lock. (MariaDB's innodb_trx is a cache that frequent reads keep stale: there, the
    process list says the INSERT is under way, which with the row locked is waiting.)"""
    async with engine.connect() as conn:
        if engine.dialect.name == "postgresql":
            query = "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = :id"
        else:
            query = "SELECT info LIKE 'INSERT%' FROM information_schema.processlist WHERE id = :id"
        return bool((await conn.execute(text(query), {"id": server_id})).scalar())


@pytest.mark.parametrize("blocker_ends", ["rollback", "commit"])
async def test_lock_cancelled_while_its_insert_waits(
    backend: Backend,
    engine: AsyncEngine,
    make_locker: LockerFactory,
    connections: Connections,
    caplog: pytest.LogCaptureFixture,
    blocker_ends: str,
) -> None:
    """Another session inserts the same tick in an open transaction, so the locker's
    INSERT waits on the unique key; the caller is cancelled meanwhile. Whatever the
    other session then does, the locker never leaves a RUNNING row of its own."""
    locker = await make_locker(worker="a")
    start = len(connections.opened)
    assert await locker.lock("warm-up", _tick()) is not None
    [kept] = connections.since(start)
    job, tick = "job", _tick()
    locks = lock_table(MetaData(), name=backend.table_name)
    now = datetime.now(UTC).replace(tzinfo=None)
    blocker_engine = backend.engine()
    caplog.set_level(logging.DEBUG, logger="aiocronlock.sql")
    try:
        async with blocker_engine.connect() as blocker:
            await blocker.begin()
            await blocker.execute(
                insert(locks).values(
                    job_name=job,
                    job_identifier=locker.identifier(job, tick),
                    worker="blocker",
                    status="RUNNING",
                    created_at=now,
                    updated_at=now,
                )
            )
            with watch_log("aiocronlock.sql", logging.DEBUG) as sent:
                task = asyncio.create_task(locker.lock(job, tick))
                async with asyncio.timeout(2):
                    await sent.wait_for(1)
            if not backend.is_sqlite:
                server_id = connections.server_id(kept)
                await _until(lambda: _waiting_on_a_lock(engine, server_id), "the INSERT waits")
            assert engine.pool.checkedout() == 0, "the user's pool lent a connection"  # type: ignore[attr-defined]
            task.cancel()
            await asyncio.sleep(0)  # the call takes its cancellation, the INSERT still waits
            assert not task.done()
            if blocker_ends == "rollback":
                await blocker.rollback()
            else:
                await blocker.commit()
        with pytest.raises(asyncio.CancelledError):
            async with asyncio.timeout(3):
                await task
    finally:
        await blocker_engine.dispose()

    rows = [r for r in await fetch_rows(engine, backend.table_name) if r["job_name"] == job]
    if blocker_ends == "rollback":  # the locker's INSERT went in after all
        assert [(r["worker"], r["status"]) for r in rows] == [("a", "FAILED")]
    else:  # the locker lost the tick
        assert [(r["worker"], r["status"]) for r in rows] == [("blocker", "RUNNING")]
    assert await locker.lock(job, _tick(1)) is not None


async def test_aclose_leaves_no_task_and_no_connection(
    backend: Backend, engine: AsyncEngine, make_locker: LockerFactory, connections: Connections
) -> None:
    tasks = asyncio.all_tasks()
    locker = await make_locker(worker="a")
    start = len(connections.opened)
    tick = _tick()
    assert all(await asyncio.gather(*(locker.lock(f"job-{i}", tick) for i in range(8))))
    assert await locker.lock_many(["m1", "m2"], tick)
    kept = connections.since(start)
    assert kept

    await locker.aclose()

    left = [t.get_name() for t in asyncio.all_tasks() - tasks if not t.done()]
    assert left == []
    assert not [t for t in asyncio.all_tasks() if t.get_name() == "aiocronlock acquire"]
    assert connections.open(kept) == []
    if not backend.is_sqlite:

        async def no_session() -> bool:
            return await connections.on_server(kept) == 0

        await _until(no_session, "the server has no session of the locker's left")
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
