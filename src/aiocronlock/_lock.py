"""A won tick: the ``Lock`` returned by ``AsyncDBLocker.lock()``."""

from __future__ import annotations

import asyncio
import contextvars
import logging
from datetime import datetime
from types import TracebackType
from typing import TYPE_CHECKING, Self

from ._schema import Status

if TYPE_CHECKING:
    from ._locker import AsyncDBLocker

logger = logging.getLogger("aiocronlock")

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
    """

    __slots__ = (
        "_done",
        "_locker",
        "_token",
        "id",
        "identifier",
        "job_name",
        "run_time",
        "worker",
    )

    def __init__(
        self,
        locker: AsyncDBLocker,
        *,
        id: int,
        job_name: str,
        identifier: str,
        worker: str,
        run_time: datetime,
    ) -> None:
        self._locker = locker
        self._done = False
        self._token: contextvars.Token[Lock] | None = None
        #: The row's id. Ids only increase, so it can serve as a fencing token.
        self.id = id
        self.job_name = job_name
        self.identifier = identifier
        self.worker = worker
        #: The tick's scheduled time, in UTC.
        self.run_time = run_time

    @property
    def released(self) -> bool:
        """True once FINISHED or FAILED has been recorded."""
        return self._done

    async def unlock(self, *, failed: bool = False) -> None:
        """Record FINISHED (or FAILED) and the time; calling it again does nothing.

        The update is shielded from cancellation (within the locker's timeout), so
        a cancelled caller still leaves an accurate row behind. If the database
        cannot be reached, ``BackendError`` is raised and the call may be retried.
        """
        if self._done:
            return
        status = Status.FAILED if failed else Status.FINISHED
        update = asyncio.ensure_future(self._locker._finish(self.id, status))
        try:
            await asyncio.shield(update)
        except asyncio.CancelledError:
            # The caller is cancelled; let the update finish, then propagate.
            try:
                await update
            except Exception:
                logger.exception("could not record %s for %r", status.value, self)
            else:
                self._done = True
            raise
        self._done = True

    async def __aenter__(self) -> Self:
        self._token = _current_lock.set(self)
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
        if exc is None:
            await self.unlock()
            return
        try:
            await self.unlock(failed=True)
        except Exception:
            # The body's exception matters more; do not hide it behind ours.
            logger.exception("could not record FAILED for %r", self)

    def __repr__(self) -> str:
        return (
            f"Lock(id={self.id}, job_name={self.job_name!r}, identifier={self.identifier!r}, "
            f"worker={self.worker!r})"
        )
