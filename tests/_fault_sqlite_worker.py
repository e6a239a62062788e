"""One writer of ``test_sqlite_processes.py``: not a test, run as a script.

Usage: ``python _fault_sqlite_worker.py URL TABLE WORKER``. It builds a locker from
URL (default settings), calls ``create_table()``, prints ``ready``, then reads one
line from stdin: a JSON list of ISO 8601 run times. It tries each tick of the job
``load`` in order without waiting for its unlocks, which run concurrently with the
next ``lock()`` calls. Its last line is JSON: ``{"won": [identifiers], "errors":
[messages of any BackendError]}``.
"""

from __future__ import annotations

import asyncio
import json
import sys
from datetime import datetime

from aiocronlock import AsyncDBLocker, BackendError, Lock

JOB = "load"


async def load(url: str, table: str, worker: str) -> dict[str, list[str]]:
    won: list[str] = []
    errors: list[str] = []

    async def finish(lock: Lock) -> None:
        try:
            await lock.unlock()
        except BackendError as error:
            errors.append(str(error))

    async with AsyncDBLocker(url, worker=worker, table_name=table, clean_interval=None) as locker:
        try:
            await locker.create_table()
        except BackendError as error:
            errors.append(str(error))
        print("ready", flush=True)
        line = await asyncio.to_thread(sys.stdin.readline)
        unlocks: list[asyncio.Task[None]] = []
        for text in json.loads(line):
            try:
                lock = await locker.lock(JOB, datetime.fromisoformat(text))
            except BackendError as error:
                errors.append(str(error))
                continue
            if lock is not None:
                won.append(lock.identifier)
                unlocks.append(asyncio.create_task(finish(lock)))
        await asyncio.gather(*unlocks)
    return {"won": won, "errors": errors}


def main() -> None:
    url, table, worker = sys.argv[1:4]
    print(json.dumps(asyncio.run(load(url, table, worker))), flush=True)


if __name__ == "__main__":
    main()
