"""Dead winners, retried once: ``retry_dead=True``.

What a user relies on: a run under ``retry_dead`` keeps a heartbeat; once it stops
(the process was killed), another instance marks the run LOST and runs its tick
again, once, with a greater fencing token; a live run is never retried, and a run
whose row was marked LOST stops at its next heartbeat, so a tick never has two live
runs.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import MetaData, update
from sqlalchemy.ext.asyncio import AsyncEngine

from _lease_support import EventLog, drop_leases_table, tick
from aiocronlock import AsyncDBLocker, EventKind, LeaseLostError, Lock, Scheduler, lock_table
from conftest import Backend, LockerFactory, fetch_rows

WORKER_SCRIPT = Path(__file__).with_name("_retry_worker.py")
LEASE = 0.6


@pytest.fixture(autouse=True)
async def _drop_leases(backend: Backend) -> AsyncIterator[None]:
    yield
    await drop_leases_table(backend)


async def _rows(engine: AsyncEngine, backend: Backend) -> list[tuple[int, str, str, str]]:
    """(id, worker, identifier, status) of every row, oldest first."""
    return [
        (row["id"], row["worker"], row["job_identifier"], row["status"])
        for row in await fetch_rows(engine, backend.table_name)
    ]


def _stop_keeper(lock: Lock) -> None:
    """Stop the task that beats ``lock``'s heartbeat, as if its process had died."""
    (keeper,) = [
        task
        for task in asyncio.all_tasks()
        if task.get_name() == f"aiocronlock lease {lock.job_name} #{lock.id}"
    ]
    keeper.cancel()


async def _retry_when_dead(locker: AsyncDBLocker, job: str, within: float) -> Lock:
    """Ask ``locker`` to retry ``job``'s dead runs until it wins one."""
    async with asyncio.timeout(within):
        while True:
            won = await locker.retry_dead_runs(job, lease=LEASE)
            if won:
                (retry,) = won
                return retry
            await asyncio.sleep(0.05)


# -- one process ---------------------------------------------------------------------------------


async def test_a_run_whose_heartbeat_stopped_is_retried_once_elsewhere(
    backend: Backend, engine: AsyncEngine, make_locker: LockerFactory
) -> None:
    a = await make_locker(worker="a")
    b = await make_locker(worker="b")
    c = await make_locker(worker="c")
    t0 = tick()
    dead = await a.lock("report", t0, retry_dead=True, lease=LEASE)
    assert dead is not None
    assert dead.retry_dead and not dead.exclusive
    _stop_keeper(dead)
    stopped_at = time.monotonic()

    # Within its lease the run counts as alive.
    assert await b.retry_dead_runs("report", lease=LEASE) == []
    retry = await _retry_when_dead(b, "report", within=LEASE + 2)
    assert time.monotonic() - stopped_at >= LEASE * 0.9
    assert retry.id > dead.id
    assert (retry.worker, retry.job_name, retry.run_time) == ("b", "report", t0)
    assert retry.identifier == dead.identifier + "#retry"
    # Once: neither another instance nor the same one wins it again.
    assert await c.retry_dead_runs("report", lease=LEASE) == []
    assert await b.retry_dead_runs("report", lease=LEASE) == []

    async with retry:
        pass
    # The dead run, should it come back, cannot record an outcome over LOST.
    await dead.unlock()
    assert await _rows(engine, backend) == [
        (dead.id, "a", dead.identifier, "LOST"),
        (retry.id, "b", retry.identifier, "FINISHED"),
    ]
    # A retry is never retried, even once it is old.
    await asyncio.sleep(LEASE)
    assert await c.retry_dead_runs("report", lease=LEASE) == []


