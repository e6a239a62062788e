"""Network and process faults on PostgreSQL and MariaDB, injected through ``_proxy.Proxy``.

Each test builds lockers from URLs that point at a proxy in front of the real
server, breaks the network in one way, and checks what a user would see: what the
call returned or raised and how long it took, the rows in the table, the sessions
left on the server, what was logged, and that no connection stayed checked out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import MetaData, bindparam, event, text, update
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from _proxy import Proxy
from aiocronlock import AsyncDBLocker, BackendError, lock_table, locked
from conftest import fetch_rows, server_url, watch_log

SERVERS = ("postgresql", "mysql")
#: The lockers' per-call timeout, and how much later than it a failing call may return.
TIMEOUT = 1.0
SLACK = 0.75
WORKER_SCRIPT = Path(__file__).with_name("_fault_worker.py")

LockerMaker = Callable[..., AsyncDBLocker]

#: The hint of an error whose connection the server closed.
DROPPED = "the connection was dropped (the server closed it or went away); the next call reconnects"


def _tick(seconds_from_now: int = 0) -> datetime:
    return datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=seconds_from_now)


def _job() -> str:
    """A job name no other statement contains, so the proxy can recognise its INSERT."""
    return f"job-{uuid.uuid4().hex}"


# -- fixtures ------------------------------------------------------------------------------


@pytest.fixture(params=SERVERS)
def server(request: pytest.FixtureRequest) -> str:
    """The real server's URL (the test is skipped when it is down)."""
    return server_url(request.param)


@pytest.fixture
async def proxy(server: str) -> AsyncIterator[Proxy]:
    async with Proxy.to(server) as proxy:
        yield proxy


@pytest.fixture
async def direct(server: str) -> AsyncIterator[AsyncEngine]:
    """An engine straight to the server, to look at rows and sessions past the faults."""
    engine = create_async_engine(server)
    try:
        yield engine
        assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    finally:
        await engine.dispose()


@pytest.fixture
async def table(direct: AsyncEngine) -> AsyncIterator[str]:
    """A lock table of the test's own, created before and dropped after the test."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    await AsyncDBLocker(direct, table_name=name, clean_interval=None).create_table()
    yield name
    async with direct.begin() as conn:
        tables = lock_table(MetaData(), name=name).metadata  # with its leases table
        await conn.run_sync(lambda sync: tables.drop_all(sync, checkfirst=True))


@pytest.fixture
async def make(table: str, proxy: Proxy) -> AsyncIterator[LockerMaker]:
    """Build lockers from URLs on the test's table; afterwards none may hold a connection."""
    made: list[AsyncDBLocker] = []

    def factory(url: str, **kwargs: Any) -> AsyncDBLocker:
        kwargs.setdefault("table_name", table)
        kwargs.setdefault("clean_interval", None)
        kwargs.setdefault("timeout", TIMEOUT)
        locker = AsyncDBLocker(url, **kwargs)
        made.append(locker)
        return locker

    yield factory
    # Closing disposes the pools, which talks to the server: let the bytes through.
    proxy.stall(False)
    proxy.refuse(False)
    proxy.delay(0)
    # (A locker the test closed has disposed of its pool: nothing left to count.)
    leaked = {locker.worker: _checked_out(locker) for locker in made if not locker.closed}
    for locker in made:
        await locker.aclose()
    assert set(leaked.values()) <= {0}, f"connections left checked out: {leaked}"


async def _statuses(direct: AsyncEngine, table: str, job: str) -> list[tuple[str, str]]:
    """(worker, status) of the job's rows, oldest first."""
    return [
        (r["worker"], r["status"]) for r in await fetch_rows(direct, table) if r["job_name"] == job
    ]


async def _cancel_after(call: Coroutine[Any, Any, Any], seconds: float) -> None:
    """Run ``call`` as a task, cancel it after ``seconds``; it must end cancelled."""
    task = asyncio.create_task(call)
    await asyncio.sleep(seconds)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def _kept(locker: AsyncDBLocker) -> int:
    """Connections the locker keeps for acquiring (in a pool of its own, not the engine's)."""
    return locker._acquirer.connections


