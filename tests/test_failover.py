"""A real PostgreSQL failover under three workers: each tick still runs once.

A primary and a streaming standby (asynchronous, then synchronous) are started from
the installed binaries (see ``_pg_cluster``). Three worker processes
(``_failover_worker.py``) run a job every second on a URL naming both servers with
``target_session_attrs=read-write``. Right after a tick, while its run is going, the
primary is killed (``pg_ctl stop -m immediate``); 0.3 s later the standby is
promoted. The failover runs once per replication mode; the tests below read what it
left: the workers' output, their logs and the new primary's table.
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import signal
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from _pg_cluster import Cluster, free_port, why_unusable
from aiocronlock import AsyncDBLocker, BackendError, JobRun, Status
from conftest import IN_CI

WORKER = Path(__file__).with_name("_failover_worker.py")
JOB_NAME = "failover"
TABLE = "cron_job_locks"
WORKERS = ("w1", "w2", "w3")
INTERVAL = timedelta(seconds=1)
#: Ticks run before the kill, so that every worker is under way.
WARM_UP_TICKS = 3
#: Between the kill and the promotion, as a failover manager would take.
PROMOTE_AFTER_S = 0.3
#: How long the workers keep running once the standby is promoted.
AFTER_PROMOTION_S = 6.0
#: Every wait here is bounded by this.
WAIT_S = 20.0
#: A tick this close to the SIGTERM may not have started anywhere (the acquire of a
#: tick takes milliseconds here; half a second is far more).
STOP_MARGIN = timedelta(seconds=0.5)

RAN = re.compile(r"ran tick=(?P<tick>\S+)")
LOST = re.compile(r"lost tick=(?P<tick>\S+)")


@dataclass
class Worker:
    name: str
    process: asyncio.subprocess.Process
    #: (when read, line) of everything printed on stdout.
    lines: list[tuple[float, str]] = field(default_factory=list)
    stderr: str = ""
    status: int | None = None

    def ticks(self, pattern: re.Pattern[str]) -> list[datetime]:
        return [
            datetime.fromisoformat(m["tick"])
            for _, line in self.lines
            if (m := pattern.fullmatch(line))
        ]

    @property
    def runs(self) -> list[datetime]:
        return self.ticks(RAN)

    @property
    def losses(self) -> list[datetime]:
        return self.ticks(LOST)


@dataclass(repr=False)
class Failover:
    """What one failover left behind."""

    synchronous: bool
    password: str
    workers: list[Worker]
    #: The tick whose run was going when the primary was killed.
    killed_during: datetime
    promoted_at: datetime
    stopped_at: datetime
    #: The new primary's rows of the job.
    rows: list[JobRun]
    #: What lock() raised on URLs that cannot reach a primary, before the kill.
    probe_errors: dict[str, str]
    server_logs: str

    def __repr__(self) -> str:  # pytest shows it on a failure: no password, no logs
        return f"<Failover {self.figures()}>"

    def hide(self, text: str) -> str:
        """``text`` fit to show in a failure message."""
        return text.replace(self.password, "***")

    @property
    def expected(self) -> list[datetime]:
        """The ticks that must each have run exactly once: every one scheduled once the
        standby's promotion returned, until shortly before the workers were stopped."""
        first = _ceil_tick(self.promoted_at)
        last = self.stopped_at - STOP_MARGIN
        return [first + n * INTERVAL for n in range(int((last - first) / INTERVAL) + 1)]

    def figures(self) -> str:
        runs = Counter(tick for worker in self.workers for tick in worker.runs)
        expected = self.expected
        return (
            f"{'synchronous' if self.synchronous else 'asynchronous'} replication: "
            f"{len(expected)} ticks expected after the promotion, "
            f"{sum(1 for t in expected if runs[t])} run, "
            f"{sum(1 for n in runs.values() if n > 1)} duplicate(s), "
            f"{sum(1 for t in expected if not runs[t])} missed; "
            f"{len(runs)} runs in all"
        )


def _ceil_tick(moment: datetime) -> datetime:
    floor = moment.replace(microsecond=0)
    return floor if floor == moment else floor + INTERVAL


