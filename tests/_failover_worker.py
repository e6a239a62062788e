"""One instance for tests/test_failover.py: a Scheduler with one job every second.

Environment: ``AIOCRONLOCK_URL``, ``AIOCRONLOCK_TABLE``, ``AIOCRONLOCK_WORKER``.
Prints to stdout, one line each: ``ready``; ``ran tick=<ISO>`` when a run starts;
``lost tick=<ISO>`` when another instance has the tick. The library's log goes to
stderr. Stops cleanly on SIGTERM.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from datetime import timedelta

from aiocronlock import AsyncDBLocker, EventKind, LockEvent, Scheduler, current_lock

JOB_NAME = "failover"
JOB_SECONDS = 0.5


def say(line: str) -> None:
    print(line, flush=True)


def on_event(event: LockEvent) -> None:
    if event.kind == EventKind.LOST_RACE and event.run_time is not None:
        say(f"lost tick={event.run_time.isoformat()}")


async def main() -> None:
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    locker = AsyncDBLocker(
        os.environ["AIOCRONLOCK_URL"],
        worker=os.environ["AIOCRONLOCK_WORKER"],
        table_name=os.environ["AIOCRONLOCK_TABLE"],
        clean_interval=None,
    )
    locker.subscribe(on_event)
    scheduler = Scheduler(locker, grace_period=5)

    @scheduler.every(timedelta(seconds=1), name=JOB_NAME)
    async def job() -> None:
        say(f"ran tick={current_lock().run_time.isoformat()}")
        await asyncio.sleep(JOB_SECONDS)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    async with locker, scheduler:
        say("ready")
        await stop.wait()


if __name__ == "__main__":
    asyncio.run(main())