def _idle(locker: AsyncDBLocker) -> int:
    """Open connections not in use: in the engine's pool, or kept for acquiring."""
    count: int = locker.engine.pool.checkedin()  # type: ignore[attr-defined]
    return count + _kept(locker)


def _checked_out(locker: AsyncDBLocker) -> int:
    """Connections checked out of the engine's pool (those kept for acquiring are not)."""
    count: int = locker.engine.pool.checkedout()  # type: ignore[attr-defined]
    return count


@dataclass(frozen=True)
class Session:
    """A server session, as the server's own catalog describes it."""

    id: int
    state: str
    in_transaction: bool
    #: Locks held (PostgreSQL) or rows/tables locked by its transaction (MariaDB).
    locks: int


async def _sessions(direct: AsyncEngine, ports: set[int]) -> list[Session]:
    """The server's sessions whose client port is one of ``ports`` (the proxy's side)."""
    if not ports:
        return []
    async with direct.connect() as conn:
        if direct.dialect.name == "postgresql":
            query = text(
                "SELECT a.pid, a.state, a.xact_start IS NOT NULL AS in_xact,"
                " (SELECT count(*) FROM pg_locks l WHERE l.pid = a.pid AND l.granted) AS locks"
                " FROM pg_stat_activity a WHERE a.client_port IN :ports"
            ).bindparams(bindparam("ports", expanding=True))
            rows = (await conn.execute(query, {"ports": sorted(ports)})).all()
            return [Session(r.pid, r.state or "", bool(r.in_xact), int(r.locks)) for r in rows]
        processes = (
            await conn.execute(text("SELECT id, host, command FROM information_schema.processlist"))
        ).all()
        transactions = {
            r.trx_mysql_thread_id: int(r.trx_rows_locked) + int(r.trx_tables_locked)
            for r in (
                await conn.execute(
                    text(
                        "SELECT trx_mysql_thread_id, trx_rows_locked, trx_tables_locked"
                        " FROM information_schema.innodb_trx"
                    )
                )
            ).all()
        }
    sessions = []
    for process in processes:
        _, _, port = (process.host or "").rpartition(":")
        if port.isdigit() and int(port) in ports:
            sessions.append(
                Session(
                    process.id,
                    process.command,
                    process.id in transactions,
                    transactions.get(process.id, 0),
                )
            )
    return sessions


# -- the database is unreachable -------------------------------------------------------------


@pytest.mark.parametrize("outage", ["refused", "silent"])
async def test_unreachable_database_fails_fast_and_the_job_does_not_run(
    server: str, proxy: Proxy, direct: AsyncEngine, table: str, make: LockerMaker, outage: str
) -> None:
    locker = make(proxy.route(server), worker="a")
    tick = _tick()
    ran: list[datetime] = []

    @locked(locker, "nightly", scheduled_time=lambda: tick)
    async def nightly() -> None:
        ran.append(tick)

    if outage == "refused":
        proxy.refuse(True)
    else:
        proxy.stall(True)  # connections are accepted, then nothing ever answers
    started = time.monotonic()
    with pytest.raises(BackendError) as info:
        await nightly()
    elapsed = time.monotonic() - started

    assert ran == []
    assert await _statuses(direct, table, "nightly") == []
    assert info.value.operation.startswith("lock('nightly')")
    assert _checked_out(locker) == 0

    # The database is back: the same locker works, nothing rebuilt.
    proxy.refuse(False)
    proxy.stall(False)
    await nightly()
    assert ran == [tick]
    assert await _statuses(direct, table, "nightly") == [("a", "FINISHED")]
    assert _checked_out(locker) == 0
    assert elapsed < TIMEOUT + SLACK, f"lock() took {elapsed:.2f} s to fail"


