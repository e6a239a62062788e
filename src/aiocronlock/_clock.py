"""Where "now" comes from, so that tests can replace the wall clock."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Protocol


class Clock(Protocol):
    """The time source of a locker and a scheduler."""

    def now(self) -> datetime:
        """The current time, aware, in UTC."""
        ...

    async def sleep_until(self, moment: datetime) -> None:
        """Return once ``now()`` has reached ``moment``."""
        ...

    def track(self, task: asyncio.Task[None]) -> None:
        """Told about each job run started, so a test clock can wait for it."""
        ...


class SystemClock:
    """The real clock: ``datetime.now(UTC)`` and ``asyncio.sleep``."""

    def now(self) -> datetime:
        return datetime.now(UTC)

    async def sleep_until(self, moment: datetime) -> None:
        await asyncio.sleep(max(0.0, (moment - datetime.now(UTC)).total_seconds()))

    def track(self, task: asyncio.Task[None]) -> None:
        pass

    def __repr__(self) -> str:
        return "SystemClock()"


SYSTEM_CLOCK = SystemClock()


class DatabaseClock:
    """A clock moved by the measured offset to the database's clock.

    Ticks computed from it fall at the same real moment on every instance, whatever
    their own clocks say: the offset is read at each call, so a new measurement
    applies at once. A simulated clock (``simulated = True``, as ``FakeClock``) is
    left as it is: its distance from the database is not drift.
    """

    def __init__(self, base: Clock, offset: Callable[[], timedelta | None]) -> None:
        self.base = base
        self._offset = offset

    def _correction(self) -> timedelta:
        if getattr(self.base, "simulated", False):
            return timedelta(0)
        return self._offset() or timedelta(0)

    def now(self) -> datetime:
        return self.base.now() + self._correction()

    async def sleep_until(self, moment: datetime) -> None:
        await self.base.sleep_until(moment - self._correction())

    def track(self, task: asyncio.Task[None]) -> None:
        self.base.track(task)

    def __repr__(self) -> str:
        return f"DatabaseClock({self.base!r})"
