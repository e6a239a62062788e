"""When ticks happen: fixed intervals aligned to the epoch, or cron expressions.

A trigger turns "now" into the next *scheduled* time. Every instance computes the
same scheduled times, whatever its clock or wake-up jitter, and that time (not
the moment an instance woke up) is what names the tick.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from ._identifiers import precision
from ._validation import require_timedelta, to_utc


class Trigger(Protocol):
    """Gives the scheduled times of a job."""

    def next_after(self, moment: datetime, /) -> datetime:
        """The first scheduled time strictly after ``moment`` (both aware, UTC)."""
        ...


@dataclass(frozen=True, slots=True)
class IntervalTrigger:
    """Every ``interval``, at multiples of it counted from the Unix epoch in UTC.

    Every 10 s fires at :00, :10, :20...; every hour at the top of each UTC hour.
    """

    interval: timedelta

    def __init__(self, interval: timedelta | float) -> None:
        object.__setattr__(self, "interval", require_timedelta("interval", interval))

    def next_after(self, moment: datetime, /) -> datetime:
        return precision(self.interval).truncate(moment) + self.interval

    def __str__(self) -> str:
        return f"every {self.interval}"


@dataclass(frozen=True, slots=True)
class CronTrigger:
    """A five-field cron expression evaluated in a time zone (UTC by default).

    Evaluation follows Debian's cron, through the ``cronsim`` library. Around DST
    changes a job at a specific local time runs once: a time that happens twice
    (clocks go back) runs at its first occurrence only, and a time that does not
    happen (clocks go forward) runs once, right after the jump. Jobs that run more
    often than hourly keep following real time.
    """

    expression: str
    tz: ZoneInfo = field(default_factory=lambda: ZoneInfo("UTC"))

    def __init__(self, expression: str, tz: str | ZoneInfo = "UTC") -> None:
        cronsim = _import_cronsim()
        if not isinstance(expression, str):
            raise TypeError(f"cron expression must be a str, not {type(expression).__name__}")
        if isinstance(tz, str):
            try:
                tz = ZoneInfo(tz)
            except (ZoneInfoNotFoundError, ValueError) as error:
                raise ValueError(
                    f"tz: unknown time zone {tz!r}; use an IANA name such as 'Europe/Berlin'"
                ) from error
        elif not isinstance(tz, ZoneInfo):
            raise TypeError(f"tz must be a str or a ZoneInfo, not {type(tz).__name__}")
        if len(expression.split()) != 5:
            raise ValueError(
                f"cron expression {expression!r} must have five fields "
                "(minute hour day-of-month month day-of-week), e.g. '*/5 * * * *'"
            )
        try:
            cronsim.CronSim(expression, datetime.now(tz))
        except cronsim.CronSimError as error:
            raise ValueError(f"cron expression {expression!r} is invalid: {error}") from error
        object.__setattr__(self, "expression", expression)
        object.__setattr__(self, "tz", tz)

    def next_after(self, moment: datetime, /) -> datetime:
        cronsim = _import_cronsim()
        # cronsim works in whole minutes from its start: start at the minute holding
        # `moment`; a result equal to `moment` is not "after" it.
        local = to_utc("moment", moment).astimezone(self.tz)
        start = local.replace(second=0, microsecond=0)
        for scheduled in cronsim.CronSim(self.expression, start):
            result = to_utc("scheduled time", scheduled)
            if result > moment:
                return result
        raise ValueError(f"cron expression {self.expression!r} never fires after {moment}")

    def __str__(self) -> str:
        return f"cron {self.expression!r} ({self.tz.key})"


def _import_cronsim() -> Any:
    try:
        import cronsim
    except ModuleNotFoundError as error:  # pragma: no cover - depends on the install
        raise ModuleNotFoundError(
            "cron expressions need the cronsim package: pip install 'aiocronlock[cron]'"
        ) from error
    return cronsim


def latest_due(trigger: Trigger, after: datetime, now: datetime) -> tuple[datetime, int]:
    """The last scheduled time in ``(after, now]`` and how many were due in that span.

    Used to coalesce ticks missed while the process was suspended or the loop blocked.
    """
    due = trigger.next_after(after)
    missed = 0
    while True:
        following = trigger.next_after(due)
        if following > now:
            return due, missed
        due = following
        missed += 1


async def ticks(trigger: Trigger | timedelta | float) -> AsyncIterator[datetime]:
    """Yield each scheduled time of ``trigger`` when it comes, for hand-written loops::

        async for tick in ticks(timedelta(minutes=1)):
            lock = await locker.lock("report", tick)
            ...

    A tick missed because the loop body ran long is skipped, not queued.
    """
    schedule = as_trigger(trigger)
    scheduled = schedule.next_after(datetime.now(UTC))
    while True:
        await asyncio.sleep(max(0.0, (scheduled - datetime.now(UTC)).total_seconds()))
        yield scheduled
        scheduled = schedule.next_after(max(scheduled, datetime.now(UTC)))


def as_trigger(value: Trigger | timedelta | float) -> Trigger:
    """A trigger, or an interval (``timedelta`` or seconds) made into one."""
    if isinstance(value, timedelta | int | float) and not isinstance(value, bool):
        return IntervalTrigger(value)
    if isinstance(value, bool) or not callable(getattr(value, "next_after", None)):
        raise TypeError(
            "trigger must be a timedelta, a number of seconds, an IntervalTrigger or a "
            f"CronTrigger, not {type(value).__name__}"
        )
    return value
