"""One of several instances scheduling the same ``retry_dead`` job: not a test.

Usage: ``python _retry_worker.py URL TABLE WORKER``. It builds a locker from URL,
creates the table if missing, prints ``ready`` and reads one line from stdin: the
Unix time UNTIL which to run. Then it runs a ``Scheduler`` with the job ``report``
every second, ``retry_dead=True``, a 1.5-second lease and ``skip_if_running=False``
(every instance competes for every tick); each run sleeps 0.5 to 1.5 s. For every
run it prints one JSON line when it starts, ``{"event": "start", "worker", "lock_id",
"identifier", "run_time", "time"}``, and one when it ends (``"event": "end"``, with
``"outcome"``: ``finished`` or ``stopped``); times are wall-clock seconds. At UNTIL
it stops the scheduler, letting runs in progress finish, and exits.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time

from aiocronlock import AsyncDBLocker, Scheduler, current_lock

JOB = "report"
INTERVAL = 1.0
LEASE = 1.5


async def run(url: str, table: str, worker: str) -> None:
    async with AsyncDBLocker(url, worker=worker, table_name=table, clean_interval=None) as locker:
        await locker.create_table()
        print("ready", flush=True)
        until = float(await asyncio.to_thread(sys.stdin.readline))
        scheduler = Scheduler(locker, grace_period=5)

        def report(event: str, **fields: object) -> None:
            lock = current_lock()
            record = {
                "event": event,
                "worker": worker,
                "lock_id": lock.id,
                "identifier": lock.identifier,
                "run_time": lock.run_time.timestamp(),
                "time": time.time(),
                **fields,
            }
            print(json.dumps(record), flush=True)

        @scheduler.every(INTERVAL, name=JOB, retry_dead=True, lease=LEASE, skip_if_running=False)
        async def job() -> None:
            report("start")
            outcome = "stopped"
            try:
                await asyncio.sleep(random.uniform(0.5, 1.5))
                outcome = "finished"
            finally:
                report("end", outcome=outcome)

        async with scheduler:
            await asyncio.sleep(max(0.0, until - time.time()))


def main() -> None:
    url, table, worker = sys.argv[1:4]
    asyncio.run(run(url, table, worker))


if __name__ == "__main__":
    main()
