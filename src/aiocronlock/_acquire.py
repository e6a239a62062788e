"""Acquiring: the INSERT that decides a tick, sent straight through the driver.

SQLAlchemy's execution layer costs more CPU than the round trip itself on a fast
local database, so the acquire statements are compiled once and sent through the
driver, on connections kept for them. Those connections come from a pool of the
locker's own, made with :meth:`Pool.recreate` from the engine's pool (same URL,
connect arguments and ``connect`` events), so a user's pool never lends one. An
in-memory SQLite database has one connection, which is shared instead.

A call runs in its caller's task, bounded by ``asyncio.timeout`` (asyncpg's own
statement timeout on PostgreSQL): no task, queue or shield per call, as those cost
as much as a lost race's whole round trip on a local PostgreSQL. A caller cancelled
mid-statement cannot learn whether its row went in; the locker then records the tick
FAILED with one upsert (``Statements.abandon``), which works whether the INSERT
landed, is still on its way, or never left.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any

from sqlalchemy import Insert
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import Pool, PoolProxiedConnection, SingletonThreadPool, StaticPool
from sqlalchemy.util import greenlet_spawn

from ._engine import lost_connection
from ._loop import OneLoop
from ._sql import Statements, mysql_duplicates_quiet

#: The statements the fast path sends, at DEBUG level (SQLAlchemy's echo and cursor
#: events do not see them).
sql_logger = logging.getLogger("aiocronlock.sql")
logger = logging.getLogger("aiocronlock")

#: A kept connection idle longer than this is replaced before its next use: servers and
#: proxies close idle connections (MySQL's wait_timeout), and a dead one costs a tick.
KEEP_IDLE_S = 60.0

#: Connections kept for acquiring: enough for a burst of jobs whose ticks fall
#: together; SQLite has one writer at a time, so one there.
MAX_CONNECTIONS = 4

#: Jobs per multi-row INSERT of lock_many(): far below every driver's parameter limit.
MANY_CHUNK = 500

_INPUTS = ("job_name", "job_identifier", "worker")


class _Compiled:
    """A statement compiled for the engine's dialect, and where each call's values go."""

    __slots__ = ("slots", "sql", "template")

    def __init__(self, engine: AsyncEngine, statement: Insert, inputs: dict[str, int]) -> None:
        compiled = statement.compile(dialect=engine.dialect)
        self.sql = str(compiled)
        params = dict(compiled.params)
        order = compiled.positiontup
        # The parameters with their fixed values, and (name or position, index in the
        # call's values) for every input.
        self.template: Any
        self.slots: list[tuple[Any, int]]
        if order is None:
            self.template = params
            self.slots = [(name, inputs[name]) for name in params if name in inputs]
        else:
            self.template = [params.get(name) for name in order]
            self.slots = [(i, inputs[name]) for i, name in enumerate(order) if name in inputs]

    def arguments(self, values: Sequence[Any]) -> Any:
        arguments = self.template.copy()
        for key, which in self.slots:
            arguments[key] = values[which]
        return arguments


def _rows_inputs(count: int) -> dict[str, int]:
    """Where a multi-row statement's binds are in ``[worker, name0, ident0, name1, ...]``."""
    inputs = {"worker": 0}
    for i in range(count):
        inputs[f"job_name_{i}"] = 1 + 2 * i
        inputs[f"job_identifier_{i}"] = 2 + 2 * i
    return inputs


def _qmark(sql: str) -> str:
    """A statement in asyncmy's ``%s`` style with ``?`` placeholders, for a prepared
    statement (``%%`` is a literal ``%``)."""
    return "%".join(part.replace("%s", "?") for part in sql.split("%%"))


def _refused(error: BaseException) -> bool:
    """Whether the server answered ``error`` to a statement: the connection is usable."""
    return (
        isinstance(error, Exception)
        and not isinstance(error, TimeoutError)
        and not lost_connection(error)
    )


#: What a pooler in transaction mode (PgBouncer) answers to a statement prepared on
#: another server connection: the statement did not run (PostgreSQL's SQLSTATE).
_POOLER_SQLSTATES = frozenset({"26000", "42P05"})  # invalid statement name; exists already


