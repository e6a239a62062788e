"""Run several instances of quickstart.py on one database and check that each tick ran once.

Prerequisites: ``pip install 'aiocronlock[sqlite]'`` (``[postgres]`` or ``[mysql]`` for
a server). Run::

    python examples/many_instances.py                           # 3 instances, 10 seconds
    python examples/many_instances.py --instances 5 --seconds 30

It starts the instances as separate processes, echoes their output prefixed with
``[<instance>]``, and when they have stopped reads the lock table. Then it prints one
line per tick, ``tick=<ISO UTC> worker=<name> instance=<n> status=<status>``, and a
verdict: ``ok: ...`` (exit status 0) when every tick from the first to the last ran
exactly once, ``FAILED: ...`` (exit status 1) otherwise. Ctrl-C stops the instances early.

Environment: ``AIOCRONLOCK_URL`` (default ``sqlite:///aiocronlock-example.db``),
``AIOCRONLOCK_TABLE`` (default ``cron_job_locks``), ``AIOCRONLOCK_WORKER`` (instance
``n`` is then named ``<value>-<n>``; by default each has the library's default name,
``<hostname>:<pid>``), ``AIOCRONLOCK_EXAMPLE_SECONDS`` (the default for ``--seconds``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import sys
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from aiocronlock import AsyncDBLocker, JobRun, Status

QUICKSTART = Path(__file__).with_name("quickstart.py")
JOB_NAME = "unique_name"  # quickstart.py's job, which runs every second
INTERVAL = timedelta(seconds=1)
RAN = re.compile(r"ran (?P<job>\S+) tick=(?P<tick>\S+) worker=(?P<worker>.+)")


@dataclass(frozen=True)
class Run:
    """A run as an instance printed it."""

    tick: datetime
    worker: str
    instance: int


@dataclass
class Instances:
    """The instances started so far, and whether they were asked to stop early."""

    seconds: float
    processes: list[asyncio.subprocess.Process] = field(default_factory=list)
    stopping: bool = False

    def stop(self) -> None:
        self.stopping = True
        for process in self.processes:
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)


async def run_instance(instance: int, instances: Instances) -> tuple[list[Run], int]:
    """Run quickstart.py, echoing its output; return the runs it printed and its exit status."""
    env = dict(os.environ, AIOCRONLOCK_EXAMPLE_SECONDS=str(instances.seconds), PYTHONUNBUFFERED="1")
    if "AIOCRONLOCK_WORKER" in os.environ:
        env["AIOCRONLOCK_WORKER"] = f"{os.environ['AIOCRONLOCK_WORKER']}-{instance}"
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(QUICKSTART), env=env, stdout=asyncio.subprocess.PIPE
    )
    instances.processes.append(process)
    if instances.stopping:  # Ctrl-C came while this instance was starting
        process.send_signal(signal.SIGTERM)
    assert process.stdout is not None
    runs = []
    async for raw in process.stdout:
        line = raw.decode().rstrip("\n")
        print(f"[{instance}] {line}")
        if (match := RAN.fullmatch(line)) and match["job"] == JOB_NAME:
            runs.append(Run(datetime.fromisoformat(match["tick"]), match["worker"], instance))
    status = await process.wait()
    # An instance stopped before it had set up its signal handlers dies of the signal.
    return runs, 0 if instances.stopping and status == -signal.SIGTERM else status


async def recorded_runs(since: datetime) -> list[JobRun]:
    """The rows of quickstart's job for ticks at or after ``since``, oldest first."""
    locker = AsyncDBLocker(
        os.environ.get("AIOCRONLOCK_URL", "sqlite:///aiocronlock-example.db"),
        table_name=os.environ.get("AIOCRONLOCK_TABLE", "cron_job_locks"),
        clean_interval=None,
    )
    elapsed = datetime.now(UTC) - since
    try:  # one row per tick: the newest ones are this run's
        rows = await locker.history(JOB_NAME, limit=elapsed // INTERVAL + 2)
    finally:
        await locker.aclose()
    return sorted((row for row in rows if tick_of(row) >= since), key=tick_of)


def tick_of(row: JobRun) -> datetime:
    return datetime.fromisoformat(row.identifier)  # e.g. "2025-01-01T10:11:12Z"


def verdict(rows: list[JobRun], printed: list[Run], statuses: list[int]) -> list[str]:
    """What went wrong, one item per kind of problem; empty when every tick ran once."""
    problems = [
        f"instance {n} exited with status {status}"
        for n, status in enumerate(statuses, start=1)
        if status != 0
    ]
    times_printed = Counter(run.tick for run in printed)
    if twice := sorted(tick for tick, count in times_printed.items() if count > 1):
        problems.append(f"{len(twice)} tick(s) ran more than once: {fmt(twice)}")
    recorded = {(tick_of(row), row.worker) for row in rows}
    if unrecorded := sorted(run.tick for run in printed if (run.tick, run.worker) not in recorded):
        problems.append(f"{len(unrecorded)} run(s) without their row: {fmt(unrecorded)}")
    if unfinished := [tick_of(row) for row in rows if row.status != Status.FINISHED]:
        problems.append(f"{len(unfinished)} row(s) not FINISHED: {fmt(unfinished)}")
    if rows:
        ticks = {tick_of(row) for row in rows}
        first, last = tick_of(rows[0]), tick_of(rows[-1])
        expected = (first + n * INTERVAL for n in range((last - first) // INTERVAL + 1))
        if gaps := [tick for tick in expected if tick not in ticks]:
            problems.append(f"{len(gaps)} tick(s) ran nowhere: {fmt(gaps)}")
    else:
        problems.append("no tick ran")
    return problems


def fmt(ticks: list[datetime]) -> str:
    shown = ", ".join(tick.isoformat() for tick in ticks[:5])
    return shown + (", ..." if len(ticks) > 5 else "")


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--instances", type=int, default=3, help="how many (default 3)")
    parser.add_argument(
        "--seconds",
        type=float,
        default=float(os.environ.get("AIOCRONLOCK_EXAMPLE_SECONDS", "10")),
        help="how long each instance runs (default 10)",
    )
    args = parser.parse_args()
    if args.instances < 1 or args.seconds <= 0:
        parser.error("--instances and --seconds must be positive")

    instances = Instances(args.seconds)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, instances.stop)

    since = datetime.now(UTC).replace(microsecond=0)
    outputs = await asyncio.gather(
        *(run_instance(n, instances) for n in range(1, args.instances + 1))
    )
    printed = [run for runs, _ in outputs for run in runs]
    rows = await recorded_runs(since)

    instance_of = {(run.tick, run.worker): run.instance for run in printed}
    for row in rows:
        instance = instance_of.get((tick_of(row), row.worker), "-")
        print(
            f"tick={tick_of(row).isoformat()} worker={row.worker} instance={instance} "
            f"status={row.status}"
        )
    if problems := verdict(rows, printed, [status for _, status in outputs]):
        print("FAILED: " + "; ".join(problems))
        return 1
    first, last = tick_of(rows[0]), tick_of(rows[-1])
    print(
        f"ok: {len(rows)} ticks from {first.isoformat()} to {last.isoformat()}, "
        f"each ran exactly once, by {args.instances} instances"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