async def test_database_going_away_with_live_connections_and_coming_back(
    server: str, proxy: Proxy, direct: AsyncEngine, table: str, make: LockerMaker
) -> None:
    locker = make(proxy.route(server), worker="a")
    assert await locker.lock("warm-up", _tick()) is not None
    assert proxy.connections == 1

    proxy.refuse(True)
    assert proxy.cut() == 1
    timings = []
    for attempt in range(3):
        started = time.monotonic()
        with pytest.raises(BackendError):
            await locker.lock("report", _tick(attempt))
        timings.append(time.monotonic() - started)
    assert proxy.refused >= 2  # the calls after the first did try to reconnect
    assert await _statuses(direct, table, "report") == []

    proxy.refuse(False)
    lock = await locker.lock("report", _tick(10))
    assert lock is not None
    async with lock:
        pass
    assert await _statuses(direct, table, "report") == [("a", "FINISHED")]
    assert _checked_out(locker) == 0
    assert max(timings) < TIMEOUT + SLACK, timings


async def test_pool_recovers_after_its_connections_are_cut(
    server: str, proxy: Proxy, direct: AsyncEngine, table: str, make: LockerMaker
) -> None:
    """One call fails after a cut, however many pooled connections died; then all succeed."""
    locker = make(proxy.route(server), worker="a")
    assert await locker.lock("warm-up", _tick()) is not None  # the first connect, at full speed
    # Three connections in the pool: three calls in flight at once, slowed down.
    proxy.delay(0.05)
    won = await asyncio.gather(*(locker.lock(f"warm-up-{i}", _tick()) for i in range(3)))
    proxy.delay(0)
    assert all(won)
    assert _idle(locker) == 3

    assert proxy.cut() == 3
    outcomes: list[str] = []
    for i in range(6):
        try:
            lock = await locker.lock("after-cut", _tick(i))
        except BackendError as error:
            assert error.hint == DROPPED
            outcomes.append("failed")
        else:
            assert lock is not None
            outcomes.append("won")

    assert outcomes == ["failed"] + ["won"] * 5
    assert len(await _statuses(direct, table, "after-cut")) == 5
    assert _checked_out(locker) == 0


# -- the connection drops between the INSERT and its answer ---------------------------------------


async def test_connection_dropped_between_insert_and_answer(
    server: str, proxy: Proxy, direct: AsyncEngine, table: str, make: LockerMaker
) -> None:
    """The INSERT commits but its answer is lost: BackendError, and the tick stays taken.

    The trap matches the job name rather than ``INSERT``: asyncpg sends the SQL text
    only when it first prepares a statement, and the values with every execution.
    """
    a = make(proxy.route(server), worker="a")
    b = make(server, worker="b")
    assert await a.lock("warm-up", _tick()) is not None
    job, tick = _job(), _tick()
    sprung = proxy.cut_after(job.encode())

    with pytest.raises(BackendError) as info:
        await a.lock(job, tick)

    assert sprung.is_set()
    assert info.value.hint == DROPPED
    # The server processed the INSERT before its answer was dropped: one RUNNING row,
    # which no one runs (a does not know it won) and no one else can take.
    assert await _statuses(direct, table, job) == [("a", "RUNNING")]
    assert await b.lock(job, tick) is None
    assert await a.lock(job, tick) is None
    # The next tick is decided normally, by whoever asks first.
    assert await a.lock(job, _tick(1)) is not None
    assert await _statuses(direct, table, job) == [("a", "RUNNING"), ("a", "RUNNING")]
    assert _checked_out(a) == 0


