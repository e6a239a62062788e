"""The hot path: the acquire INSERT sent straight through the driver.

SQLAlchemy's execution layer (statement cache lookup, greenlet hand-off, result
wrapping) costs several times the round trip itself on a fast local database. For
the one statement every instance sends on every tick, a locker that owns its engine
compiles the statement once and sends it through the driver of a connection taken
from SQLAlchemy's pool: same SQL, same pool, one round trip, none of the overhead.

Checking a connection out of SQLAlchemy's pool and back in costs about as much as
the rest of the call together (a greenlet hand-off and the pool's bookkeeping), so
the connections this path used stay checked out, in a list of its own (at most
the pool's size), for the next call. They go back to the pool when idle for a
while (where its recycling and the server's idle timeout apply), on any error, and
when the locker closes.

On SQLite (a file; an in-memory database has a single connection) the calls do
not take a connection each: they share one kept connection, whose aiosqlite thread
runs them one after another from its queue. SQLite has one writer at a time anyway;
this way the next INSERT starts the moment the last one ends, instead of after a
trip through the event loop, and the locker's calls never wait on each other in
SQLite's busy handler, which backs off in sleeps of milliseconds. Only one call
opens that connection; the others wait for it. At most ``SQLITE_WINDOW`` requests
are handed to the thread at a time, the rest wait their turn here: a request handed
over runs even if its caller gives up (its deadline passes), and one that never was
leaves no row behind.

On MySQL/MariaDB the acquire is a server-side prepared statement, prepared on each
connection's first acquire and kept with the connection: the server does not parse
it on every tick. Only that one statement per connection, since the server counts
every connection's statements against one limit (``max_prepared_stmt_count``).

lock_many() takes the same path with one multi-row INSERT per chunk of jobs,
compiled once per chunk size, where the backend can return the rows it inserted.

Used only on engines the locker created, whose connections are in autocommit by
construction; with an engine passed in, the statement goes through SQLAlchemy.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from sqlalchemy import Insert
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import PoolProxiedConnection, QueuePool
from sqlalchemy.util import greenlet_spawn

from ._sql import mysql_duplicates_quiet

#: The inputs of the acquire statement, bound per call; every other parameter is constant.
_INPUTS = ("job_name", "job_identifier", "worker")

#: A kept connection idle longer than this goes back to the pool instead of being used.
KEEP_IDLE_S = 30.0

#: Jobs per multi-row INSERT of lock_many(): a few thousand bound parameters, far
#: below every driver's limit.
MANY_CHUNK = 500

#: Multi-row statements kept compiled, by row count (compiling 500 rows takes ~40 ms).
_MANY_CACHED = 8

#: SQLite requests handed to the shared connection's thread at once: one running and
#: the next queued behind it.
SQLITE_WINDOW = 2


class _Compiled:
    """A statement compiled for one driver, and where each call's values go in it."""

    __slots__ = ("constants", "slots", "sql")

    def __init__(
        self, engine: AsyncEngine, statement: Insert, inputs: Callable[[str], int]
    ) -> None:
        compiled = statement.compile(dialect=engine.dialect)
        order = compiled.positiontup or []
        self.sql = str(compiled)
        self.constants = [compiled.params.get(name) for name in order]
        # (position in the statement, index in the call's values), for every input.
        where = [(i, inputs(name)) for i, name in enumerate(order)]
        self.slots = [(i, which) for i, which in where if which >= 0]

    def arguments(self, values: Sequence[Any]) -> list[Any]:
        arguments = list(self.constants)
        for position, which in self.slots:
            arguments[position] = values[which]
        return arguments


#: Where a connection keeps its prepared acquire, with the driver connection it was
#: prepared on and its SQL: SQLAlchemy's ``info`` of a pooled connection lasts as
#: long as the connection, across checkouts, and is emptied when it is replaced.
_PREPARED = "aiocronlock prepared acquire"


def _qmark(sql: str) -> str:
    """A statement compiled for asyncmy's ``%s`` placeholders, with ``?`` ones instead
    (what a server-side prepared statement takes); ``%%`` is a literal ``%``."""
    return "%".join(part.replace("%s", "?") for part in sql.split("%%"))


def _single_input(name: str) -> int:
    return _INPUTS.index(name) if name in _INPUTS else -1


