"""Engines: building one from a URL, and turning driver errors into ``BackendError``."""

from __future__ import annotations

import errno
import inspect
import socket
import time
from typing import Any

from sqlalchemy import event, exc
from sqlalchemy.engine import URL, make_url
from sqlalchemy.engine.default import DefaultDialect
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from ._errors import BackendError, TableMissingError
from ._urls import describe as describe
from ._urls import mask_url as mask_url
from ._urls import parse_url as parse_url

#: The extra that installs each driver.
_EXTRAS = {"asyncpg": "postgres", "psycopg": "psycopg", "asyncmy": "mysql", "aiosqlite": "sqlite"}

#: How long SQLite waits for another process's write before reporting "database is locked".
SQLITE_BUSY_TIMEOUT_S = 30.0
#: Switching a new SQLite file to WAL: SQLite does not wait out its busy timeout for
#: this. While another connection writes to a file still in rollback mode, the switch
#: fails at once ("database is locked") or leaves the mode as it was; four processes
#: opening a new file together met this in a quarter of the races here, and one retry
#: 10 ms later always switched. So it is retried, this many times at most.
_WAL_ATTEMPTS = 10
_WAL_RETRY_S = 0.01
#: ``create_engine(skip_autocommit_rollback=...)`` is SQLAlchemy 2.0.43+.
_SKIPS_AUTOCOMMIT_ROLLBACK = (
    "skip_autocommit_rollback" in inspect.signature(DefaultDialect.__init__).parameters
)


def create_engine_from_url(url: URL) -> AsyncEngine:
    """An engine owned by a locker: autocommit, so that acquiring is a single round trip."""
    backend = url.get_backend_name()
    options: dict[str, Any] = {"isolation_level": "AUTOCOMMIT"}
    if _SKIPS_AUTOCOMMIT_ROLLBACK:
        # A connection in autocommit has nothing to roll back when it returns to the pool.
        options["skip_autocommit_rollback"] = True
    in_memory = backend == "sqlite" and url.database in (None, "", ":memory:")
    if not in_memory:  # an in-memory database has one connection, in a StaticPool
        # Enough connections for a burst of concurrent ticks without reconnecting.
        options.update(pool_size=10, max_overflow=20)
    if backend in ("mysql", "mariadb"):
        options["pool_recycle"] = 3600  # stay under the server's wait_timeout
        if "charset" not in url.query:
            url = url.update_query_dict({"charset": "utf8mb4"})
    elif backend == "sqlite":
        options["connect_args"] = {"timeout": SQLITE_BUSY_TIMEOUT_S}
    elif backend == "postgresql":
        # No named prepared statement may outlive its round trip: a pooler in
        # transaction mode (PgBouncer) gives the next one another server connection.
        # The acquire INSERT prepares its own, and stops when a pooler is met.
        driver = url.get_driver_name()
        if driver == "asyncpg":
            # asyncpg's cache, and SQLAlchemy's of asyncpg statements.
            options["connect_args"] = {
                "statement_cache_size": 0,
                "prepared_statement_cache_size": 0,
            }
        elif driver == "psycopg":
            options["connect_args"] = {"prepare_threshold": None}
    not_async = ValueError(
        f"engine: {url.drivername!r} is not an asyncio driver; use "
        "postgresql+asyncpg, postgresql+psycopg, mysql+asyncmy or sqlite+aiosqlite"
    )
    try:
        # The dialect class loads without its driver, so a sync driver is told apart
        # from a missing one.
        if not getattr(url.get_dialect(_is_async=True), "is_async", False):
            raise not_async
        engine = create_async_engine(url, **options)
    except exc.NoSuchModuleError as error:
        raise ValueError(
            f"engine: no SQLAlchemy dialect for {url.drivername!r} in {mask_url(url)!r}; "
            "use postgresql+asyncpg, postgresql+psycopg, mysql+asyncmy or sqlite+aiosqlite"
        ) from error
    except exc.ArgumentError as error:
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ValueError(f"engine: {mask_url(url)!r} is not a usable URL: {first_line}") from error
    except ModuleNotFoundError as error:
        driver = url.get_driver_name()
        extra = _EXTRAS.get(driver)
        fix = f"pip install 'aiocronlock[{extra}]'" if extra else f"install {driver!r}"
        raise ValueError(f"engine: the driver {driver!r} is not installed: {fix}") from error
    except exc.InvalidRequestError as error:
        raise not_async from error
    if backend == "sqlite":
        event.listen(engine.sync_engine, "connect", _sqlite_on_connect)
    return engine


