"""``schema=``: the lock table (and its leases table) in a schema of your choice."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from aiocronlock import AsyncDBLocker, BackendError
from conftest import Backend

#: A schema of its own on PostgreSQL; on MySQL a schema is a database, so the test
#: database itself; on SQLite the main database.
SCHEMAS = {"postgresql": "aiocronlock_schema_test", "mysql": "test", "sqlite": "main"}


@pytest.fixture
async def schema(backend: Backend) -> AsyncIterator[str]:
    name = SCHEMAS[backend.dialect]
    if not backend.is_postgres:
        yield name
        return
    engine = create_async_engine(backend.url)
    try:
        async with engine.begin() as conn:
            await conn.execute(text(f"CREATE SCHEMA IF NOT EXISTS {name}"))
        yield name
        async with engine.begin() as conn:
            await conn.execute(text(f"DROP SCHEMA {name} CASCADE"))
    finally:
        await engine.dispose()


async def test_the_locker_works_in_a_named_schema(backend: Backend, schema: str) -> None:
    locker = AsyncDBLocker(
        backend.url, worker="w", table_name=backend.table_name, schema=schema, clean_interval=None
    )
    try:
        await locker.create_table()
        await locker.create_table()  # idempotent there too
        tick = datetime.now(UTC).replace(microsecond=0)
        lock = await locker.lock("job", tick)
        assert lock is not None
        async with lock:
            pass
        assert await locker.lock("job", tick) is None
        exclusive = await locker.lock("solo", tick, exclusive=True, lease=5)
        assert exclusive is not None
        await exclusive.unlock()
        runs = await locker.history()
        assert [(run.job_name, run.status) for run in runs] == [
            ("solo", "FINISHED"),
            ("job", "FINISHED"),
        ]
        assert locker.table.fullname == f"{schema}.{backend.table_name}"
    finally:
        if backend.is_postgres:
            await locker.aclose()
        else:
            # Not in a schema of the test's own: drop what it made.
            async with locker.engine.begin() as conn:
                await conn.run_sync(locker.table.metadata.drop_all)
            await locker.aclose()


# SQLite has no schemas beyond attached databases.
@pytest.mark.parametrize("backend", ["postgresql", "mysql"], indirect=True)
async def test_a_missing_schema_is_a_backend_error(backend: Backend) -> None:
    locker = AsyncDBLocker(
        backend.url, table_name=backend.table_name, schema="no_such_schema", clean_interval=None
    )
    try:
        with pytest.raises(BackendError) as caught:
            await locker.lock("job", datetime.now(UTC))
        assert "does not exist" in str(caught.value) or "no_such_schema" in str(caught.value)
        assert caught.value.__cause__ is not None
    finally:
        await locker.aclose()
