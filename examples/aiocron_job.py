"""An aiocron crontab that runs on one instance only, guarded by ``@locked``.

Prerequisites: ``pip install 'aiocronlock[sqlite]' 'aiocron>=1.8'`` (``[postgres]`` or
``[mysql]`` for a server). Start it in several terminals, and stop each with Ctrl-C::

    python examples/aiocron_job.py

aiocron fires every second on every instance; ``@locked`` lets exactly one of them run
each tick, which prints ``ran aiocron-report tick=<ISO UTC> worker=<name>``.

Environment: ``AIOCRONLOCK_URL`` (default ``sqlite:///aiocronlock-example.db``),
``AIOCRONLOCK_WORKER`` (default ``<hostname>:<pid>``), ``AIOCRONLOCK_EXAMPLE_SECONDS``
(stop after that many seconds).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from datetime import UTC
from typing import Any

import aiocron

from aiocronlock import AsyncDBLocker, current_lock, locked

#: Every second. aiocron 2 reads cron expressions with cronsim, where a sixth field is
#: the *first* one and counts seconds: "*/10 * * * * *" is every 10 seconds.
EVERY_SECOND = "* * * * * *"

locker = AsyncDBLocker(
    os.environ.get("AIOCRONLOCK_URL", "sqlite:///aiocronlock-example.db"),
    worker=os.environ.get("AIOCRONLOCK_WORKER"),
)


@locked(locker, "aiocron-report")
async def report() -> None:
    lock = current_lock()  # this run's tick: the fire time rounded to the second
    print(f"ran aiocron-report tick={lock.run_time.isoformat()} worker={lock.worker}")


#: Runs in progress, so that stopping can wait for them (aiocron does not track them).
runs: set[asyncio.Task[Any]] = set()


async def report_job() -> None:
    """What aiocron runs: ``report``, noted in ``runs`` while it runs."""
    run = asyncio.current_task()
    assert run is not None
    runs.add(run)
    try:
        await report()
    finally:
        runs.discard(run)


async def main() -> None:
    await locker.create_table()
    async with locker:
        cron = aiocron.crontab(EVERY_SECOND, func=report_job, tz=UTC)
        await stop_requested()
        cron.stop()  # fire no more
        await asyncio.sleep(0)  # let a run started just now begin
        await asyncio.gather(*runs, return_exceptions=True)  # and let the runs finish


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
    asyncio.run(main())
