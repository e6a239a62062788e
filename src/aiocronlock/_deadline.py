"""A timeout that really ends the work, even when cleanup inside it awaits again.

``asyncio.timeout`` cancels once. When a database call is cancelled, the driver's
cleanup (closing the now unusable connection politely) can await for seconds more,
and a single cancellation does not interrupt that. ``Deadline`` keeps cancelling
until the block exits, then reports ``TimeoutError`` like ``asyncio.timeout``.
"""

from __future__ import annotations

import asyncio
from types import TracebackType

#: How often the deadline repeats its cancellation while the block is still running.
_RECANCEL_EVERY = 0.05


class Deadline:
    """``async with Deadline(seconds):`` raises ``TimeoutError`` once ``seconds`` pass."""

    __slots__ = ("_cancels", "_handle", "_initial", "_seconds", "_task")

    def __init__(self, seconds: float) -> None:
        self._seconds = seconds
        self._cancels = 0
        self._handle: asyncio.TimerHandle | None = None

    async def __aenter__(self) -> None:
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("Deadline must be used inside a task")
        self._task = task
        self._initial = task.cancelling()
        self._handle = asyncio.get_running_loop().call_later(self._seconds, self._expire)

    def _expire(self) -> None:
        self._cancels += 1
        self._task.cancel()
        self._handle = asyncio.get_running_loop().call_later(_RECANCEL_EVERY, self._expire)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        if not self._cancels:
            return
        for _ in range(self._cancels):
            self._task.uncancel()
        if (
            exc_type is not None
            and issubclass(exc_type, asyncio.CancelledError)
            and self._task.cancelling() <= self._initial
        ):
            raise TimeoutError from exc
