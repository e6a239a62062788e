"""Three processes running examples/quickstart.py on one database: each tick runs once.

This is the README's promise, checked on the README's own program: for 30 seconds,
three instances race for every tick. Afterwards the table holds exactly one FINISHED
row per tick with no tick missing between the first and the last, and the runs the
processes printed are those rows: none printed twice, none printed without its row.
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from itertools import pairwise
from pathlib import Path

import pytest
from sqlalchemy import MetaData
from sqlalchemy.ext.asyncio import create_async_engine

from aiocronlock import lock_table
from conftest import fetch_rows, server_url

QUICKSTART = Path(__file__).resolve().parent.parent / "examples" / "quickstart.py"
PROCESSES = 3
SECONDS = 30
JOB_NAME = "unique_name"
CLEANER_JOB = "aiocronlock.cleaner"
RAN = re.compile(r"ran (?P<job>\S+) tick=(?P<tick>\S+) worker=(?P<worker>.+)")


@dataclass(frozen=True)
class Finished:
    """A quickstart process after it stopped."""

    worker: str
    status: int
    stdout: str
    stderr: str

    def runs(self) -> list[tuple[datetime, str]]:
        """(tick, worker) of each run it printed."""
        matches = (RAN.fullmatch(line) for line in self.stdout.splitlines())
        return [
            (datetime.fromisoformat(m["tick"]), m["worker"])
            for m in matches
            if m and m["job"] == JOB_NAME
        ]


async def run_quickstarts(url: str, table: str) -> list[Finished]:
    """Run PROCESSES quickstarts on ``url`` for SECONDS seconds, all started at once."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("AIOCRONLOCK_")}
    env.update(
        AIOCRONLOCK_URL=url,
        AIOCRONLOCK_TABLE=table,
        AIOCRONLOCK_EXAMPLE_SECONDS=str(SECONDS),
        PYTHONUNBUFFERED="1",
    )
    workers = [f"proc-{n}" for n in range(1, PROCESSES + 1)]
    processes = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            str(QUICKSTART),
            env=dict(env, AIOCRONLOCK_WORKER=worker),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        for worker in workers
    ]
    try:
        async with asyncio.timeout(SECONDS + 30):
            outputs = await asyncio.gather(*(p.communicate() for p in processes))
    finally:
        for process in processes:
            if process.returncode is None:
                process.kill()
                await process.communicate()
    return [
        Finished(worker, process.returncode or 0, out.decode(), err.decode(errors="replace"))
        for worker, process, (out, err) in zip(workers, processes, outputs, strict=True)
    ]


async def check_each_tick_ran_once(finished: list[Finished], url: str, table: str) -> None:
    """What the processes printed and what ``url``'s table holds agree: each tick ran once."""
    for process in finished:
        assert process.status == 0, f"{process.worker}: {process.stderr}"
        assert "Traceback" not in process.stderr, f"{process.worker}: {process.stderr}"
        assert {worker for _, worker in process.runs()} <= {process.worker}
    printed = [run for process in finished for run in process.runs()]
    twice = sorted(tick for tick, count in Counter(t for t, _ in printed).items() if count > 1)
    assert not twice, f"ticks printed by more than one process: {twice}"

    engine = create_async_engine(url)
    try:
        rows = await fetch_rows(engine, table)
    finally:
        await engine.dispose()
    assert {row["job_name"] for row in rows} <= {JOB_NAME, CLEANER_JOB}
    rows = [row for row in rows if row["job_name"] == JOB_NAME]
    assert {row["status"] for row in rows} == {"FINISHED"}
    ticks = sorted(datetime.fromisoformat(row["job_identifier"]) for row in rows)
    assert len(set(ticks)) == len(ticks)
    gaps = [(a, b) for a, b in pairwise(ticks) if b - a != timedelta(seconds=1)]
    assert not gaps, f"ticks missing between: {gaps}"
    # The processes start within a second or so of one another and each runs SECONDS.
    assert len(ticks) >= SECONDS - 2, ticks
    recorded = {(datetime.fromisoformat(row["job_identifier"]), row["worker"]) for row in rows}
    assert set(printed) == recorded
    wins = Counter(worker for _, worker in printed)
    print(f"ticks won per process: {dict(sorted(wins.items()))}")


@pytest.fixture
async def postgres_table() -> AsyncIterator[tuple[str, str]]:
    """A PostgreSQL URL and a table name of the test's own, dropped afterwards."""
    url = server_url("postgresql")
    table = f"quickstart_{uuid.uuid4().hex[:12]}"
    yield url, table
    engine = create_async_engine(url)
    try:
        async with engine.begin() as conn:
            tables = lock_table(MetaData(), name=table).metadata  # with its leases table
            await conn.run_sync(lambda sync: tables.drop_all(sync, checkfirst=True))
    finally:
        await engine.dispose()


@pytest.mark.slow
async def test_three_quickstarts_on_postgresql(postgres_table: tuple[str, str]) -> None:
    url, table = postgres_table
    finished = await run_quickstarts(url, table)
    await check_each_tick_ran_once(finished, url, table)


@pytest.mark.slow
async def test_three_quickstarts_on_one_sqlite_file(tmp_path: Path) -> None:
    database = tmp_path / "locks.db"
    # The processes get the URL without a driver, as a user would write it.
    finished = await run_quickstarts(f"sqlite:///{database}", "cron_job_locks")
    await check_each_tick_ran_once(finished, f"sqlite+aiosqlite:///{database}", "cron_job_locks")