async def test_a_live_run_is_never_retried(
    backend: Backend, engine: AsyncEngine, make_locker: LockerFactory
) -> None:
    a = await make_locker(worker="a")
    b = await make_locker(worker="b")
    a_events = EventLog(a)
    loop = asyncio.get_running_loop()
    lock = await a.lock("report", tick(), retry_dead=True, lease=LEASE)
    assert lock is not None

    attempts = 0
    async with lock:
        until = loop.time() + 3 * LEASE
        while loop.time() < until:
            attempts += 1
            assert await b.retry_dead_runs("report", lease=LEASE) == []
            await asyncio.sleep(0.05)

    assert attempts >= 10
    assert not lock.lost
    assert len(a_events.of(EventKind.LEASE_RENEWED)) >= 4
    assert await _rows(engine, backend) == [(lock.id, "a", lock.identifier, "FINISHED")]
    # Finished runs are not dead either.
    await asyncio.sleep(LEASE)
    assert await b.retry_dead_runs("report", lease=LEASE) == []


async def test_a_run_marked_lost_stops_at_its_next_heartbeat(
    backend: Backend, engine: AsyncEngine, make_locker: LockerFactory
) -> None:
    """As when another instance found it dead: the holder must not run beside its retry."""
    a = await make_locker(worker="a")
    lock = await a.lock("report", tick(), retry_dead=True, lease=LEASE)
    assert lock is not None
    locks = lock_table(MetaData(), name=backend.table_name)
    reached: list[str] = []
    started = time.monotonic()

    with pytest.raises(LeaseLostError):
        async with lock:
            async with engine.begin() as conn:
                await conn.execute(update(locks).where(locks.c.id == lock.id).values(status="LOST"))
            await asyncio.sleep(5)
            reached.append("after the sleep")

    assert time.monotonic() - started < LEASE
    assert reached == []
    assert lock.lost
    assert await _rows(engine, backend) == [(lock.id, "a", lock.identifier, "LOST")]
    # Its tick is retried at once: LOST, and no retry yet.
    b = await make_locker(worker="b")
    (retry,) = await b.retry_dead_runs("report", lease=LEASE)
    await retry.unlock()


async def test_retry_dead_options_are_checked(make_locker: LockerFactory) -> None:
    locker = await make_locker(create=False)
    with pytest.raises(ValueError, match="retry_dead"):
        await locker.lock("report", exclusive=True, retry_dead=True)
    with pytest.raises(ValueError, match="retry_dead=True"):
        await locker.lock("report", lease=5)
    with pytest.raises(ValueError, match="no room"):
        await AsyncDBLocker(
            locker.engine, identifier=lambda job, run_time: "x" * 250, clean_interval=None
        ).lock("report", retry_dead=True)
    scheduler = Scheduler(locker)
    with pytest.raises(TypeError, match="retry_dead=True needs a coroutine function"):
        scheduler.add_job(lambda: None, timedelta(seconds=1), name="plain", retry_dead=True)
    assert scheduler.jobs == []


# -- three processes, one killed mid-job --------------------------------------------------------

#: The worker script's settings.
INTERVAL, WORKER_LEASE = 1.0, 1.5
#: How long the three schedulers run together, and when (from the start) the next run
#: to start is killed, in seconds.
WINDOW, KILL_AFTER = 8.5, 2.5


@dataclass
class Run:
    """One run, from the lines ``_retry_worker.py`` printed (wall-clock seconds)."""

    worker: str
    lock_id: int
    identifier: str
    start: float
    end: float | None = None
    outcome: str | None = None

    @property
    def tick(self) -> str:
        return self.identifier.removesuffix("#retry")


