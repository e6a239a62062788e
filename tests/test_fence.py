"""Fenced writes: ``await lock.fence(conn)`` lets a transaction commit only under the lease.

What a user relies on: a write fenced by the run that holds the job's lease lands; a
run that no longer holds it (released by force, taken over after it expired, paused
past its end) has its fenced transaction refused with ``LeaseLostError``, and nothing
written in that transaction lands; and while a fenced transaction is open, no other
instance takes the job.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import Table, insert, select
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from _fenced_holder import fenced_write, marks_table
from _lease_support import tick
from aiocronlock import AsyncDBLocker, LeaseLostError, Lock
from conftest import Backend, LockerFactory, fetch_rows

HOLDER_SCRIPT = Path(__file__).with_name("_fenced_holder.py")


@pytest.fixture
async def marks(backend: Backend, engine: AsyncEngine) -> AsyncIterator[Table]:
    """The user's table that jobs write to, beside the lock table."""
    table = marks_table(f"{backend.table_name}_marks")
    async with engine.begin() as conn:
        await conn.run_sync(table.create)
    yield table
    async with engine.begin() as conn:
        await conn.run_sync(table.drop)


async def _marks(engine: AsyncEngine, table: Table) -> list[tuple[str, str]]:
    """(writer, note) of every row that landed, oldest first."""
    async with engine.connect() as conn:
        rows = await conn.execute(select(table.c.writer, table.c.note).order_by(table.c.id))
        return [(row.writer, row.note) for row in rows]


async def _statuses(engine: AsyncEngine, backend: Backend) -> list[tuple[str, str]]:
    return [(r["worker"], r["status"]) for r in await fetch_rows(engine, backend.table_name)]


def _block_event_loop(seconds: float) -> None:
    """Hold the event loop, as a paused process would: the keeper cannot renew."""
    time.sleep(seconds)


# -- the live holder, and a holder that lost its lease ----------------------------------------


async def test_a_fenced_write_by_the_live_holder_lands(
    backend: Backend, engine: AsyncEngine, make_locker: LockerFactory, marks: Table
) -> None:
    a = await make_locker(worker="a")
    lock = await a.lock("report", tick(), exclusive=True, lease=30)
    assert lock is not None

    async with lock:
        assert await fenced_write(engine, lock, marks, "through a connection") == "wrote"
        async with AsyncSession(engine) as session, session.begin():
            await lock.fence(session)
            await session.execute(insert(marks).values(writer="a", note="through a session"))

    assert not lock.lost
    assert await _marks(engine, marks) == [
        ("a", "through a connection"),
        ("a", "through a session"),
    ]
    assert await _statuses(engine, backend) == [("a", "FINISHED")]


async def test_after_a_forced_release_the_holder_s_fenced_transaction_is_rolled_back(
    backend: Backend, engine: AsyncEngine, make_locker: LockerFactory, marks: Table
) -> None:
    holder = await make_locker(worker="holder")
    operator = await make_locker(worker="operator")
    lock = await holder.lock("stuck", tick(), exclusive=True, lease=30)
    assert lock is not None
    assert await operator.release("stuck") is True
    assert not lock.lost  # the keeper's next renewal is 10 s away: only the database knows

    with pytest.raises(LeaseLostError) as info:
        async with engine.begin() as conn:
            # Written before the fence, in the same transaction: rolled back with it.
            await conn.execute(insert(marks).values(writer="holder", note="late"))
            await lock.fence(conn)

    assert (info.value.job_name, info.value.lock_id) == ("stuck", lock.id)
    assert await _marks(engine, marks) == []
    assert lock.lost
    await lock.unlock()
    assert await _statuses(engine, backend) == [("holder", "LOST")]


async def test_after_another_run_took_the_expired_lease_only_its_fenced_writes_land(
    backend: Backend, engine: AsyncEngine, make_locker: LockerFactory, marks: Table
) -> None:
    a = await make_locker(worker="a")
    b = await make_locker(worker="b", own_engine=True)
    t1 = tick()
    old = await a.lock("sync", t1, exclusive=True, lease=0.5)
    assert old is not None
    _block_event_loop(0.8)  # a cannot renew: its lease expires in the database
    new = await b.lock("sync", t1 + timedelta(seconds=1), exclusive=True, lease=30)
    assert new is not None

    assert await fenced_write(engine, old, marks, "old holder") == "rejected"
    assert await fenced_write(engine, new, marks, "new holder") == "wrote"
    assert await _marks(engine, marks) == [("b", "new holder")]
    await old.unlock()
    await new.unlock()
    assert await _statuses(engine, backend) == [("a", "LOST"), ("b", "FINISHED")]


async def test_fence_refuses_a_per_tick_lock_and_what_is_not_a_transaction(
    backend: Backend, engine: AsyncEngine, make_locker: LockerFactory
) -> None:
    a = await make_locker(worker="a")
    per_tick = await a.lock("plain", tick())
    exclusive = await a.lock("report", tick(), exclusive=True, lease=30)
    assert per_tick is not None
    assert exclusive is not None
    try:
        async with engine.begin() as conn:
            with pytest.raises(RuntimeError, match=r"exclusive=True"):
                await per_tick.fence(conn)
        with pytest.raises(TypeError, match=r"AsyncConnection or AsyncSession.*AsyncEngine"):
            await exclusive.fence(engine)  # type: ignore[arg-type]
        async with engine.connect() as conn:
            autocommit = await conn.execution_options(isolation_level="AUTOCOMMIT")
            with pytest.raises(ValueError, match=r"AUTOCOMMIT"):
                await exclusive.fence(autocommit)
        assert not exclusive.lost
    finally:
        await per_tick.unlock()
        await exclusive.unlock()


