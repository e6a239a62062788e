"""One racing instance for ``test_processes.py``: not a test, run as a script.

Usage: ``python _race_worker.py URL TABLE WORKER``. It builds a locker from URL,
calls ``create_table()``, prints ``ready``, then reads one line from stdin: a JSON
list of ISO 8601 run times. It tries each tick of the job ``race`` in order and
prints, as its last line, a JSON list of the identifiers it won.
"""

from __future__ import annotations

import asyncio
import json
import sys
from datetime import datetime

from aiocronlock import AsyncDBLocker

JOB = "race"


async def race(url: str, table: str, worker: str) -> list[str]:
    async with AsyncDBLocker(
        url, worker=worker, table_name=table, clean_interval=None, timeout=30
    ) as locker:
        await locker.create_table()
        print("ready", flush=True)
        line = await asyncio.to_thread(sys.stdin.readline)
        run_times = [datetime.fromisoformat(text) for text in json.loads(line)]
        won: list[str] = []
        for run_time in run_times:
            lock = await locker.lock(JOB, run_time)
            if lock is not None:
                async with lock:
                    won.append(lock.identifier)
        return won


def main() -> None:
    url, table, worker = sys.argv[1:4]
    won = asyncio.run(race(url, table, worker))
    print(json.dumps(won), flush=True)


if __name__ == "__main__":
    main()
