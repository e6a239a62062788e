"""Acquiring: the INSERT that decides a tick, sent straight through the driver.

SQLAlchemy's execution layer costs more CPU than the round trip itself on a fast
local database, so the acquire statements are compiled once and sent through the
driver, on connections kept for them. Those connections come from a pool of the
locker's own, made with :meth:`Pool.recreate` from the engine's pool (same URL,
connect arguments and ``connect`` events), so a user's pool never lends one. An
in-memory SQLite database has one connection, which is shared instead.

Each kept connection has a worker task; a call hands its statement to the workers
through a queue and awaits a future (the shape of aiosqlite's thread bridge). A
caller that is cancelled leaves its statement to finish in the worker: the caller
still learns whether a row went in (:meth:`Submission.outcome`), and marks it FAILED.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Insert
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import Pool, PoolProxiedConnection, SingletonThreadPool, StaticPool
from sqlalchemy.util import greenlet_spawn

from ._engine import lost_connection
from ._sql import MYSQL_DIALECTS, Statements, mysql_duplicates_quiet

#: The statements the fast path sends, at DEBUG level (SQLAlchemy's echo and cursor
#: events do not see them).
sql_logger = logging.getLogger("aiocronlock.sql")
logger = logging.getLogger("aiocronlock")

#: A kept connection idle longer than this is replaced before its next use: servers and
#: proxies close idle connections (MySQL's wait_timeout), and a dead one costs a tick.
KEEP_IDLE_S = 60.0

#: Connections (and workers) kept for acquiring: enough for a burst of jobs whose ticks
#: fall together; SQLite has one writer at a time, so one there.
MAX_CONNECTIONS = 4

#: Jobs per multi-row INSERT of lock_many(): far below every driver's parameter limit.
MANY_CHUNK = 500

_INPUTS = ("job_name", "job_identifier", "worker")


class _Compiled:
    """A statement compiled for the engine's dialect, and where each call's values go."""

    __slots__ = ("named", "params", "slots", "sql")

    def __init__(self, engine: AsyncEngine, statement: Insert, inputs: dict[str, int]) -> None:
        compiled = statement.compile(dialect=engine.dialect)
        self.sql = str(compiled)
        self.params = dict(compiled.params)
        order = compiled.positiontup
        self.named = order is None
        names = list(self.params) if order is None else order
        # (position or name, index in the call's values), for every input.
        self.slots = [
            (i if order is not None else name, inputs[name])
            for i, name in enumerate(names)
            if name in inputs
        ]
        if order is not None:
            self.params = {str(i): self.params.get(name) for i, name in enumerate(order)}

    def arguments(self, values: Sequence[Any]) -> Any:
        if self.named:
            named = dict(self.params)
            for key, which in self.slots:
                named[str(key)] = values[which]
            return named
        positional = list(self.params.values())
        for position, which in self.slots:
            positional[int(position)] = values[which]
        return positional


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


class Submission:
    """One statement handed to the workers: the caller awaits :attr:`answer`."""

    __slots__ = ("_late", "answer", "arguments", "deadline", "result", "rows", "settled", "sql")

    def __init__(
        self, sql: str, arguments: Any, rows: bool, deadline: float, answer: asyncio.Future[Any]
    ) -> None:
        self.sql = sql
        self.arguments = arguments
        self.rows = rows
        self.deadline = deadline
        self.answer = answer
        self.settled = False
        self.result: Any = None
        self._late: asyncio.Future[Any] | None = None

    def settle(self, result: Any = None, error: BaseException | None = None) -> None:
        """Record the outcome; for the caller if it still waits, else for :meth:`outcome`."""
        self.settled = True
        answer = self.answer
        if not answer.done():
            if error is None:
                answer.set_result(result)
            else:
                answer.set_exception(error)
            return
        self.result = error if error is not None else result
        late = self._late
        if late is not None and not late.done():
            late.set_result(self.result)

    async def outcome(self) -> Any:
        """The statement's result, or its error as a value, once it has run; for a
        caller that gave up waiting on :attr:`answer` (or never awaited it)."""
        answer = self.answer
        if not answer.cancelled():
            try:
                return await answer
            except Exception as error:
                return error
        if not self.settled:
            self._late = asyncio.get_running_loop().create_future()
            await self._late
        return self.result


class Acquirer:
    """Sends the acquire statements of one locker on connections kept for them."""

    def __init__(self, engine: AsyncEngine, statements: Statements, *, timeout: float) -> None:
        self._engine = engine
        self._timeout = timeout
        self._driver = engine.dialect.driver
        # Job names and identifiers are bytes on MySQL (see ExactText in _schema).
        self._encode = statements.dialect_name in MYSQL_DIALECTS
        self._one = _Compiled(
            engine, statements.acquire, {name: i for i, name in enumerate(_INPUTS)}
        )
        self._returns_id = statements.acquire_returns_id
        self._rows_statement = statements.acquire_rows
        self._many: dict[int, _Compiled] = {}
        pool = engine.sync_engine.pool
        self._shared = isinstance(pool, StaticPool | SingletonThreadPool)
        self._most = 1 if self._shared or statements.dialect_name == "sqlite" else MAX_CONNECTIONS
        self._pool: Pool | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue[Submission | None] = asyncio.Queue()
        self._workers: set[asyncio.Task[None]] = set()
        self._idle_workers = 0
        # Connections being closed after an error.
        self._closing: set[asyncio.Future[None]] = set()
        # Connections of workers that have stopped, for aclose() to close politely.
        self._retired: list[PoolProxiedConnection] = []
        self._closed = False

    @property
    def decides_many(self) -> bool:
        """Whether lock_many() can be one multi-row INSERT that returns the rows won
        (known once the engine has connected: MariaDB 10.5+, not MySQL)."""
        return bool(self._engine.dialect.insert_returning)

    @property
    def connections(self) -> int:
        """How many connections are kept for acquiring now (at most one per worker)."""
        return len(self._workers)

    # -- submitting ---------------------------------------------------------------------

    def acquire(self, job_name: str, identifier: str, worker: str) -> Submission:
        """Send the one-row INSERT; the answer is the new row's id, or None if taken."""
        values = (
            (job_name.encode(), identifier.encode(), worker)
            if self._encode
            else (job_name, identifier, worker)
        )
        return self._submit(self._one.sql, self._one.arguments(values), rows=False)

    def acquire_many(
        self, names: Sequence[str], identifiers: Sequence[str], worker: str
    ) -> list[Submission]:
        """Send one multi-row INSERT per ``MANY_CHUNK`` jobs; each answer is the list of
        ``(id, job_name)`` rows it won."""
        submissions = []
        for start in range(0, len(names), MANY_CHUNK):
            chunk = range(start, min(start + MANY_CHUNK, len(names)))
            compiled = self._many.get(len(chunk))
            if compiled is None:
                statement = self._rows_statement(len(chunk))
                compiled = _Compiled(self._engine, statement, _rows_inputs(len(chunk)))
                self._many = {len(chunk): compiled}  # the sizes of one caller, usually
            values: list[Any] = [worker]
            for i in chunk:
                name, identifier = names[i], identifiers[i]
                if self._encode:
                    values += (name.encode(), identifier.encode())
                else:
                    values += (name, identifier)
            submissions.append(self._submit(compiled.sql, compiled.arguments(values), rows=True))
        return submissions

    def _submit(self, sql: str, arguments: Any, *, rows: bool) -> Submission:
        if self._closed:
            raise RuntimeError("this locker is closed: create a new AsyncDBLocker")
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self._move_to(loop)
        submission = Submission(
            sql, arguments, rows, loop.time() + self._timeout, loop.create_future()
        )
        self._queue.put_nowait(submission)
        if not self._idle_workers and len(self._workers) < self._most:
            worker = loop.create_task(self._work(), name="aiocronlock acquire")
            self._workers.add(worker)
            worker.add_done_callback(self._workers.discard)
        return submission

    def _move_to(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start afresh in a new event loop: what belonged to the old one cannot be used
        (one ``asyncio.run`` after another)."""
        self._loop = loop
        self._queue = asyncio.Queue()
        self._workers = set()
        self._idle_workers = 0
        pool = self._engine.sync_engine.pool
        self._pool = pool if self._shared else pool.recreate()

    # -- the workers --------------------------------------------------------------------

    async def _work(self) -> None:
        """Take statements from the queue and send them on this worker's connection."""
        queue = self._queue
        pooled: PoolProxiedConnection | None = None
        prepared: Any = None  # asyncmy: the acquire, prepared on this connection
        last_used = 0.0
        try:
            while True:
                self._idle_workers += 1
                try:
                    submission = await queue.get()
                finally:
                    self._idle_workers -= 1
                if submission is None:
                    return
                if submission.answer.cancelled() and not submission.settled:
                    submission.settle()  # given up before it was sent: no row
                    continue
                try:
                    async with asyncio.timeout_at(submission.deadline):
                        if pooled is not None and not self._usable(pooled, last_used):
                            self._discard(pooled, None)
                            pooled, prepared = None, None
                        if pooled is None:
                            pooled = await self._connect()
                        result, prepared = await self._send(pooled, submission, prepared)
                except asyncio.CancelledError:
                    # This worker was cancelled (the loop is shutting down): not the
                    # deadline, which raises TimeoutError.
                    if not submission.settled:
                        submission.settle(error=RuntimeError("the locker was closed"))
                    raise
                except BaseException as error:
                    # A statement the server refused leaves the connection as it was;
                    # after a timeout or a lost connection its state is unknown.
                    if pooled is not None and not _refused(error):
                        self._discard(pooled, error)
                        pooled, prepared = None, None
                    submission.settle(error=error)
                    if not isinstance(error, Exception):
                        raise
                    continue
                last_used = time.monotonic()
                submission.settle(result)
        finally:
            if pooled is not None:
                self._retired.append(pooled)

    def _usable(self, pooled: PoolProxiedConnection, last_used: float) -> bool:
        """Whether a kept connection may be used: not closed by the server (its driver
        noticed), and not idle for so long that it may have been."""
        if time.monotonic() - last_used > KEEP_IDLE_S and not self._shared:
            return False
        connection: Any = pooled.driver_connection
        if self._driver == "asyncpg":
            return not connection.is_closed()
        if self._driver == "asyncmy":
            return bool(connection.connected)
        return True

    async def _connect(self) -> PoolProxiedConnection:
        assert self._pool is not None
        pooled = await greenlet_spawn(self._pool.connect)
        try:
            connection: Any = pooled.driver_connection
            # The statements commit alone, like SQLAlchemy's AUTOCOMMIT; a user's engine
            # may leave its connections in a transaction mode.
            if self._driver == "asyncmy":
                await connection.autocommit(True)
            elif self._driver == "aiosqlite" and not self._shared:
                connection.isolation_level = None
        except BaseException:
            self._discard(pooled, None)
            raise
        return pooled

    async def _send(
        self, pooled: PoolProxiedConnection, submission: Submission, prepared: Any
    ) -> tuple[Any, Any]:
        """Run one statement; the new id (or None), or every row for ``rows``."""
        sql, arguments, rows = submission.sql, submission.arguments, submission.rows
        if sql_logger.isEnabledFor(logging.DEBUG):
            sql_logger.debug("%s %r", sql, arguments)
        connection = pooled.driver_connection
        assert connection is not None
        driver = self._driver
        if driver == "asyncpg":
            if rows:
                return await connection.fetch(sql, *arguments), prepared
            return await connection.fetchval(sql, *arguments), prepared
        if driver == "asyncmy":
            if not rows:
                # Prepared once per connection: the server then does not parse it on
                # every tick. Only this statement, as the server counts prepared
                # statements against one limit for all connections.
                if prepared is None:
                    prepared = await connection.prepare(_qmark(sql))
                return (await prepared.execute(arguments)).insert_id or None, prepared
            async with connection.cursor() as cursor:
                with mysql_duplicates_quiet():  # INSERT IGNORE: a warning per taken tick
                    await cursor.execute(sql, arguments)
                return await cursor.fetchall(), prepared
        if driver == "aiosqlite":
            fetched = await connection.execute_fetchall(sql, arguments)
            return (fetched if rows else (fetched[0][0] if fetched else None)), prepared
        return await greenlet_spawn(self._send_dbapi, pooled, sql, arguments, rows), prepared

    def _send_dbapi(
        self, pooled: PoolProxiedConnection, sql: str, arguments: Any, rows: bool
    ) -> Any:
        """Any other asyncio driver, through SQLAlchemy's DBAPI adapter (in a greenlet)."""
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

    def _discard(self, pooled: PoolProxiedConnection, error: BaseException | None) -> None:
        """Close a connection whose state is unknown, in the background: the caller
        need not wait for the driver's polite close (aclose() waits for it)."""
        if self._shared:
            return  # the engine's only connection: the engine decides its fate
        closing = asyncio.ensure_future(greenlet_spawn(pooled.invalidate, error))
        self._closing.add(closing)
        closing.add_done_callback(self._closed_one)

    def _closed_one(self, closing: asyncio.Future[None]) -> None:
        self._closing.discard(closing)
        if not closing.cancelled() and closing.exception() is not None:
            logger.debug("closing a connection failed: %r", closing.exception())

    # -- closing ------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Stop the workers (a statement under way finishes first, within its deadline)
        and close their connections."""
        self._closed = True
        workers = [w for w in self._workers if w.get_loop() is asyncio.get_running_loop()]
        for _ in workers:
            self._queue.put_nowait(None)
        if workers:
            await asyncio.wait(workers)
        while not self._queue.empty():
            left = self._queue.get_nowait()
            if left is not None and not left.settled:
                left.settle(error=RuntimeError("the locker was closed"))
        if self._closing:
            await asyncio.wait(set(self._closing), timeout=self._timeout)
        retired, self._retired = self._retired, []
        for pooled in retired:
            await greenlet_spawn(pooled.close)  # back to the locker's own pool
        if self._pool is not None and not self._shared:
            await greenlet_spawn(self._pool.dispose)
