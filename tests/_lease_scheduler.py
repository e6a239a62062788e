"""One of several instances scheduling the same exclusive job: not a test.

Usage: ``python _lease_scheduler.py URL TABLE WORKER``. It builds a locker from URL,
creates the table if missing, prints ``ready`` and reads one line from stdin: the
Unix time UNTIL which to run. Then it runs a ``Scheduler`` with the job
``overlapping`` every second, ``exclusive=True`` and a 2-second lease; each run
sleeps 2.5 s, longer than the interval. For every run it prints one JSON line
``{"worker", "lock_id", "start", "end", "outcome"}`` (wall-clock seconds; the outcome
is ``finished`` or, if the run was stopped, ``stopped``). At UNTIL it stops the
scheduler, letting a run in progress finish, and exits.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

from aiocronlock import AsyncDBLocker, Scheduler, current_lock

JOB = "overlapping"
INTERVAL = 1.0
LEASE = 2.0
RUN_FOR = 2.5


async def run(url: str, table: str, worker: str) -> None:
    async with AsyncDBLocker(url, worker=worker, table_name=table, clean_interval=None) as locker:
        await locker.create_table()
        print("ready", flush=True)
        until = float(await asyncio.to_thread(sys.stdin.readline))
        scheduler = Scheduler(locker, grace_period=RUN_FOR * 2)

        @scheduler.every(INTERVAL, name=JOB, exclusive=True, lease=LEASE)
        async def overlapping() -> None:
            lock_id = current_lock().id
            start, outcome = time.time(), "stopped"
            try:
                await asyncio.sleep(RUN_FOR)
                outcome = "finished"
            finally:
                record = {
                    "worker": worker,
                    "lock_id": lock_id,
                    "start": start,
                    "end": time.time(),
                    "outcome": outcome,
                }
                print(json.dumps(record), flush=True)

        async with scheduler:
            await asyncio.sleep(max(0.0, until - time.time()))


def main() -> None:
    url, table, worker = sys.argv[1:4]
    asyncio.run(run(url, table, worker))


if __name__ == "__main__":
    main()
