"""History stays true through outages: an outcome the database missed is recorded later."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from _proxy import Proxy
from aiocronlock import AsyncDBLocker, BackendError
from conftest import Backend, fetch_rows, watch_log


# The proxy sits in front of a server: SQLite has no connection to cut.
@pytest.mark.parametrize("backend", ["postgresql", "mysql"], indirect=True)
async def test_an_outcome_the_database_missed_is_recorded_once_it_is_back(
    backend: Backend, engine: AsyncEngine, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="aiocronlock")
    async with Proxy.to(backend.url) as proxy:
        locker = AsyncDBLocker(
            proxy.route(backend.url),
            worker="a",
            table_name=backend.table_name,
            clean_interval=None,
            timeout=1,
        )
        try:
            await locker.create_table()
            lock = await locker.lock("job", datetime.now(UTC))
            assert lock is not None
            with watch_log("aiocronlock", logging.INFO) as log:
                # The database goes away while the job runs.
                proxy.refuse(True)
                proxy.cut()
                with pytest.raises(BackendError):
                    await lock.unlock()
                rows = await fetch_rows(engine, backend.table_name)
                assert [r["status"] for r in rows] == ["RUNNING"]

                proxy.refuse(False)
                async with asyncio.timeout(10):
                    while not any("database is back" in r.getMessage() for r in log.records):
                        await log.wait_for(len(log.records) + 1)

            rows = await fetch_rows(engine, backend.table_name)
            assert [(r["worker"], r["status"]) for r in rows] == [("a", "FINISHED")]
        finally:
            await locker.aclose()


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
async def test_closing_stops_the_attempts_and_says_what_was_not_recorded(
    backend: Backend, engine: AsyncEngine, caplog: pytest.LogCaptureFixture
) -> None:
    async with Proxy.to(backend.url) as proxy:
        locker = AsyncDBLocker(
            proxy.route(backend.url),
            worker="a",
            table_name=backend.table_name,
            clean_interval=None,
            timeout=1,
        )
        await locker.create_table()
        lock = await locker.lock("job", datetime.now(UTC))
        assert lock is not None
        proxy.refuse(True)
        proxy.cut()
        with pytest.raises(BackendError):
            await lock.unlock()
        caplog.set_level(logging.WARNING, logger="aiocronlock")
        await locker.aclose()

    assert any("could not be recorded before closing" in r.getMessage() for r in caplog.records)
    rows = await fetch_rows(engine, backend.table_name)
    assert [r["status"] for r in rows] == ["RUNNING"]
