"""Exclusive jobs: ``lock(..., exclusive=True)`` holds a lease that keeps other runs out.

What a user relies on: while one run of a job holds its lease, no instance starts
another run, even on a later tick; the lease is renewed while the run lasts, and
ends when the run ends; a run that cannot keep its lease (event loop blocked,
database unreachable, process killed) stops, or is stopped, before another takes
over; an operator can list leases and free a stuck one.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import aiosqlite
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from _lease_support import EventLog, drop_leases_table, tick
from _proxy import Proxy
from aiocronlock import AsyncDBLocker, EventKind, LeaseLostError, Lock, LockEvent, locked
from conftest import Backend, LockerFactory, StatementCounter, fetch_rows

HOLDER_SCRIPT = Path(__file__).with_name("_lease_holder.py")
SCHEDULER_SCRIPT = Path(__file__).with_name("_lease_scheduler.py")


@pytest.fixture(autouse=True)
async def _drop_leases(backend: Backend) -> AsyncIterator[None]:
    yield
    await drop_leases_table(backend)


async def _rows(engine: AsyncEngine, backend: Backend) -> list[tuple[str, str, str]]:
    """(worker, identifier, status) of every row, oldest first."""
    return [
        (row["worker"], row["job_identifier"], row["status"])
        for row in await fetch_rows(engine, backend.table_name)
    ]


def _block_event_loop(seconds: float) -> None:
    """Hold the event loop, as CPU-bound or blocking code in a job would."""
    time.sleep(seconds)


# -- keeping other runs out --------------------------------------------------------------------


async def test_a_held_lease_refuses_other_ticks_until_released(
    backend: Backend, engine: AsyncEngine, make_locker: LockerFactory
) -> None:
    a = await make_locker(worker="a")
    b = await make_locker(worker="b")
    b_events = EventLog(b)
    t1 = tick()
    t2, t3, t4 = (t1 + timedelta(seconds=n) for n in (1, 2, 3))

    held = await a.lock("report", t1, exclusive=True, lease=30)
    assert held is not None
    assert held.exclusive

    assert await b.lock("report", t2, exclusive=True) is None
    assert b_events.events == [
        LockEvent(
            kind=EventKind.SKIPPED,
            worker="b",
            job_name="report",
            identifier=b.identifier("report", t2),
            run_time=t2,
            reason="overlap",
        )
    ]
    # A per-tick lock of the same job does not look at the lease.
    plain = await b.lock("report", t3)
    assert plain is not None
    await plain.unlock()
    # The refused tick left no row behind.
    i1, i3, i4 = (a.identifier("report", t) for t in (t1, t3, t4))
    assert await _rows(engine, backend) == [("a", i1, "RUNNING"), ("b", i3, "FINISHED")]

    await held.unlock()
    (lease,) = await b.leases()
    assert not lease.live

    following = await b.lock("report", t4, exclusive=True)
    assert following is not None
    async with following:
        pass
    assert await _rows(engine, backend) == [
        ("a", i1, "FINISHED"),
        ("b", i3, "FINISHED"),
        ("b", i4, "FINISHED"),
    ]


async def test_the_lease_is_renewed_for_as_long_as_the_run_lasts(
    backend: Backend, engine: AsyncEngine, make_locker: LockerFactory
) -> None:
    """With a 0.6 s lease, a 2 s run keeps every other tick out, renewing as it goes."""
    a = await make_locker(worker="a")
    b = await make_locker(worker="b")
    a_events = EventLog(a)
    loop = asyncio.get_running_loop()
    t0 = tick()
    lock = await a.lock("sync", t0, exclusive=True, lease=0.6)
    assert lock is not None
    (first,) = await a.leases()

    attempts = 0
    async with lock:
        until = loop.time() + 2.0
        while loop.time() < until:
            attempts += 1
            refused = await b.lock("sync", t0 + timedelta(seconds=attempts), exclusive=True)
            held_for = 2.0 - (until - loop.time())
            assert refused is None, f"b took the job {held_for:.2f} s into a's run"
            await asyncio.sleep(0.1)
        (during,) = await a.leases()

    assert attempts >= 10
    assert not lock.lost
    assert during.live
    assert during.holder_id == lock.id
    assert during.worker == "a"
    assert during.lease_until - first.lease_until > timedelta(seconds=1.2)
    assert len(a_events.of(EventKind.LEASE_RENEWED)) >= 5
    assert {e.lock_id for e in a_events.of(EventKind.LEASE_RENEWED)} == {lock.id}
    # b's refused attempts wrote nothing.
    assert await _rows(engine, backend) == [("a", lock.identifier, "FINISHED")]


async def test_locked_guard_with_exclusive_skips_while_another_run_holds_the_lease(
    backend: Backend, make_locker: LockerFactory
) -> None:
    a = await make_locker(worker="a")
    b = await make_locker(worker="b")
    ran: list[str] = []
    t1 = tick()
    scheduled = t1 + timedelta(seconds=1)

    @locked(b, "export", scheduled_time=lambda: scheduled, exclusive=True, lease=5)
    async def export() -> str:
        ran.append("b")
        return "done"

    held = await a.lock("export", t1, exclusive=True, lease=5)
    assert held is not None
    assert await export() is None
    await held.unlock()
    assert await export() == "done"
    assert ran == ["b"]


# -- statements ---------------------------------------------------------------------------------


async def test_a_renewal_is_one_update_and_acquiring_takes_few_statements(
    backend: Backend, make_locker: LockerFactory, count_statements: StatementCounter
) -> None:
    """PostgreSQL decides the tick and the lease in one statement.

    SQLite and MariaDB check the lease, insert the tick row, then claim the lease:
    3 statements on SQLite; 4 on MariaDB the first time a locker takes a job (it
    first makes sure the job's lease row exists), 3 after that.
    """
    a = await make_locker(worker="a")
    a_events = EventLog(a)
    count_statements.statements.clear()
    lock = await a.lock("counted", tick(), exclusive=True, lease=0.6)
    assert lock is not None
    acquiring = list(count_statements.statements)
    if backend.is_postgres:
        assert len(acquiring) == 1, acquiring
    else:
        assert 1 <= len(acquiring) <= 4, acquiring

    count_statements.statements.clear()
    async with lock:
        async with asyncio.timeout(5):
            await a_events.wait_for(EventKind.LEASE_RENEWED, 3)
        # The next renewal is a third of the lease away: nothing else was sent.
        renewing = list(count_statements.statements)
    assert len(renewing) == 3, renewing
    for statement in renewing:
        assert statement.lstrip().upper().startswith("UPDATE"), statement
        assert f"{backend.table_name}_leases" in statement


# -- fencing ------------------------------------------------------------------------------------


async def test_a_renewal_after_another_run_took_over_fails_and_leaves_its_lease_alone(
    backend: Backend, engine: AsyncEngine, make_locker: LockerFactory
) -> None:
    a = await make_locker(worker="a")
    b = await make_locker(worker="b")
    t1 = tick()
    old = await a.lock("fenced", t1, exclusive=True, lease=0.5)
    assert old is not None
    _block_event_loop(0.8)  # a cannot renew: its lease expires in the database

    new = await b.lock("fenced", t1 + timedelta(seconds=1), exclusive=True, lease=30)
    assert new is not None
    async with asyncio.timeout(2):
        await old.wait_lost()  # a's keeper noticed
    (taken,) = await b.leases()
    assert (taken.holder_id, taken.worker, taken.live) == (new.id, "b", True)

    assert await a.store.renew(old.job_name, old.id, timedelta(seconds=30)) is False
    assert await b.leases() == [taken]
    await old.unlock()  # a's late outcome does not touch b's lease either
    assert await b.leases() == [taken]
    await new.unlock()
    assert [status for _, _, status in await _rows(engine, backend)] == ["LOST", "FINISHED"]


# -- losing the lease: blocked event loop ------------------------------------------------------


async def test_a_blocked_event_loop_loses_the_lease_and_the_run_is_cancelled(
    backend: Backend, engine: AsyncEngine, make_locker: LockerFactory
) -> None:
    a = await make_locker(worker="a")
    b = await make_locker(worker="b")
    a_events = EventLog(a)
    t1 = tick()
    lock = await a.lock("blocking", t1, exclusive=True, lease=0.6)
    assert lock is not None
    reached: list[str] = []
    started = time.monotonic()

    with pytest.raises(LeaseLostError) as info:
        async with lock:
            _block_event_loop(1.0)
            reached.append("after the block")
            await asyncio.sleep(10)
            reached.append("after the await")

    assert time.monotonic() - started < 5
    assert reached == ["after the block"]
    assert lock.lost
    assert (info.value.job_name, info.value.lock_id) == ("blocking", lock.id)
    current = asyncio.current_task()
    assert current is not None
    assert current.cancelling() == 0  # the cancellation became the error, not ours to undo
    (lost,) = a_events.of(EventKind.LEASE_LOST)
    assert (lost.job_name, lost.lock_id, lost.worker) == ("blocking", lock.id, "a")
    assert lost.reason
    assert a_events.of(EventKind.FINISHED) == []
    assert await _rows(engine, backend) == [("a", lock.identifier, "LOST")]
    # The job is free for the next tick.
    following = await b.lock("blocking", t1 + timedelta(seconds=1), exclusive=True)
    assert following is not None
    await following.unlock()


async def test_with_cancel_on_loss_false_the_run_goes_on_and_is_recorded_lost(
    backend: Backend, engine: AsyncEngine, make_locker: LockerFactory
) -> None:
    a = await make_locker(worker="a")
    a_events = EventLog(a)
    lock = await a.lock("blocking", tick(), exclusive=True, lease=0.6)
    assert lock is not None
    lock.cancel_on_loss = False
    reached: list[str] = []

    async with lock:
        _block_event_loop(1.0)
        async with asyncio.timeout(2):
            await lock.wait_lost()
        await asyncio.sleep(0.3)  # not cancelled: the body decides what to do
        reached.append("end of body")

    assert reached == ["end of body"]
    assert len(a_events.of(EventKind.LEASE_LOST)) == 1
    assert a_events.of(EventKind.FINISHED) == []
    assert await _rows(engine, backend) == [("a", lock.identifier, "LOST")]


# -- losing the lease: the database stalls ------------------------------------------------------

#: The lease of the stalled holder, its locker's per-call timeout, and the slack
#: allowed on "stopped within lease + lease/3 of the stall".
STALL_LEASE = 2.4
STALL_TIMEOUT = 0.3
STALL_SLACK = 0.35


@dataclass
class StallOutcome:
    """What happened when a's database connection stalled mid-run (loop times)."""

    stalled_at: float
    #: When a's run stopped (its body saw the cancellation).
    stopped_at: float
    #: When b, straight to the server, won the job's next tick.
    taken_at: float
    #: a's last lease end, as the database had it when the stall began.
    lease_until: datetime
    error: BaseException | None
    lock: Lock
    taken: Lock
    #: b, the locker that took the job.
    taker: AsyncDBLocker

    def assert_no_overlap(self, settings: str) -> None:
        """a's run stopped before b's started."""
        overlap = self.stopped_at - self.taken_at
        assert overlap <= 0, (
            f"b started the job {self.taken_at - self.stalled_at:.2f} s into the stall, "
            f"while a's run went on until {self.stopped_at - self.stalled_at:.2f} s: "
            f"both ran for {overlap:.2f} s ({settings})"
        )


def _run_under(lock: Lock) -> tuple[asyncio.Task[None], list[float]]:
    """Start a job that sleeps under ``lock``; the list gets the loop time it stopped."""
    loop = asyncio.get_running_loop()
    stopped: list[float] = []

    async def run() -> None:
        async with lock:
            try:
                await asyncio.sleep(60)
            finally:
                stopped.append(loop.time())

    return asyncio.create_task(run()), stopped


async def _take_when_free(
    locker: AsyncDBLocker, job: str, run_time: datetime
) -> tuple[Lock, float]:
    """Poll for ``job``'s tick at ``run_time``; the lock and the loop time it was won."""
    while True:
        lock = await locker.lock(job, run_time, exclusive=True, lease=30)
        if lock is not None:
            return lock, asyncio.get_running_loop().time()
        await asyncio.sleep(0.02)


async def _stall_the_holder(
    backend: Backend,
    make_locker: LockerFactory,
    *,
    lease_s: float = STALL_LEASE,
    locker_timeout: float | None = STALL_TIMEOUT,
    delay: float = 0.0,
) -> StallOutcome:
    """a runs an exclusive job through a proxy; the proxy stalls; b polls for the next tick.

    The proxy resumes as soon as a reports its lease lost, so that a can record LOST.
    """
    loop = asyncio.get_running_loop()
    job = f"stalled-{uuid.uuid4().hex[:8]}"
    t1 = tick()
    b = await make_locker(worker="b")
    tasks: list[asyncio.Task[Any]] = []
    async with Proxy.to(backend.url) as proxy:
        settings: dict[str, Any] = {} if locker_timeout is None else {"timeout": locker_timeout}
        a = AsyncDBLocker(
            proxy.route(backend.url),
            worker="a",
            table_name=backend.table_name,
            clean_interval=None,
            **settings,
        )
        try:
            a_events = EventLog(a)
            lock = await a.lock(job, t1, exclusive=True, lease=lease_s)
            assert lock is not None
            running, stopped = _run_under(lock)
            tasks.append(running)
            proxy.delay(delay)  # slow answers, before the stall
            async with asyncio.timeout(5):
                # Stall right after a renewal, so the lease has all of its time left.
                await a_events.wait_for(EventKind.LEASE_RENEWED)
            proxy.stall(True)
            stalled_at = loop.time()
            (lease,) = await b.leases()
            taking = asyncio.create_task(_take_when_free(b, job, t1 + timedelta(seconds=1)))
            tasks.append(taking)
            async with asyncio.timeout(15):
                await a_events.wait_for(EventKind.LEASE_LOST)
            proxy.stall(False)
            async with asyncio.timeout(15):
                (outcome,) = await asyncio.gather(running, return_exceptions=True)
                taken, taken_at = await taking
        finally:
            proxy.stall(False)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await a.aclose()
    return StallOutcome(
        stalled_at=stalled_at,
        stopped_at=stopped[0],
        taken_at=taken_at,
        lease_until=lease.lease_until,
        error=outcome if isinstance(outcome, BaseException) else None,
        lock=lock,
        taken=taken,
        taker=b,
    )


# The proxy sits in front of a server: SQLite has no connection to stall.
@pytest.mark.parametrize("backend", ["postgresql", "mysql"], indirect=True)
async def test_stalled_renewals_stop_the_run_and_free_the_next_tick(
    backend: Backend, engine: AsyncEngine, make_locker: LockerFactory
) -> None:
    outcome = await _stall_the_holder(backend, make_locker)

    assert isinstance(outcome.error, LeaseLostError), outcome.error
    assert outcome.error.lock_id == outcome.lock.id
    assert outcome.lock.lost
    # a recorded LOST once the database was back; b holds the next tick.
    rows = await fetch_rows(engine, backend.table_name)
    assert [(r["worker"], r["status"]) for r in rows] == [("a", "LOST"), ("b", "RUNNING")]
    # b's tick was taken only once a's lease had expired, by the database's clock.
    (b_run,) = [run for run in await outcome.taker.history() if run.worker == "b"]
    assert b_run.started_at >= outcome.lease_until
    await outcome.taken.unlock()

    stopped_after = outcome.stopped_at - outcome.stalled_at
    assert stopped_after <= STALL_LEASE * 4 / 3 + STALL_SLACK, (
        f"the run went on {stopped_after:.2f} s into the stall (lease {STALL_LEASE} s, "
        f"timeout {STALL_TIMEOUT} s): more than lease + lease/3"
    )


# The proxy sits in front of a server: SQLite has no connection to stall.
@pytest.mark.parametrize("backend", ["postgresql", "mysql"], indirect=True)
async def test_a_stalled_run_is_stopped_before_another_instance_takes_the_job(
    backend: Backend, make_locker: LockerFactory
) -> None:
    """The promise of exclusive: two instances never run the job at once, even in a stall."""
    outcome = await _stall_the_holder(backend, make_locker)
    await outcome.taken.unlock()

    outcome.assert_no_overlap(f"lease {STALL_LEASE} s, timeout {STALL_TIMEOUT} s")


# The proxy sits in front of a server: SQLite has no connection to stall.
@pytest.mark.parametrize("backend", ["postgresql", "mysql"], indirect=True)
async def test_with_the_default_timeout_a_stalled_run_stops_before_another_takes_the_job(
    backend: Backend, make_locker: LockerFactory
) -> None:
    """A renewal may wait for the whole default timeout (5 s), longer than this 3 s
    lease, and a driver may take seconds more to close the stalled connection: the
    run must stop by its lease's end all the same, not when the renewal gives up."""
    outcome = await _stall_the_holder(backend, make_locker, lease_s=3.0, locker_timeout=None)
    await outcome.taken.unlock()

    assert isinstance(outcome.error, LeaseLostError), outcome.error
    outcome.assert_no_overlap("lease 3 s, the default timeout")


# The proxy sits in front of a server: SQLite has no connection to stall.
@pytest.mark.parametrize("backend", ["postgresql", "mysql"], indirect=True)
async def test_after_slow_answers_a_stalled_run_stops_before_another_takes_the_job(
    backend: Backend, make_locker: LockerFactory
) -> None:
    """Each answer arrives half a second after its statement ran: the lease must be counted
    from when the renewal was sent, as the database counts it, not from the answer."""
    outcome = await _stall_the_holder(
        backend, make_locker, lease_s=3.0, locker_timeout=None, delay=0.25
    )
    await outcome.taken.unlock()

    assert isinstance(outcome.error, LeaseLostError), outcome.error
    outcome.assert_no_overlap("lease 3 s, answers late")


# -- losing the lease: the holder's process dies ------------------------------------------------


async def _start_holder(
    backend: Backend, worker: str, job: str, lease: float
) -> tuple[asyncio.subprocess.Process, int]:
    """Start ``_lease_holder.py``; return it and its run's row id once it holds the job."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(HOLDER_SCRIPT),
        backend.url,
        backend.table_name,
        worker,
        job,
        str(lease),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None
    async with asyncio.timeout(30):
        line = await process.stdout.readline()
    if not line.startswith(b"held "):
        process.kill()
        _, stderr = await process.communicate()
        pytest.fail(f"the holder did not take the job: {line!r}\n{stderr.decode(errors='replace')}")
    return process, int(line.split()[1])


@pytest.mark.slow
async def test_a_killed_holder_blocks_the_job_until_its_lease_expires(
    backend: Backend, engine: AsyncEngine, make_locker: LockerFactory
) -> None:
    lease = 1.0
    b = await make_locker(worker="b")
    holder, held_id = await _start_holder(backend, "crashed", "nightly", lease)
    try:
        # A tick after the holder's, which its database clock named (it may run ahead
        # of this process's by a loaded round trip).
        (held,) = await b.history("nightly")
        following = max(tick(1), datetime.fromisoformat(held.identifier) + timedelta(seconds=1))
        assert await b.lock("nightly", following, exclusive=True) is None
    finally:
        holder.kill()
        await holder.communicate()
    killed_at = time.monotonic()

    (left,) = await b.leases()
    assert (left.holder_id, left.worker, left.live) == (held_id, "crashed", True)
    assert await b.lock("nightly", following, exclusive=True) is None

    # Taken soon after the lease ran out (with room for a loaded CI machine), and
    # not before: the rows' times below are the database's.
    async with asyncio.timeout(lease + 5):
        taken, _ = await _take_when_free(b, "nightly", following)
    waited = time.monotonic() - killed_at
    assert waited <= lease + 3
    await taken.unlock()

    # The killed run's row says RUNNING: nobody was left to record its end.
    rows = [(run.worker, run.status, run.started_at) for run in reversed(await b.history())]
    assert [(worker, status) for worker, status, _ in rows] == [
        ("crashed", "RUNNING"),
        ("b", "FINISHED"),
    ]
    assert rows[1][2] >= left.lease_until


# -- no overlap across processes ----------------------------------------------------------------


#: How long the three schedulers run together, in seconds.
WINDOW = 8


@dataclass(frozen=True)
class Run:
    """One run of the job, as ``_lease_scheduler.py`` reports it (wall-clock seconds)."""

    worker: str
    lock_id: int
    start: float
    end: float
    outcome: str


async def _expect_ready(process: asyncio.subprocess.Process) -> None:
    assert process.stdout is not None
    line = await process.stdout.readline()
    if line.strip() != b"ready":
        _, stderr = await process.communicate()
        pytest.fail(f"the scheduler did not start: {line!r}\n{stderr.decode(errors='replace')}")


@pytest.mark.slow
async def test_three_processes_never_overlap_a_job_longer_than_its_interval(
    backend: Backend, engine: AsyncEngine, make_locker: LockerFactory
) -> None:
    """Each process schedules the job every 1 s with a 2 s lease; each run takes 2.5 s."""
    await make_locker()  # the table exists before anyone schedules
    workers = [f"proc-{i}" for i in range(3)]
    processes = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            str(SCHEDULER_SCRIPT),
            backend.url,
            backend.table_name,
            worker,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        for worker in workers
    ]
    try:
        async with asyncio.timeout(60):
            # Everyone is connected before the window opens, however slow to start.
            await asyncio.gather(*(_expect_ready(p) for p in processes))
            until = f"{time.time() + WINDOW}\n".encode()
            outputs = await asyncio.gather(*(p.communicate(until) for p in processes))
    finally:
        for process in processes:
            if process.returncode is None:
                process.kill()
                await process.communicate()

    runs: list[Run] = []
    for process, (stdout, stderr) in zip(processes, outputs, strict=True):
        errors = stderr.decode(errors="replace")
        assert process.returncode == 0, errors
        assert "Traceback" not in errors, errors
        runs.extend(Run(**json.loads(line)) for line in stdout.decode().splitlines())

    assert len(runs) >= 2, (runs, await fetch_rows(engine, backend.table_name))
    runs.sort(key=lambda run: run.start)
    busiest = runs[0]  # the run that ends last among those started so far
    for run in runs[1:]:
        assert run.start >= busiest.end - 0.005, f"{run} overlaps {busiest}"
        if run.end > busiest.end:
            busiest = run
    assert {run.outcome for run in runs} == {"finished"}

    rows = await fetch_rows(engine, backend.table_name)
    finished = {(r["worker"], r["id"]) for r in rows if r["status"] == "FINISHED"}
    assert finished == {(run.worker, run.lock_id) for run in runs}
    # Ticks won while another run held the lease (a race SQLite and MariaDB can lose
    # between checking the lease and claiming it) are SKIPPED, never run.
    assert {r["status"] for r in rows} <= {"FINISHED", "SKIPPED"}


# -- operators: leases() and release() ----------------------------------------------------------


async def test_leases_lists_each_exclusive_job(
    backend: Backend, make_locker: LockerFactory
) -> None:
    a = await make_locker(worker="a")
    assert await a.leases() == []
    report = await a.lock("report", tick(), exclusive=True, lease=30)
    backup = await a.lock("backup", tick(), exclusive=True, lease=30)
    plain = await a.lock("plain", tick())
    assert report is not None
    assert backup is not None
    assert plain is not None
    await backup.unlock()
    await plain.unlock()
    now = a.clock.now()

    leases = await a.leases()
    assert [(x.job_name, x.holder_id, x.worker, x.live) for x in leases] == [
        ("backup", backup.id, "a", False),
        ("report", report.id, "a", True),
    ]
    ends = {x.job_name: x.lease_until for x in leases}
    assert timedelta(seconds=28) < ends["report"] - now < timedelta(seconds=32)
    assert ends["backup"] <= now + timedelta(seconds=1)
    await report.unlock()


async def test_release_frees_a_live_lease_and_marks_its_run_lost(
    backend: Backend, engine: AsyncEngine, make_locker: LockerFactory
) -> None:
    holder = await make_locker(worker="holder")
    operator = await make_locker(worker="operator")
    other = await make_locker(worker="other")
    t1 = tick()
    stuck = await holder.lock("stuck", t1, exclusive=True, lease=30)
    assert stuck is not None
    assert await other.lock("stuck", t1 + timedelta(seconds=1), exclusive=True) is None

    assert await operator.release("stuck") is True

    (lease,) = await operator.leases()
    assert (lease.holder_id, lease.live) == (stuck.id, False)
    rows = await fetch_rows(engine, backend.table_name)
    assert [(r["worker"], r["status"]) for r in rows] == [("holder", "LOST")]
    # Releasing again, or a job that never ran: nothing held, nothing done.
    assert await operator.release("stuck") is False
    assert await operator.release("never-ran") is False
    assert await operator.leases() == [lease]

    following = await other.lock("stuck", t1 + timedelta(seconds=1), exclusive=True, lease=30)
    assert following is not None

    # The old holder finishing late changes neither its LOST row nor the new lease.
    await stuck.unlock()
    (lease,) = await operator.leases()
    assert (lease.holder_id, lease.worker, lease.live) == (following.id, "other", True)
    await following.unlock()
    rows = await fetch_rows(engine, backend.table_name)
    assert [(r["worker"], r["status"]) for r in rows] == [("holder", "LOST"), ("other", "FINISHED")]
    assert await operator.release("stuck") is False


async def test_a_released_holder_still_running_stops_at_its_next_renewal(
    backend: Backend, engine: AsyncEngine, make_locker: LockerFactory
) -> None:
    holder = await make_locker(worker="holder")
    operator = await make_locker(worker="operator")
    holder_events = EventLog(holder)
    lock = await holder.lock("stuck", tick(), exclusive=True, lease=0.6)
    assert lock is not None

    with pytest.raises(LeaseLostError):
        async with lock:
            assert await operator.release("stuck") is True
            await asyncio.sleep(5)

    assert len(holder_events.of(EventKind.LEASE_LOST)) == 1
    rows = await fetch_rows(engine, backend.table_name)
    assert [(r["worker"], r["status"]) for r in rows] == [("holder", "LOST")]


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_on_sqlite_a_run_whose_renewals_wait_on_the_file_stops_before_another_takes_it(
    backend: Backend, make_locker: LockerFactory
) -> None:
    """SQLite's stall: another connection holds the file's write lock, as another
    process would, so the holder's renewals wait (SQLite's busy timeout is 30 s, far
    past the lease). The run must stop by its lease's end, before the next holder can
    start, with the default timeout and a 3 s lease."""
    loop = asyncio.get_running_loop()
    job = f"stalled-{uuid.uuid4().hex[:8]}"
    a = await make_locker(own_engine=True, worker="a")
    b = await make_locker(own_engine=True, worker="b")
    events = EventLog(a)
    lock = await a.lock(job, tick(), exclusive=True, lease=3.0)
    assert lock is not None
    running, stopped = _run_under(lock)
    path = backend.url.split("///", 1)[1]
    async with asyncio.timeout(5):
        await events.wait_for(EventKind.LEASE_RENEWED)
    async with aiosqlite.connect(path, isolation_level=None) as blocker:
        await blocker.execute("BEGIN IMMEDIATE")  # the write lock, until released below
        blocked_at = loop.time()
        await asyncio.sleep(4.0)  # past the lease: a's renewals all wait
        await blocker.execute("ROLLBACK")
    async with asyncio.timeout(10):
        taken, taken_at = await _take_when_free(b, job, tick(1))
        outcome = await asyncio.gather(running, return_exceptions=True)

    assert isinstance(outcome[0], LeaseLostError), outcome
    assert stopped[0] - blocked_at <= 3.0, "the run went on past its lease"
    assert stopped[0] < taken_at
    await taken.unlock()