async def test_a_driver_timeout_inside_a_call_is_its_error_not_a_cancellation(
    server: str, proxy: Proxy, table: str, make: LockerMaker
) -> None:
    """The driver's own timeout on connecting, shorter than the locker's: lock() fails
    with it, as a BackendError. (asyncpg bounds its connect with asyncio.timeout, and
    asyncmy its reads with wait_for, which from Python 3.12 is the same: either
    cancels the task it runs in, and a lock() runs in its caller's task.)"""
    locker = make(proxy.route(server), worker="a", timeout=5.0)
    # asyncmy's connect_timeout covers only the TCP connect, which the proxy accepts.
    driver_timeout = "timeout" if server.startswith("postgresql") else "read_timeout"

    @event.listens_for(locker.engine.sync_engine, "do_connect")
    def impatient(dialect: Any, record: Any, cargs: Any, cparams: dict[str, Any]) -> None:
        cparams[driver_timeout] = 0.3

    proxy.stall(True)  # connections are accepted, then nothing ever answers
    started = time.monotonic()
    with pytest.raises(BackendError):
        await locker.lock("impatient", _tick())
    assert time.monotonic() - started < 0.3 + SLACK, "failed at the locker's timeout instead"
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0
    proxy.stall(False)
    assert await locker.lock("impatient", _tick()) is not None


# -- the database stalls ------------------------------------------------------------------------


@pytest.mark.parametrize("when", ["before the INSERT", "after the INSERT"])
async def test_stall_longer_than_the_timeout(
    server: str, proxy: Proxy, direct: AsyncEngine, table: str, make: LockerMaker, when: str
) -> None:
    a = make(proxy.route(server), worker="a")
    b = make(server, worker="b")
    assert await a.lock("warm-up", _tick()) is not None
    job, tick = _job(), _tick()
    if when == "before the INSERT":
        proxy.stall(True)
    else:
        sprung = proxy.stall_after(job.encode())

    started = time.monotonic()
    with pytest.raises(BackendError) as info:
        await a.lock(job, tick)
    elapsed = time.monotonic() - started
    assert f"no answer within {TIMEOUT:g} s" in str(info.value)
    assert _checked_out(a) == 0

    # Still stalled: a's server session is there, and holds no transaction or lock.
    sessions = await _sessions(direct, proxy.upstream_ports())
    assert sessions, "the stalled session should still exist on the server"
    assert [s for s in sessions if s.in_transaction or s.locks] == []

    if when == "before the INSERT":
        assert await _statuses(direct, table, job) == []
        # Nobody won this tick yet: the next instance to ask does.
        assert await b.lock(job, tick) is not None
    else:
        assert sprung.is_set()
        assert await _statuses(direct, table, job) == [("a", "RUNNING")]
        assert await b.lock(job, tick) is None
    # Another instance decides the next tick while a's connection is stalled.
    assert await b.lock(job, _tick(1)) is not None

    proxy.stall(False)
    assert await a.lock(job, _tick(2)) is not None
    assert _checked_out(a) == 0
    assert elapsed < TIMEOUT + SLACK, f"lock() took {elapsed:.2f} s with timeout={TIMEOUT:g}"


async def test_aclose_during_a_stall_returns_promptly(
    server: str, proxy: Proxy, table: str, make: LockerMaker
) -> None:
    """Shutting down while the database stalls must not hang the service's exit."""
    a = make(proxy.route(server), worker="a")
    assert await a.lock("warm-up", _tick()) is not None
    assert _idle(a) == 1
    proxy.stall(True)

    started = time.monotonic()
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(TIMEOUT + 2 * SLACK):
            await a.aclose()
    elapsed = time.monotonic() - started

    assert a.closed
    assert elapsed < TIMEOUT + SLACK, f"aclose() took {elapsed:.2f} s (gave up waiting)"


# -- the background cleaner through an outage --------------------------------------------------


