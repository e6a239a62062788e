"""Several processes, each with its own locker, race for the same ticks: one wins each."""

from __future__ import annotations

import asyncio
import json
import sys
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from aiocronlock import precision
from conftest import Backend, fetch_rows

WORKER_SCRIPT = Path(__file__).with_name("_race_worker.py")
PROCESSES = 3
TICKS = 30


async def _start(backend: Backend, worker: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        str(WORKER_SCRIPT),
        backend.url,
        backend.table_name,
        worker,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def _expect_ready(process: asyncio.subprocess.Process) -> None:
    assert process.stdout is not None
    line = await process.stdout.readline()
    if line.strip() != b"ready":
        _, stderr = await process.communicate()
        pytest.fail(f"worker did not start: {line!r}\n{stderr.decode(errors='replace')}")


@pytest.mark.slow
async def test_processes_win_each_tick_exactly_once(backend: Backend, engine: AsyncEngine) -> None:
    base = datetime.now(UTC).replace(microsecond=0)
    run_times = [base - timedelta(seconds=i) for i in range(TICKS)]
    expected = {precision()("race", t) for t in run_times}
    assert len(expected) == TICKS
    workers = [f"proc-{i}" for i in range(PROCESSES)]

    processes = [await _start(backend, worker) for worker in workers]
    try:
        async with asyncio.timeout(60):
            # Everyone has created the table and connected before anyone races.
            await asyncio.gather(*(_expect_ready(p) for p in processes))
            go = (json.dumps([t.isoformat() for t in run_times]) + "\n").encode()
            outputs = await asyncio.gather(*(p.communicate(go) for p in processes))
    finally:
        for process in processes:
            if process.returncode is None:
                process.kill()
                await process.wait()

    won: dict[str, list[str]] = {}
    for worker, process, (stdout, stderr) in zip(workers, processes, outputs, strict=True):
        errors = stderr.decode(errors="replace")
        assert process.returncode == 0, errors
        assert "database is locked" not in errors
        won[worker] = json.loads(stdout.decode().strip().splitlines()[-1])

    wins = Counter(identifier for identifiers in won.values() for identifier in identifiers)
    assert set(wins) == expected
    assert set(wins.values()) == {1}

    rows = await fetch_rows(engine, backend.table_name)
    assert len(rows) == TICKS
    assert {r["job_identifier"] for r in rows} == expected
    assert {r["status"] for r in rows} == {"FINISHED"}
    assert {(r["worker"], r["job_identifier"]) for r in rows} == {
        (worker, identifier) for worker, identifiers in won.items() for identifier in identifiers
    }
