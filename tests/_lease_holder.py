"""An instance that takes an exclusive job and holds it until killed: not a test.

Usage: ``python _lease_holder.py URL TABLE WORKER JOB LEASE_SECONDS``. It builds a
locker from URL, creates the table if missing, locks JOB's current tick with
``exclusive=True`` and the given lease, prints ``held <row id>`` from inside
``async with lock:`` and sleeps (renewing the lease) until it is killed. If another
run holds the lease it prints ``refused`` and exits.
"""

from __future__ import annotations

import asyncio
import sys

from aiocronlock import AsyncDBLocker


async def hold(url: str, table: str, worker: str, job: str, lease: float) -> None:
    async with AsyncDBLocker(
        url, worker=worker, table_name=table, clean_interval=None, timeout=30
    ) as locker:
        await locker.create_table()
        lock = await locker.lock(job, exclusive=True, lease=lease)
        if lock is None:
            print("refused", flush=True)
            return
        async with lock:
            print(f"held {lock.id}", flush=True)
            await asyncio.sleep(3600)


def main() -> None:
    url, table, worker, job, lease = sys.argv[1:6]
    asyncio.run(hold(url, table, worker, job, float(lease)))


if __name__ == "__main__":
    main()