def _row_input(name: str) -> int:
    """Index of a multi-row statement's bind in ``[worker, name0, ident0, name1, ...]``."""
    if name == "worker":
        return 0
    column, _, row = name.rpartition("_")
    if column == "job_name" and row.isdigit():
        return 1 + 2 * int(row)
    if column == "job_identifier" and row.isdigit():
        return 2 + 2 * int(row)
    return -1


class DriverAcquire:
    """The compiled acquire statements (one row, and many), the connections kept for
    them, and how to send them through one driver."""

    __slots__ = (
        "_acquire",
        "_driver",
        "_encode",
        "_engine",
        "_idle",
        "_keep",
        "_many",
        "_opening",
        "_prepares",
        "_returning",
        "_rows_statement",
        "_users",
        "_window",
        "runs_inline",
        "shares",
        "sql",
    )

    def __init__(
        self,
        engine: AsyncEngine,
        statement: Insert,
        driver: str,
        rows_statement: Callable[[int], Insert] | None = None,
    ) -> None:
        self._acquire = _Compiled(engine, statement, _single_input)
        self.sql = self._acquire.sql
        self._engine = engine
        self._driver = driver
        self._rows_statement = rows_statement
        self._many: OrderedDict[int, _Compiled] = OrderedDict()
        # Job names and identifiers are stored as UTF-8 bytes on MySQL (see ExactText).
        self._encode = driver == "asyncmy"
        #: On MySQL/MariaDB the acquire runs as a server-side prepared statement, made
        #: once per connection (see _send), unless the URL sets asyncmy's own
        #: statement cache to 0.
        self._prepares = driver == "asyncmy" and engine.url.query.get("stmt_cache_size") != "0"
        # Connections kept checked out between calls, each with its driver connection
        # (a property two objects deep) and when it was last used.
        self._idle: list[tuple[PoolProxiedConnection, Any, float]] = []
        # Connections on their way back to the pool (see _give_back).
        self._returning: set[asyncio.Task[None]] = set()
        # As many as the pool holds idle (SQLAlchemy's own checkouts, for unlock and
        # clean, still have the overflow); none from a single-connection pool
        # (in-memory SQLite).
        pool = engine.sync_engine.pool
        self._keep = pool.size() if isinstance(pool, QueuePool) else 0
        #: Whether an acquire may run in its caller's task (see _attempt.py): not where
        #: the driver bounds a read with wait_for, which from Python 3.12 cancels the
        #: task it runs in (asyncmy, given a read or write timeout in the URL).
        self.runs_inline = not (
            driver == "asyncmy"
            and sys.version_info >= (3, 12)
            and any(key in engine.url.query for key in ("read_timeout", "write_timeout"))
        )
        #: Whether concurrent calls share the one kept connection (SQLite, see above).
        self.shares = driver == "aiosqlite" and self._keep > 0
        if self.shares:
            self._keep = 1
        # Calls under way (for a shared connection: it is not idle while one is).
        self._users = 0
        # A shared connection being opened, for every call that needs it meanwhile.
        self._opening: asyncio.Task[PoolProxiedConnection] | None = None
        # How many SQLite requests may be in the connection's thread at once (unbounded
        # for a connection of one call's own).
        self._window: contextlib.AbstractAsyncContextManager[Any] = (
            asyncio.Semaphore(SQLITE_WINDOW) if self.shares else contextlib.nullcontext()
        )

    @classmethod
    def for_engine(
        cls,
        engine: AsyncEngine,
        statement: Insert,
        *,
        owned: bool,
        rows_statement: Callable[[int], Insert] | None = None,
    ) -> DriverAcquire | None:
        driver = engine.dialect.driver
        if owned and driver in ("asyncpg", "asyncmy", "aiosqlite"):
            return cls(engine, statement, driver, rows_statement)
        return None

    def _arguments(self, job_name: str, identifier: str, worker: str) -> list[Any]:
        if self._encode:
            return self._acquire.arguments((job_name.encode(), identifier.encode(), worker))
        return self._acquire.arguments((job_name, identifier, worker))

    def __call__(
        self, job_name: str, identifier: str, worker: str
    ) -> Coroutine[Any, Any, int | None]:
        """Send the INSERT: the coroutine of it, whose result is the new row's id (an int
        from every driver), or ``None`` when the tick was taken."""
        return self._send(self.sql, self._arguments(job_name, identifier, worker), rows=False)

    @property
    def decides_many(self) -> bool:
        """Whether :meth:`many` can run here: a multi-row INSERT that returns its rows."""
        return self._rows_statement is not None and bool(self._engine.dialect.insert_returning)

    async def many(
        self, names: Sequence[str], identifiers: Sequence[str], worker: str, won: dict[str, int]
    ) -> None:
        """Insert one row per job, ``MANY_CHUNK`` jobs per statement, adding the ids won to
        ``won`` by job as each statement returns: if a later one fails, the caller still
        knows the rows the earlier ones won."""
        for start in range(0, len(names), MANY_CHUNK):
            chunk = range(start, min(start + MANY_CHUNK, len(names)))
            compiled = self._compiled_for(len(chunk))
            values: list[Any] = [worker]
            for i in chunk:
                values += self._row_values(names[i], identifiers[i])
            for row_id, name in await self._send(
                compiled.sql, compiled.arguments(values), rows=True
            ):
                won[name.decode() if isinstance(name, bytes) else name] = int(row_id)

    def _row_values(self, job_name: str, identifier: str) -> tuple[Any, Any]:
        if self._encode:
            return job_name.encode(), identifier.encode()
        return job_name, identifier

    def _compiled_for(self, count: int) -> _Compiled:
        compiled = self._many.get(count)
        if compiled is None:
            assert self._rows_statement is not None
            compiled = _Compiled(self._engine, self._rows_statement(count), _row_input)
            self._many[count] = compiled
            if len(self._many) > _MANY_CACHED:
                self._many.popitem(last=False)
        else:
            self._many.move_to_end(count)
        return compiled

    async def _send(self, sql: str, arguments: list[Any], *, rows: bool) -> Any:
        """Run one statement on a kept or pooled connection.

        ``rows``: return every row it returned; else the new row's id or ``None``.
        """
        kept = self._kept()
        if kept is None:
            pooled = await self._checkout()
            connection = pooled.driver_connection
        else:
            pooled, connection = kept
        self._users += 1
        try:
            assert connection is not None
            result: Any
            if self._driver == "asyncpg":
                if rows:
                    result = await connection.fetch(sql, *arguments)
                else:
                    result = await connection.fetchval(sql, *arguments)
            elif self._driver == "asyncmy":
                if not rows and self._prepares:  # the acquire
                    # Prepared on this connection's first acquire (one more round
                    # trip, once): then the server does not parse it on every tick,
                    # and the driver escapes nothing.
                    prepared = pooled.info.get(_PREPARED)
                    if prepared is None or prepared[0] is not connection or prepared[1] != sql:
                        if prepared is not None and prepared[0] is connection:
                            await prepared[2].close()
                        prepared = (connection, sql, await connection.prepare(_qmark(sql)))
                        pooled.info[_PREPARED] = prepared
                    result = (await prepared[2].execute(arguments)).insert_id or None
                else:
                    async with connection.cursor() as cursor:
                        if rows:
                            # INSERT IGNORE: each taken tick is a warning (see _sql).
                            with mysql_duplicates_quiet():
                                await cursor.execute(sql, arguments)
                            result = await cursor.fetchall()
                        else:
                            await cursor.execute(sql, arguments)
                            result = cursor.lastrowid or None
            else:
                # One hop to aiosqlite's thread: execute and fetch together.
                async with self._window:
                    fetched = await connection.execute_fetchall(sql, arguments)
                result = fetched if rows else (fetched[0][0] if fetched else None)
        except BaseException as error:
            # A call on the shared SQLite connection that is cancelled (its deadline
            # passed) leaves it consistent: its request still runs in the thread.
            if not (self.shares and isinstance(error, asyncio.CancelledError)):
                self._retire(pooled, error)
            raise
        finally:
            self._users -= 1
        if self.shares:
            if self._idle and self._idle[-1][0] is pooled:
                self._idle[-1] = (pooled, connection, time.monotonic())
            # else: released or retired meanwhile, by whoever took it off the list
        elif len(self._idle) < self._keep:
            self._idle.append((pooled, connection, time.monotonic()))
        else:
            self._give_back(pooled)
        return result

    def _retire(self, pooled: PoolProxiedConnection, error: BaseException) -> None:
        """After a call failed or was cancelled midway on ``pooled``.

        The connection's state is unknown, and when the server went away the pool's
        other connections are likely dead too. Like SQLAlchemy on a disconnect, retire
        them all: each reconnects on its next checkout. (A shared SQLite connection has
        no server to lose, and other calls may still be using it: only it goes.)
        """
        self._idle = [kept for kept in self._idle if kept[0] is not pooled]
        if self.shares:
            if pooled.is_valid:  # else another call sharing it retired it already
                pooled.invalidate(error)
            return
        self._engine.sync_engine.pool._invalidate(pooled, error)
        self.release()

    def _kept(self) -> tuple[PoolProxiedConnection, Any] | None:
        """A kept connection used recently, with its driver connection, if there is one
        (on SQLite, the shared one); those idle too long go back to the pool."""
        if self.shares:
            if self._idle:
                pooled, connection, last_used = self._idle[-1]
                if self._users or time.monotonic() - last_used < KEEP_IDLE_S:
                    return pooled, connection
                self._idle.pop()  # idle too long, and nobody is using it
                self._give_back(pooled)
            return None
        while self._idle:
            pooled, connection, last_used = self._idle.pop()
            if time.monotonic() - last_used < KEEP_IDLE_S:
                return pooled, connection
            self._give_back(pooled)
        return None

    async def _checkout(self) -> PoolProxiedConnection:
        """A connection from the pool, when none is kept (see _kept); on SQLite, the
        shared one, opened by one call for all."""
        if self.shares:
            if self._opening is None:
                self._opening = asyncio.get_running_loop().create_task(self._open_shared())
                self._opening.add_done_callback(_retrieved)  # its callers may all be gone
            # Shielded: a caller that gives up does not stop the opening for the others.
            return await asyncio.shield(self._opening)
        # In a task of its own: a driver bounds its connect with asyncio.timeout() (or,
        # from Python 3.12, wait_for), which cancels the task it runs in, and an
        # acquire runs in its caller's task (see _attempt.py), which would take that
        # for its caller being cancelled.
        return await asyncio.get_running_loop().create_task(self._engine.raw_connection())

    async def _open_shared(self) -> PoolProxiedConnection:
        try:
            pooled = await self._engine.raw_connection()
        finally:
            self._opening = None
        # close() waits for this
        self._idle.append((pooled, pooled.driver_connection, time.monotonic()))
        return pooled

    def _give_back(self, pooled: PoolProxiedConnection) -> None:
        """Return a connection to the pool, in a task of its own.

        The pool may close it, which is I/O; nothing a call has already decided may
        wait on that, or be lost if the call's deadline cancels it meanwhile.
        """
        task = asyncio.get_running_loop().create_task(greenlet_spawn(pooled.close))
        self._returning.add(task)
        task.add_done_callback(self._returning.discard)

    def release(self) -> None:
        """Return every kept connection to the pool (in the background)."""
        idle, self._idle = self._idle, []
        for pooled, _, _ in idle:
            self._give_back(pooled)

    async def close(self) -> None:
        """Return the kept connections, keep none from calls still under way, and wait
        for the connections on their way back to the pool."""
        self._keep = 0
        if self._opening is not None:
            await asyncio.wait({self._opening})
        self.release()
        if self._returning:
            # asyncio.wait, not gather: if this is cancelled, the returns still finish.
            await asyncio.wait(set(self._returning))


def _retrieved(task: asyncio.Task[Any]) -> None:
    """Mark a task's error as seen: whoever awaited it got it already, if anyone did."""
    if not task.cancelled():
        task.exception()


def lost_connection(error: BaseException) -> bool:
    """Whether a driver error means the connection itself is gone."""
    if isinstance(error, ConnectionError | OSError):
        return True
    if "Connection" in type(error).__name__:  # asyncpg: ConnectionDoesNotExistError...
        return True
    code = error.args[0] if error.args else None
    if code == 0 and type(error).__name__ == "InterfaceError":
        return True  # asyncmy: the connection was closed ("Not connected")
    return code in (2006, 2013, 2055)  # MySQL: server gone away, lost connection
