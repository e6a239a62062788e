"""A hand-written loop: no scheduler, just ``ticks()`` and ``locker.lock()``.

Prerequisites: ``pip install 'aiocronlock[sqlite]'`` (``[postgres]`` or ``[mysql]`` for
a server). Start it in several terminals, and stop each with Ctrl-C::

    python examples/plain_loop.py

Each second exactly one of them prints ``ran plain-loop tick=<ISO UTC> worker=<name>``.
Stopping lets the tick in progress finish first.

Environment: ``AIOCRONLOCK_URL`` (default ``sqlite:///aiocronlock-example.db``),
``AIOCRONLOCK_WORKER`` (default ``<hostname>:<pid>``), ``AIOCRONLOCK_EXAMPLE_SECONDS``
(stop after that many seconds).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from datetime import datetime, timedelta

from aiocronlock import AsyncDBLocker, BackendError, ticks

JOB_NAME = "plain-loop"
logger = logging.getLogger("plain_loop")


async def run_tick(locker: AsyncDBLocker, tick: datetime) -> None:
    try:
        lock = await locker.lock(JOB_NAME, tick)  # the scheduled time names the tick
    except BackendError as error:
        logger.warning("skipping %s: %s", tick.isoformat(), error)  # no lock, no run
        return
    if lock is None:
        return  # another instance has this tick
    async with lock:  # records FINISHED, or FAILED if the block raises
        print(f"ran {JOB_NAME} tick={tick.isoformat()} worker={lock.worker}")


async def tick_loop(locker: AsyncDBLocker) -> None:
    async for tick in ticks(timedelta(seconds=1)):
        current = asyncio.ensure_future(run_tick(locker, tick))
        try:
            await asyncio.shield(current)
        finally:
            await current  # when the loop is cancelled, finish this tick before stopping


async def main() -> None:
    locker = AsyncDBLocker(
        os.environ.get("AIOCRONLOCK_URL", "sqlite:///aiocronlock-example.db"),
        worker=os.environ.get("AIOCRONLOCK_WORKER"),
    )
    await locker.create_table()
    async with locker:
        task = asyncio.create_task(tick_loop(locker))
        await stop_requested()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


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
