"""A small scheduler whose every tick is decided by the locker.

Each job has a trigger that yields *scheduled* times. At each one, every instance
asks the locker for ``(job, scheduled time)``; the winner runs the job, the
others skip quietly. Because the scheduled time, not each instance's wake-up
time, names the tick, instances agree even when their clocks or timers differ by
a fraction of the interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from types import TracebackType
from typing import Any, Self
from zoneinfo import ZoneInfo

from ._clock import Clock
from ._errors import BackendError
from ._events import EventKind
from ._lock import Lock
from ._locker import AsyncDBLocker, lease_for
from ._triggers import CronTrigger, IntervalTrigger, Trigger, as_trigger, latest_due
from ._validation import check_name, require_timedelta

logger = logging.getLogger("aiocronlock.scheduler")

JobFunction = Callable[[], Awaitable[Any]] | Callable[[], Any]


@dataclass(eq=False)
class Job:
    """A function, its trigger and its name (the same on every instance)."""

    name: str
    func: JobFunction
    trigger: Trigger
    #: Skip a tick on this instance while the previous run here is still going.
    skip_if_running: bool = True
    #: Also skip a tick while a run on *any* instance holds the job's lease.
    exclusive: bool = False
    #: The lease of exclusive runs; ``None``: the locker's default.
    lease: timedelta | None = None
    #: Runs keep a heartbeat, and a tick whose run died is run again, once, elsewhere.
    retry_dead: bool = False
    _runs: set[asyncio.Task[None]] = field(default_factory=set, repr=False)
    #: Threads of cancelled plain-function runs that have not returned yet: a thread
    #: cannot be stopped, and no new run may start beside it.
    _orphans: int = field(default=0, repr=False)

    @property
    def running(self) -> bool:
        """Whether a run of this job is going on here (its task, or its thread)."""
        return bool(self._runs) or self._orphans > 0


#: How often a running scheduler measures its clock's offset to the database's again.
CLOCK_CHECK_INTERVAL_S = 300.0


def _default_name(func: Callable[..., Any]) -> str:
    return f"{func.__module__}.{func.__qualname__}"


class Scheduler:
    """Runs jobs on their ticks, each tick on exactly one of the instances.

    ::

        scheduler = Scheduler(locker)

        @scheduler.every(timedelta(seconds=1), name="heartbeat")
        async def heartbeat() -> None: ...

        async with locker, scheduler:
            await stop_event.wait()

    :param grace_period: on stop, how long running jobs may take to finish before
        they are cancelled (their rows are then marked FAILED).
    :param clock: the time source. By default the locker's, moved by its measured
        offset to the database's clock (``locker.database_clock``, measured again every
        five minutes), so that instances whose clocks differ fire each tick at the same
        moment; a clock given here is used as it is (tests pass a ``FakeClock``).
    """

    def __init__(
        self,
        locker: AsyncDBLocker,
        *,
        grace_period: timedelta | float = 10.0,
        clock: Clock | None = None,
    ) -> None:
        if not isinstance(locker, AsyncDBLocker):
            raise TypeError(f"locker must be an AsyncDBLocker, not {type(locker).__name__}")
        self.locker = locker
        self.clock: Clock = locker.database_clock if clock is None else clock
        self.grace_period = require_timedelta("grace_period", grace_period).total_seconds()
        self._jobs: dict[str, Job] = {}
        self._loops: list[asyncio.Task[None]] = []
        self._started = False

    # -- declaring jobs --------------------------------------------------------------------

    @property
    def jobs(self) -> list[Job]:
        return list(self._jobs.values())

    def add_job(
        self,
        func: JobFunction,
        trigger: Trigger | timedelta | float,
        *,
        name: str | None = None,
        skip_if_running: bool = True,
        exclusive: bool = False,
        lease: timedelta | float | None = None,
        retry_dead: bool = False,
    ) -> Job:
        """Schedule ``func`` (a coroutine function, or a plain function run in a thread).

        With ``exclusive=True`` a tick runs only if no run of the job holds a live
        lease on any instance, so runs never overlap even when one outlives its
        interval; ``lease`` (default: the locker's) bounds how long a crashed
        holder blocks the job.

        With ``retry_dead=True`` each run keeps a heartbeat (a ``lease``, renewed every
        third of it), and at each tick every instance looks for runs of the job whose
        heartbeat expired: one of them runs such a tick again, once (see
        :meth:`AsyncDBLocker.retry_dead_runs`), whether or not it is running the job.
        """
        if not callable(func):
            raise TypeError(f"func must be callable, not {type(func).__name__}")
        job_name = check_name("name", _default_name(func) if name is None else name)
        if job_name in self._jobs:
            raise ValueError(f"name: a job named {job_name!r} is already scheduled")
        if self._started:
            raise RuntimeError("add jobs before the scheduler starts")
        schedule = as_trigger(trigger)
        step = getattr(self.locker.identifier, "step", None)
        if isinstance(schedule, IntervalTrigger) and step is not None and schedule.interval < step:
            raise ValueError(
                f"interval: every {schedule.interval} is shorter than the locker's identifier "
                f"precision ({step}), so two ticks would share one identifier; build the "
                f"locker with identifier=precision(timedelta(seconds="
                f"{schedule.interval.total_seconds():g}))"
            )
        leased = exclusive or retry_dead or lease
        job_lease = lease_for(self.locker, exclusive, lease, retry_dead) if leased else None
        if (exclusive or retry_dead) and not _is_async(func):
            option = "exclusive=True" if exclusive else "retry_dead=True"
            raise TypeError(
                f"{option} needs a coroutine function, and {job_name!r} is a plain "
                "function, which runs in a thread that nothing can stop when its lease is "
                f"lost: make it `async def`, or schedule it without {option}"
            )
        job = Job(
            job_name,
            func,
            schedule,
            skip_if_running=skip_if_running,
            exclusive=exclusive,
            lease=job_lease,
            retry_dead=retry_dead,
        )
        self._jobs[job_name] = job
        return job

    def every(
        self,
        interval: timedelta | float,
        *,
        name: str | None = None,
        skip_if_running: bool = True,
        exclusive: bool = False,
        lease: timedelta | float | None = None,
        retry_dead: bool = False,
    ) -> Callable[[JobFunction], JobFunction]:
        """Decorator: run the function every ``interval``, aligned to the Unix epoch."""
        return self._decorator(
            IntervalTrigger(interval),
            name=name,
            skip_if_running=skip_if_running,
            exclusive=exclusive,
            lease=lease,
            retry_dead=retry_dead,
        )

    def cron(
        self,
        expression: str,
        *,
        name: str | None = None,
        tz: str | ZoneInfo = "UTC",
        skip_if_running: bool = True,
        exclusive: bool = False,
        lease: timedelta | float | None = None,
        retry_dead: bool = False,
    ) -> Callable[[JobFunction], JobFunction]:
        """Decorator: run the function on a five-field cron expression in time zone ``tz``."""
        return self._decorator(
            CronTrigger(expression, tz),
            name=name,
            skip_if_running=skip_if_running,
            exclusive=exclusive,
            lease=lease,
            retry_dead=retry_dead,
        )

    def _decorator(self, trigger: Trigger, **options: Any) -> Callable[[JobFunction], JobFunction]:
        """A decorator that schedules the function it is given, and returns it unchanged."""

        def decorate(func: JobFunction) -> JobFunction:
            self.add_job(func, trigger, **options)
            return func

        return decorate

    # -- running ----------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def start(self) -> None:
        """Start every job's loop in the background (``async with`` does this)."""
        if self._started:
            raise RuntimeError("this scheduler is already running")
        if not self._jobs:
            logger.warning("the scheduler has no jobs")
        self._started = True
        self._loops = [
            asyncio.create_task(self._job_loop(job), name=f"aiocronlock job {job.name}")
            for job in self._jobs.values()
        ]
        if self.clock is self.locker.database_clock:
            self._loops.append(
                asyncio.create_task(self._measure_clock(), name="aiocronlock clock check")
            )

    async def run(self) -> None:
        """Run until cancelled, then stop cleanly (for ``asyncio.run(scheduler.run())``)."""
        self.start()
        try:
            await asyncio.Event().wait()
        finally:
            await asyncio.shield(self.stop())

    async def stop(self) -> None:
        """Start no new ticks; give running jobs ``grace_period``, then cancel them."""
        loops, self._loops = self._loops, []
        for loop in loops:
            loop.cancel()
        await asyncio.gather(*loops, return_exceptions=True)
        runs = {run for job in self._jobs.values() for run in job._runs}
        if runs:
            _, pending = await asyncio.wait(runs, timeout=self.grace_period)
            for run in pending:
                logger.warning(
                    "cancelling %s: still running after the grace period", run.get_name()
                )
                run.cancel()
            await asyncio.gather(*runs, return_exceptions=True)
        self._started = False

    async def _measure_clock(self) -> None:
        """Measure the offset to the database's clock now if the locker has not, then
        every ``CLOCK_CHECK_INTERVAL_S``: clocks drift, and NTP steps them."""
        if self.locker.clock_offset is not None:
            await asyncio.sleep(CLOCK_CHECK_INTERVAL_S)
        while True:
            try:
                await self.locker.check_clock()
            except (BackendError, RuntimeError) as error:
                logger.debug("could not compare clocks with the database: %s", error)
            await asyncio.sleep(CLOCK_CHECK_INTERVAL_S)

    async def _job_loop(self, job: Job) -> None:
        scheduled = job.trigger.next_after(self.clock.now())
        while True:
            await self.clock.sleep_until(scheduled)
            self._start_tick(job, scheduled)
            if job.retry_dead:
                self._start_retries(job)
            now = self.clock.now()
            following, missed = latest_due(job.trigger, scheduled, now)
            if missed:
                logger.warning(
                    "%r: %d tick(s) missed while this instance was busy; next one at %s",
                    job.name,
                    missed,
                    following.isoformat(),
                )
            scheduled = following

    def _start_tick(self, job: Job, scheduled: datetime) -> None:
        if job._orphans or (job.running and job.skip_if_running):
            logger.debug("%r: skipping %s, the previous run is still going", job.name, scheduled)
            if self.locker.events:
                self.locker.events.emit(
                    EventKind.SKIPPED,
                    self.locker.worker,
                    job.name,
                    None,
                    {"run_time": scheduled, "reason": "running"},
                )
            return
        run = asyncio.create_task(
            self._run_tick(job, scheduled), name=f"aiocronlock {job.name} @ {scheduled.isoformat()}"
        )
        job._runs.add(run)
        run.add_done_callback(job._runs.discard)
        self.clock.track(run)

    def _start_retries(self, job: Job) -> None:
        """Look for the job's dead runs, and run the ticks this instance retries."""
        run = asyncio.create_task(self._retry_dead(job), name=f"aiocronlock {job.name} retries")
        job._runs.add(run)
        run.add_done_callback(job._runs.discard)
        self.clock.track(run)

    async def _retry_dead(self, job: Job) -> None:
        try:
            locks = await self.locker.retry_dead_runs(job.name, lease=job.lease)
        except BackendError as error:
            logger.warning("%r: could not look for dead runs to retry: %s", job.name, error)
            return
        await asyncio.gather(*(self._run(job, lock) for lock in locks))

    async def _run_tick(self, job: Job, scheduled: datetime) -> None:
        try:
            lock = await self.locker.lock(
                job.name,
                scheduled,
                exclusive=job.exclusive,
                lease=job.lease,
                retry_dead=job.retry_dead,
            )
        except BackendError as error:
            # Fail closed: never run without the lock.
            logger.warning(
                "%r: skipping %s, the lock could not be decided: %s", job.name, scheduled, error
            )
            return
        if lock is None:
            logger.debug("%r: %s is another worker's", job.name, scheduled)
            return
        await self._run(job, lock)

    async def _run(self, job: Job, lock: Lock) -> None:
        ran = False
        try:
            async with lock:
                await _call(job)
                ran = True
        except Exception as error:
            if ran and isinstance(error, BackendError):
                # The job did its work; only recording that failed, and is retried.
                logger.warning(
                    "%r: the run at %s finished, but its outcome is not recorded yet "
                    "(retried in the background): %s",
                    job.name,
                    lock.run_time.isoformat(),
                    error,
                )
            else:
                logger.exception("%r: the run at %s failed", job.name, lock.run_time.isoformat())


def _is_async(func: JobFunction) -> bool:
    return inspect.iscoroutinefunction(func) or inspect.iscoroutinefunction(
        getattr(func, "__call__", None)  # noqa: B004 - async callable objects
    )


async def _call(job: Job) -> None:
    """Run the job's function: awaited, or in a thread for a plain one."""
    func = job.func
    if _is_async(func):
        await func()
        return
    loop = asyncio.get_running_loop()
    thread = {"ended": False, "orphaned": False}

    def ended() -> None:
        thread["ended"] = True
        if thread["orphaned"]:
            job._orphans -= 1

    def in_thread() -> object:
        try:
            return func()
        finally:
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(ended)

    try:
        result = await asyncio.to_thread(in_thread)
    except asyncio.CancelledError:
        if not thread["ended"]:  # the run is cancelled, its thread goes on
            thread["orphaned"] = True
            job._orphans += 1
        raise
    if inspect.isawaitable(result):
        await result
