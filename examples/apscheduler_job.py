"""An APScheduler 3 job that runs on one instance only, guarded by ``@locked``.

Prerequisites: ``pip install 'aiocronlock[sqlite]' 'apscheduler>=3.10,<4'``
(``[postgres]`` or ``[mysql]`` for a server). Start it in several terminals, and stop
each with Ctrl-C::

    python examples/apscheduler_job.py

APScheduler fires the job every second on every instance; ``@locked`` lets exactly one
of them run each tick, which prints ``ran apscheduler-report tick=<ISO UTC> worker=<name>``.

Environment: ``AIOCRONLOCK_URL`` (default ``sqlite:///aiocronlock-example.db``),
``AIOCRONLOCK_WORKER`` (default ``<hostname>:<pid>``), ``AIOCRONLOCK_EXAMPLE_SECONDS``
(stop after that many seconds).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from datetime import UTC, datetime
from typing import Any

from apscheduler.schedulers.asyncio import AsyncIOScheduler

from aiocronlock import AsyncDBLocker, current_lock, locked

locker = AsyncDBLocker(
    os.environ.get("AIOCRONLOCK_URL", "sqlite:///aiocronlock-example.db"),
    worker=os.environ.get("AIOCRONLOCK_WORKER"),
)


@locked(locker, "apscheduler-report")
async def report() -> None:
    lock = current_lock()  # this run's tick: the fire time rounded to the second
    print(f"ran apscheduler-report tick={lock.run_time.isoformat()} worker={lock.worker}")


#: Runs in progress, so that stopping can wait for them: APScheduler 3's asyncio
#: executor would cancel them on shutdown.
runs: set[asyncio.Task[Any]] = set()


async def report_job() -> None:
    """What APScheduler runs: ``report``, noted in ``runs`` while it runs."""
    run = asyncio.current_task()
    assert run is not None
    runs.add(run)
    try:
        await report()
    finally:
        runs.discard(run)


async def main() -> None:
    await locker.create_table()
    scheduler = AsyncIOScheduler(timezone=UTC)
    # Fire on whole seconds (an interval counted from a whole second), so that every
    # instance names the same tick; an interval counted from each instance's start
    # time would fire at different fractions of a second.
    start = datetime(2000, 1, 1, tzinfo=UTC)
    scheduler.add_job(report_job, "interval", seconds=1, start_date=start)
    async with locker:
        scheduler.start()
        await stop_requested()
        scheduler.pause()  # fire no more
        await asyncio.sleep(0)  # let a run submitted just now start
        await asyncio.gather(*runs, return_exceptions=True)  # and let the runs finish
        scheduler.shutdown(wait=False)
        await asyncio.sleep(0)  # the shutdown happens in a loop callback


async def stop_requested() -> None:
    """Return on Ctrl-C or SIGTERM, or after ``AIOCRONLOCK_EXAMPLE_SECONDS``."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    if seconds := os.environ.get("AIOCRONLOCK_EXAMPLE_SECONDS"):
        loop.call_later(float(seconds), stop.set)
    await stop.wait()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("apscheduler").setLevel(logging.WARNING)  # it logs every run at INFO
    asyncio.run(main())