async def test_cleaner_survives_an_outage(
    server: str,
    proxy: Proxy,
    direct: AsyncEngine,
    table: str,
    make: LockerMaker,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    caplog.set_level(logging.WARNING)
    b = make(server, worker="b")
    old = [await b.lock(f"old-{i}", _tick()) for i in range(3)]
    assert all(old)
    a = make(proxy.route(server), worker="a", clean_interval=0.3, ttl=timedelta(seconds=1))
    pruned = asyncio.Event()
    clean = a.clean

    async def watched_clean() -> int:
        deleted = await clean()
        if deleted:
            pruned.set()
        return deleted

    monkeypatch.setattr(a, "clean", watched_clean)

    def cleaner() -> asyncio.Task[Any]:
        (task,) = [t for t in asyncio.all_tasks() if t.get_name() == "aiocronlock cleaner a"]
        return task

    with watch_log("aiocronlock.cleaner") as cleaner_log:
        async with a:
            proxy.refuse(True)
            proxy.cut()
            outage_started = time.monotonic()
            async with asyncio.timeout(10):
                await cleaner_log.wait_for(3)  # three intervals failed, each logged
            # A second of outage: the old rows are older than ttl, but nobody could prune.
            await asyncio.sleep(max(0.0, 1.0 - (time.monotonic() - outage_started)))
            assert not pruned.is_set()
            assert {f"old-{i}" for i in range(3)} <= {
                r["job_name"] for r in await fetch_rows(direct, table)
            }
            assert not cleaner().done()

            proxy.refuse(False)
            async with asyncio.timeout(10):
                await pruned.wait()
            assert not cleaner().done()

    rows = await fetch_rows(direct, table)
    assert [r["job_name"] for r in rows if r["job_name"].startswith("old-")] == []
    # The cleaner's own tick that pruned them was recorded as finished.
    assert [r["id"] for r in rows if r["worker"] == "a" and r["status"] == "RUNNING"] == []
    failures = [r for r in cleaner_log.records if r.levelno == logging.WARNING]
    assert len(failures) >= 3
    assert all("pruning for the tick at" in r.getMessage() for r in failures)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    assert _checked_out(a) == 0


# -- a worker killed mid-job ---------------------------------------------------------------------


async def test_worker_killed_mid_job(
    server: str, direct: AsyncEngine, table: str, make: LockerMaker
) -> None:
    job, tick = _job(), _tick()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(WORKER_SCRIPT),
        server,
        table,
        "victim",
        job,
        tick.isoformat(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        async with asyncio.timeout(30):
            line = (await process.stdout.readline()).decode()
        assert line.startswith("started "), line
        process.send_signal(signal.SIGKILL)
        await process.wait()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == -signal.SIGKILL

    b = make(server, worker="b", ttl=timedelta(hours=1))
    # Nobody re-runs the tick: its row says RUNNING, by the dead worker.
    assert await b.lock(job, tick) is None
    assert await _statuses(direct, table, job) == [("victim", "RUNNING")]

    # Once the row is older than ttl, clean() removes it...
    locks = lock_table(MetaData(), name=table)
    async with direct.begin() as conn:
        await conn.execute(
            update(locks)
            .where(locks.c.job_name == job)
            .values(created_at=datetime.now(UTC) - timedelta(hours=2))
        )
    assert await b.clean() == 1
    assert await _statuses(direct, table, job) == []
    # ... and the next tick runs normally.
    lock = await b.lock(job, tick + timedelta(seconds=1))
    assert lock is not None
    async with lock:
        pass
    assert await _statuses(direct, table, job) == [("b", "FINISHED")]


# -- cancellation --------------------------------------------------------------------------------


@pytest.mark.parametrize("cancel_after", [0.05, 0.1, 0.3])
async def test_cancelled_lock_leaves_no_running_row(
    server: str,
    proxy: Proxy,
    direct: AsyncEngine,
    table: str,
    make: LockerMaker,
    caplog: pytest.LogCaptureFixture,
    cancel_after: float,
) -> None:
    """Each chunk takes 0.2 s each way: cancelled before the INSERT arrives, or after."""
    caplog.set_level(logging.INFO, logger="aiocronlock")
    a = make(proxy.route(server), worker="a", timeout=3)
    warm = await a.lock("warm-up", _tick())
    assert warm is not None
    await warm.unlock()  # prepares the UPDATE too, on PostgreSQL
    job, tick = _job(), _tick()
    proxy.delay(0.2)

    await _cancel_after(a.lock(job, tick), cancel_after)

    assert _checked_out(a) == 0
    # The proxy delivers late but never drops: the INSERT won, and the row says FAILED.
    assert await _statuses(direct, table, job) == [("a", "FAILED")]
    assert any("was cancelled after winning" in r.getMessage() for r in caplog.records)
    proxy.delay(0)
    assert await a.lock(job, tick) is None
    assert await a.lock(job, _tick(1)) is not None


async def test_lock_cancelled_while_stalled(
    server: str,
    proxy: Proxy,
    direct: AsyncEngine,
    table: str,
    make: LockerMaker,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="aiocronlock")
    a = make(proxy.route(server), worker="a")
    assert await a.lock("warm-up", _tick()) is not None
    job, tick = _job(), _tick()
    proxy.stall(True)

    await _cancel_after(a.lock(job, tick), 0.3)

    assert _checked_out(a) == 0
    assert await _statuses(direct, table, job) == []
    assert any("was cancelled and its outcome" in r.getMessage() for r in caplog.records)
    proxy.stall(False)
    assert await a.lock(job, _tick(1)) is not None
    assert _checked_out(a) == 0


async def test_cancelled_job_body_ends_failed(
    server: str, proxy: Proxy, direct: AsyncEngine, table: str, make: LockerMaker
) -> None:
    a = make(proxy.route(server), worker="a", timeout=3)
    job = _job()
    lock = await a.lock(job, _tick())
    assert lock is not None
    started = asyncio.Event()

    async def run() -> None:
        async with lock:
            started.set()
            await asyncio.sleep(30)

    proxy.delay(0.2)  # the UPDATE to FAILED takes 0.4 s: the cancelled task waits for it
    task = asyncio.create_task(run())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    assert lock.released
    assert await _statuses(direct, table, job) == [("a", "FAILED")]
    assert _checked_out(a) == 0


async def test_cancelled_during_unlock_still_records_the_outcome(
    server: str, proxy: Proxy, direct: AsyncEngine, table: str, make: LockerMaker
) -> None:
    a = make(proxy.route(server), worker="a", timeout=3)
    job = _job()
    lock = await a.lock(job, _tick())
    assert lock is not None
    body_done = asyncio.Event()

    async def run() -> None:
        async with lock:
            body_done.set()

    proxy.delay(0.2)
    task = asyncio.create_task(run())
    await body_done.wait()
    await asyncio.sleep(0.1)  # the UPDATE to FINISHED is on its way
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    # The job did finish; the shielded update recorded it before the task ended.
    assert lock.released
    assert await _statuses(direct, table, job) == [("a", "FINISHED")]
    assert _checked_out(a) == 0


@pytest.mark.parametrize("cancel_after", [0.05, 0.3])
async def test_cancelled_lock_many_leaves_no_running_row(
    server: str,
    proxy: Proxy,
    direct: AsyncEngine,
    table: str,
    make: LockerMaker,
    caplog: pytest.LogCaptureFixture,
    cancel_after: float,
) -> None:
    """As for lock(): the INSERT still lands, and every row it won says FAILED."""
    caplog.set_level(logging.INFO, logger="aiocronlock")
    a = make(proxy.route(server), worker="a", timeout=3)
    warm = await a.lock_many(["warm-up"], _tick())
    await warm["warm-up"].unlock()  # prepares the UPDATE too, on PostgreSQL
    jobs, tick = [_job(), _job(), _job()], _tick()
    proxy.delay(0.2)

    await _cancel_after(a.lock_many(jobs, tick), cancel_after)

    assert _checked_out(a) == 0
    for job in jobs:
        assert await _statuses(direct, table, job) == [("a", "FAILED")]
    assert (
        sum("lock_many() was cancelled after winning" in r.getMessage() for r in caplog.records)
        == 3
    )
    proxy.delay(0)
    assert await a.lock_many(jobs, tick) == {}
