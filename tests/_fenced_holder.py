"""An instance that holds an exclusive job and writes through ``lock.fence()``: not a test.

Usage: ``python _fenced_holder.py URL TABLE MARKS_TABLE WORKER JOB LEASE_SECONDS ATTEMPTS``.
It takes JOB's current tick with ``exclusive=True`` and the given lease, makes one
fenced write (row ``before`` in MARKS_TABLE), prints ``ready <row id>``, then waits
for a line on stdin. Then, without looking at ``lock.lost``, as a holder paused
between its check and its write would, it tries ATTEMPTS fenced writes (``after-<n>``)
and prints one JSON line for each: ``{"note": ..., "outcome": "wrote" | "rejected"}``.
"""

from __future__ import annotations

import asyncio
import json
import sys

from sqlalchemy import Column, Integer, MetaData, String, Table, insert
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from aiocronlock import AsyncDBLocker, LeaseLostError, Lock


def marks_table(name: str) -> Table:
    """The user's table that the job writes to: one row per fenced write."""
    return Table(
        name,
        MetaData(),
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("writer", String(64), nullable=False),
        Column("note", String(64), nullable=False),
    )


async def fenced_write(engine: AsyncEngine, lock: Lock, marks: Table, note: str) -> str:
    """One transaction: the fence, then the row; ``wrote`` or ``rejected``."""
    try:
        async with engine.begin() as conn:
            await lock.fence(conn)
            await conn.execute(insert(marks).values(writer=lock.worker, note=note))
    except LeaseLostError:
        return "rejected"
    return "wrote"


async def hold(url: str, table: str, marks_name: str, worker: str, job: str, lease: float) -> None:
    attempts = int(sys.argv[7])
    marks = marks_table(marks_name)
    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    engine = create_async_engine(url)
    try:
        async with AsyncDBLocker(
            url, worker=worker, table_name=table, clean_interval=None
        ) as locker:
            lock = await locker.lock(job, exclusive=True, lease=lease)
            if lock is None:
                print("refused", flush=True)
                return
            # The writes must be attempted whatever the keeper finds: only the fence
            # stands in their way.
            lock.cancel_on_loss = False
            async with lock:
                outcome = await fenced_write(engine, lock, marks, "before")
                print(f"ready {lock.id}" if outcome == "wrote" else outcome, flush=True)
                await stdin.readline()
                for n in range(attempts):
                    outcome = await fenced_write(engine, lock, marks, f"after-{n}")
                    print(json.dumps({"note": f"after-{n}", "outcome": outcome}), flush=True)
    finally:
        await engine.dispose()


def main() -> None:
    url, table, marks_name, worker, job, lease = sys.argv[1:7]
    asyncio.run(hold(url, table, marks_name, worker, job, float(lease)))


if __name__ == "__main__":
    main()
