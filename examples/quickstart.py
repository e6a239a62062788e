"""Run a job every second on exactly one of several instances.

Prerequisites: ``pip install 'aiocronlock[sqlite]'`` (``[postgres]`` or ``[mysql]`` for
a server). Start it in as many terminals as you like, and stop each with Ctrl-C::

    python examples/quickstart.py

Each second exactly one of them prints ``call 1s``, followed by the line
``ran unique_name tick=<ISO UTC> worker=<name>``.

Environment: ``AIOCRONLOCK_URL`` (default ``sqlite:///aiocronlock-example.db``),
``AIOCRONLOCK_WORKER`` (default ``<hostname>:<pid>``), ``AIOCRONLOCK_TABLE`` (default
``cron_job_locks``), ``AIOCRONLOCK_EXAMPLE_SECONDS`` (stop after that many seconds).
"""

from __future__ import annotations

import asyncio
import os
import signal
from datetime import timedelta

from aiocronlock import AsyncDBLocker, Scheduler, current_lock


async def main() -> None:
    locker = AsyncDBLocker(
        os.environ.get("AIOCRONLOCK_URL", "sqlite:///aiocronlock-example.db"),
        worker=os.environ.get("AIOCRONLOCK_WORKER"),  # this instance's name
        table_name=os.environ.get("AIOCRONLOCK_TABLE", "cron_job_locks"),
    )
    await locker.create_table()  # the table that records which instance ran each tick
    scheduler = Scheduler(locker)

    @scheduler.every(timedelta(seconds=1), name="unique_name")
    async def job() -> None:
        # task to do
        print("call 1s")
        lock = current_lock()
        print(f"ran unique_name tick={lock.run_time.isoformat()} worker={lock.worker}")

    async with locker, scheduler:
        await stop_requested()


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
    asyncio.run(main())
