"""Backend fixtures: every test that takes ``backend`` runs on SQLite, PostgreSQL (with
asyncpg, and with psycopg) and MariaDB.

PostgreSQL and MySQL/MariaDB are real servers, found through environment variables
(defaults: the local servers that ``docker compose up`` starts). When one cannot be
reached its tests are skipped with a one-line reason, except under ``CI=true``,
where an unreachable server fails the run.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import MetaData, event, select
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from aiocronlock import AsyncDBLocker, lock_table

POSTGRES_URL = os.environ.get(
    "AIOCRONLOCK_TEST_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
)
PSYCOPG_URL = os.environ.get(
    "AIOCRONLOCK_TEST_PSYCOPG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
MYSQL_URL = os.environ.get("AIOCRONLOCK_TEST_MYSQL_URL", "mysql+asyncmy://root@127.0.0.1:3306/test")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

BACKENDS = ("sqlite", "postgresql", "mysql", "psycopg")


def _reachable(url: str) -> bool:
    parsed = make_url(url)
    try:
        with socket.create_connection((parsed.host or "127.0.0.1", parsed.port or 0), timeout=2):
            return True
    except OSError:
        return False


def server_url(name: str) -> str:
    """The URL of a server backend, skipping (or, under CI, failing) when it is down."""
    url = {"postgresql": POSTGRES_URL, "psycopg": PSYCOPG_URL}.get(name, MYSQL_URL)
    if not _reachable(url):
        where = make_url(url).render_as_string(hide_password=True)
        message = f"{name} server not reachable at {where}"
        if IN_CI:
            pytest.fail(f"{message} (CI=true: a missing server is a failure)")
        pytest.skip(message)
    return url


@dataclass
class Backend:
    """One database to test against, with a table name of the test's own."""

    name: str
    url: str
    table_name: str

    @property
    def is_sqlite(self) -> bool:
        return self.name == "sqlite"

    @property
    def is_postgres(self) -> bool:
        """PostgreSQL, whichever driver ("postgresql" is asyncpg, "psycopg" psycopg)."""
        return self.name in ("postgresql", "psycopg")

    @property
    def dialect(self) -> str:
        """The database: "sqlite", "postgresql" or "mysql", whichever the driver."""
        return "postgresql" if self.is_postgres else self.name

    def engine(self, **kwargs: Any) -> AsyncEngine:
        return create_async_engine(self.url, **kwargs)


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    name: str = request.param
    known = request.node.get_closest_marker("xfail_psycopg")
    if known is not None and name == "psycopg":  # strict: passing means the note is stale
        request.applymarker(pytest.mark.xfail(reason=known.args[0], strict=True))
    table = f"t_{uuid.uuid4().hex[:12]}"
    url = f"sqlite+aiosqlite:///{tmp_path / 'locks.db'}" if name == "sqlite" else server_url(name)
    backend = Backend(name=name, url=url, table_name=table)
    yield backend
    if name != "sqlite":
        asyncio.run(_drop_table(url, table))


async def _drop_table(url: str, table: str) -> None:
    """Drop the test's table and every companion table ``lock_table`` defines with it."""
    engine = create_async_engine(url)
    metadata = MetaData()
    lock_table(metadata, name=table)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(lambda sync: metadata.drop_all(sync, checkfirst=True))
    finally:
        await engine.dispose()


LockerFactory = Callable[..., Awaitable[AsyncDBLocker]]


@pytest.fixture
async def engine(backend: Backend) -> AsyncIterator[AsyncEngine]:
    """The test's engine; after the test, no connection may still be checked out."""
    engine = backend.engine()
    try:
        yield engine
        checked_out = engine.pool.checkedout()  # type: ignore[attr-defined]
        assert checked_out == 0, f"{checked_out} connection(s) leaked from the pool"
    finally:
        await engine.dispose()


@pytest.fixture
async def make_locker(backend: Backend, engine: AsyncEngine) -> AsyncIterator[LockerFactory]:
    """Build lockers on the test's table (created on first use); all are closed afterwards.

    ``make_locker(worker="a")`` shares the test's engine; ``make_locker(own_engine=True)``
    gives the locker an engine of its own, like another instance of a service.
    """
    lockers: list[AsyncDBLocker] = []
    engines: list[AsyncEngine] = []

    async def factory(
        *, own_engine: bool = False, create: bool = True, **kwargs: Any
    ) -> AsyncDBLocker:
        kwargs.setdefault("table_name", backend.table_name)
        kwargs.setdefault("clean_interval", None)
        target = engine
        if own_engine:
            target = backend.engine()
            engines.append(target)
        locker = AsyncDBLocker(target, **kwargs)
        lockers.append(locker)
        if create:
            await locker.create_table()
        return locker

    yield factory
    for locker in lockers:
        await locker.aclose()
    for own in engines:
        assert own.pool.checkedout() == 0, "connection leaked from a locker's own engine"  # type: ignore[attr-defined]
        await own.dispose()


class StatementCounter(logging.Handler):
    """Counts the statements sent to the database: through the engine (SQLAlchemy's
    cursor events) and through the locker's acquire path (the ``aiocronlock.sql`` log)."""

    def __init__(self, engine: AsyncEngine) -> None:
        super().__init__(logging.DEBUG)
        self.statements: list[str] = []
        self._engine = engine.sync_engine
        event.listen(self._engine, "before_cursor_execute", self._record)
        self._sql_log = logging.getLogger("aiocronlock.sql")
        self._level = self._sql_log.level
        self._sql_log.setLevel(logging.DEBUG)
        self._sql_log.addHandler(self)

    def _record(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        self.statements.append(statement)

    def emit(self, record: logging.LogRecord) -> None:
        args = record.args
        self.statements.append(str(args[0]) if isinstance(args, tuple) else record.getMessage())

    def detach(self) -> None:
        event.remove(self._engine, "before_cursor_execute", self._record)
        self._sql_log.removeHandler(self)
        self._sql_log.setLevel(self._level)

    def __len__(self) -> int:
        return len(self.statements)


@pytest.fixture
def count_statements(engine: AsyncEngine) -> Iterator[StatementCounter]:
    counter = StatementCounter(engine)
    yield counter
    counter.detach()


async def fetch_rows(engine: AsyncEngine, table: str) -> list[Any]:
    """The table's rows, oldest first, read directly (not through the locker)."""
    locks = lock_table(MetaData(), name=table)
    async with engine.connect() as conn:
        result = await conn.execute(select(locks).order_by(locks.c.id))
        return list(result.mappings().all())


class LogWaiter(logging.Handler):
    """Collects one logger's records so a test can await them instead of polling."""

    def __init__(self, level: int) -> None:
        super().__init__(level)
        self.records: list[logging.LogRecord] = []
        self._arrived = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        self._arrived.set()

    async def wait_for(self, count: int) -> list[logging.LogRecord]:
        """Wait until ``count`` records have arrived (bound it with ``asyncio.timeout``)."""
        while len(self.records) < count:
            self._arrived.clear()
            await self._arrived.wait()
        return self.records


@contextmanager
def watch_log(name: str, level: int = logging.WARNING) -> Iterator[LogWaiter]:
    """Attach a :class:`LogWaiter` to the logger ``name`` for the duration of the block."""
    logger = logging.getLogger(name)
    waiter = LogWaiter(level)
    logger.addHandler(waiter)
    try:
        yield waiter
    finally:
        logger.removeHandler(waiter)
