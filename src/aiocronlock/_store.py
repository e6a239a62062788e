"""The lock table's other statements, run through SQLAlchemy on the engine's pool.

Everything but the acquire INSERT (see ``_acquire``): recording outcomes, leases,
history, pruning, creating the table. Each call takes a pooled connection for its
own duration only, and ends within the locker's timeout: anyio's ``fail_after``
keeps cancelling until the block exits, even while a driver's cleanup awaits. On
SQLite a statement runs in the driver's thread, where no cancellation reaches it:
the caller stops waiting instead, and the statement ends in the background.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import anyio
from sqlalchemy import Executable, event, exc
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ._engine import describe, lost_connection, translate_error
from ._errors import BackendError
from ._loop import OneLoop, writes_in_turn
from ._schema import Status
from ._sql import Statements, lease_param, mysql_duplicates_quiet

_T = TypeVar("_T")

logger = logging.getLogger("aiocronlock")


@dataclass(frozen=True, slots=True)
class JobRun:
    """One row of the lock table, as returned by :meth:`AsyncDBLocker.history`."""

    id: int
    job_name: str
    identifier: str
    worker: str
    status: str
    started_at: datetime
    #: When FINISHED or FAILED was recorded; ``None`` while RUNNING.
    finished_at: datetime | None

    @property
    def duration(self) -> timedelta | None:
        return None if self.finished_at is None else self.finished_at - self.started_at


@dataclass(frozen=True, slots=True)
class Lease:
    """The lease row of an exclusive job, as returned by :meth:`AsyncDBLocker.leases`."""

    job_name: str
    #: The id of the run holding (or last holding) the lease.
    holder_id: int
    worker: str
    lease_until: datetime
    #: Whether the lease had not expired, by the database's clock, when read.
    live: bool


def aware(value: datetime) -> datetime:
    """Database timestamps as aware UTC datetimes (MySQL and SQLite return naive UTC)."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _job_run(row: Any) -> JobRun:
    """A row of the lock table as a JobRun."""
    return JobRun(
        id=row.id,
        job_name=row.job_name,
        identifier=row.job_identifier,
        worker=row.worker,
        status=row.status,
        started_at=aware(row.created_at),
        finished_at=None if row.status == Status.RUNNING else aware(row.updated_at),
    )


def _replace_if_closed(dbapi_connection: Any, record: Any, proxy: Any) -> None:
    """Pool checkout: a connection the server closed while it sat in the pool (a
    restart, a failover) is replaced, rather than handed out to fail the statement
    (an ``unlock()`` would leave its row RUNNING)."""
    driver = getattr(dbapi_connection, "driver_connection", None)
    is_closed = getattr(driver, "is_closed", None)  # asyncpg
    closed = is_closed() if callable(is_closed) else getattr(driver, "closed", False)  # psycopg
    if closed is True or getattr(driver, "connected", True) is False:  # asyncmy
        raise exc.DisconnectionError("the server closed this pooled connection")