async def _start_worker(backend: Backend, worker: str) -> asyncio.subprocess.Process:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(WORKER_SCRIPT),
        backend.url,
        backend.table_name,
        worker,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None
    line = await process.stdout.readline()
    if line.strip() != b"ready":
        _, stderr = await process.communicate()
        pytest.fail(f"the worker did not start: {line!r}\n{stderr.decode(errors='replace')}")
    return process


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sqlite", "postgresql", "mysql"], indirect=True)
async def test_a_winner_killed_mid_job_has_its_tick_run_once_more_elsewhere(
    backend: Backend, engine: AsyncEngine, make_locker: LockerFactory
) -> None:
    await make_locker()  # the table exists before anyone schedules
    workers = [f"proc-{i}" for i in range(3)]
    processes: dict[str, asyncio.subprocess.Process] = {}
    runs: dict[int, Run] = {}
    killed: str | None = None
    killed_at = 0.0

    async def read(worker: str, process: asyncio.subprocess.Process) -> None:
        nonlocal killed, killed_at
        assert process.stdout is not None
        async for line in process.stdout:
            record: dict[str, Any] = json.loads(line)
            if record["event"] == "start":
                run = Run(record["worker"], record["lock_id"], record["identifier"], record["time"])
                runs[run.lock_id] = run
                if killed is None and run.start >= opened + KILL_AFTER:
                    killed = worker
                    await asyncio.sleep(0.25)  # mid-job: each run takes 0.5 s or more
                    process.send_signal(signal.SIGKILL)
                    killed_at = time.time()
            else:
                runs[record["lock_id"]].end = record["time"]
                runs[record["lock_id"]].outcome = record["outcome"]

    try:
        async with asyncio.timeout(45):
            for worker in workers:
                processes[worker] = await _start_worker(backend, worker)
            opened = time.time()
            until = f"{opened + WINDOW}\n".encode()
            for process in processes.values():
                assert process.stdin is not None
                process.stdin.write(until)
                process.stdin.close()
            await asyncio.gather(*(read(w, p) for w, p in processes.items()))
            stderrs = {}
            for worker, process in processes.items():
                assert process.stderr is not None
                stderrs[worker] = (await process.stderr.read()).decode(errors="replace")
                await process.wait()
    finally:
        for process in processes.values():
            if process.returncode is None:
                process.kill()
                await process.communicate()

    assert killed is not None, runs
    for worker, process in processes.items():
        if worker != killed:
            assert process.returncode == 0, stderrs[worker]
            assert "Traceback" not in stderrs[worker], stderrs[worker]
    rows = {row["id"]: row for row in await fetch_rows(engine, backend.table_name)}

    # The killed runs: each has exactly one retry, on another instance, with a greater
    # id, started within lease + one interval of the kill and run to FINISHED.
    dead = [run for run in runs.values() if run.worker == killed and run.end is None]
    assert dead, runs
    for run in dead:
        assert rows[run.lock_id]["status"] == "LOST"
        (retry,) = [r for r in runs.values() if r.identifier == run.identifier + "#retry"]
        assert retry.worker != killed
        assert retry.lock_id > run.lock_id
        assert retry.start - killed_at <= WORKER_LEASE + INTERVAL + 0.5, (retry, killed_at)
        assert retry.outcome == "finished"
        assert rows[retry.lock_id]["status"] == "FINISHED"
        print(  # the figures, with -s
            f"{backend.name}: run {run.lock_id} killed; retry {retry.lock_id} on "
            f"{retry.worker} started {retry.start - killed_at:.2f} s and FINISHED "
            f"{(retry.end or 0) - killed_at:.2f} s after the kill"
        )

    # No tick ever had two live runs; every other tick ran exactly once.
    by_tick: dict[str, list[Run]] = {}
    for run in runs.values():
        by_tick.setdefault(run.tick, []).append(run)
    dead_ticks = {run.tick for run in dead}
    for name, ran in by_tick.items():
        if name in dead_ticks:
            first, second = sorted(ran, key=lambda r: r.lock_id)
            assert second.start > killed_at, (first, second)
        else:
            assert len(ran) == 1, ran
            assert ran[0].outcome == "finished", ran
    ticks = sorted(row["job_identifier"] for row in rows.values())
    assert len(ticks) == len(set(ticks))
    assert len(by_tick) >= WINDOW - 1
    assert {r["status"] for r in rows.values()} == {"FINISHED", "LOST"}
    assert len(rows) == len(runs)