def _url(password: str, *ports: int, read_write: bool = True) -> str:
    hosts = "&".join(f"host=127.0.0.1:{port}" for port in ports)
    attrs = "&target_session_attrs=read-write" if read_write else ""
    return f"postgresql://postgres:{password}@/test?{hosts}{attrs}"


async def _lock_error(url: str) -> str:
    """The message of the BackendError that lock() raises on ``url``."""
    locker = AsyncDBLocker(url, table_name=TABLE, clean_interval=None, timeout=5)
    try:
        with pytest.raises(BackendError) as info:
            await locker.lock("probe")
        return str(info.value)
    finally:
        await locker.aclose()


async def _read(worker: Worker, printed: asyncio.Condition) -> None:
    stdout = worker.process.stdout
    assert stdout is not None
    async for raw in stdout:
        worker.lines.append((time.monotonic(), raw.decode(errors="replace").rstrip("\n")))
        async with printed:
            printed.notify_all()


async def _wait_for(
    workers: list[Worker], printed: asyncio.Condition, pattern: re.Pattern[str], count: int
) -> None:
    """Wait until ``count`` lines matching ``pattern`` have been printed in all."""

    def enough() -> bool:
        return sum(1 for w in workers for _, line in w.lines if pattern.fullmatch(line)) >= count

    async with asyncio.timeout(WAIT_S), printed:
        await printed.wait_for(enough)


async def _failover(cluster: Cluster, password: str) -> Failover:
    url = _url(password, cluster.primary.port, cluster.standby.port)
    async with AsyncDBLocker(url, table_name=TABLE, clean_interval=None) as setup:
        await setup.create_table()
    await asyncio.sleep(0.2)  # the table reaches the standby
    probe_errors = {
        "standby only": await _lock_error(_url(password, cluster.standby.port, read_write=False)),
        "nothing listening": await _lock_error(_url(password, free_port(), free_port())),
        "dead host, then standby": await _lock_error(
            _url(password, free_port(), cluster.standby.port)
        ),
    }

    env = {key: value for key, value in os.environ.items() if not key.startswith("AIOCRONLOCK_")}
    env.update(AIOCRONLOCK_URL=url, AIOCRONLOCK_TABLE=TABLE, PYTHONUNBUFFERED="1")
    workers = [
        Worker(
            name,
            await asyncio.create_subprocess_exec(
                sys.executable,
                str(WORKER),
                env=dict(env, AIOCRONLOCK_WORKER=name),
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            ),
        )
        for name in WORKERS
    ]
    printed = asyncio.Condition()
    readers = [asyncio.create_task(_read(worker, printed)) for worker in workers]
    try:
        await _wait_for(workers, printed, re.compile("ready"), len(workers))
        ran = re.compile(RAN.pattern)
        started = sum(1 for w in workers for _, line in w.lines if ran.fullmatch(line))
        await _wait_for(workers, printed, ran, started + WARM_UP_TICKS)
        # Right after the next tick starts, while its run (0.5 s) is going.
        await _wait_for(workers, printed, ran, started + WARM_UP_TICKS + 1)
        await cluster.kill_primary()
        killed_during = max(tick for worker in workers for tick in worker.runs)
        await asyncio.sleep(PROMOTE_AFTER_S)
        await cluster.promote_standby()
        promoted_at = datetime.now(UTC)
        await asyncio.sleep(AFTER_PROMOTION_S)
        stopped_at = datetime.now(UTC)
        for worker in workers:
            worker.process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(WAIT_S):
            for worker in workers:
                assert worker.process.stderr is not None
                worker.stderr = (await worker.process.stderr.read()).decode(errors="replace")
                worker.status = await worker.process.wait()
            await asyncio.gather(*readers)
    finally:
        for worker in workers:
            if worker.process.returncode is None:
                worker.process.kill()
                await worker.process.wait()
        for reader in readers:
            reader.cancel()
        await asyncio.gather(*readers, return_exceptions=True)

    new_primary = AsyncDBLocker(
        _url(password, cluster.standby.port), table_name=TABLE, clean_interval=None
    )
    try:
        rows = await new_primary.history(JOB_NAME, limit=1000)
    finally:
        await new_primary.aclose()
    return Failover(
        synchronous=cluster.synchronous,
        password=password,
        workers=workers,
        killed_during=killed_during,
        promoted_at=promoted_at,
        stopped_at=stopped_at,
        rows=rows,
        probe_errors=probe_errors,
        server_logs=cluster.logs(),
    )