class Store:
    """Runs the lock table's statements, each within ``timeout`` seconds."""

    def __init__(
        self, engine: AsyncEngine, statements: Statements, *, timeout: float, one_loop: OneLoop
    ) -> None:
        self.engine = engine
        self._one_loop = one_loop
        #: The locker's statements pass through it in turn (SQLite: see writes_in_turn).
        self.in_turn = writes_in_turn(statements.dialect_name)
        self.sql = statements
        self.timeout = timeout
        #: The engine's URL with the password hidden, for messages.
        self.target = describe(engine)
        # Outcomes being recorded in the background (see finish_later).
        self._pending: set[asyncio.Task[None]] = set()
        # SQLite statements whose caller stopped waiting (see _run_in_thread).
        self._in_thread = statements.dialect_name == "sqlite"
        self._detached: set[asyncio.Task[Any]] = set()
        # Lease rows this store has made sure exist (MySQL and SQLite make them lazily).
        self._lease_rows: set[str] = set()
        pool = engine.sync_engine.pool
        if not event.contains(pool, "checkout", _replace_if_closed):
            event.listen(pool, "checkout", _replace_if_closed)

    async def run(self, operation: str, work: Callable[[AsyncConnection], Awaitable[_T]]) -> _T:
        """Run ``work`` on a pooled connection within the timeout; errors become BackendError."""
        self._one_loop.check()
        try:
            if self._in_thread:
                return await self._run_in_thread(work)
            with anyio.fail_after(self.timeout):
                async with self.in_turn, self.engine.connect() as conn:
                    return await work(conn)
        except Exception as error:
            raise self.error(error, operation) from error

    async def _run_in_thread(self, work: Callable[[AsyncConnection], Awaitable[_T]]) -> _T:
        """SQLite: wait for ``work`` until the timeout, without cancelling it.

        aiosqlite runs a statement in its thread, and a write there waits out SQLite's
        busy timeout while another process holds the file; cancelling does not stop
        it. It would only make SQLAlchemy close the connection behind it, and a second
        cancellation during that close leaves a task waiting for ever, which hangs the
        event loop's shutdown. So the caller stops waiting and the statement ends by
        itself in the background; one that had not started yet is skipped.
        """
        gave_up = False

        async def statement() -> _T:
            async with self.in_turn, self.engine.connect() as conn:
                if gave_up:
                    raise TimeoutError
                return await work(conn)

        def ended(task: asyncio.Task[_T]) -> None:
            self._detached.discard(task)
            if gave_up and not task.cancelled() and task.exception() is not None:
                logger.debug(
                    "a statement failed after its caller stopped waiting: %r", task.exception()
                )

        task = asyncio.ensure_future(statement())
        self._detached.add(task)
        task.add_done_callback(ended)
        try:
            async with asyncio.timeout(self.timeout):
                return await asyncio.shield(task)
        except BaseException:
            gave_up = True
            raise

    def error(self, error: BaseException, operation: str) -> BackendError:
        """The ``BackendError`` for a driver error (or timeout) during ``operation``."""
        return translate_error(
            error,
            operation,
            target=self.target,
            table=self.sql.table.name,
            timeout=self.timeout,
            disconnected=lost_connection(error),
        )

    # -- outcomes and leases -------------------------------------------------------------

    async def finish(self, lock_id: int, status: Status, *, release_job: str | None = None) -> None:
        """Record a run's outcome; release the job's lease too when ``release_job`` is set."""

        async def update(conn: AsyncConnection) -> None:
            await conn.execute(self.sql.finish, {"lock_id": lock_id, "new_status": status.value})
            if release_job is not None:
                await conn.execute(self.sql.release, {"lease_job": release_job, "lock_id": lock_id})

        await self.run(f"unlock(id={lock_id})", update)

    async def abandon(self, job_name: str, identifier: str, worker: str) -> bool:
        """Record as FAILED a tick whose acquire was interrupted (see
        ``Statements.abandon``); False when another worker has it."""
        params = {"job_name": job_name, "job_identifier": identifier, "worker": worker}

        async def abandon(conn: AsyncConnection) -> bool:
            return bool((await conn.execute(self.sql.abandon, params)).rowcount)

        return await self.run(f"lock({job_name!r}) after it was interrupted", abandon)

    def finish_later(self, lock_id: int, status: Status, *, release_job: str | None) -> None:
        """Keep trying to record a run's outcome, in the background, after ``finish()``
        failed: the run has ended, and its row must not stay RUNNING once the database
        is back. Attempts back off from half a second to a minute; ``aclose()`` stops
        them."""
        task = asyncio.ensure_future(self._finish_when_back(lock_id, status, release_job))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _finish_when_back(
        self, lock_id: int, status: Status, release_job: str | None
    ) -> None:
        delay = 0.5
        while True:
            await asyncio.sleep(delay)
            try:
                await self.finish(lock_id, status, release_job=release_job)
            except BackendError as error:
                logger.debug("row %d: %s still not recorded: %s", lock_id, status.value, error)
                delay = min(delay * 2, 60.0)
                continue
            logger.info("row %d: %s recorded, the database is back", lock_id, status.value)
            return

    async def aclose(self) -> None:
        """Stop the background attempts; say which outcomes were never recorded."""
        pending, self._pending = self._pending, set()
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)
            logger.warning(
                "%d run outcome(s) could not be recorded before closing: their rows stay "
                "RUNNING until pruned",
                len(pending),
            )
        if self._detached:
            # SQLite statements still in the driver's thread: they end within its busy
            # timeout, and their connections go back to the pool.
            _, left = await asyncio.wait(set(self._detached), timeout=self.timeout)
            if left:
                logger.warning(
                    "%d SQLite statement(s) still waiting for the database file after %g s; "
                    "left to end in the background",
                    len(left),
                    self.timeout,
                )

    async def renew(self, job_name: str, lock_id: int, lease: timedelta) -> bool:
        """Extend a run's lease; False when it is no longer the run's (expired or taken)."""
        params = {
            "lease_job": job_name,
            "lock_id": lock_id,
            "lease": lease_param(self.sql.dialect_name, lease),
        }

        async def renew(conn: AsyncConnection) -> bool:
            return (await conn.execute(self.sql.renew, params)).rowcount == 1

        return await self.run(f"renew lease of {job_name!r}", renew)

    async def heartbeat(self, lock_id: int) -> bool:
        """Beat a ``retry_dead`` run's heartbeat; False once its row is no longer RUNNING."""

        async def beat(conn: AsyncConnection) -> bool:
            return (await conn.execute(self.sql.heartbeat, {"lock_id": lock_id})).rowcount == 1

        return await self.run(f"heartbeat of run {lock_id}", beat)

    async def dead_runs(self, job_name: str, lease: timedelta) -> list[JobRun]:
        """The runs of ``job_name`` that died (see ``Statements.dead_runs``), oldest first."""
        params = {"dead_job": job_name, "lease": lease_param(self.sql.dialect_name, -lease)}

        async def fetch(conn: AsyncConnection) -> list[JobRun]:
            rows = (await conn.execute(self.sql.dead_runs, params)).all()
            return [_job_run(row) for row in rows]

        return await self.run(f"dead runs of {job_name!r}", fetch)

    async def retry(self, dead_id: int, worker: str, lease: timedelta) -> int | None:
        """Mark run ``dead_id`` LOST if its heartbeat expired, and insert its tick's retry
        if it is LOST: the retry's id, or None when the run lives or another instance
        has the retry."""
        sql = self.sql
        params = {
            "dead_id": dead_id,
            "retry_worker": worker,
            "lease": lease_param(sql.dialect_name, -lease),
        }

        async def retry(conn: AsyncConnection) -> int | None:
            if sql.mark_dead is not None:
                await conn.execute(sql.mark_dead, params)
            if sql.acquire_returns_id:
                return (await conn.execute(sql.retry, params)).scalar_one_or_none()
            with mysql_duplicates_quiet():  # INSERT IGNORE: a taken retry warns
                return (await conn.execute(sql.retry, params)).lastrowid or None

        return await self.run(f"retry of run {dead_id}", retry)

    async def acquire_exclusive(
        self, job_name: str, identifier: str, worker: str, lease: timedelta
    ) -> tuple[int | None, bool]:
        """Win the tick and the job's lease, or neither: ``(row id or None, overlap)``."""
        params: dict[str, Any] = {
            "job_name": job_name,
            "job_identifier": identifier,
            "worker": worker,
            "lease": lease_param(self.sql.dialect_name, lease),
            "lease_job": job_name,
            "lease_worker": worker,
        }

        async def decide(conn: AsyncConnection) -> tuple[int | None, bool]:
            return await self._decide_exclusive(conn, params)

        return await self.run(f"lock({job_name!r})", decide)

    async def _decide_exclusive(
        self, conn: AsyncConnection, params: dict[str, Any]
    ) -> tuple[int | None, bool]:
        sql = self.sql
        if sql.acquire_exclusive is not None:
            # PostgreSQL: tick row and lease in one statement.
            row = (await conn.execute(sql.acquire_exclusive, params)).one()
            tick_id, holder_id, live = row.tick_id, row.holder_id, row.live
            if tick_id is None:
                return None, bool(live)
            if holder_id is not None:
                return int(tick_id), False
        else:
            if await conn.scalar(sql.lease_is_live, params):
                return None, True
            result = await conn.execute(sql.acquire, params)
            tick_id = result.scalar_one_or_none() if sql.acquire_returns_id else result.lastrowid
            if not tick_id:
                return None, False
            claim = {**params, "lock_id": tick_id}
            if sql.ensure_lease_row is not None and params["lease_job"] not in self._lease_rows:
                await conn.execute(sql.ensure_lease_row, claim)
                self._lease_rows.add(params["lease_job"])
            claimed = await conn.execute(sql.claim, claim)
            if sql.acquire_returns_id:
                if claimed.scalar_one_or_none() is not None:
                    return int(tick_id), False
            elif claimed.rowcount == 1:
                return int(tick_id), False
            elif sql.ensure_lease_row is not None:
                # The lease row may have been deleted by hand since we made it: make
                # sure it exists, and claim once more.
                await conn.execute(sql.ensure_lease_row, claim)
                if (await conn.execute(sql.claim, claim)).rowcount == 1:
                    return int(tick_id), False
        # We won the tick but another run took the lease in between: not run.
        await conn.execute(sql.mark, {"lock_id": tick_id, "new_status": Status.SKIPPED.value})
        return None, True

    async def insert_each(
        self, names: Sequence[str], identifiers: Sequence[str], worker: str
    ) -> dict[str, int]:
        """lock_many() where a multi-row INSERT cannot say which rows it won (MySQL):
        one INSERT per job on one connection; the ids won, by job name."""

        async def insert(conn: AsyncConnection) -> dict[str, int]:
            won: dict[str, int] = {}
            for name, identifier in zip(names, identifiers, strict=True):
                row = {"job_name": name, "job_identifier": identifier, "worker": worker}
                row_id = (await conn.execute(self.sql.acquire, row)).lastrowid
                if row_id:
                    won[name] = row_id
            return won

        return await self.run(f"lock_many({len(names)} jobs)", insert)

    # -- reading and maintenance -----------------------------------------------------------

    async def now(self, operation: str) -> datetime:
        """The database's clock."""

        async def read(conn: AsyncConnection) -> datetime:
            return aware((await conn.execute(self.sql.now)).scalar_one())

        return await self.run(operation, read)

    async def prune(self, statement: Executable) -> tuple[int, datetime | None]:
        """One pruning batch: rows deleted, and the newest creation time among them
        where the backend returns it."""

        async def prune(conn: AsyncConnection) -> tuple[int, datetime | None]:
            result = await conn.execute(statement)
            if self.sql.after_prune is not None and result.rowcount:
                # SQLite: copy this batch's pages from the write-ahead log into the
                # database now, in the cleaner's turn, not in the next lock()'s commit.
                await conn.execute(self.sql.after_prune)
            if not result.returns_rows:
                return result.rowcount, None
            row = result.one()
            return row.deleted, row.newest

        return await self.run("clean()", prune)

    async def create_table(self) -> None:
        """Create the lock table and its companions if missing (SQLite: switch to WAL)."""

        async def create(conn: AsyncConnection) -> None:
            for attempt in range(3):
                try:
                    if self.sql.dialect_name == "sqlite":
                        await conn.exec_driver_sql("PRAGMA journal_mode=WAL")
                    await conn.run_sync(self.sql.table.metadata.create_all, checkfirst=True)
                    return
                except Exception:
                    # Most likely another instance created one of the tables between our
                    # check and our CREATE; checkfirst skips it on the next attempt.
                    if attempt == 2:
                        raise
                    await asyncio.sleep(0.05 * (attempt + 1))

        await self.run("create_table()", create)

    async def history(self, job_name: str | None, limit: int) -> list[JobRun]:
        query = self.sql.history(job_name, limit)

        async def fetch(conn: AsyncConnection) -> list[JobRun]:
            rows = (await conn.execute(query)).all()
            return [_job_run(row) for row in rows]

        return await self.run("history()", fetch)

    async def leases(self) -> list[Lease]:
        async def fetch(conn: AsyncConnection) -> list[Lease]:
            rows = (await conn.execute(self.sql.list_leases)).all()
            return [
                Lease(
                    job_name=row.job_name,
                    holder_id=row.holder_id,
                    worker=row.worker,
                    lease_until=aware(row.lease_until),
                    live=bool(row.live),
                )
                for row in rows
            ]

        return await self.run("leases()", fetch)

    async def release(self, job_name: str) -> bool:
        """End a job's live lease and mark its run LOST; False when none was live."""
        sql = self.sql

        async def release(conn: AsyncConnection) -> bool:
            query = sql.list_leases.where(sql.leases.c.job_name == job_name)
            lease = (await conn.execute(query)).first()
            if lease is None or not lease.live:
                return False
            if (await conn.execute(sql.force_release, {"lease_job": job_name})).rowcount != 1:
                return False
            await conn.execute(
                sql.mark, {"lock_id": lease.holder_id, "new_status": Status.LOST.value}
            )
            return True

        return await self.run(f"release({job_name!r})", release)
