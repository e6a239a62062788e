"""``@locked``: make any coroutine function run only on the instance that wins its tick.

For jobs driven by another scheduler (APScheduler, aiocron, arq's cron jobs) or by a
hand-written loop. The tick's scheduled time comes from, in order: the
``scheduled_time`` callable given to the decorator, APScheduler 4's current job, or
the current time rounded to the nearest step of the locker's identifier precision
(so instances that fire a little early or late still name the same tick).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any, ParamSpec, TypeVar

from ._identifiers import Precision
from ._locker import AsyncDBLocker, lease_for
from ._validation import check_name

P = ParamSpec("P")
R = TypeVar("R")


def locked(
    locker: AsyncDBLocker,
    name: str | None = None,
    *,
    scheduled_time: Callable[[], datetime | None] | None = None,
    exclusive: bool = False,
    lease: timedelta | float | None = None,
) -> Callable[[Callable[P, Awaitable[R]]], Callable[P, Awaitable[R | None]]]:
    """Decorator: call the function only if this instance wins the current tick.

    The wrapped function returns the function's result, or ``None`` when another
    instance has the tick. ``BackendError`` propagates (the function does not run).
    Inside, :func:`current_lock` gives the run's lock.

    :param name: the job name, the same on every instance; defaults to the
        function's module and qualified name.
    :param scheduled_time: returns the tick's scheduled time when the caller knows
        it (e.g. from the scheduler's context), or ``None`` to fall back.
    :param exclusive: also skip while another run of the job holds its lease
        (see ``AsyncDBLocker.lock``); ``lease`` defaults to the locker's.
    """
    if not isinstance(locker, AsyncDBLocker):
        raise TypeError(f"locker must be an AsyncDBLocker, not {type(locker).__name__}")
    if name is not None:
        check_name("name", name)
    if scheduled_time is not None and not callable(scheduled_time):
        raise TypeError("scheduled_time must be a callable returning a datetime or None")
    job_lease = lease_for(locker, exclusive, lease) if exclusive or lease else None

    def decorate(func: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R | None]]:
        job_name = name if name is not None else f"{func.__module__}.{func.__qualname__}"
        check_name("name", job_name)
        if job_lease is not None and not inspect.iscoroutinefunction(func):
            raise TypeError(
                f"exclusive=True needs a coroutine function, and {job_name!r} is not one: "
                "code run in a thread cannot be stopped when its lease is lost; make it "
                "`async def`, or guard it without exclusive=True"
            )

        @functools.wraps(func)
        async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R | None:
            run_time = _tick_time(locker, scheduled_time)
            lock = await locker.lock(job_name, run_time, exclusive=exclusive, lease=job_lease)
            if lock is None:
                return None
            async with lock:
                return await func(*args, **kwargs)

        return wrapper

    return decorate


def _tick_time(
    locker: AsyncDBLocker, scheduled_time: Callable[[], datetime | None] | None
) -> datetime:
    if scheduled_time is not None:
        known = scheduled_time()
        if known is not None:
            return known
    known = _apscheduler4_fire_time()
    if known is not None:
        return known
    now = locker.database_clock.now()
    if isinstance(locker.identifier, Precision):
        return locker.identifier.nearest(now)
    return now


def _apscheduler4_fire_time() -> datetime | None:
    """The scheduled fire time of the APScheduler 4 job being run, if any."""
    try:
        from apscheduler import current_job  # type: ignore[import-not-found,attr-defined,unused-ignore]
    except ImportError:
        return None
    info: Any = current_job.get(None)
    fire_time = getattr(info, "scheduled_fire_time", None)
    return fire_time if isinstance(fire_time, datetime) else None