@pytest.fixture(scope="module", params=[False, True], ids=["async", "sync"])
def failover(request: pytest.FixtureRequest) -> Iterator[Failover]:
    if reason := why_unusable():
        if IN_CI:
            pytest.fail(f"{reason} (CI=true: the failover test must run)")
        pytest.skip(reason)
    # A password the role really has, so that a leak of it would show.
    password = f"pw-{secrets.token_hex(12)}"
    cluster = Cluster.create(synchronous=request.param, password=password)
    try:
        result = asyncio.run(_failover(cluster, password))
    finally:
        cluster.remove()
    print(f"\n{result.figures()}")
    yield result


def test_no_tick_runs_twice(failover: Failover) -> None:
    runs = Counter(tick for worker in failover.workers for tick in worker.runs)
    twice = sorted(tick for tick, count in runs.items() if count > 1)
    assert not twice, f"ticks run by more than one worker: {twice}; {failover.figures()}"
    rows = Counter(datetime.fromisoformat(row.identifier) for row in failover.rows)
    assert max(rows.values()) == 1


def test_no_tick_missed_once_the_standby_is_promoted(failover: Failover) -> None:
    runs = {tick for worker in failover.workers for tick in worker.runs}
    expected = failover.expected
    assert len(expected) >= AFTER_PROMOTION_S - 3, expected
    missed = [tick for tick in expected if tick not in runs]
    assert not missed, f"ticks that ran nowhere: {missed}; {failover.figures()}"
    # The new primary's table agrees with what the workers printed.
    recorded = {datetime.fromisoformat(row.identifier): row.worker for row in failover.rows}
    for worker in failover.workers:
        for tick in worker.runs:
            if tick >= failover.promoted_at:
                assert recorded.get(tick) == worker.name, tick


def test_every_worker_recovers_by_itself(failover: Failover) -> None:
    for worker in failover.workers:
        stderr = failover.hide(worker.stderr)
        assert worker.status == 0, f"{worker.name} exited with {worker.status}: {stderr}"
        after = [t for t in worker.runs + worker.losses if t > failover.promoted_at + INTERVAL]
        assert after, f"{worker.name} decided no tick after the promotion: {stderr}"


def test_no_row_left_running(failover: Failover) -> None:
    """Every row is FINISHED, that of the run the kill cut short too: when its run
    ends before the promotion, its outcome is recorded once the new primary is up."""
    statuses = {row.identifier: row.status for row in failover.rows}
    assert set(statuses.values()) == {Status.FINISHED}, statuses
    killed = [
        r for r in failover.rows if datetime.fromisoformat(r.identifier) == failover.killed_during
    ]
    if failover.synchronous:  # its INSERT had reached the standby when it returned
        assert len(killed) == 1


def test_outage_errors_say_what_happened(failover: Failover) -> None:
    probes = failover.probe_errors
    assert "the server is a standby (read-only)" in probes["standby only"]
    assert "target_session_attrs=read-write" in probes["standby only"]
    for name in ("nothing listening", "dead host, then standby"):
        hosts = re.findall(r"host=(127\.0\.0\.1%3A\d+)", probes[name])
        tried = ", ".join(host.replace("%3A", ":") for host in hosts)
        assert len(hosts) == 2, probes[name]
        assert f"no server among {tried} accepted a read-write connection" in probes[name]
        assert "check that the primary is up" in probes[name]
    # Whatever the workers met during the outage says what happened.
    hints = ("was dropped", "accepted a read-write connection", "is a standby")
    for worker in failover.workers:
        for line in worker.stderr.splitlines():
            if "BackendError" in line or "could not be decided" in line:
                assert any(hint in line for hint in hints), failover.hide(line)


def test_no_password_in_any_output(failover: Failover) -> None:
    outputs = {f"{w.name} stdout": "\n".join(line for _, line in w.lines) for w in failover.workers}
    outputs |= {f"{w.name} stderr": w.stderr for w in failover.workers}
    outputs |= {f"probe {name!r}": text for name, text in failover.probe_errors.items()}
    outputs["server logs"] = failover.server_logs
    leaked = [name for name, text in outputs.items() if failover.password in text]
    assert not leaked, f"the password appears in: {leaked}"
