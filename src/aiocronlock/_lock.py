"""A won tick: the ``Lock`` returned by ``AsyncDBLocker.lock()``."""

from __future__ import annotations

import asyncio
import contextvars
import logging
from datetime import datetime, timedelta
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from ._errors import LeaseLostError
from ._events import EventKind
from ._schema import Status

if TYPE_CHECKING:
    from ._events import Events
    from ._store import Store

logger = logging.getLogger("aiocronlock")

#: The part of a lease kept in reserve: a holder that could not renew gives up at
#: 90% of its lease, before the database lets another instance take the job.
_LEASE_MARGIN = 0.1

_current_lock: contextvars.ContextVar[Lock] = contextvars.ContextVar("aiocronlock_current_lock")


def current_lock() -> Lock:
    """The lock of the run in progress, inside a job started by the scheduler or a guard.

    Gives the job its tick (``current_lock().run_time``) and its fencing token
    (``current_lock().id``). Raises ``LookupError`` outside such a run.
    """
    try:
        return _current_lock.get()
    except LookupError:
        raise LookupError(
            "current_lock() is only available inside a job run by Scheduler or @locked"
        ) from None


class Lock:
    """This instance won ``(job_name, identifier)``; the row says RUNNING until unlocked.

    Use it as an async context manager: leaving the block records FINISHED, or
    FAILED when the block raised (the exception propagates) or was cancelled.

    An exclusive lock (``lock(..., exclusive=True)``) also holds the job's lease and
    renews it every third of the lease while held. If a renewal fails for longer
    than the lease (database down, event loop blocked) or finds the lease taken,
    the lock is *lost*: ``lost`` becomes true (``await lock.wait_lost()`` returns), the
    row becomes LOST, and, when
    ``cancel_on_loss`` is true (the default), the task running the ``async with``
    block is cancelled and the block raises ``LeaseLostError`` instead, so that two
    instances never run the job at once.

    A ``retry_dead`` lock (``lock(..., retry_dead=True)``) keeps its lease the same way,
    as a heartbeat on its own row; it is lost when another instance found the heartbeat
    expired and marked the row LOST to run the tick again.
    """

    __slots__ = (
        "_cancelled_by_loss",
        "_done",
        "_events",
        "_keeper",
        "_lost",
        "_lost_reason",
        "_renewal",
        "_store",
        "_task",
        "_token",
        "cancel_on_loss",
        "id",
        "identifier",
        "job_name",
        "lease",
        "retry_dead",
        "run_time",
        "worker",
    )

    def __init__(
        self,
        store: Store,
        events: Events,
        *,
        id: int,
        job_name: str,
        identifier: str,
        worker: str,
        run_time: datetime,
        lease: timedelta | None = None,
        lease_sent: float | None = None,
        retry_dead: bool = False,
    ) -> None:
        self._store = store
        self._events = events
        self._done = False
        self._token: contextvars.Token[Lock] | None = None
        self._task: asyncio.Task[object] | None = None
        self._keeper: asyncio.Task[None] | None = None
        self._lost_reason: str | None = None
        self._cancelled_by_loss = False
        #: The row's id. Ids only increase, so it can serve as a fencing token.
        self.id = id
        self.job_name = job_name
        self.identifier = identifier
        self.worker = worker
        #: The tick's scheduled time, in UTC.
        self.run_time = run_time
        #: The lease of an exclusive or a ``retry_dead`` lock; ``None`` for a per-tick lock.
        self.lease = lease
        #: The lease is a heartbeat on the run's own row, and another instance retries
        #: the tick once it expires (``lock(..., retry_dead=True)``).
        self.retry_dead = retry_dead
        # What wait_lost() waits on, made on first use: lock_many() makes hundreds of
        # locks at once, and a per-tick lock never needs one.
        self._lost: asyncio.Event | None = None
        #: Cancel the task in the ``async with`` block when the lease is lost.
        self.cancel_on_loss = True
        self._renewal: asyncio.Future[bool] | None = None
        if lease is not None:
            # The lease runs from when the statement that took it was sent (the loop's
            # clock): the database started it no earlier than that.
            sent = asyncio.get_running_loop().time() if lease_sent is None else lease_sent
            self._keeper = asyncio.create_task(
                self._keep_lease(sent), name=f"aiocronlock lease {job_name} #{id}"
            )

    @property
    def lost(self) -> bool:
        """True once an exclusive lock has lost its lease; never for a per-tick lock."""
        return self._lost_reason is not None

    async def wait_lost(self) -> None:
        """Return once the lease is lost (at once if it is already); for a per-tick lock,
        never."""
        if self._lost is None:
            self._lost = asyncio.Event()
            if self.lost:
                self._lost.set()
        await self._lost.wait()

    @property
    def exclusive(self) -> bool:
        return self.lease is not None and not self.retry_dead

    @property
    def released(self) -> bool:
        """True once the outcome (FINISHED, FAILED or LOST) has been recorded."""
        return self._done

    # -- the lease of an exclusive lock ---------------------------------------------------------

    async def _keep_lease(self, confirmed: float) -> None:
        """Renew the lease every third of it; lose it at its end, as counted from when the
        last statement that took or renewed it was sent, less a margin.

        The keeper never waits on a renewal past that point: a stalled connection, or a
        driver slow to close one, cannot keep the run going after the database let
        another instance take the job.
        """
        assert self.lease is not None
        loop = asyncio.get_running_loop()
        lease = self.lease.total_seconds()
        margin = lease * _LEASE_MARGIN
        while True:
            deadline = confirmed + lease - margin
            next_renewal = min(confirmed + lease / 3, deadline)  # past, after a failure
            if loop.time() < next_renewal:
                await asyncio.sleep(next_renewal - loop.time())
            sent = loop.time()
            if sent >= deadline:
                self._lose(f"no renewal for {sent - confirmed:.1f} s, the lease is {lease:g} s")
                return
            if self.retry_dead:
                renewing = self._store.heartbeat(self.id)
            else:
                renewing = self._store.renew(self.job_name, self.id, self.lease)
            renewal = asyncio.ensure_future(renewing)
            renewal.add_done_callback(_retrieved)
            self._renewal = renewal
            await asyncio.wait({renewal}, timeout=deadline - sent)
            if not renewal.done():
                renewal.cancel()  # it ends in the background; the run stops now
                self._lose(f"no renewal answered within the lease ({lease:g} s)")
                return
            error = renewal.exception()
            if error is not None:
                logger.warning("could not renew the lease of %r: %s", self, error)
                # Again soon, while the lease lasts.
                await asyncio.sleep(max(0.0, min(lease / 6, deadline - loop.time())))
                continue
            if not renewal.result():
                self._lose("the lease expired or was taken over")
                return
            confirmed = sent
            if self._events:
                self._emit(EventKind.LEASE_RENEWED, lock_id=self.id, run_time=self.run_time)

    async def fence(self, conn: AsyncConnection | AsyncSession) -> None:
        """Let the caller's transaction commit only while this run holds the job's lease.

        Call it inside the transaction that writes the job's results (``async with
        engine.begin() as conn:``, or a session's), on the locker's database. It
        checks, in that transaction, that this run still holds the job's live lease,
        by the database's clock, and locks the lease row until the transaction ends:
        no other run can take the job (and no renewal or release change the lease)
        before what was written commits or rolls back. If this run no longer holds
        the lease (it expired, was released, or another run took it), it raises
        ``LeaseLostError`` and the lock becomes lost: let the exception roll the
        transaction back. Keep the transaction short: the lease's renewal waits for it.

        Errors of the connection itself are SQLAlchemy's, as for your own statements.
        """
        if not self.exclusive:
            raise RuntimeError(
                f"fence() needs an exclusive lock, and {self!r} holds no lease of its job: "
                "take it with lock(..., exclusive=True)"
            )
        if not isinstance(conn, AsyncConnection | AsyncSession):
            raise TypeError(
                "fence() takes the AsyncConnection or AsyncSession of the transaction to "
                f"fence, got {type(conn).__name__}"
            )
        statement = self._store.sql.fence
        if isinstance(conn, AsyncSession):
            conn = await conn.connection(bind_arguments={"clause": statement})
        sync = conn.sync_connection
        if sync is not None and sync.get_execution_options().get("isolation_level") == "AUTOCOMMIT":
            raise ValueError(
                "fence() needs a transaction, and this connection is in AUTOCOMMIT: "
                "use a connection from your engine as it is, in `async with engine.begin()`"
            )
        params = {"lease_job": self.job_name, "lock_id": self.id}
        if (await conn.execute(statement, params)).first() is not None:
            return
        reason = "a fenced write found its lease expired, released or taken by another run"
        if not self._done:
            self._lose(reason)
        raise LeaseLostError(self.job_name, self.id, reason)

    def _lose(self, reason: str) -> None:
        if self.lost:
            return
        self._lost_reason = reason
        if self._lost is not None:
            self._lost.set()
        logger.error("%r lost its lease: %s", self, reason)
        if self._events:
            self._emit(
                EventKind.LEASE_LOST,
                lock_id=self.id,
                run_time=self.run_time,
                reason=reason,
            )
        task = self._task
        # A fence() in the run's own task raises LeaseLostError there instead.
        if self.cancel_on_loss and task and not task.done() and task is not asyncio.current_task():
            self._cancelled_by_loss = True
            task.cancel(f"aiocronlock: {self!r} lost its lease")

    async def _stop_keeper(self) -> None:
        if self._renewal is not None:
            self._renewal.cancel()
        keeper, self._keeper = self._keeper, None
        if keeper is not None and keeper is not asyncio.current_task():
            keeper.cancel()
            await asyncio.gather(keeper, return_exceptions=True)

    def _emit(self, kind: EventKind, **details: Any) -> None:
        self._events.emit(kind, self.worker, self.job_name, self.identifier, details)

    # -- releasing ------------------------------------------------------------------------------

    async def unlock(self, *, failed: bool = False) -> None:
        """Record FINISHED (or FAILED, or LOST for a lost lease) and release the lease.

        Calling it again does nothing. The update is shielded from cancellation
        (within the locker's timeout), so a cancelled caller still leaves an accurate
        row behind. If the database cannot be reached, ``BackendError`` is raised and
        the call may be retried.
        """
        if self._done:
            return
        await self._stop_keeper()
        if self.lost:
            status = Status.LOST
        else:
            status = Status.FAILED if failed else Status.FINISHED
        await self._record(status)

    async def _record(self, status: Status) -> None:
        release = self.job_name if self.exclusive and status != Status.LOST else None
        update = asyncio.ensure_future(self._store.finish(self.id, status, release_job=release))
        try:
            await asyncio.shield(update)
        except asyncio.CancelledError:
            # The caller is cancelled; let the update finish, then propagate.
            try:
                await update
            except Exception:
                logger.exception("could not record %s for %r", status.value, self)
                self._store.finish_later(self.id, status, release_job=release)
            else:
                self._finished(status)
            raise
        except Exception:
            # The run has ended all the same: record it once the database is back.
            self._store.finish_later(self.id, status, release_job=release)
            raise
        self._finished(status)

    def _finished(self, status: Status) -> None:
        self._done = True
        if self._events and status != Status.LOST:
            kind = EventKind.FAILED if status == Status.FAILED else EventKind.FINISHED
            self._emit(kind, lock_id=self.id, run_time=self.run_time)

    async def __aenter__(self) -> Self:
        self._token = _current_lock.set(self)
        self._task = asyncio.current_task()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        token, self._token = self._token, None
        if token is not None:
            _current_lock.reset(token)
        task, self._task = self._task, None
        if exc is None:
            await self.unlock()
            return
        try:
            await self.unlock(failed=True)
        except Exception:
            # The body's exception matters more; do not hide it behind ours.
            outcome = Status.LOST if self.lost else Status.FAILED
            logger.exception("could not record %s for %r", outcome.value, self)
        if self._cancelled_by_loss and isinstance(exc, asyncio.CancelledError) and task:
            # Our cancellation, not the caller's: report it as what it is.
            task.uncancel()
            raise LeaseLostError(self.job_name, self.id, self._lost_reason or "") from None

    def __repr__(self) -> str:
        return (
            f"Lock(id={self.id}, job_name={self.job_name!r}, identifier={self.identifier!r}, "
            f"worker={self.worker!r})"
        )


def _retrieved(future: asyncio.Future[bool]) -> None:
    """Mark a renewal's error as seen: the keeper may have stopped waiting for it."""
    if not future.cancelled():
        future.exception()