def _statement_name(sql: str) -> str:
    """A prepared statement's name given by its text: should a pooler run it on
    another client's server connection, the statement there is the same."""
    return "aiocronlock_" + hashlib.blake2b(sql.encode(), digest_size=20).hexdigest()


class _Kept:
    """A connection kept for acquiring: the pool's handle, the driver's connection,
    the statements prepared on it (by SQL text), and when it was last used."""

    __slots__ = ("driver", "last_used", "pooled", "prepared")

    def __init__(self, pooled: PoolProxiedConnection) -> None:
        self.pooled = pooled
        self.driver: Any = pooled.driver_connection
        self.prepared: dict[str, Any] = {}
        self.last_used = 0.0


#: Whether a driver's connection is known closed (the server closed it, and the driver
#: noticed); for drivers not listed, never.
_IS_CLOSED: dict[str, Callable[[Any], bool]] = {
    "asyncpg": lambda connection: bool(connection.is_closed()),
    "asyncmy": lambda connection: not connection.connected,
    "psycopg": lambda connection: bool(connection.closed),
}


class Acquirer:
    """Sends the acquire statements of one locker on connections kept for them.

    A call runs in its caller's task, within the timeout; a connection whose state a
    timeout or a cancellation left unknown is closed, not reused.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        statements: Statements,
        *,
        timeout: float,
        in_doubt: Callable[[str, str], Awaitable[None]],
        one_loop: OneLoop,
        in_turn: contextlib.AbstractAsyncContextManager[Any],
    ) -> None:
        # The store's, shared: on SQLite the locker's writes take turns (writes_in_turn).
        self._in_turn = in_turn
        self._engine = engine
        self._in_doubt = in_doubt
        self._one_loop = one_loop
        self._timeout = timeout
        driver = engine.dialect.driver
        self._driver = driver
        self._is_closed = _IS_CLOSED.get(driver, lambda connection: False)
        # How a statement is sent, by driver; asyncpg bounds it with its own timeout.
        self._send: Callable[[_Kept, str, Any, bool, float | None], Awaitable[Any]] = {
            "asyncpg": self._send_asyncpg,
            "psycopg": self._send_psycopg,
            "asyncmy": self._send_asyncmy,
            "aiosqlite": self._send_aiosqlite,
        }.get(driver, self._send_dbapi)
        self._bounds_itself = driver == "asyncpg"
        self._acquire_statement = statements.acquire
        self._returns_id = statements.acquire_returns_id
        self._rows_statement = statements.acquire_rows
        # Compiled on first use, once the dialect has met its server (see _compiled).
        self._compiled_for: dict[int, _Compiled] = {}
        pool = engine.sync_engine.pool
        self._shared = isinstance(pool, StaticPool | SingletonThreadPool)
        self._most = 1 if self._shared or statements.dialect_name == "sqlite" else MAX_CONNECTIONS
        self._pool: Pool | None = None
        # Connections not in use; the most recently used last.
        self._idle: list[_Kept] = []
        # Connections open or being opened now, in use or idle.
        self._open = 0
        # Calls under way, which aclose() waits for.
        self._busy = 0
        # Set when a connection comes back or closes, or a call ends, while anyone waits
        # for that (a call for a connection, aclose() for the calls).
        self._changed = asyncio.Event()
        self._waiting = 0
        # Connections being closed after an error, for aclose() to wait on.
        self._closing: set[asyncio.Future[None]] = set()
        self._closed = False
        # Set once a pooler lost a prepared statement: asyncpg then sends unnamed ones.
        self._behind_pooler = False

    @property
    def decides_many(self) -> bool:
        """Whether lock_many() can be one multi-row INSERT that returns the rows won
        (known once the engine has connected: MariaDB 10.5+, not MySQL)."""
        return bool(self._engine.dialect.insert_returning)

    @property
    def connections(self) -> int:
        """How many connections the locker keeps for acquiring now."""
        return self._open

    # -- calls ----------------------------------------------------------------------------

    def acquire(
        self, job_name: str, identifier: str, worker: str
    ) -> Coroutine[Any, Any, int | None]:
        """Send the one-row INSERT: the new row's id, or None when the tick is taken."""
        # The call's own coroutine, not one around it: one frame fewer on the hot path.
        return self._call(0, (job_name, identifier, worker), (job_name, identifier))

    async def acquire_many(
        self, names: Sequence[str], identifiers: Sequence[str], worker: str, won: dict[str, int]
    ) -> None:
        """One multi-row INSERT per ``MANY_CHUNK`` jobs, adding the ids won to ``won`` by
        job as each returns: if a later one fails, the caller still knows the earlier."""
        for start in range(0, len(names), MANY_CHUNK):
            chunk = range(start, min(start + MANY_CHUNK, len(names)))
            values: list[Any] = [worker]
            for i in chunk:
                values += (names[i], identifiers[i])
            for row_id, name in await self._call(len(chunk), values):
                won[name.decode() if isinstance(name, bytes) else name] = int(row_id)

    def _compiled(self, rows: int) -> _Compiled:
        """The acquire (``rows`` 0), or lock_many()'s INSERT of ``rows`` rows, compiled
        for the dialect on first use: after a connection, when the dialect knows its
        server (MySQL's and MariaDB's column types depend on it, see ExactText)."""
        compiled = self._compiled_for.get(rows)
        if compiled is None:
            if rows:
                statement, inputs = self._rows_statement(rows), _rows_inputs(rows)
                # Only the sizes in use lately: one caller's, usually.
                self._compiled_for = {k: v for k, v in self._compiled_for.items() if not k}
            else:
                statement = self._acquire_statement
                inputs = {name: i for i, name in enumerate(_INPUTS)}
            compiled = self._compiled_for[rows] = _Compiled(self._engine, statement, inputs)
        return compiled

    async def _call(
        self, rows: int, values: Sequence[Any], doubt: tuple[str, str] | None = None
    ) -> Any:
        """Run the acquire (``rows`` 0: the new id, or None) or a multi-row INSERT (every
        row it returned) on a kept connection, within the timeout.

        ``doubt``: the tick an acquire decides. If its caller is cancelled after the
        INSERT was sent, the outcome is unknown, and ``in_doubt`` settles the tick
        before the cancellation goes on.
        """
        if self._closed:
            raise RuntimeError("this locker is closed: create a new AsyncDBLocker")
        loop = asyncio.get_running_loop()  # the locker's: it checked (see OneLoop)
        if self._pool is None:
            pool = self._engine.sync_engine.pool
            self._pool = pool if self._shared else pool.recreate()
        deadline = loop.time() + self._timeout
        self._busy += 1
        try:
            kept = self._take()
            if kept is None:
                async with asyncio.timeout_at(deadline):
                    kept = await self._checkout()
            try:
                compiled = self._compiled(rows)
                sql, arguments = compiled.sql, compiled.arguments(values)
                if sql_logger.isEnabledFor(logging.DEBUG):
                    sql_logger.debug("%s %r", sql, arguments)
                if self._bounds_itself:
                    # The driver's own statement timeout costs less than a timeout
                    # scope, and a lost race here is a round trip of tens of µs.
                    remaining = deadline - loop.time()
                    result = await self._send(kept, sql, arguments, rows > 0, remaining)
                else:
                    async with asyncio.timeout_at(deadline), self._in_turn:
                        result = await self._send(kept, sql, arguments, rows > 0, None)
            except BaseException as error:
                self._release(kept, error)
                if doubt is not None and isinstance(error, asyncio.CancelledError):
                    settling = asyncio.ensure_future(self._in_doubt(*doubt))
                    self._closing.add(settling)
                    settling.add_done_callback(self._closed_one)
                    await asyncio.shield(settling)  # a second cancel leaves it running
                raise
            self._release(kept, None)
            return result
        finally:
            self._busy -= 1
            if self._waiting:
                self._changed.set()

    def _take(self) -> _Kept | None:
        """The most recently used idle connection that is still usable, if any."""
        while self._idle:
            kept = self._idle.pop()
            if self._usable(kept):
                return kept
            self._discard(kept, None)
        return None

    async def _checkout(self) -> _Kept:
        """An idle connection, a new one while fewer than the most are open, or the
        next one to come back."""
        while True:
            kept = self._take()
            if kept is not None:
                return kept
            if self._open < self._most:
                return await self._connect()
            await self._wait_for_change()

    async def _wait_for_change(self) -> None:
        self._changed.clear()
        self._waiting += 1
        try:
            await self._changed.wait()
        finally:
            self._waiting -= 1

    def _release(self, kept: _Kept, error: BaseException | None) -> None:
        """Keep a connection after a call, or close it if the call left its state unknown.

        A lost connection likely means the server went away: the idle ones go too (a
        driver does not always notice a socket the server closed).
        """
        if error is None or _refused(error):
            kept.last_used = time.monotonic()
            self._idle.append(kept)
        else:
            self._discard(kept, error)
            if lost_connection(error):
                idle, self._idle = self._idle, []
                for other in idle:
                    self._discard(other, None)
        if self._waiting:
            self._changed.set()

    def _usable(self, kept: _Kept) -> bool:
        """Whether a kept connection may be used: not closed by the server (its driver
        noticed), and not idle for so long that it may have been."""
        if time.monotonic() - kept.last_used > KEEP_IDLE_S and not self._shared:
            return False
        return not self._is_closed(kept.driver)

    async def _connect(self) -> _Kept:
        assert self._pool is not None
        self._open += 1  # counted from now: concurrent calls do not open too many
        try:
            kept = _Kept(await greenlet_spawn(self._pool.connect))
        except BaseException:
            self._open -= 1
            if self._waiting:
                self._changed.set()
            raise
        try:
            connection = kept.driver
            # The statements commit alone, like SQLAlchemy's AUTOCOMMIT; a user's engine
            # may leave its connections in a transaction mode.
            if self._driver == "asyncmy":
                await connection.autocommit(True)
            elif self._driver == "psycopg" and not connection.autocommit:
                await connection.set_autocommit(True)
            elif self._driver == "aiosqlite" and not self._shared:
                connection.isolation_level = None
        except BaseException:
            self._discard(kept, None)
            raise
        return kept

    # -- sending, by driver: the new id (or None), or every row for ``rows`` -------------

    async def _send_asyncpg(
        self, kept: _Kept, sql: str, arguments: Any, rows: bool, driver_timeout: float | None
    ) -> Any:
        """A statement prepared once per connection under a name of its own (the
        connection's statement cache may be off), then one round trip per call;
        ``driver_timeout`` bounds the statement itself."""
        assert driver_timeout is not None
        timeout = driver_timeout
        if timeout <= 0:
            raise TimeoutError
        connection = kept.driver
        if not self._behind_pooler:
            try:
                statement = kept.prepared.get(sql)
                if statement is None:
                    began = time.monotonic()
                    statement = await connection.prepare(
                        sql, name=_statement_name(sql), timeout=timeout
                    )
                    if len(kept.prepared) >= 8:  # lock_many()'s sizes come and go
                        kept.prepared.clear()
                    kept.prepared[sql] = statement
                    timeout -= time.monotonic() - began
                    if timeout <= 0:
                        raise TimeoutError
                if rows:
                    return await statement.fetch(*arguments, timeout=timeout)
                return await statement.fetchval(*arguments, timeout=timeout)
            except Exception as error:
                kept.prepared.pop(sql, None)  # stale after a schema change, or lost by a pooler
                if getattr(error, "sqlstate", None) not in _POOLER_SQLSTATES:
                    raise
                self._behind_pooler = True
                logger.info(
                    "a pooler in transaction mode lost a prepared statement (%s): "
                    "acquiring with unnamed statements from now on",
                    type(error).__name__,
                )
        # Unnamed (with asyncpg's statement cache off, as on a locker's own engine):
        # one round trip more, on one server connection.
        if rows:
            return await connection.fetch(sql, *arguments, timeout=timeout)
        return await connection.fetchval(sql, *arguments, timeout=timeout)

    async def _send_psycopg(
        self, kept: _Kept, sql: str, arguments: Any, rows: bool, driver_timeout: float | None
    ) -> Any:
        cursor = await kept.driver.execute(sql, arguments)
        if rows:
            return await cursor.fetchall()
        row = await cursor.fetchone()
        return None if row is None else row[0]

    async def _send_asyncmy(
        self, kept: _Kept, sql: str, arguments: Any, rows: bool, driver_timeout: float | None
    ) -> Any:
        connection = kept.driver
        if not rows:
            # Prepared once per connection: the server then does not parse it on every
            # tick. Only this statement, as the server counts prepared statements
            # against one limit for all connections.
            prepared = kept.prepared.get(sql)
            if prepared is None:
                prepared = kept.prepared[sql] = await connection.prepare(_qmark(sql))
            return (await prepared.execute(arguments)).insert_id or None
        async with connection.cursor() as cursor:
            with mysql_duplicates_quiet():  # INSERT IGNORE: a warning per taken tick
                await cursor.execute(sql, arguments)
            return await cursor.fetchall()

    async def _send_aiosqlite(
        self, kept: _Kept, sql: str, arguments: Any, rows: bool, driver_timeout: float | None
    ) -> Any:
        connection = kept.driver
        # A connection shared with the engine may be in the implicit transaction mode;
        # the row must be committed on its own all the same.
        was_open = self._shared and connection.in_transaction
        fetched = await connection.execute_fetchall(sql, arguments)
        if self._shared and not was_open and connection.in_transaction:
            await connection.commit()
        return fetched if rows else (fetched[0][0] if fetched else None)

    async def _send_dbapi(
        self, kept: _Kept, sql: str, arguments: Any, rows: bool, driver_timeout: float | None
    ) -> Any:
        """Any other asyncio driver, through SQLAlchemy's DBAPI adapter (in a greenlet)."""
        return await greenlet_spawn(self._send_in_greenlet, kept.pooled, sql, arguments, rows)

    def _send_in_greenlet(
        self, pooled: PoolProxiedConnection, sql: str, arguments: Any, rows: bool
    ) -> Any:
        cursor = pooled.cursor()
        try:
            cursor.execute(sql, arguments)
            if rows:
                return cursor.fetchall()
            if self._returns_id:
                row = cursor.fetchone()
                return None if row is None else row[0]
            return cursor.lastrowid or None
        finally:
            cursor.close()

    def _discard(self, kept: _Kept, error: BaseException | None) -> None:
        """Close a connection, in the background: the caller need not wait for the
        driver's polite close (aclose() waits for it). Closed, not returned to the
        pool: nothing to reset, and after an error its state is unknown."""
        self._open -= 1
        pooled = kept.pooled
        if self._shared:
            if error is None:
                pooled_close = greenlet_spawn(pooled.close)  # the engine's only connection
                closing = asyncio.ensure_future(pooled_close)
                self._closing.add(closing)
                closing.add_done_callback(self._closed_one)
            return
        closing = asyncio.ensure_future(greenlet_spawn(pooled.invalidate, error))
        self._closing.add(closing)
        closing.add_done_callback(self._closed_one)

    def _closed_one(self, closing: asyncio.Future[None]) -> None:
        self._closing.discard(closing)
        if not closing.cancelled() and closing.exception() is not None:
            logger.debug("closing a connection failed: %r", closing.exception())

    async def aclose(self) -> None:
        """Close the kept connections once the calls under way have ended (within the
        timeout: past it, they are abandoned)."""
        self._closed = True
        if not self._one_loop.is_current():
            return  # they belong to another event loop, which alone can close them
        try:
            async with asyncio.timeout(self._timeout):
                while self._busy:
                    await self._wait_for_change()
                idle, self._idle = self._idle, []
                for kept in idle:
                    self._discard(kept, None)
                if self._closing:
                    await asyncio.wait(set(self._closing))
                if self._pool is not None and not self._shared:
                    await greenlet_spawn(self._pool.dispose)
        except TimeoutError:
            logger.warning(
                "closing the connections kept for acquiring took over %g s; abandoned them",
                self._timeout,
            )
