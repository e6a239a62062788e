"""``AsyncDBLocker``: how a tick is decided.

Every instance that wants to run job ``J`` at tick ``t`` inserts the row
``(J, identifier(t), worker, RUNNING)``. The table has a unique key on
``(job_name, job_identifier)``, so exactly one insert succeeds: its instance runs
the job, the others see the conflict and skip. The insert ignores the conflict
instead of raising, so deciding costs one statement and no server-side error.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib.util
import logging
import os
import socket
import time
from asyncio import Future
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any, Self, TypeVar

from sqlalchemy import Executable, MetaData
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ._attempt import Attempt
from ._cleaner import CLEAN_JOB_NAME, run_cleaner
from ._clock import SYSTEM_CLOCK, Clock
from ._deadline import Deadlines
from ._driver import DriverAcquire, lost_connection
from ._engine import create_engine_from_url, describe, parse_url, translate_error
from ._errors import BackendError
from ._events import EventKind, Events, Subscriber
from ._gate import Gate
from ._identifiers import IdentifierStrategy, Precision, compute_identifier, precision
from ._lock import Lock
from ._schema import DEFAULT_TABLE_NAME, Status, lock_table
from ._sql import MYSQL_DIALECTS, Statements, lease_param, mysql_duplicates_quiet
from ._validation import check_name, require_timedelta, to_timedelta, to_utc

logger = logging.getLogger("aiocronlock")

_T = TypeVar("_T")

#: The most rows one pruning DELETE removes: small enough that no single statement
#: holds its locks for long, so ``lock()`` calls interleave with a large prune.
DEFAULT_CLEAN_BATCH_SIZE = 2000
#: The longest a pruning DELETE should take: batches halve while one takes longer,
#: and double again (up to ``clean_batch_size``) once one takes under half of it, so
#: a slow or busy database gets smaller ones. Fewer, larger batches cost the
#: database less in all than many small ones: each statement has its own commit.
CLEAN_STATEMENT_S = 0.05
#: The share of the time a prune keeps the database busy: after a batch that took
#: ``d`` seconds (its DELETE, commit and, on SQLite, checkpoint; on PostgreSQL the
#: commit does not wait for the log's flush, see ``Statements.prune_batch``) the
#: cleaner rests ``d * (1 - share) / share`` (at most a second, so a prune does not
#: outlast its interval), leaving the rest to the INSERTs that decide ticks. After a
#: batch over about 53 ms the cap binds, and the share is exceeded for that batch
#: (the next one is halved). The work a DELETE leaves behind (InnoDB's purge and
#: page flushing, PostgreSQL's log flush) competes with ``lock()`` too: pruning a
#: million rows on MariaDB at a tenth of the time, ``lock()`` p99 was 1.9-2.5x idle
#: in five runs; at a twentieth, 1.2-1.5x in four (see benchmarks/README.md).
CLEAN_BUSY_SHARE = 0.05
#: The fewest rows a pruning DELETE removes, however slow the database.
_MIN_CLEAN_BATCH = 50


async def _settle(work: Awaitable[_T], outcome: Future[_T]) -> tuple[_T] | None:
    """Run ``work`` and hand its outcome to ``outcome`` as it ends.

    A shield, like ``asyncio.shield``, but the caller awaiting ``outcome`` wakes one
    turn of the event loop after ``work`` ends, not three. Cancelling the caller
    cancels ``outcome`` only, never ``work``; the task then ends with ``work``'s own
    result (as a 1-tuple) or error, for whoever abandons the attempt to read.
    """
    try:
        result = await work
    except Exception as error:
        if outcome.done():
            raise
        outcome.set_exception(error)  # the caller reads it; the task ends quietly
        return None
    except BaseException:
        outcome.cancel()
        raise
    if not outcome.done():
        outcome.set_result(result)
    return (result,)


def _shielded(work: Awaitable[_T]) -> tuple[Future[_T], asyncio.Task[tuple[_T] | None]]:
    """Start ``work`` behind the shield (see _settle): the future the caller awaits,
    and the task that runs ``work`` to its end whatever happens to the caller."""
    loop = asyncio.get_running_loop()
    outcome: Future[_T] = loop.create_future()
    return outcome, loop.create_task(_settle(work, outcome))


async def _row_of(attempt: asyncio.Task[tuple[tuple[int | None, bool]] | None]) -> int | None:
    """The row a shielded acquire won, if any (None too when it failed: its error
    went to the caller)."""
    decided = await attempt
    return None if decided is None else decided[0][0]


def _rest_after(took: float) -> float:
    """The seconds the cleaner rests after a pruning batch that took ``took`` seconds."""
    return min(took * (1 - CLEAN_BUSY_SHARE) / CLEAN_BUSY_SHARE, 1.0)


def _next_batch(batch: int, took: float, most: int) -> int:
    """The next pruning batch: halved or doubled toward ``CLEAN_STATEMENT_S`` per DELETE."""
    if took > CLEAN_STATEMENT_S and batch > _MIN_CLEAN_BATCH:
        return max(_MIN_CLEAN_BATCH, batch // 2)
    if took < CLEAN_STATEMENT_S / 2 and batch < most:
        return min(most, batch * 2)
    return batch


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


def default_worker_name() -> str:
    """``<hostname>:<pid>``, which tells instances apart on one host and across hosts."""
    return f"{socket.gethostname()}:{os.getpid()}"[:255]


def _aware(value: datetime) -> datetime:
    """Database timestamps as aware UTC datetimes (MySQL and SQLite return naive UTC)."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class AsyncDBLocker:
    """Decides which instance runs each tick of a job, through a table in a SQL database.

    :param engine: an ``AsyncEngine`` (yours: the locker never disposes it) or a
        database URL (then the locker creates the engine and disposes it on close).
        ``postgresql://``, ``mysql://`` and ``sqlite://`` URLs get their asyncio
        driver filled in.
    :param worker: this instance's name, stored with each row it wins; 1 to 255
        characters. Defaults to ``<hostname>:<pid>``.
    :param identifier: the identifier strategy; defaults to ``precision(1 second)``.
    :param ttl: rows older than this are pruned, and run times older than this are
        refused. ``timedelta`` or seconds.
    :param clean_interval: how often the background cleaner prunes; ``None`` for no
        cleaner. ``timedelta`` or seconds.
    :param table_name: the lock table's name; a plain SQL identifier.
    :param schema: the table's schema, or ``None`` for the default one.
    :param timeout: seconds any single database call may take before it fails with
        ``BackendError``; a tick decided late is worth little.
    :param clock: the time source; tests pass ``aiocronlock.testing.FakeClock``.
    :param lease: the default lease of exclusive locks (``lock(..., exclusive=True)``).
    :param telemetry: emit OpenTelemetry spans and metrics when ``opentelemetry-api``
        is installed.
    """

    def __init__(
        self,
        engine: AsyncEngine | str | URL,
        *,
        worker: str | None = None,
        identifier: IdentifierStrategy | None = None,
        ttl: timedelta | float = timedelta(days=1),
        clean_interval: timedelta | float | None = timedelta(minutes=5),
        table_name: str = DEFAULT_TABLE_NAME,
        schema: str | None = None,
        timeout: timedelta | float = 5.0,
        clean_batch_size: int = DEFAULT_CLEAN_BATCH_SIZE,
        clock: Clock | None = None,
        lease: timedelta | float = timedelta(seconds=30),
        telemetry: bool = True,
    ) -> None:
        self.worker = check_name("worker", default_worker_name() if worker is None else worker)
        if identifier is None:
            identifier = precision()
        elif not callable(identifier):
            raise TypeError(
                "identifier must be a callable (job_name, run_time) -> str such as "
                f"precision(timedelta(seconds=1)), not {type(identifier).__name__}"
            )
        self.identifier: IdentifierStrategy = identifier
        # The last identifier a precision gave: (the strategy, run time, identifier).
        self._last_identifier: tuple[object, datetime | None, str] = (None, None, "")
        self.ttl = require_timedelta("ttl", ttl)
        self.clean_interval = to_timedelta("clean_interval", clean_interval, allow_none=True)
        # Every database call of this locker ends within ``timeout``, on one shared timer.
        self._deadlines = Deadlines(require_timedelta("timeout", timeout).total_seconds())
        if isinstance(clean_batch_size, bool) or not isinstance(clean_batch_size, int):
            raise TypeError(
                f"clean_batch_size must be an int, not {type(clean_batch_size).__name__}"
            )
        if clean_batch_size < 1:
            raise ValueError(f"clean_batch_size must be at least 1, got {clean_batch_size}")
        self.clean_batch_size = clean_batch_size
        self.clock: Clock = SYSTEM_CLOCK if clock is None else clock
        self.lease = require_timedelta("lease", lease)
        self._lease_rows: set[str] = set()
        self.events = Events()
        #: Database clock minus this instance's clock, measured on start (``check_clock``).
        self.clock_offset: timedelta | None = None
        self.table = lock_table(MetaData(), name=table_name, schema=schema)

        if isinstance(engine, AsyncEngine):
            self._owns_engine = False
            # Run outside any transaction: no BEGIN/COMMIT around the single INSERT.
            self._engine = engine.execution_options(isolation_level="AUTOCOMMIT")
        elif isinstance(engine, str | URL):
            self._owns_engine = True
            self._engine = create_engine_from_url(parse_url(engine))
        else:
            raise TypeError(
                "engine must be a sqlalchemy.ext.asyncio.AsyncEngine or a database URL, "
                f"not {type(engine).__name__}"
            )
        self.engine: AsyncEngine = engine if isinstance(engine, AsyncEngine) else self._engine
        self._sql = Statements(self.table, self._engine.dialect.name)
        self._driver_acquire = DriverAcquire.for_engine(
            self._engine,
            self._sql.acquire,
            owned=self._owns_engine,
            rows_statement=self._sql.acquire_rows,
        )
        # SQLite has one writer at a time: order this locker's statements here (see
        # _gate) instead of letting each wait in SQLite's busy loop, which backs off
        # in growing sleeps. Other backends need no such thing.
        self._serial: contextlib.AbstractAsyncContextManager[Any] = contextlib.nullcontext()
        self._serial_driver: contextlib.AbstractAsyncContextManager[Any] = self._serial
        self._gated = self._sql.dialect_name == "sqlite"
        if self._gated:
            gate = Gate()
            self._serial = self._serial_driver = gate.alone()
            if self._driver_acquire is not None and self._driver_acquire.shares:
                self._serial_driver = gate.together()
        self._target = describe(self._engine)
        if telemetry and importlib.util.find_spec("opentelemetry") is not None:
            from ._otel import instrument

            instrument(self)
        self._clean_identifier = (
            precision(self.clean_interval) if self.clean_interval is not None else None
        )
        self._cleaner: asyncio.Task[None] | None = None
        self._cleaner_idle = asyncio.Event()
        self._cleaner_idle.set()
        self._started = False
        self._closed = False

    # -- lifecycle ---------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        if self._closed:
            raise RuntimeError("this locker is closed: create a new AsyncDBLocker")
        if self._started:
            raise RuntimeError("this locker is already started: enter `async with` only once")
        # If start-up fails half-way, the stack closes what was started.
        async with contextlib.AsyncExitStack() as stack:
            stack.push_async_callback(self.aclose)
            self._started = True
            try:
                await self.check_clock()
            except BackendError as error:
                logger.warning("could not compare clocks with the database: %s", error)
            if self._clean_identifier is not None:
                self._cleaner = asyncio.create_task(
                    run_cleaner(self, self._clean_identifier),
                    name=f"aiocronlock cleaner {self.worker}",
                )
            stack.pop_all()  # started: from now on __aexit__ closes
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop the cleaner and wait for it; dispose the engine if the locker created it.

        Calling it again does nothing.
        """
        if self._closed:
            return
        # Public methods refuse from here on; work already under way (the cleaner's
        # last unlock, a cancelled lock() marking its row) may still finish.
        self._closed = True
        cleaner, self._cleaner = self._cleaner, None
        if cleaner is not None:
            # Cancelling a query midway can strand its connection in some drivers:
            # let an interval in progress end first (bounded), then cancel the sleep.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2 * self.timeout):
                    await self._cleaner_idle.wait()
            cleaner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await cleaner
        if self._driver_acquire is not None:
            await self._driver_acquire.close()
        if self._owns_engine:
            try:
                with self._deadlines.guard():
                    await self._engine.dispose()
            except TimeoutError:
                logger.warning(
                    "closing the database connections took over %g s; abandoned them",
                    self.timeout,
                )

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def timeout(self) -> float:
        """Seconds any one database call may take, fixed when the locker is made."""
        return self._deadlines.seconds

    # -- deciding a tick -----------------------------------------------------------------

    async def lock(
        self,
        job_name: str,
        run_time: datetime | None = None,
        *,
        exclusive: bool = False,
        lease: timedelta | float | None = None,
    ) -> Lock | None:
        """Try to win ``job_name``'s tick at ``run_time``; ``None`` if another instance has it.

        :param job_name: the job, 1 to 255 characters.
        :param run_time: the tick's *scheduled* time, timezone-aware; ``None`` means now.
            Instances that pass the same scheduled time agree on the tick whatever
            their clocks say.
        :returns: a :class:`Lock` to run the job under, or ``None`` when the tick was
            already taken, or when ``run_time`` is older than ``ttl`` (its row may have
            been pruned, and running it would be a second run).
        :param exclusive: also require that no other run of this job holds a live
            lease, so runs of the job never overlap across instances, even when one
            outlives its interval. The lock then holds a lease of ``lease`` (default:
            the locker's ``lease``), renewed in the background while it is held.
        :raises BackendError: the database could not decide. Do not run the job.
        """
        self._check_open()
        check_name("job_name", job_name)
        lease_for = self._lease_for(exclusive, lease)
        run_time, stale = self._tick_time(run_time)
        identifier = self._identify(job_name, run_time)
        if stale:
            logger.warning(
                "refusing %r at %s: the run time is older than ttl (%s)",
                job_name,
                run_time.isoformat(),
                self.ttl,
            )
            if self.events:
                self._emit(
                    EventKind.SKIPPED, job_name, identifier, run_time=run_time, reason="stale"
                )
            return None
        driver_acquire = self._driver_acquire
        if lease_for is None and driver_acquire is not None and driver_acquire.runs_inline:
            # Every lock() of a URL-built locker: _acquire's first branch, one coroutine
            # fewer.
            row_id = await self._acquire_driver(job_name, identifier)
            return self._decided(job_name, identifier, run_time, row_id)
        return await self._acquire(job_name, identifier, run_time, lease_for)

    def _identify(self, job_name: str, run_time: datetime) -> str:
        """The tick's identifier.

        A precision's depends on the run time alone, and the jobs of one tick ask for
        it one after another: the last one is kept (it costs as much to build as all
        the rest of lock() before the INSERT).
        """
        strategy = self.identifier
        if strategy.__class__ is not Precision:
            return compute_identifier(strategy, job_name, run_time)
        last_strategy, last_time, last = self._last_identifier
        if last_strategy is strategy and last_time == run_time:
            return last
        identifier = strategy(job_name, run_time)
        self._last_identifier = (strategy, run_time, identifier)
        return identifier

    def _tick_time(self, run_time: datetime | None) -> tuple[datetime, bool]:
        """The run time in UTC (``None``: now), and whether it is older than ``ttl``."""
        now = self.clock.now()
        if run_time is None:
            return now, False
        run_time = to_utc("run_time", run_time)
        return run_time, now - run_time > self.ttl

    def _lease_for(self, exclusive: bool, lease: timedelta | float | None) -> timedelta | None:
        if not isinstance(exclusive, bool):
            raise TypeError(f"exclusive must be a bool, not {type(exclusive).__name__}")
        if not exclusive:
            if lease is not None:
                raise ValueError("lease: a lease only applies with exclusive=True")
            return None
        return self.lease if lease is None else require_timedelta("lease", lease)

    async def lock_many(
        self, job_names: Iterable[str], run_time: datetime | None = None
    ) -> dict[str, Lock]:
        """Try to win one tick of several jobs at once; return the locks won, by job name.

        On PostgreSQL, SQLite and MariaDB 10.5+ this is a single multi-row INSERT,
        whatever the number of jobs (on MariaDB, a second round trip follows when some
        ticks were taken). MySQL cannot report which rows of a multi-row insert won, so
        there it is one INSERT per job on one connection. Jobs whose tick another
        instance has are simply absent from the result.
        """
        self._check_open()
        names = list(job_names)
        for name in names:
            check_name("job_names item", name)
        if len(set(names)) != len(names):
            raise ValueError("job_names must not repeat a job")
        run_time, stale = self._tick_time(run_time)
        if not names or stale:
            return {}
        if isinstance(self.identifier, Precision):  # the same for every job
            identifier = self._identify(names[0], run_time)
            identifiers = dict.fromkeys(names, identifier)
        else:
            identifiers = {
                name: compute_identifier(self.identifier, name, run_time) for name in names
            }
        operation = f"lock_many({len(names)} jobs)"
        deciding: Awaitable[dict[str, int]]
        if self._driver_acquire is not None and self._driver_acquire.decides_many:
            deciding = self._run_driver_many(operation, names, list(identifiers.values()))
        else:
            deciding = self._run(
                operation, functools.partial(self._insert_many, names, identifiers)
            )
        # Shielded like lock(): a cancelled call still learns which rows it won, and
        # marks them FAILED.
        outcome, attempt = _shielded(deciding)
        try:
            won = await outcome
        except asyncio.CancelledError:
            await self._abandon_many(attempt, identifiers)
            raise
        unknown = won.keys() - identifiers.keys()
        if unknown:
            # Only a table whose job_name column is narrower than the library's does
            # this (it cut the names short), and MariaDB's INSERT IGNORE does not say so.
            await self._fail_rows(won, "lock_many() got back job names it did not send")
            raise BackendError(
                f"{operation} on {self._target}",
                f"the database returned job names that were not sent ({sorted(unknown)[:3]!r})",
                hint=f"the table {self.table.name!r} does not match lock_table(); recreate "
                "it with `await locker.create_table()` or `aiocronlock init`",
            )
        return self._many_locks(won, identifiers, run_time)

    async def _insert_many(
        self, names: list[str], identifiers: dict[str, str], conn: AsyncConnection
    ) -> dict[str, int]:
        """lock_many()'s INSERTs through SQLAlchemy: the ids won, by job name."""
        rows = [
            {"job_name": name, "job_identifier": identifiers[name], "worker": self.worker}
            for name in names
        ]
        if self._sql.dialect_name not in MYSQL_DIALECTS:
            result = await conn.execute(self._sql.acquire_returning_job, rows)
            return {row.job_name: row.id for row in result}
        if conn.dialect.insert_returning:
            # MariaDB 10.5+. A lost tick is a duplicate-key warning, which the driver
            # fetches (one more round trip) and would log once per job.
            with mysql_duplicates_quiet():
                result = await conn.execute(self._sql.acquire_returning_job, rows)
            return {row.job_name: row.id for row in result}
        # MySQL: one INSERT per job, whose lastrowid says whether it won.
        won: dict[str, int] = {}
        for row in rows:
            row_id = (await conn.execute(self._sql.acquire, row)).lastrowid
            if row_id:
                won[row["job_name"]] = row_id
        return won

    def _many_locks(
        self, won: dict[str, int], identifiers: dict[str, str], run_time: datetime
    ) -> dict[str, Lock]:
        return {
            name: Lock(
                self,
                id=row_id,
                job_name=name,
                identifier=identifiers[name],
                worker=self.worker,
                run_time=run_time,
            )
            for name, row_id in won.items()
        }

    async def _acquire(
        self,
        job_name: str,
        identifier: str,
        run_time: datetime,
        lease: timedelta | None = None,
    ) -> Lock | None:
        # If the caller is cancelled mid-INSERT, the insert still completes (within the
        # timeout) and a row we won is marked FAILED, never left RUNNING with nobody
        # running it.
        row_id: int | None
        driver_acquire = self._driver_acquire if lease is None else None
        if driver_acquire is not None and driver_acquire.runs_inline:
            row_id, overlap = await self._acquire_driver(job_name, identifier), False
        else:
            operation = f"lock({job_name!r})"
            params: dict[str, Any] = {
                "job_name": job_name,
                "job_identifier": identifier,
                "worker": self.worker,
            }
            deciding: Awaitable[tuple[int | None, bool]]
            if driver_acquire is not None:  # in a task of its own, then
                deciding = self._guarded_acquire(job_name, identifier)
            elif lease is None:
                deciding = self._run(operation, functools.partial(self._insert, params=params))
            else:
                params["lease"] = lease_param(self._sql.dialect_name, lease)
                params["lease_job"] = job_name
                params["lease_worker"] = self.worker
                exclusive = functools.partial(self._decide_exclusive, params=params)
                deciding = self._run(operation, exclusive)
            outcome, attempt = _shielded(deciding)
            try:
                row_id, overlap = await outcome
            except asyncio.CancelledError:
                await self._abandon(
                    _row_of(attempt), job_name, identifier, exclusive=lease is not None
                )
                raise
        return self._decided(job_name, identifier, run_time, row_id, overlap, lease)

    def _decided(
        self,
        job_name: str,
        identifier: str,
        run_time: datetime,
        row_id: int | None,
        overlap: bool = False,
        lease: timedelta | None = None,
    ) -> Lock | None:
        """The outcome of an acquire: the Lock of a row won, else None; logged and emitted."""
        if row_id is None:
            if overlap:
                logger.debug("%r %s skipped: another run holds the lease", job_name, identifier)
                if self.events:
                    self._emit(
                        EventKind.SKIPPED, job_name, identifier, run_time=run_time, reason="overlap"
                    )
                return None
            logger.debug("%r %s is held by another worker", job_name, identifier)
            if self.events:
                self._emit(EventKind.LOST_RACE, job_name, identifier, run_time=run_time)
            return None
        logger.debug("%r %s acquired by %s (id %d)", job_name, identifier, self.worker, row_id)
        if self.events:
            self._emit(EventKind.ACQUIRED, job_name, identifier, run_time=run_time, lock_id=row_id)
        lock = Lock(
            self,
            id=row_id,
            job_name=job_name,
            identifier=identifier,
            worker=self.worker,
            run_time=run_time,
            lease=lease,
        )
        if lease is not None:
            lock._start_lease()
        return lock

    async def _insert(
        self, conn: AsyncConnection, *, params: dict[str, Any]
    ) -> tuple[int | None, bool]:
        """The plain acquire through SQLAlchemy: ``(row id or None, False)``."""
        result = await conn.execute(self._sql.acquire, params)
        if self._sql.acquire_returns_id:
            row_id: int | None = result.scalar_one_or_none()
            return row_id, False
        return result.lastrowid or None, False

    async def _decide_exclusive(
        self, conn: AsyncConnection, *, params: dict[str, Any]
    ) -> tuple[int | None, bool]:
        """Win the tick and the job's lease, or neither: ``(row id or None, overlap)``."""
        sql = self._sql
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

    async def _renew(self, lock: Lock) -> bool:
        """Extend ``lock``'s lease; False when it is no longer ours (expired or taken)."""
        assert lock.lease is not None
        params = {
            "lease_job": lock.job_name,
            "lock_id": lock.id,
            "lease": lease_param(self._sql.dialect_name, lock.lease),
        }

        async def renew(conn: AsyncConnection) -> bool:
            return (await conn.execute(self._sql.renew, params)).rowcount == 1

        return await self._run(f"renew lease of {lock.job_name!r}", renew)

    async def _abandon(
        self,
        attempt: Awaitable[int | None],
        job_name: str,
        identifier: str,
        *,
        exclusive: bool,
    ) -> None:
        """After a cancelled lock(): wait for the insert, and mark a won row FAILED."""
        try:
            row_id = await attempt
            if row_id is not None:
                await self._finish(
                    row_id, Status.FAILED, release_job=job_name if exclusive else None
                )
                logger.info(
                    "lock(%r) was cancelled after winning %s; its row %d is marked FAILED",
                    job_name,
                    identifier,
                    row_id,
                )
        except Exception as error:
            logger.warning(
                "lock(%r) was cancelled and its outcome for %s is unknown: %s",
                job_name,
                identifier,
                error,
            )

    async def _abandon_many(
        self,
        attempt: asyncio.Task[tuple[dict[str, int]] | None],
        identifiers: dict[str, str],
    ) -> None:
        """After a cancelled lock_many(): wait for the inserts, mark the rows won FAILED."""
        try:
            decided = await attempt
        except Exception as error:
            logger.warning(
                "lock_many() of %d jobs was cancelled and its outcome is unknown: %s",
                len(identifiers),
                error,
            )
            return
        if decided is not None:  # None: it failed, and its error went to the caller
            (won,) = decided
            await self._fail_rows(won, "lock_many() was cancelled")

    async def _finish(
        self, lock_id: int, status: Status, *, release_job: str | None = None
    ) -> None:
        async def update(conn: AsyncConnection) -> None:
            await conn.execute(self._sql.finish, {"lock_id": lock_id, "new_status": status.value})
            if release_job is not None:
                await conn.execute(
                    self._sql.release, {"lease_job": release_job, "lock_id": lock_id}
                )

        await self._run(f"unlock(id={lock_id})", update)

    # -- maintenance -----------------------------------------------------------------------

    async def create_table(self) -> None:
        """Create the lock table and its indexes if missing; safe to call from many instances.

        On SQLite it also switches the file to WAL, so several processes can share it.
        """

        self._check_open()

        async def create(conn: AsyncConnection) -> None:
            for attempt in range(3):
                try:
                    if self._engine.dialect.name == "sqlite":
                        await conn.exec_driver_sql("PRAGMA journal_mode=WAL")
                    await conn.run_sync(self.table.metadata.create_all, checkfirst=True)
                    return
                except Exception:
                    # Most likely another instance created one of the tables between our
                    # check and our CREATE; checkfirst skips it on the next attempt.
                    if attempt == 2:
                        raise
                    await asyncio.sleep(0.05 * (attempt + 1))

        await self._run("create_table()", create)

    async def clean(self) -> int:
        """Delete rows older than ``ttl`` now, in batches; return how many were deleted.

        Batches hold at most ``clean_batch_size`` rows, fewer while a DELETE takes
        over ``CLEAN_STATEMENT_S``, and after each the cleaner rests so that it keeps
        the database busy ``CLEAN_BUSY_SHARE`` of the time (resting at most a second,
        so a batch over about 53 ms takes a larger share): a big backlog goes slowly
        rather than slowing down the ``lock()`` calls of every instance.

        Ages are measured with the database's clock, so instances whose clocks differ
        prune the same rows. On PostgreSQL each batch commits with
        ``synchronous_commit`` off, for its own transaction only: a crash can bring
        back the last batches' expired rows, for the next prune to delete again.
        """

        self._check_open()

        async def now(conn: AsyncConnection) -> datetime:
            return _aware((await conn.execute(self._sql.now)).scalar_one())

        cutoff = (await self._run("clean()", now)) - self.ttl
        total = 0
        batch = min(self.clean_batch_size, 500)
        floor: datetime | None = None
        while True:
            statement = self._sql.prune_batch(cutoff, batch, floor)

            async def prune(
                conn: AsyncConnection, statement: Executable = statement
            ) -> tuple[int, datetime | None]:
                result = await conn.execute(statement)
                if self._sql.after_prune is not None and result.rowcount:
                    # SQLite: copy the pages this batch changed from the write-ahead log
                    # into the database now, in the cleaner's turn and counted in its
                    # busy time. Otherwise the commit that fills the log to SQLite's
                    # automatic checkpoint does it, most often a lock()'s, which then
                    # waits for a whole batch's pages (a plain no-op outside WAL mode).
                    await conn.execute(self._sql.after_prune)
                if not result.returns_rows:
                    return result.rowcount, None
                row = result.one()
                return row.deleted, row.newest

            started = time.monotonic()
            deleted, floor = await self._run("clean()", prune)
            took = time.monotonic() - started
            total += deleted
            if deleted < batch:
                break
            await asyncio.sleep(_rest_after(took))
            batch = _next_batch(batch, took, self.clean_batch_size)
        if total:
            logger.info("pruned %d rows older than %s from %s", total, self.ttl, self.table.name)
        if self.events:
            self._emit(EventKind.CLEANED, None, None, rows=total)
        return total

    async def history(self, job_name: str | None = None, limit: int = 50) -> list[JobRun]:
        """The most recent runs, newest first, of one job or of all jobs."""
        self._check_open()
        if job_name is not None:
            check_name("job_name", job_name)
        if isinstance(limit, bool) or not isinstance(limit, int):
            raise TypeError(f"limit must be an int, not {type(limit).__name__}")
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        query = self._sql.history(job_name, limit)

        async def fetch(conn: AsyncConnection) -> list[JobRun]:
            rows = (await conn.execute(query)).all()
            return [
                JobRun(
                    id=row.id,
                    job_name=row.job_name,
                    identifier=row.job_identifier,
                    worker=row.worker,
                    status=row.status,
                    started_at=_aware(row.created_at),
                    finished_at=None if row.status == Status.RUNNING else _aware(row.updated_at),
                )
                for row in rows
            ]

        return await self._run("history()", fetch)

    async def leases(self) -> list[Lease]:
        """The lease of every exclusive job that has run, live or expired."""
        self._check_open()

        async def fetch(conn: AsyncConnection) -> list[Lease]:
            rows = (await conn.execute(self._sql.list_leases)).all()
            return [
                Lease(
                    job_name=row.job_name,
                    holder_id=row.holder_id,
                    worker=row.worker,
                    lease_until=_aware(row.lease_until),
                    live=bool(row.live),
                )
                for row in rows
            ]

        return await self._run("leases()", fetch)

    async def release(self, job_name: str) -> bool:
        """Force-release a stuck exclusive job: end its live lease, mark its run LOST.

        For an operator, when a holder is known to be gone. Returns False when the
        job had no live lease. A holder that is in fact still running will find its
        lease gone at its next renewal and stop.
        """
        self._check_open()
        check_name("job_name", job_name)
        sql = self._sql

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

        released = await self._run(f"release({job_name!r})", release)
        if released:
            logger.info("the lease of %r was released by force", job_name)
        return released

    async def _clean_tick(self, tick: datetime) -> int | None:
        """One interval of the background cleaner: prune if this instance wins the tick."""
        assert self._clean_identifier is not None
        identifier = self._clean_identifier(CLEAN_JOB_NAME, tick)
        lock = await self._acquire(CLEAN_JOB_NAME, identifier, tick)
        if lock is None:
            return None
        async with lock:
            return await self.clean()

    async def check_clock(self) -> timedelta:
        """Measure how far the database's clock is from this instance's; warn if too far.

        Ticks computed from local clocks (``lock()`` without a run time, ``@locked``
        without a scheduled time) split when clocks differ by about the identifier
        precision. The offset is kept in ``clock_offset``; ``async with`` measures it.
        """

        self._check_open()

        async def read(conn: AsyncConnection) -> tuple[datetime, datetime, datetime]:
            before = self.clock.now()
            database = _aware((await conn.execute(self._sql.now)).scalar_one())
            return before, database, self.clock.now()

        before, database, after = await self._run("check_clock()", read)
        offset = database - (before + (after - before) / 2)
        self.clock_offset = offset
        step = getattr(self.identifier, "step", None)
        tolerance = (step if isinstance(step, timedelta) else timedelta(seconds=1)) / 4
        uncertainty = (after - before) / 2
        if abs(offset) - uncertainty > tolerance:
            logger.warning(
                "this instance's clock differs from the database's by %.3f s, more than a "
                "quarter of the identifier precision: ticks named from local clocks may "
                "split between instances; synchronise the clocks (NTP) or pass scheduled "
                "run times",
                offset.total_seconds(),
            )
        return offset

    def subscribe(self, callback: Subscriber) -> Callable[[], None]:
        """Call ``callback(event)`` for every :class:`LockEvent`; returns an unsubscribe function.

        Callbacks run synchronously in the event loop; keep them short. One that
        raises is logged and does not affect the lock.
        """
        return self.events.subscribe(callback)

    def _emit(
        self,
        kind: EventKind,
        job_name: str | None,
        identifier: str | None,
        **details: Any,
    ) -> None:
        self.events.emit(kind, self.worker, job_name, identifier, details)

    # -- plumbing --------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this locker is closed: create a new AsyncDBLocker")

    async def _run(self, operation: str, work: Callable[[AsyncConnection], Awaitable[_T]]) -> _T:
        """Run ``work`` on a pooled connection within the timeout; errors become BackendError."""
        try:
            with self._deadlines.guard():
                async with self._serial, self._engine.connect() as conn:
                    return await work(conn)
        except Exception as error:
            raise self._backend_error(error, operation) from error

    async def _acquire_driver(self, job_name: str, identifier: str) -> int | None:
        """The plain acquire through the driver (see _driver.py), with _run's guarantees,
        in the caller's task (see _attempt.py): this is every lock() call's path.

        The operation's label for an error is only built on an error.
        """
        driver_acquire = self._driver_acquire
        assert driver_acquire is not None
        sending = (
            self._send_acquire(job_name, identifier)
            if self._gated
            else driver_acquire(job_name, identifier, self.worker)
        )
        attempt = Attempt(sending, self._deadlines)
        try:
            return await attempt
        except asyncio.CancelledError:
            if attempt.detached is not None:
                await self._abandon(attempt.detached, job_name, identifier, exclusive=False)
            raise
        except Exception as error:
            operation = f"lock({job_name!r})"
            raise self._backend_error(error, operation, lost_connection(error)) from error

    async def _guarded_acquire(self, job_name: str, identifier: str) -> tuple[int | None, bool]:
        """The driver-path acquire for a task of its own, with the deadline of _run."""
        try:
            with self._deadlines.guard():
                return await self._send_acquire(job_name, identifier), False
        except Exception as error:
            operation = f"lock({job_name!r})"
            raise self._backend_error(error, operation, lost_connection(error)) from error

    async def _send_acquire(self, job_name: str, identifier: str) -> int | None:
        """The driver-path acquire, through the SQLite gate on SQLite (see __init__)."""
        assert self._driver_acquire is not None
        async with self._serial_driver:
            return await self._driver_acquire(job_name, identifier, self.worker)

    async def _run_driver_many(
        self, operation: str, names: list[str], identifiers: list[str]
    ) -> dict[str, int]:
        """lock_many()'s INSERTs through the driver, with _run's guarantees.

        When a later statement fails after earlier ones won rows, those rows are marked
        FAILED (nobody will run them) before the error is raised.
        """
        assert self._driver_acquire is not None
        won: dict[str, int] = {}
        try:
            with self._deadlines.guard():
                async with self._serial_driver:
                    await self._driver_acquire.many(names, identifiers, self.worker, won)
            return won
        except Exception as error:
            if won:
                await self._fail_rows(won, "lock_many() failed part-way")
            raise self._backend_error(error, operation, lost_connection(error)) from error

    async def _fail_rows(self, won: dict[str, int], why: str) -> None:
        """Mark rows won but never to be run FAILED, one by one, as far as possible."""
        for name, row_id in won.items():
            try:
                await self._finish(row_id, Status.FAILED)
            except BackendError as error:
                logger.warning("%s: could not mark %r row %d FAILED: %s", why, name, row_id, error)
            else:
                logger.info("%s after winning %r; its row %d is marked FAILED", why, name, row_id)

    def _backend_error(
        self, error: Exception, operation: str, disconnected: bool = False
    ) -> BackendError:
        return translate_error(
            error,
            operation,
            target=self._target,
            table=self.table.name,
            timeout=self.timeout,
            disconnected=disconnected,
        )

    def __repr__(self) -> str:
        identifier = self.identifier
        if isinstance(identifier, Precision):
            strategy = f"precision({identifier.step!r})"
        else:
            strategy = repr(identifier)
        return (
            f"AsyncDBLocker({self._target!r}, worker={self.worker!r}, identifier={strategy}, "
            f"table={self.table.fullname!r})"
        )
