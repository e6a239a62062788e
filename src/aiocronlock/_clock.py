"""Where "now" comes from, so that tests can replace the wall clock."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
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