def _sqlite_on_connect(dbapi_connection: Any, connection_record: Any) -> None:
    # WAL lets readers and one writer work at once across processes on one file.
    cursor = dbapi_connection.cursor()
    try:
        for attempt in range(1, _WAL_ATTEMPTS + 1):
            try:
                cursor.execute("PRAGMA journal_mode=WAL")
                row = cursor.fetchone()
            except dbapi_connection.dbapi.OperationalError as error:
                if "locked" not in str(error) or attempt == _WAL_ATTEMPTS:
                    raise
            else:
                # An in-memory database stays "memory"; after the last attempt, a file
                # left in rollback mode still works, with readers waiting for writers.
                mode = str(row[0]).lower() if row else ""
                if mode in ("wal", "memory") or attempt == _WAL_ATTEMPTS:
                    return
            # Only while a new file is switched by several processes at once, and only
            # about 10 ms when it is: blocking the event loop is simpler than waiting
            # in the greenlet that runs this hook (a writer of this same process then
            # cannot finish meanwhile, and the file may stay in rollback mode).
            time.sleep(_WAL_RETRY_S)
    finally:
        cursor.close()


def translate_error(
    error: BaseException,
    operation: str,
    *,
    target: str,
    table: str,
    timeout: float | None,
    disconnected: bool = False,
) -> BackendError:
    """A ``BackendError`` for ``error``, which the caller chains as its cause.

    ``target``: the URL with its password hidden, whose hosts a failed connect names.
    """
    if isinstance(error, TimeoutError):
        return BackendError(
            f"{operation} on {target}",
            f"no answer within {timeout:g} s",
            hint="check that the database is reachable, or raise the locker's timeout",
        )
    original = error.orig if isinstance(error, exc.DBAPIError) and error.orig else error
    if _is_missing_table(original):
        return TableMissingError(f"{operation} on {target}", table)
    text = str(original).strip().splitlines()[0] if str(original).strip() else ""
    reason = f"{type(original).__name__}: {text}" if text else type(original).__name__
    hint = None
    # The driver's own error, under SQLAlchemy's adaptation of it.
    causes = (original, original.__cause__)
    read_write = "target_session_attrs=read-write" in target
    if any(type(e).__name__ == "TargetServerAttributeNotMatched" for e in causes):
        hint = (
            f"every server among {_hosts(target)} is a standby (read-only): "
            "list the primary in the URL, or promote a standby"
        )
    elif any(getattr(e, "sqlstate", None) == "25006" for e in causes):
        hint = (
            "the server is a standby (read-only): put the primary in the URL, or list every "
            "host of the cluster (?host=h1:port&host=h2:port) with "
            "target_session_attrs=read-write"
        )
    elif _unreachable(original):
        tried = _hosts(target)
        if read_write:
            hint = (
                f"no server among {tried} accepted a read-write connection: check that the "
                "primary is up and listed (after a failover, the promoted server too)"
            )
        else:
            hint = f"could not connect to {tried}: check that the server is up and reachable"
    elif disconnected or (isinstance(error, exc.DBAPIError) and error.connection_invalidated):
        hint = (
            "the connection was dropped (the server closed it or went away); "
            "the next call reconnects"
        )
    return BackendError(f"{operation} on {target}", reason, hint=hint)


def _hosts(target: str) -> str:
    """The hosts a URL (password hidden) names, as ``host:port, host:port``."""
    try:
        url = make_url(target)
    except exc.ArgumentError:
        return "the URL's hosts"
    listed = url.query.get("host", ())
    hosts = [listed] if isinstance(listed, str) else list(listed)
    if not hosts:
        hosts = [f"{url.host or 'localhost'}" + (f":{url.port}" if url.port else "")]
    return ", ".join(hosts)


def _unreachable(error: BaseException) -> bool:
    """Whether ``error`` says no connection could be opened (refused, unknown host...)."""
    if isinstance(error, ConnectionRefusedError | socket.gaierror):
        return True
    if isinstance(error, OSError) and error.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
        return True
    if isinstance(error, OSError) and "Connect call failed" in str(error):
        return True  # asyncio, when every address of a host failed
    return bool(error.args) and error.args[0] == 2003  # MySQL: CR_CONN_HOST_ERROR


def _is_missing_table(error: BaseException) -> bool:
    sqlstate = getattr(error, "sqlstate", None) or getattr(error, "pgcode", None)
    if sqlstate == "42P01":  # PostgreSQL: undefined_table
        return True
    args = getattr(error, "args", ())
    if args and args[0] == 1146:  # MySQL/MariaDB: ER_NO_SUCH_TABLE
        return True
    return "no such table" in str(error)  # SQLite


def lost_connection(error: BaseException) -> bool:
    """Whether a driver error means the connection itself is gone."""
    if isinstance(error, exc.DBAPIError):
        if error.connection_invalidated:
            return True
        error = error.orig or error
    if isinstance(error, ConnectionError | OSError):
        return True
    if "Connection" in type(error).__name__:  # asyncpg: ConnectionDoesNotExistError...
        return True
    if "connection is closed" in str(error):
        return True  # asyncpg and psycopg, on a connection the server closed
    sqlstate = str(getattr(error, "sqlstate", None) or "")
    if sqlstate.startswith("08") or sqlstate in ("57P01", "57P02", "57P03"):
        return True  # PostgreSQL: connection exception; the server shut the session down
    code = error.args[0] if error.args else None
    if code == 0 and type(error).__name__ == "InterfaceError":
        return True  # asyncmy: the connection was closed ("Not connected")
    return code in (2006, 2013, 2055)  # MySQL: server gone away, lost connection