# -- a competing acquirer waits for the fenced transaction ------------------------------------


async def test_another_instance_cannot_take_the_job_while_a_fenced_transaction_is_open(
    backend: Backend, engine: AsyncEngine, make_locker: LockerFactory, marks: Table
) -> None:
    """The holder's lease expires while its fenced transaction is open: another instance
    sees it expired, and still takes the job only once that transaction has committed.

    PostgreSQL and MariaDB: the other instance's claim waits on the lease row's lock.
    SQLite: on the file's write lock, which the fence took."""
    a = await make_locker(worker="a")
    b = await make_locker(worker="b", own_engine=True)
    t1 = tick()
    lock = await a.lock("sync", t1, exclusive=True, lease=1.0)
    assert lock is not None
    taking: asyncio.Task[Lock | None] | None = None
    try:
        async with engine.begin() as conn:
            await lock.fence(conn)
            _block_event_loop(1.2)  # a cannot renew: its lease expires in the database
            (lease,) = await b.leases()
            assert not lease.live
            taking = asyncio.create_task(
                b.lock("sync", t1 + timedelta(seconds=1), exclusive=True, lease=30)
            )
            done, _ = await asyncio.wait({taking}, timeout=0.6)
            assert not done, f"b took the job inside a's fenced transaction: {taking.result()}"
            await conn.execute(insert(marks).values(writer="a", note="fenced"))
        async with asyncio.timeout(5):
            taken = await taking
        assert taken is not None, "b was refused the job after a's transaction ended"
    finally:
        if taking is not None and not taking.done():
            taking.cancel()
            await asyncio.gather(taking, return_exceptions=True)

    assert await _marks(engine, marks) == [("a", "fenced")]
    assert await fenced_write(engine, lock, marks, "after the takeover") == "rejected"
    assert await fenced_write(engine, taken, marks, "new holder") == "wrote"
    await lock.unlock()
    await taken.unlock()
    assert await _marks(engine, marks) == [("a", "fenced"), ("b", "new holder")]
    assert await _statuses(engine, backend) == [("a", "LOST"), ("b", "FINISHED")]


# -- the paused holder --------------------------------------------------------------------------

#: The paused holder's lease, and how many fenced writes it tries once continued.
PAUSED_LEASE = 1.5
PAUSED_ATTEMPTS = 3


async def _take_when_free(locker: AsyncDBLocker, job: str, run_time: datetime) -> Lock:
    while True:
        lock = await locker.lock(job, run_time, exclusive=True, lease=30)
        if lock is not None:
            return lock
        await asyncio.sleep(0.05)


async def test_a_holder_paused_past_its_lease_has_its_fenced_writes_refused(
    backend: Backend, engine: AsyncEngine, make_locker: LockerFactory, marks: Table
) -> None:
    """SIGSTOP (a GC pause, a VM migration) outlasts the holder's lease; another instance
    takes the job; on SIGCONT the holder writes at once, as if it still held the job."""
    b = await make_locker(worker="b", own_engine=True)
    job = f"paused-{uuid.uuid4().hex[:8]}"
    holder = await asyncio.create_subprocess_exec(
        sys.executable,
        str(HOLDER_SCRIPT),
        backend.url,
        backend.table_name,
        marks.name,
        "holder",
        job,
        str(PAUSED_LEASE),
        str(PAUSED_ATTEMPTS),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert holder.stdin is not None
    assert holder.stdout is not None
    try:
        async with asyncio.timeout(30):
            line = await holder.stdout.readline()
        if not line.startswith(b"ready "):
            holder.kill()
            _, stderr = await holder.communicate()
            pytest.fail(f"the holder did not take the job: {line!r}\n{stderr.decode()}")
        held_id = int(line.split()[1])

        os.kill(holder.pid, signal.SIGSTOP)
        async with asyncio.timeout(PAUSED_LEASE + 3):
            taken = await _take_when_free(b, job, tick(1))
        assert await fenced_write(engine, taken, marks, "new holder") == "wrote"
        holder.stdin.write(b"go\n")  # read as soon as the holder runs again
        await holder.stdin.drain()
        os.kill(holder.pid, signal.SIGCONT)
        async with asyncio.timeout(10):
            stdout, stderr = await holder.communicate()
    finally:
        if holder.returncode is None:
            holder.kill()  # SIGKILL ends a stopped process too
            await holder.communicate()

    errors = stderr.decode(errors="replace")
    assert holder.returncode == 0, errors
    assert "Traceback" not in errors, errors
    outcomes = [json.loads(line) for line in stdout.decode().splitlines()]
    assert [o["note"] for o in outcomes] == [f"after-{n}" for n in range(PAUSED_ATTEMPTS)]
    assert {o["outcome"] for o in outcomes} == {"rejected"}, outcomes
    assert await _marks(engine, marks) == [("holder", "before"), ("b", "new holder")]
    await taken.unlock()
    rows = await fetch_rows(engine, backend.table_name)
    assert [(r["id"], r["worker"], r["status"]) for r in rows] == [
        (held_id, "holder", "LOST"),
        (taken.id, "b", "FINISHED"),
    ]
