"""The hot path: the acquire INSERT sent straight through the driver.

SQLAlchemy's execution layer (statement cache lookup, greenlet hand-off, result
wrapping) costs several times the round trip itself on a fast local database. For
the one statement every instance sends on every tick, a locker that owns its engine
compiles the statement once and sends it through the driver of a connection taken
from SQLAlchemy's pool: same SQL, same pool, one round trip, none of the overhead.

Checking a connection out of SQLAlchemy's pool and back in costs about as much as
the rest of the call together (a greenlet hand-off and the pool's bookkeeping), so
the connections this path used stay checked out, in a short list of its own, for
the next call. They go back to the pool when idle for a while (where its recycling
and the server's idle timeout apply), on any error, and when the locker closes.

Used only on engines the locker created, whose connections are in autocommit by
construction; with an engine passed in, the statement goes through SQLAlchemy.
"""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import Insert
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import PoolProxiedConnection, QueuePool
from sqlalchemy.util import greenlet_spawn

#: The inputs of the acquire statement, bound per call; every other parameter is constant.
_INPUTS = ("job_name", "job_identifier", "worker")

#: A kept connection idle longer than this goes back to the pool instead of being used.
KEEP_IDLE_S = 30.0


class DriverAcquire:
    """The compiled acquire statement and how to send it through one driver."""

    __slots__ = ("_constants", "_driver", "_encode", "_engine", "_idle", "_keep", "_slots", "sql")

    def __init__(self, engine: AsyncEngine, statement: Insert, driver: str) -> None:
        compiled = statement.compile(dialect=engine.dialect)
        order = compiled.positiontup or []
        self.sql = str(compiled)
        self._engine = engine
        self._driver = driver
        self._constants = [compiled.params.get(name) for name in order]
        self._slots = [(i, _INPUTS.index(name)) for i, name in enumerate(order) if name in _INPUTS]
        # Job names and identifiers are stored as UTF-8 bytes on MySQL (see ExactText).
        self._encode = driver == "asyncmy"
        # Connections kept checked out between calls, each with when it was last used.
        self._idle: list[tuple[PoolProxiedConnection, float]] = []
        # Half the pool at most, so SQLAlchemy's own checkouts (unlock, clean) keep
        # their share; none from a single-connection pool (in-memory SQLite).
        pool = engine.sync_engine.pool
        self._keep = max(1, pool.size() // 2) if isinstance(pool, QueuePool) else 0

    @classmethod
    def for_engine(
        cls, engine: AsyncEngine, statement: Insert, *, owned: bool
    ) -> DriverAcquire | None:
        driver = engine.dialect.driver
        if owned and driver in ("asyncpg", "asyncmy", "aiosqlite"):
            return cls(engine, statement, driver)
        return None

    def _arguments(self, job_name: str, identifier: str, worker: str) -> list[Any]:
        values: tuple[Any, ...] = (job_name, identifier, worker)
        if self._encode:
            values = (job_name.encode(), identifier.encode(), worker)
        arguments = list(self._constants)
        for position, which in self._slots:
            arguments[position] = values[which]
        return arguments

    async def __call__(self, job_name: str, identifier: str, worker: str) -> int | None:
        """Send the INSERT; the new row's id, or ``None`` when the tick was taken."""
        arguments = self._arguments(job_name, identifier, worker)
        pooled = await self._checkout()
        try:
            connection = pooled.driver_connection
            assert connection is not None
            row_id: Any
            if self._driver == "asyncpg":
                row_id = await connection.fetchval(self.sql, *arguments)
            elif self._driver == "asyncmy":
                async with connection.cursor() as cursor:
                    await cursor.execute(self.sql, arguments)
                    row_id = cursor.lastrowid or None
            else:
                # One hop to aiosqlite's thread: execute and fetch together.
                rows = await connection.execute_fetchall(self.sql, arguments)
                row_id = rows[0][0] if rows else None
        except BaseException as error:
            # Failed, timed out or cancelled midway: this connection's state is unknown,
            # and when the server went away the pool's other connections are likely dead
            # too. Like SQLAlchemy on a disconnect, retire them all: each reconnects on
            # its next checkout.
            self._engine.sync_engine.pool._invalidate(pooled, error)
            # The kept ones too: back to the pool, which reconnects them on checkout.
            await self.release()
            raise
        if len(self._idle) < self._keep:
            self._idle.append((pooled, time.monotonic()))
        else:
            await greenlet_spawn(pooled.close)
        return None if row_id is None else int(row_id)

    async def _checkout(self) -> PoolProxiedConnection:
        """A kept connection used recently, else one from the pool."""
        idle = self._idle
        while idle:
            pooled, last_used = idle.pop()
            if time.monotonic() - last_used < KEEP_IDLE_S:
                return pooled
            await greenlet_spawn(pooled.close)
        return await self._engine.raw_connection()

    async def release(self) -> None:
        """Return every kept connection to the pool."""
        idle, self._idle = self._idle, []
        for pooled, _ in idle:
            await greenlet_spawn(pooled.close)

    async def close(self) -> None:
        """Return the kept connections, and keep none from calls still under way."""
        self._keep = 0
        await self.release()


def lost_connection(error: BaseException) -> bool:
    """Whether a driver error means the connection itself is gone."""
    if isinstance(error, ConnectionError | OSError):
        return True
    if "Connection" in type(error).__name__:  # asyncpg: ConnectionDoesNotExistError...
        return True
    code = error.args[0] if error.args else None
    return code in (2006, 2013, 2055)  # MySQL: server gone away, lost connection
