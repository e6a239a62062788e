"""The comparison: each backend's asyncio driver used directly, through its own pool.

Every client runs in autocommit, like the locker's engine, and returns a pooled
connection without a round trip, like the engine does with
``skip_autocommit_rollback=True``:

- PostgreSQL: ``asyncpg.create_pool`` with ``reset`` set to a no-op. asyncpg's default
  reset sends ``RESET ALL``/``UNLISTEN *``/... on every release, a second round trip
  per call that would flatter the library.
- MariaDB/MySQL: ``asyncmy.create_pool(autocommit=True)``; its release is local.
- SQLite: aiosqlite connections opened with ``isolation_level=None`` (autocommit), the
  same busy timeout as the locker, on the same WAL file, handed out by a queue.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any, Protocol

import aiosqlite
import asyncmy
import asyncpg  # type: ignore[import-untyped,unused-ignore]
from sqlalchemy.engine import make_url

from ._backends import Backend

#: The busy timeout the locker gives SQLite connections (aiocronlock._engine).
SQLITE_TIMEOUT_S = 30.0


class RawClient(Protocol):
    async def insert_returning_id(self, sql: str, params: Sequence[Any]) -> int | None:
        """Run the single-row acquire INSERT; the new id, or ``None`` if the key existed."""
        ...

    async def insert_rows(self, sql: str, params: Sequence[Any]) -> int:
        """Run a multi-row INSERT; how many rows it inserted."""
        ...

    async def aclose(self) -> None: ...


async def _keep_session(connection: Any) -> None:
    """asyncpg pool reset hook: nothing to reset in autocommit, so no round trip."""


class PostgresClient:
    def __init__(self, pool: Any) -> None:
        self._pool = pool

    @classmethod
    async def open(cls, url: str, size: int) -> PostgresClient:
        u = make_url(url)
        pool = await asyncpg.create_pool(
            host=u.host,
            port=u.port,
            user=u.username,
            password=u.password,
            database=u.database,
            min_size=size,
            max_size=size,
            reset=_keep_session,
        )
        return cls(pool)

    async def insert_returning_id(self, sql: str, params: Sequence[Any]) -> int | None:
        row_id: int | None = await self._pool.fetchval(sql, *params)
        return row_id

    async def insert_rows(self, sql: str, params: Sequence[Any]) -> int:
        return len(await self._pool.fetch(sql, *params))

    async def aclose(self) -> None:
        await self._pool.close()


class MySQLClient:
    def __init__(self, pool: Any) -> None:
        self._pool = pool

    @classmethod
    async def open(cls, url: str, size: int) -> MySQLClient:
        u = make_url(url)
        pool = await asyncmy.create_pool(
            host=u.host or "127.0.0.1",
            port=u.port or 3306,
            user=u.username,
            password=u.password or "",
            db=u.database,
            charset="utf8mb4",
            autocommit=True,
            minsize=size,
            maxsize=size,
        )
        return cls(pool)

    async def insert_returning_id(self, sql: str, params: Sequence[Any]) -> int | None:
        async with self._pool.acquire() as conn, conn.cursor() as cursor:
            await cursor.execute(sql, params)
            row_id: int = cursor.lastrowid
            return row_id or None

    async def insert_rows(self, sql: str, params: Sequence[Any]) -> int:
        async with self._pool.acquire() as conn, conn.cursor() as cursor:
            await cursor.execute(sql, params)
            if cursor.description is not None:  # INSERT ... RETURNING (MariaDB)
                return len(await cursor.fetchall())
            count: int = cursor.rowcount
            return count

    async def aclose(self) -> None:
        self._pool.close()
        await self._pool.wait_closed()


class SQLiteClient:
    def __init__(self, connections: list[aiosqlite.Connection]) -> None:
        self._connections = connections
        self._free: asyncio.Queue[aiosqlite.Connection] = asyncio.Queue()
        for conn in connections:
            self._free.put_nowait(conn)

    @classmethod
    async def open(cls, path: str, size: int) -> SQLiteClient:
        connections = []
        for _ in range(size):
            conn = await aiosqlite.connect(path, timeout=SQLITE_TIMEOUT_S, isolation_level=None)
            await conn.execute("PRAGMA journal_mode=WAL")
            connections.append(conn)
        return cls(connections)

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[aiosqlite.Connection]:
        conn = await self._free.get()
        try:
            yield conn
        finally:
            self._free.put_nowait(conn)

    async def insert_returning_id(self, sql: str, params: Sequence[Any]) -> int | None:
        async with self._connection() as conn:
            rows = await conn.execute_fetchall(sql, params)
        for row in rows:
            row_id: int = row[0]
            return row_id
        return None

    async def insert_rows(self, sql: str, params: Sequence[Any]) -> int:
        async with self._connection() as conn:
            return len(list(await conn.execute_fetchall(sql, params)))

    async def aclose(self) -> None:
        for conn in self._connections:
            await conn.close()


class Dedicated:
    """The floor: the driver on one connection of its own, no pool, in autocommit."""

    def __init__(self, backend: str, connection: Any) -> None:
        self._backend = backend
        self._connection = connection

    @classmethod
    async def open(cls, backend: Backend) -> Dedicated:
        u = make_url(backend.url)
        connection: Any
        if backend.name == "postgresql":
            connection = await asyncpg.connect(
                host=u.host, port=u.port, user=u.username, password=u.password, database=u.database
            )
        elif backend.name == "mysql":
            connection = await asyncmy.connect(
                host=u.host or "127.0.0.1",
                port=u.port or 3306,
                user=u.username,
                password=u.password or "",
                db=u.database,
                charset="utf8mb4",
                autocommit=True,
            )
        else:
            connection = await aiosqlite.connect(
                backend.sqlite_path, timeout=SQLITE_TIMEOUT_S, isolation_level=None
            )
            await connection.execute("PRAGMA journal_mode=WAL")
        return cls(backend.name, connection)

    async def insert_returning_id(self, sql: str, params: Sequence[Any]) -> int | None:
        conn = self._connection
        if self._backend == "postgresql":
            row_id: int | None = await conn.fetchval(sql, *params)
            return row_id
        if self._backend == "mysql":
            async with conn.cursor() as cursor:
                await cursor.execute(sql, params)
                return cursor.lastrowid or None
        rows = await conn.execute_fetchall(sql, params)
        return rows[0][0] if rows else None

    async def insert_rows(self, sql: str, params: Sequence[Any]) -> int:
        raise NotImplementedError

    async def aclose(self) -> None:
        if self._backend == "mysql":
            await self._connection.ensure_closed()
        else:
            await self._connection.close()


async def open_raw(backend: Backend, size: int = 1) -> RawClient:
    """A raw-driver client on ``backend`` holding ``size`` connections in a pool."""
    if backend.name == "postgresql":
        return await PostgresClient.open(backend.url, size)
    if backend.name == "mysql":
        return await MySQLClient.open(backend.url, size)
    return await SQLiteClient.open(backend.sqlite_path, size)
