"""A worker that wins a tick and is killed mid-job, for ``test_faults.py``: not a test.

Usage: ``python _fault_worker.py URL TABLE WORKER JOB RUN_TIME``. It builds a locker
from URL, tries ``JOB`` at ``RUN_TIME`` (ISO 8601) and, if it wins, prints
``started <row id>`` from inside ``async with lock:`` and sleeps until killed. If it
loses it prints ``lost`` and exits.
"""

from __future__ import annotations

import asyncio
import sys
from datetime import datetime

from aiocronlock import AsyncDBLocker


async def work(url: str, table: str, worker: str, job: str, run_time: datetime) -> None:
    async with AsyncDBLocker(
        url, worker=worker, table_name=table, clean_interval=None, timeout=30
    ) as locker:
        lock = await locker.lock(job, run_time)
        if lock is None:
            print("lost", flush=True)
            return
        async with lock:
            print(f"started {lock.id}", flush=True)
            await asyncio.sleep(3600)


def main() -> None:
    url, table, worker, job, run_time = sys.argv[1:6]
    asyncio.run(work(url, table, worker, job, datetime.fromisoformat(run_time)))


if __name__ == "__main__":
    main()
