"""The databases under test: URLs, this run's table names, and their setup and teardown."""

from __future__ import annotations

import os
import secrets
import socket
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import MetaData
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from aiocronlock import AsyncDBLocker, lock_table

BACKENDS = ("postgresql", "mysql", "sqlite")
#: The worker name every contender stores, so the raw driver sends the very same values.
WORKER = "bench"

DEFAULT_URLS = {
    "postgresql": os.environ.get(
        "AIOCRONLOCK_BENCH_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
    ),
    "mysql": os.environ.get(
        "AIOCRONLOCK_BENCH_MYSQL_URL", "mysql+asyncmy://root@127.0.0.1:3306/test"
    ),
}

#: What the raw-driver contender is called in the tables.
RAW_NAMES = {"postgresql": "raw asyncpg", "mysql": "raw asyncmy", "sqlite": "raw aiosqlite"}


@dataclass(frozen=True, slots=True)
class Backend:
    """One database, and the table name this run owns on it (``bench_<random>``)."""

    name: str
    url: str
    table: str

    @property
    def raw_name(self) -> str:
        return RAW_NAMES[self.name]

    @property
    def sqlite_path(self) -> str:
        database = make_url(self.url).database
        assert self.name == "sqlite" and database
        return database

    def locker(
        self, table: str | None = None, *, engine: AsyncEngine | None = None, **kwargs: Any
    ) -> AsyncDBLocker:
        """A locker built from the URL, or given ``engine`` (a user's own)."""
        kwargs.setdefault("clean_interval", None)
        target = self.url if engine is None else engine
        return AsyncDBLocker(target, table_name=table or self.table, worker=WORKER, **kwargs)

    def engine(self, **kwargs: Any) -> AsyncEngine:
        """A plain SQLAlchemy engine on this database (setup, teardown, the ORM contender)."""
        if self.name == "sqlite":
            kwargs.setdefault("connect_args", {"timeout": 30.0})
        return create_async_engine(self.url, **kwargs)


def new_table_name() -> str:
    return f"bench_{secrets.token_hex(5)}"


def make_backend(name: str, url: str | None, sqlite_dir: Path, table: str) -> Backend:
    if name == "sqlite":
        url = f"sqlite+aiosqlite:///{sqlite_dir / 'bench.db'}"
    elif url is None:
        url = DEFAULT_URLS[name]
    return Backend(name=name, url=url, table=table)


def unreachable(url: str) -> str | None:
    """Why a server URL cannot be reached, or ``None`` when it can (SQLite always can)."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        return None
    try:
        with socket.create_connection((parsed.host or "127.0.0.1", parsed.port or 0), timeout=2):
            return None
    except OSError as error:
        where = parsed.render_as_string(hide_password=True)
        return f"{where}: {error}"


async def drop_tables(backend: Backend, *tables: str) -> None:
    """Drop lock tables and whatever companion tables ``lock_table`` defines with them."""
    metadata = MetaData()
    for name in tables:
        lock_table(metadata, name=name)
    engine = backend.engine()
    try:
        async with engine.begin() as conn:
            await conn.run_sync(metadata.drop_all, checkfirst=True)
    finally:
        await engine.dispose()


async def run_one(backend: Backend, sql: str) -> Any:
    """Run one statement in autocommit on an engine of its own: the single value of
    its single row when it returns rows (an error if it returns none), else None."""
    engine = backend.engine(isolation_level="AUTOCOMMIT")
    try:
        async with engine.connect() as conn:
            result = await conn.exec_driver_sql(sql)
            return result.scalar_one() if result.returns_rows else None
    finally:
        await engine.dispose()


#: What each database waits for on commit: the settings behind its flushes.
_DURABILITY_SQL = {
    "postgresql": (
        "SELECT 'synchronous_commit=' || current_setting('synchronous_commit') "
        "|| ', fsync=' || current_setting('fsync')"
    ),
    "mysql": (
        "SELECT CONCAT('innodb_flush_log_at_trx_commit=', @@innodb_flush_log_at_trx_commit, "
        "', log_bin=', @@log_bin, ', sync_binlog=', @@sync_binlog)"
    ),
}


async def durability(backend: Backend) -> str:
    """The settings that decide what a commit waits for, as ``name=value, ...``."""
    if backend.name == "sqlite":
        # What a locker's connection has: SQLite's compiled-in default, in WAL mode.
        with sqlite3.connect(":memory:") as conn:
            level = conn.execute("PRAGMA synchronous").fetchone()[0]
        names = {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}
        return f"journal_mode=WAL, synchronous={names.get(level, level)}"
    return str(await run_one(backend, _DURABILITY_SQL[backend.name]))


async def server_version(backend: Backend) -> str:
    if backend.name == "sqlite":
        return f"SQLite {sqlite3.sqlite_version}"
    text = str(await run_one(backend, "SELECT version()"))
    if backend.name == "postgresql":
        return " ".join(text.split()[:2])
    return f"MariaDB {text}" if "mariadb" in text.lower() else f"MySQL {text}"
