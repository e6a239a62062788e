"""A database that cannot decide raises ``BackendError``: never a win, never a loss."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import MetaData
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from aiocronlock import AiocronlockError, AsyncDBLocker, BackendError, TableMissingError, lock_table
from conftest import MYSQL_URL, Backend, LockerFactory, fetch_rows, server_url, watch_log

PASSWORD = "s3cret-Hunter2"

Operation = Callable[[AsyncDBLocker], Awaitable[object]]

OPERATIONS: dict[str, Operation] = {
    "lock": lambda locker: locker.lock("job"),
    "lock-at": lambda locker: locker.lock("job", datetime.now(UTC)),
    "create_table": lambda locker: locker.create_table(),
    "clean": lambda locker: locker.clean(),
    "history": lambda locker: locker.history(),
}


def test_error_hierarchy() -> None:
    assert issubclass(BackendError, AiocronlockError)
    assert issubclass(TableMissingError, BackendError)
    assert issubclass(AiocronlockError, Exception)


# -- a missing table ---------------------------------------------------------------------------


@pytest.mark.parametrize("operation", ["lock", "lock-at", "clean", "history"])
async def test_missing_table_raises_table_missing_error(
    backend: Backend, make_locker: LockerFactory, operation: str
) -> None:
    locker = await make_locker(create=False)

    with pytest.raises(TableMissingError) as info:
        await OPERATIONS[operation](locker)

    error = info.value
    assert isinstance(error, BackendError)
    assert isinstance(error, AiocronlockError)
    assert error.__cause__ is not None
    assert "create_table" in str(error)
    assert backend.table_name in str(error)
    assert error.table == backend.table_name


async def test_a_dropped_table_fails_unlock_and_it_can_be_retried(
    backend: Backend, engine: AsyncEngine, make_locker: LockerFactory
) -> None:
    locker = await make_locker()
    lock = await locker.lock("job")
    assert lock is not None
    table = lock_table(MetaData(), name=backend.table_name)
    async with engine.begin() as conn:
        await conn.run_sync(table.drop)

    with pytest.raises(TableMissingError):
        await lock.unlock()
    assert not lock.released
    with pytest.raises(TableMissingError):
        await locker.lock("job")

    await locker.create_table()
    await lock.unlock()  # the row is gone, but the call no longer fails
    assert lock.released


async def test_a_body_error_wins_over_a_failed_unlock(
    backend: Backend,
    engine: AsyncEngine,
    make_locker: LockerFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    locker = await make_locker()
    lock = await locker.lock("job")
    assert lock is not None
    table = lock_table(MetaData(), name=backend.table_name)

    class BodyError(Exception):
        pass

    with pytest.raises(BodyError):
        async with lock:
            async with engine.begin() as conn:
                await conn.run_sync(table.drop)
            raise BodyError

    assert not lock.released
    logged = [r for r in caplog.records if r.name == "aiocronlock" and r.levelno >= logging.ERROR]
    assert len(logged) == 1
    assert "FAILED" in logged[0].getMessage()
    assert logged[0].exc_info is not None
    assert isinstance(logged[0].exc_info[1], TableMissingError)


async def test_a_normal_exit_reports_a_failed_unlock(
    backend: Backend, engine: AsyncEngine, make_locker: LockerFactory
) -> None:
    locker = await make_locker()
    lock = await locker.lock("job")
    assert lock is not None
    table = lock_table(MetaData(), name=backend.table_name)

    with pytest.raises(TableMissingError):
        async with lock, engine.begin() as conn:
            await conn.run_sync(table.drop)
    assert not lock.released


# -- an unreachable server ---------------------------------------------------------------------

UNREACHABLE = [
    pytest.param("postgresql+asyncpg://postgres@127.0.0.1:1/test", id="postgresql"),
    pytest.param("mysql+asyncmy://root@127.0.0.1:1/test", id="mysql"),
    pytest.param("sqlite+aiosqlite:///{tmp}/no/such/dir/locks.db", id="sqlite"),
]


@pytest.mark.parametrize("url", UNREACHABLE)
@pytest.mark.parametrize("operation", sorted(OPERATIONS))
async def test_unreachable_database_raises_backend_error_promptly(
    url: str, operation: str, tmp_path: Path
) -> None:
    threads_before = set(threading.enumerate())
    async with AsyncDBLocker(url.format(tmp=tmp_path), timeout=2, clean_interval=None) as locker:
        started = time.monotonic()
        with pytest.raises(BackendError) as info:
            await OPERATIONS[operation](locker)
        elapsed = time.monotonic() - started

    assert elapsed < 4
    assert info.value.__cause__ is not None
    assert not isinstance(info.value, TableMissingError)
    # aiosqlite stops the thread of a failed connection without awaiting it; let it
    # finish while this test's event loop still runs (else it reports a closed loop).
    for thread in set(threading.enumerate()) - threads_before:
        await asyncio.to_thread(thread.join, 5)
        assert not thread.is_alive()


@pytest.fixture
async def silent_server() -> AsyncIterator[int]:
    """A TCP server that accepts connections and never answers: a hung database."""
    writers: list[asyncio.StreamWriter] = []

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    for writer in writers:
        writer.close()
    server.close()
    await server.wait_closed()


@pytest.mark.parametrize("scheme", ["postgresql+asyncpg", "mysql+asyncmy"])
async def test_a_hung_server_raises_backend_error_after_timeout(
    silent_server: int, scheme: str
) -> None:
    url = f"{scheme}://user@127.0.0.1:{silent_server}/test"
    async with AsyncDBLocker(url, timeout=1, clean_interval=None) as locker:
        started = time.monotonic()
        with pytest.raises(BackendError) as info:
            await locker.lock("job")
        elapsed = time.monotonic() - started

    assert 0.9 <= elapsed < 3
    assert info.value.__cause__ is not None
    assert "1 s" in str(info.value)


async def test_an_engine_passed_in_that_is_unreachable() -> None:
    engine = create_async_engine("postgresql+asyncpg://postgres@127.0.0.1:1/test")
    try:
        locker = AsyncDBLocker(engine, timeout=2, clean_interval=None)
        with pytest.raises(BackendError) as info:
            await locker.lock("job")
        assert info.value.__cause__ is not None
        await locker.aclose()
    finally:
        await engine.dispose()


async def test_a_failure_is_neither_won_nor_lost_and_recovers(
    backend: Backend, engine: AsyncEngine, make_locker: LockerFactory
) -> None:
    locker = await make_locker(create=False, worker="a")
    run_time = datetime.now(UTC)
    with pytest.raises(BackendError):
        await locker.lock("job", run_time)

    await locker.create_table()
    won = await locker.lock("job", run_time)

    assert won is not None
    rows = await fetch_rows(engine, backend.table_name)
    assert [(r["job_name"], r["worker"]) for r in rows] == [("job", "a")]


# -- passwords -------------------------------------------------------------------------------


def _rejected_mysql_url() -> str:
    server_url("mysql")
    return make_url(MYSQL_URL).set(password=PASSWORD).render_as_string(hide_password=False)


URL_WITH_PASSWORD: dict[str, Callable[[], str]] = {
    "mysql-rejected": _rejected_mysql_url,
    "postgresql-unreachable": lambda: f"postgresql+asyncpg://postgres:{PASSWORD}@127.0.0.1:1/test",
    "mysql-unreachable": lambda: f"mysql+asyncmy://root:{PASSWORD}@127.0.0.1:1/test",
}


@pytest.mark.parametrize("which", sorted(URL_WITH_PASSWORD))
async def test_no_password_in_errors_reprs_or_logs(
    which: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    url = URL_WITH_PASSWORD[which]()
    locker = AsyncDBLocker(url, timeout=2, clean_interval=0.1)
    errors: list[BackendError] = []
    with watch_log("aiocronlock.cleaner") as cleaner_log:
        async with locker:
            for operation in sorted(OPERATIONS):
                with pytest.raises(BackendError) as info:
                    await OPERATIONS[operation](locker)
                errors.append(info.value)
            # Let the background cleaner fail and log it too.
            async with asyncio.timeout(5):
                await cleaner_log.wait_for(1)

    texts = [repr(locker), str(locker)]
    for error in errors:
        assert error.__cause__ is not None
        texts += [str(error), repr(error)]
    formatter = logging.Formatter()
    for record in caplog.records:
        texts.append(formatter.format(record))
    assert caplog.records
    leaks = [text for text in texts if PASSWORD in text]
    assert leaks == []
    assert "***" in repr(locker)


@pytest.mark.parametrize(
    "url",
    [
        f"postgresql+asyncpg://root:{PASSWORD}@host:notaport/db",
        f"nosuchdb://root:{PASSWORD}@host/db",
        f"postgresql+psycopg2://root:{PASSWORD}@host/db",
        f"mysql+pymysql://root:{PASSWORD}@host/db",
    ],
)
def test_no_password_in_url_errors(url: str) -> None:
    with pytest.raises(ValueError, match="engine") as info:
        AsyncDBLocker(url)
    assert PASSWORD not in str(info.value)
    assert PASSWORD not in repr(info.value)


def test_errors_that_say_the_connection_is_gone() -> None:
    from asyncmy.errors import InterfaceError as MySQLInterfaceError
    from asyncmy.errors import OperationalError as MySQLOperationalError
    from asyncpg.exceptions import (  # type: ignore[import-untyped]
        ConnectionDoesNotExistError,
    )
    from asyncpg.exceptions import InterfaceError as PostgresInterfaceError

    from aiocronlock._engine import lost_connection

    assert lost_connection(MySQLInterfaceError(0, "Not connected"))
    assert lost_connection(MySQLOperationalError(2013, "Lost connection to server"))
    assert lost_connection(ConnectionDoesNotExistError("connection was closed"))
    assert lost_connection(ConnectionResetError())
    # Errors of a working connection are not.
    assert not lost_connection(MySQLOperationalError(1205, "Lock wait timeout exceeded"))
    assert not lost_connection(PostgresInterfaceError("another operation is in progress"))
    assert not lost_connection(ValueError("bad input"))


# -- what a failover meets -----------------------------------------------------------------


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def test_a_refused_connect_names_every_host_tried() -> None:
    first, second = _free_port(), _free_port()
    hosts = f"host=127.0.0.1:{first}&host=127.0.0.1:{second}"
    for attrs, expected in [
        ("", f"could not connect to 127.0.0.1:{first}, 127.0.0.1:{second}: check that"),
        (
            "&target_session_attrs=read-write",
            f"no server among 127.0.0.1:{first}, 127.0.0.1:{second} accepted a read-write",
        ),
    ]:
        locker = AsyncDBLocker(f"postgresql://u:{PASSWORD}@/db?{hosts}{attrs}", clean_interval=None)
        try:
            with pytest.raises(BackendError) as info:
                await locker.lock("job")
        finally:
            await locker.aclose()
        assert expected in str(info.value)
        assert "lost" not in str(info.value)
        assert PASSWORD not in str(info.value)


def test_a_read_only_server_and_a_dropped_connection_say_so() -> None:
    from asyncpg.exceptions import InterfaceError, ReadOnlySQLTransactionError
    from sqlalchemy import exc

    from aiocronlock._engine import lost_connection, translate_error

    def message(error: BaseException) -> str:
        translated = translate_error(
            error,
            "lock('job')",
            target="postgresql+asyncpg://u:***@db1:5432/db",
            table="t",
            timeout=5,
            disconnected=lost_connection(error),
        )
        return str(translated)

    read_only = ReadOnlySQLTransactionError("cannot execute INSERT in a read-only transaction")
    assert "the server is a standby (read-only)" in message(read_only)
    assert "target_session_attrs=read-write" in message(read_only)
    assert not lost_connection(read_only)

    closed = InterfaceError("connection is closed")
    assert lost_connection(closed)
    wrapped = exc.InterfaceError("UPDATE ...", {}, closed, connection_invalidated=True)
    for error in (closed, wrapped):
        assert "the connection was dropped" in message(error)
        assert "the next call reconnects" in message(error)
