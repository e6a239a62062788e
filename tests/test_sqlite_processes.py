"""One SQLite file shared by several processes under write load.

Four processes, each with its own locker built from the same URL, create the table
at the same moment, then race for the same 200 ticks while their unlocks run
concurrently with their next inserts. SQLite allows one writer at a time: the
locker must wait for the lock (WAL and a busy timeout) rather than surface
"database is locked", and every tick must still be decided exactly once.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import sys
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from aiocronlock import _engine, precision
from conftest import fetch_rows

WORKER_SCRIPT = Path(__file__).with_name("_fault_sqlite_worker.py")
PROCESSES = 4
TICKS = 200
TABLE = "cron_job_locks"


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path / 'shared.db'}"


@pytest.fixture
async def engine(url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_async_engine(url)
    try:
        yield engine
        assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    finally:
        await engine.dispose()


async def _start(url: str, worker: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        str(WORKER_SCRIPT),
        url,
        TABLE,
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
async def test_processes_share_one_sqlite_file_under_write_load(
    url: str, engine: AsyncEngine
) -> None:
    base = datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=TICKS)
    run_times = [base + timedelta(seconds=i) for i in range(TICKS)]
    expected = {precision()("load", t) for t in run_times}
    assert len(expected) == TICKS
    workers = [f"proc-{i}" for i in range(PROCESSES)]

    # No table yet: all of them create it (and switch the file to WAL) at once.
    processes = [await _start(url, worker) for worker in workers]
    try:
        async with asyncio.timeout(90):
            await asyncio.gather(*(_expect_ready(p) for p in processes))
            go = (json.dumps([t.isoformat() for t in run_times]) + "\n").encode()
            outputs = await asyncio.gather(*(p.communicate(go) for p in processes))
    finally:
        for process in processes:
            if process.returncode is None:
                process.kill()
                await process.wait()

    results: dict[str, Any] = {}
    for worker, process, (stdout, stderr) in zip(workers, processes, outputs, strict=True):
        errors = stderr.decode(errors="replace")
        assert process.returncode == 0, errors
        assert "database is locked" not in errors
        results[worker] = json.loads(stdout.decode().strip().splitlines()[-1])

    backend_errors = {w: r["errors"] for w, r in results.items() if r["errors"]}
    assert backend_errors == {}
    wins = Counter(i for r in results.values() for i in r["won"])
    assert set(wins) == expected
    assert set(wins.values()) == {1}

    rows = await fetch_rows(engine, TABLE)
    assert len(rows) == TICKS
    assert {r["job_identifier"] for r in rows} == expected
    assert {r["status"] for r in rows} == {"FINISHED"}
    assert {(r["worker"], r["job_identifier"]) for r in rows} == {
        (worker, identifier) for worker, r in results.items() for identifier in r["won"]
    }


class _SwitchingFile:
    """A DB-API connection to a new SQLite file whose switch to WAL is refused
    ``refusals`` times (as errors or as the old mode), as SQLite does at once, without
    its busy timeout, while another process has begun writing to it."""

    class dbapi:  # the attribute SQLAlchemy's adapted connections have
        OperationalError = sqlite3.OperationalError

    def __init__(self, refusals: list[str]) -> None:
        self.refusals = refusals
        self.switches = 0

    def cursor(self) -> _SwitchingFile:
        return self

    def execute(self, sql: str) -> None:
        assert sql == "PRAGMA journal_mode=WAL"
        self.switches += 1
        if self.refusals and self.refusals[0] == "locked":
            self.refusals.pop(0)
            raise sqlite3.OperationalError("database is locked")

    def fetchone(self) -> tuple[str]:
        return (self.refusals.pop(0),) if self.refusals else ("wal",)

    def close(self) -> None:
        pass


@pytest.mark.parametrize("refusals", [["locked"], ["delete"], ["locked", "delete", "locked"]])
def test_a_new_file_refused_wal_at_first_is_switched_on_a_retry(refusals: list[str]) -> None:
    connection = _SwitchingFile(list(refusals))
    _engine._sqlite_on_connect(connection, None)
    assert connection.switches == len(refusals) + 1
    assert connection.refusals == []


def test_a_file_still_locked_after_every_retry_fails_to_connect() -> None:
    connection = _SwitchingFile(["locked"] * _engine._WAL_ATTEMPTS)
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        _engine._sqlite_on_connect(connection, None)
    assert connection.switches == _engine._WAL_ATTEMPTS


def test_an_in_memory_database_is_not_switched_again() -> None:
    connection = _SwitchingFile(["memory"])
    _engine._sqlite_on_connect(connection, None)
    assert connection.switches == 1
