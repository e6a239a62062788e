"""A locker built from a URL sends the acquire INSERT straight through the driver.

SQLAlchemy's event listeners do not see that statement, so these tests count what
reaches the database at the driver (PostgreSQL, SQLite) or at the server (MariaDB).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import MetaData
from sqlalchemy.ext.asyncio import create_async_engine

from aiocronlock import AsyncDBLocker, lock_table
from conftest import Backend


@pytest.fixture
async def url_locker(backend: Backend) -> AsyncIterator[AsyncDBLocker]:
    locker = AsyncDBLocker(backend.url, worker="w", table_name=backend.table_name)
    await locker.create_table()
    assert locker._driver_acquire is not None, "a URL-built locker takes the driver path"
    try:
        yield locker
    finally:
        await locker.aclose()


async def _statements_sent(locker: AsyncDBLocker, backend: Backend, calls: int) -> list[str]:
    """Run ``calls`` lock() calls on one pooled connection; what reached the database."""
    tick = datetime.now(UTC).replace(microsecond=0)
    assert await locker.lock("warm-up", tick) is not None  # opens the pool's one connection
    pooled = await locker.engine.raw_connection()
    driver: Any = pooled.driver_connection
    sent: list[str] = []
    if backend.name == "postgresql":
        driver.add_query_logger(lambda record: sent.append(record.query))
    elif backend.name == "sqlite":
        await driver.set_trace_callback(sent.append)
    else:
        async with driver.cursor() as cursor:
            await cursor.execute("SHOW SESSION STATUS LIKE 'Questions'")
            before = int((await cursor.fetchone())[1])
    pooled.close()
    for _ in range(calls):
        await locker.lock("job", tick)  # the first wins, the others lose
    if backend.name == "mysql":
        pooled = await locker.engine.raw_connection()
        driver = pooled.driver_connection
        async with driver.cursor() as cursor:
            await cursor.execute("SHOW SESSION STATUS LIKE 'Questions'")
            after = int((await cursor.fetchone())[1])
        pooled.close()
        # Questions counts the SHOW itself too.
        return ["INSERT"] * (after - before - 1)
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
    backend: Backend, url_locker: AsyncDBLocker
) -> None:
    tick = datetime.now(UTC).replace(microsecond=0)
    name = "ünïcödé 'job'; --"
    won = await url_locker.lock(name, tick)
    assert won is not None
    async with won:
        pass
    assert await url_locker.lock(name, tick) is None
    locks = lock_table(MetaData(), name=backend.table_name)
    engine = create_async_engine(backend.url)
    try:
        async with engine.connect() as conn:
            rows = (await conn.execute(locks.select())).mappings().all()
    finally:
        await engine.dispose()
    assert [(r["id"], r["job_name"], r["worker"], r["status"]) for r in rows] == [
        (won.id, name, "w", "FINISHED")
    ]
