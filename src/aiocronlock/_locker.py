"""``AsyncDBLocker``: how a tick is decided.

Every instance that wants to run job ``J`` at tick ``t`` inserts the row
``(J, identifier(t), worker, RUNNING)``. The table has a unique key on
``(job_name, job_identifier)``, so exactly one insert succeeds: its instance runs
the job, the others see the conflict and skip. The insert ignores the conflict
instead of raising, so deciding costs one statement and no server-side error.

The locker holds the configuration and the lifecycle; the parts do the work:
``Acquirer`` sends the INSERT (``_acquire``), ``Store`` every other statement
(``_store``), ``Cleaner`` prunes (``_cleaner``), ``Lock`` records the outcome.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Iterable
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any, Self

from sqlalchemy import MetaData
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine

from ._acquire import Acquirer
from ._cleaner import DEFAULT_CLEAN_BATCH_SIZE, Cleaner
from ._clock import SYSTEM_CLOCK, Clock, DatabaseClock
from ._engine import create_engine_from_url, parse_url
from ._errors import BackendError
from ._events import EventKind, Events, Subscriber
from ._identifiers import IdentifierStrategy, Precision, compute_identifier, precision
from ._lock import Lock
from ._loop import OneLoop
from ._schema import DEFAULT_TABLE_NAME, Status, lock_table
from ._sql import RETRY_SUFFIX, Statements
from ._store import JobRun, Lease, Store
from ._validation import MAX_NAME_LENGTH, check_name, require_timedelta, to_timedelta, to_utc

__all__ = ["AsyncDBLocker", "JobRun", "Lease", "default_worker_name", "lease_for"]

logger = logging.getLogger("aiocronlock")


def default_worker_name() -> str:
    """``<hostname>:<pid>``, which tells instances apart on one host and across hosts."""
    return f"{socket.gethostname()}:{os.getpid()}"[:255]


def lease_for(
    locker: AsyncDBLocker,
    exclusive: bool,
    lease: timedelta | float | None,
    retry_dead: bool = False,
) -> timedelta | None:
    """The lease a run takes: ``None`` for per-tick locking, else ``lease`` or the
    locker's default. Shared by ``lock()``, the scheduler and ``@locked``."""
    if not isinstance(exclusive, bool):
        raise TypeError(f"exclusive must be a bool, not {type(exclusive).__name__}")
    if not isinstance(retry_dead, bool):
        raise TypeError(f"retry_dead must be a bool, not {type(retry_dead).__name__}")
    if exclusive and retry_dead:
        raise ValueError(
            "retry_dead: a tick is retried only in per-tick mode; choose exclusive=True "
            "(runs never overlap) or retry_dead=True (a dead run's tick runs again)"
        )
    if not exclusive and not retry_dead:
        if lease is not None:
            raise ValueError("lease: a lease only applies with exclusive=True or retry_dead=True")
        return None
    return locker.lease if lease is None else require_timedelta("lease", lease)


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
    :param clean_batch_size: the most rows one pruning DELETE removes (2,000 by
        default): a large backlog is pruned in small statements, between lock() calls.
    :param clock: the time source; tests pass ``aiocronlock.testing.FakeClock``.
    :param lease: the default lease of exclusive locks (``lock(..., exclusive=True)``).
    :param telemetry: emit OpenTelemetry spans and metrics when ``opentelemetry-api``
        is installed.

    Attributes: ``worker``, ``engine`` (the one given, or made from the URL),
    ``timeout`` (seconds), ``clock_offset`` (the database's clock minus this
    instance's, measured on start; ``None`` before), ``closed``, ``events`` and
    ``store`` (every statement but the acquire, for the parts built on the locker).

    The locker works in the event loop of its first call; used from another one it
    raises ``RuntimeError`` before sending anything.
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
        #: This instance's name, stored with every row it wins.
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
        #: Seconds any one database call may take.
        self.timeout = require_timedelta("timeout", timeout).total_seconds()
        if isinstance(clean_batch_size, bool) or not isinstance(clean_batch_size, int):
            raise TypeError(
                f"clean_batch_size must be an int, not {type(clean_batch_size).__name__}"
            )
        if clean_batch_size < 1:
            raise ValueError(f"clean_batch_size must be at least 1, got {clean_batch_size}")
        self.clean_batch_size = clean_batch_size
        self.clock: Clock = SYSTEM_CLOCK if clock is None else clock
        self.lease = require_timedelta("lease", lease)
        #: Subscribers and telemetry; see :meth:`subscribe`.
        self.events = Events()
        #: Database clock minus this instance's clock, measured on start (``check_clock``).
        self.clock_offset: timedelta | None = None
        #: ``clock`` moved by ``clock_offset``: the database's time, which the scheduler
        #: fires ticks by, so instances whose clocks differ fire each at the same moment.
        self.database_clock: Clock = DatabaseClock(self.clock, lambda: self.clock_offset)
        self.table = lock_table(MetaData(), name=table_name, schema=schema)

        if isinstance(engine, AsyncEngine):
            self._owns_engine = False
            # Run outside any transaction: no BEGIN/COMMIT around a single statement.
            own = engine.execution_options(isolation_level="AUTOCOMMIT")
        elif isinstance(engine, str | URL):
            self._owns_engine = True
            own = create_engine_from_url(parse_url(engine))
        else:
            raise TypeError(
                "engine must be a sqlalchemy.ext.asyncio.AsyncEngine or a database URL, "
                f"not {type(engine).__name__}"
            )
        #: The engine given, or the one made from the URL.
        self.engine: AsyncEngine = engine if isinstance(engine, AsyncEngine) else own
        statements = Statements(self.table, own.dialect.name)
        # The locker works in the event loop of its first call, and refuses any other.
        self._one_loop = OneLoop()
        #: Every statement but the acquire: outcomes, leases, history, pruning.
        self.store = Store(own, statements, timeout=self.timeout, one_loop=self._one_loop)
        self._acquirer = Acquirer(
            own,
            statements,
            timeout=self.timeout,
            in_doubt=self._abandon,
            one_loop=self._one_loop,
            in_turn=self.store.in_turn,
        )
        self._cleaner = Cleaner(
            self.store,
            ttl=self.ttl,
            batch_size=clean_batch_size,
            interval=self.clean_interval,
            clock=self.clock,
        )
        # Tasks that mark the rows of cancelled calls, which must outlive their callers.
        self._background: set[asyncio.Task[None]] = set()
        if telemetry and importlib.util.find_spec("opentelemetry") is not None:
            from ._otel import instrument

            instrument(self)
        self._started = False
        self._closed = False

    # -- lifecycle ---------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        """Start: compare clocks with the database (see :meth:`check_clock`) and start
        the background cleaner."""
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
            # The loop calls clean() through the locker, where it emits CLEANED.
            self._cleaner.start(
                self._decide, lambda: self.clean(), name=f"aiocronlock cleaner {self.worker}"
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
        """Stop the cleaner, close the connections kept for acquiring, and dispose the
        engine if the locker created it. Calling it again does nothing."""
        if self._closed:
            return
        # Public methods refuse from here on; work already under way (the cleaner's
        # last unlock, a cancelled lock() marking its row) may still finish.
        self._closed = True
        if not self._one_loop.is_current():
            logger.warning(
                "aclose() was called from another event loop than the locker's: its "
                "connections belong to that loop and are left to it"
            )
            return
        await self._cleaner.stop(grace=2 * self.timeout)
        if self._background:
            await asyncio.wait(set(self._background))
        await self._acquirer.aclose()
        await self.store.aclose()
        if self._owns_engine:
            try:
                async with asyncio.timeout(self.timeout):
                    await self.engine.dispose()
            except TimeoutError:
                logger.warning(
                    "closing the database connections took over %g s; abandoned them",
                    self.timeout,
                )

    @property
    def closed(self) -> bool:
        """True once :meth:`aclose` has been called."""
        return self._closed

    # -- deciding a tick -----------------------------------------------------------------

    async def lock(
        self,
        job_name: str,
        run_time: datetime | None = None,
        *,
        exclusive: bool = False,
        lease: timedelta | float | None = None,
        retry_dead: bool = False,
    ) -> Lock | None:
        """Try to win ``job_name``'s tick at ``run_time``; ``None`` if another instance has it.

        :param job_name: the job, 1 to 255 characters.
        :param run_time: the tick's *scheduled* time, timezone-aware; ``None`` means now.
            Instances that pass the same scheduled time agree on the tick whatever
            their clocks say.
        :param exclusive: also require that no other run of this job holds a live
            lease, so runs of the job never overlap across instances, even when one
            outlives its interval.
        :param lease: with ``exclusive`` or ``retry_dead``, how long the lease lasts
            without renewal (default: the locker's ``lease``); it is renewed every third
            of it while held.
        :param retry_dead: the run keeps a heartbeat on its row (its lease), so that if
            it dies, another instance's :meth:`retry_dead_runs` runs the tick again, once.
            Pass the same ``lease`` on every instance.
        :returns: a :class:`Lock` to run the job under, or ``None`` when the tick was
            already taken, or when ``run_time`` is older than ``ttl`` (its row may have
            been pruned, and running it would be a second run).
        :raises BackendError: the database could not decide. Do not run the job.
        """
        self._check_open()
        self._one_loop.check()
        check_name("job_name", job_name)
        job_lease = lease_for(self, exclusive, lease, retry_dead)
        run_time, stale = self._tick_time(run_time)
        identifier = self._identify(job_name, run_time)
        if retry_dead and len(identifier) > MAX_NAME_LENGTH - len(RETRY_SUFFIX):
            raise ValueError(
                f"retry_dead: the identifier of {job_name!r} ({len(identifier)} characters) "
                f"leaves no room for its retry's suffix {RETRY_SUFFIX!r}: use identifiers "
                f"of at most {MAX_NAME_LENGTH - len(RETRY_SUFFIX)} characters"
            )
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
        if job_lease is not None and not retry_dead:
            return await self._decide(job_name, identifier, run_time, job_lease)
        # A heartbeat's lease runs from when the INSERT was sent, at best.
        sent = asyncio.get_running_loop().time() if retry_dead else None
        try:
            # Cancelled mid-INSERT, the acquirer settles the tick with _abandon.
            row_id = await self._acquirer.acquire(job_name, identifier, self.worker)
        except BackendError:
            raise
        except Exception as error:
            raise self.store.error(error, f"lock({job_name!r})") from error
        if retry_dead:
            return self._decided(
                job_name, identifier, run_time, row_id, False, job_lease, sent, retry_dead=True
            )
        return self._decided(job_name, identifier, run_time, row_id)

    async def _decide(
        self, job_name: str, identifier: str, run_time: datetime, lease: timedelta | None = None
    ) -> Lock | None:
        """Decide a tick as lock() does, for a run time already checked (the cleaner's
        ticks, exclusive locks): a Lock, or None.

        If the caller is cancelled meanwhile, the statement still completes (within
        the timeout) and a row it won is marked FAILED, never left RUNNING.
        """
        overlap, sent = False, None
        if lease is None:
            try:
                row_id = await self._acquirer.acquire(job_name, identifier, self.worker)
            except BackendError:
                raise
            except Exception as error:
                raise self.store.error(error, f"lock({job_name!r})") from error
        else:
            sent = asyncio.get_running_loop().time()  # the lease runs from here at best
            deciding = asyncio.ensure_future(
                self.store.acquire_exclusive(job_name, identifier, self.worker, lease)
            )
            try:
                row_id, overlap = await asyncio.shield(deciding)
            except asyncio.CancelledError:
                abandon = self._abandon_exclusive(deciding, job_name, identifier)
                await asyncio.shield(self._in_background(abandon))
                raise
        return self._decided(job_name, identifier, run_time, row_id, overlap, lease, sent)

    async def _abandon(self, job_name: str, identifier: str) -> None:
        """After lock() was cancelled mid-INSERT: record the tick FAILED, whether the
        INSERT landed or not (see ``Statements.abandon``)."""
        try:
            if await self.store.abandon(job_name, identifier, self.worker):
                logger.info(
                    "lock(%r) was cancelled after winning %s, or before its INSERT arrived: "
                    "the tick is recorded FAILED",
                    job_name,
                    identifier,
                )
        except Exception as error:
            logger.warning(
                "lock(%r) was cancelled and its outcome for %s is unknown: %s",
                job_name,
                identifier,
                error,
            )

    async def _abandon_exclusive(
        self, deciding: Awaitable[tuple[int | None, bool]], job_name: str, identifier: str
    ) -> None:
        """After a cancelled exclusive lock(): wait for it, and mark a row won FAILED."""
        try:
            row_id, _ = await deciding
            if row_id is not None:
                await self.store.finish(row_id, Status.FAILED, release_job=job_name)
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

    def _in_background(self, work: Awaitable[None]) -> asyncio.Future[None]:
        """Run ``work`` in a task of its own, which aclose() waits for; a caller awaits
        it through ``asyncio.shield``, so that a second cancel leaves it running."""
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    def _decided(
        self,
        job_name: str,
        identifier: str,
        run_time: datetime,
        row_id: int | None,
        overlap: bool = False,
        lease: timedelta | None = None,
        lease_sent: float | None = None,
        *,
        retry_dead: bool = False,
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
        return Lock(
            self.store,
            self.events,
            id=row_id,
            job_name=job_name,
            identifier=identifier,
            worker=self.worker,
            run_time=run_time,
            lease=lease,
            lease_sent=lease_sent,
            retry_dead=retry_dead,
        )

    async def retry_dead_runs(
        self, job_name: str, *, lease: timedelta | float | None = None
    ) -> list[Lock]:
        """Run again, here, the ticks of ``job_name`` whose ``retry_dead`` run died.

        A run died when its row is RUNNING and its heartbeat older than ``lease`` (the
        lease its runs take, the locker's by default), by the database's clock, or when
        it is LOST. Each such tick is retried once, on one instance: its run is marked
        LOST, so that it can no longer beat, and the tick's retry row is inserted (the
        identifier plus ``"#retry"``; its id is greater than the dead run's). The
        scheduler calls this at every tick of a ``retry_dead`` job.

        :returns: the locks of the retries won here, to run the job under, as lock()'s;
            usually none. A retry has no heartbeat: it is never retried itself.
        :raises BackendError: the database could not say, and no retry was won.
        """
        self._check_open()
        self._one_loop.check()
        check_name("job_name", job_name)
        job_lease = lease_for(self, False, lease, retry_dead=True)
        assert job_lease is not None
        won: list[Lock] = []
        for run in await self.store.dead_runs(job_name, job_lease):
            deciding = asyncio.ensure_future(self.store.retry(run.id, self.worker, job_lease))
            try:
                row_id = await asyncio.shield(deciding)
            except asyncio.CancelledError:
                await asyncio.shield(self._in_background(self._fail_retries(deciding, won)))
                raise
            except BackendError as error:
                if not won:
                    raise
                logger.warning("%r: retrying the run %d failed: %s", job_name, run.id, error)
                break
            if row_id is None:
                continue  # it lives, or another instance has its retry
            logger.warning(
                "%r %s: run %d (%s) stopped its heartbeat; its tick is retried here as run %d",
                job_name,
                run.identifier,
                run.id,
                run.worker,
                row_id,
            )
            identifier = run.identifier + RETRY_SUFFIX
            lock = self._decided(job_name, identifier, self._run_time_of(run), row_id)
            assert lock is not None
            won.append(lock)
        return won

    async def _fail_retries(self, deciding: Awaitable[int | None], won: list[Lock]) -> None:
        """After a cancelled retry_dead_runs(): mark the retries it won FAILED."""
        try:
            row_id = await deciding
        except Exception as error:
            logger.warning(
                "retry_dead_runs() was cancelled; a retry's outcome is unknown: %s", error
            )
            row_id = None
        ids = [lock.id for lock in won] + ([] if row_id is None else [row_id])
        for lock_id in ids:
            try:
                await self.store.finish(lock_id, Status.FAILED)
            except BackendError as error:
                logger.warning("could not mark the retry %d FAILED: %s", lock_id, error)
            else:
                logger.info("retry_dead_runs() was cancelled; its retry %d is FAILED", lock_id)

    def _run_time_of(self, run: JobRun) -> datetime:
        """A dead run's tick: read back from a precision's identifier, else when it began."""
        strategy = self.identifier
        if isinstance(strategy, Precision):
            with contextlib.suppress(ValueError):
                tick = datetime.fromisoformat(run.identifier).astimezone(UTC)
                if strategy(run.job_name, tick) == run.identifier:
                    return tick
        return run.started_at

    def _identify(self, job_name: str, run_time: datetime) -> str:
        """The tick's identifier. A precision's depends on the run time alone, and the
        jobs of one tick ask one after another: the last one is kept."""
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
        if run_time is None:
            return self.database_clock.now(), False
        now = self.clock.now()  # ttl is hours or days: a clock's offset is nothing to it
        run_time = to_utc("run_time", run_time)
        return run_time, now - run_time > self.ttl

    async def lock_many(
        self, job_names: Iterable[str], run_time: datetime | None = None
    ) -> dict[str, Lock]:
        """Try to win one tick of several jobs at once; return the locks won, by job name.

        On PostgreSQL, SQLite and MariaDB 10.5+ this is a single multi-row INSERT per
        500 jobs. MySQL cannot report which rows of a multi-row insert won, so there it
        is one INSERT per job on one connection. Jobs whose tick another instance has
        are simply absent from the result.
        """
        self._check_open()
        self._one_loop.check()
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
        deciding = asyncio.ensure_future(self._insert_many(names, identifiers))
        try:
            won, error = await asyncio.shield(deciding)
        except asyncio.CancelledError:

            async def abandon() -> None:
                won, _ = await deciding
                await self._fail_rows(won, "lock_many() was cancelled")

            await asyncio.shield(self._in_background(abandon()))
            raise
        if error is not None:
            await self._fail_rows(won, "lock_many() failed part-way")
            raise self.store.error(error, operation) from error
        unknown = won.keys() - identifiers.keys()
        if unknown:
            # Only a table whose job_name column is narrower than the library's does
            # this (it cut the names short), and MariaDB's INSERT IGNORE does not say so.
            await self._fail_rows(won, "lock_many() got back job names it did not send")
            raise BackendError(
                f"{operation} on {self.store.target}",
                f"the database returned job names that were not sent ({sorted(unknown)[:3]!r})",
                hint=f"the table {self.table.name!r} does not match lock_table(); recreate "
                "it with `await locker.create_table()` or `aiocronlock init`",
            )
        return {
            name: Lock(
                self.store,
                self.events,
                id=row_id,
                job_name=name,
                identifier=identifiers[name],
                worker=self.worker,
                run_time=run_time,
            )
            for name, row_id in won.items()
        }

    async def _insert_many(
        self, names: list[str], identifiers: dict[str, str]
    ) -> tuple[dict[str, int], BaseException | None]:
        """lock_many()'s INSERTs: the ids won by job name, and the first error, if any,
        after every statement has ended (the rows won before it must be marked)."""
        values = [identifiers[name] for name in names]
        if not self._acquirer.decides_many:
            try:
                return await self.store.insert_each(names, values, self.worker), None
            except BackendError as failed:
                return {}, failed.__cause__ or failed
        won: dict[str, int] = {}
        try:
            await self._acquirer.acquire_many(names, values, self.worker, won)
        except Exception as error:
            return won, error
        return won, None

    async def _fail_rows(self, won: dict[str, int], why: str) -> None:
        """Mark rows won but never to be run FAILED, one by one, as far as possible."""
        for name, row_id in won.items():
            try:
                await self.store.finish(row_id, Status.FAILED)
            except BackendError as error:
                logger.warning("%s: could not mark %r row %d FAILED: %s", why, name, row_id, error)
            else:
                logger.info("%s after winning %r; its row %d is marked FAILED", why, name, row_id)

    # -- maintenance -----------------------------------------------------------------------

    async def create_table(self) -> None:
        """Create the lock table and its indexes if missing; safe to call from many instances.

        On SQLite it also switches the file to WAL, so several processes can share it.
        """
        self._check_open()
        await self.store.create_table()

    async def clean(self) -> int:
        """Delete rows older than ``ttl`` now, in batches; return how many were deleted.

        Batches hold at most ``clean_batch_size`` rows, fewer while a DELETE is slow,
        and after each the cleaner rests, so that a big backlog goes slowly rather than
        slowing down the ``lock()`` calls of every instance. Ages are measured with the
        database's clock, so instances whose clocks differ prune the same rows.
        """
        self._check_open()
        deleted = await self._cleaner.clean()
        if self.events:
            self._emit(EventKind.CLEANED, None, None, rows=deleted)
        return deleted

    async def history(self, job_name: str | None = None, limit: int = 50) -> list[JobRun]:
        """The most recent runs, newest first, of one job or of all jobs."""
        self._check_open()
        if job_name is not None:
            check_name("job_name", job_name)
        if isinstance(limit, bool) or not isinstance(limit, int):
            raise TypeError(f"limit must be an int, not {type(limit).__name__}")
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        return await self.store.history(job_name, limit)

    async def leases(self) -> list[Lease]:
        """The lease of every exclusive job that has run, live or expired."""
        self._check_open()
        return await self.store.leases()

    async def release(self, job_name: str) -> bool:
        """Force-release a stuck exclusive job: end its live lease, mark its run LOST.

        For an operator, when a holder is known to be gone. Returns False when the
        job had no live lease. A holder that is in fact still running will find its
        lease gone at its next renewal and stop.
        """
        self._check_open()
        check_name("job_name", job_name)
        released = await self.store.release(job_name)
        if released:
            logger.info("the lease of %r was released by force", job_name)
        return released

    async def check_clock(self) -> timedelta:
        """Measure how far the database's clock is from this instance's; warn if too far.

        Ticks computed from local clocks (``lock()`` without a run time, ``@locked``
        without a scheduled time) split when clocks differ by about the identifier
        precision. The offset is kept in ``clock_offset``; ``async with`` measures it.
        """
        self._check_open()
        # Two readings, keeping the shorter round trip: the first may include opening a
        # connection, which would skew the offset by half the time that took.
        readings = []
        for _ in range(2):
            before = self.clock.now()
            database = await self.store.now("check_clock()")
            readings.append((self.clock.now() - before, database, before))
        round_trip, database, before = min(readings)
        offset = database - (before + round_trip / 2)
        self.clock_offset = offset
        step = getattr(self.identifier, "step", None)
        tolerance = (step if isinstance(step, timedelta) else timedelta(seconds=1)) / 4
        uncertainty = round_trip / 2
        if abs(offset) - uncertainty > tolerance and not getattr(self.clock, "simulated", False):
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
        self, kind: EventKind, job_name: str | None, identifier: str | None, **details: Any
    ) -> None:
        self.events.emit(kind, self.worker, job_name, identifier, details)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this locker is closed: create a new AsyncDBLocker")

    def __repr__(self) -> str:
        identifier = self.identifier
        if isinstance(identifier, Precision):
            strategy = f"precision({identifier.step!r})"
        else:
            strategy = repr(identifier)
        return (
            f"AsyncDBLocker({self.store.target!r}, worker={self.worker!r}, "
            f"identifier={strategy}, table={self.table.fullname!r})"
        )
