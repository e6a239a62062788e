"""Exactly-once under contention, short form: ``harness.contention`` on every backend.

Each test runs the harness as a subprocess, the way ``harness/README.md`` runs the
long form, and checks its figures. The last test breaks the library inside the
racing processes to show that the harness notices.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import MetaData
from sqlalchemy.ext.asyncio import create_async_engine

from aiocronlock import lock_table
from conftest import Backend

ROOT = Path(__file__).resolve().parent.parent
TICKS = 200
#: (processes, lockers, jobs) per backend: a few seconds each on two cores.
SHAPES = {"postgresql": (4, 8, 1), "mysql": (4, 8, 1), "sqlite": (3, 2, 1)}


def run_harness(
    url: str,
    table: str,
    *,
    processes: int,
    lockers: int,
    jobs: int,
    env: dict[str, str] | None = None,
) -> tuple[int, dict[str, Any]]:
    """The harness's exit status and its JSON figures."""
    command = [
        sys.executable,
        "-m",
        "harness.contention",
        *("--url", url, "--table", table),
        *("--processes", str(processes), "--lockers", str(lockers)),
        *("--jobs", str(jobs), "--ticks", str(TICKS)),
        "--json",
    ]
    result = subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=90, env=env, check=False
    )
    try:
        figures: dict[str, Any] = json.loads(result.stdout)
    except ValueError:
        pytest.fail(f"no JSON from the harness (exit {result.returncode}):\n{result.stderr}")
    return result.returncode, figures


async def _drop_tables(url: str, name: str) -> None:
    metadata = MetaData()
    lock_table(metadata, name=name)
    engine = create_async_engine(url)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(metadata.drop_all, checkfirst=True)
    finally:
        await engine.dispose()


@pytest.fixture
def table(backend: Backend) -> Iterator[str]:
    """The test's table name; its tables are dropped afterwards, even when the harness kept them."""
    yield backend.table_name
    if not backend.is_sqlite:
        asyncio.run(_drop_tables(backend.url, backend.table_name))


@pytest.mark.slow
def test_every_tick_is_won_exactly_once(backend: Backend, table: str) -> None:
    processes, lockers, jobs = SHAPES[backend.dialect]

    status, figures = run_harness(
        backend.url, table, processes=processes, lockers=lockers, jobs=jobs
    )

    print({k: figures[k] for k in ("decisions", "wall_seconds", "decisions_per_second")})
    assert status == 0, figures["problems"]
    calls = processes * lockers * jobs * TICKS
    assert (figures["attempts"], figures["decisions"]) == (calls, calls)
    assert figures["wins"] == jobs * TICKS
    assert (figures["duplicates"], figures["missing"]) == (0, 0)
    assert figures["rows"] == jobs * TICKS
    assert figures["duplicate_rows"] == figures["missing_rows"] == figures["extra_rows"] == 0
    assert figures["not_finished"] == 0
    assert (figures["worker_mismatches"], figures["id_mismatches"]) == (0, 0)
    assert figures["backend_errors"] == 0
    assert figures["errors"] == {}
    assert figures["process_failures"] == []
    assert figures["stderr"] == []  # not even a logged warning
    assert figures["problems"] == []


# Loaded by every process of the harness through PYTHONPATH: p0-l0 claims the even
# ticks it lost, p1-l0 keeps quiet about the odd ticks it wins (and leaves them
# RUNNING), p2-l0's first call fails.
SABOTAGE = """
from aiocronlock import AsyncDBLocker, BackendError, Lock

real_lock = AsyncDBLocker.lock
calls = {}


async def lock(self, job_name, run_time=None):
    calls[self.worker] = calls.get(self.worker, 0) + 1
    if self.worker == "p2-l0" and calls[self.worker] == 1:
        raise BackendError("lock()", "sabotaged")
    won = await real_lock(self, job_name, run_time)
    odd = run_time.microsecond // 10_000 % 2
    if self.worker == "p0-l0" and won is None and not odd:
        identifier = self.identifier(job_name, run_time)
        return Lock(self.store, self.events, id=-1, job_name=job_name, identifier=identifier,
                    worker=self.worker, run_time=run_time)
    if self.worker.startswith("p1-") and odd:  # both of p1's lockers: wins come in bursts
        return None
    return won


AsyncDBLocker.lock = lock
"""


@pytest.mark.slow
def test_the_harness_fails_when_the_library_misbehaves(tmp_path: Path) -> None:
    (tmp_path / "sitecustomize.py").write_text(SABOTAGE)
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    url = f"sqlite+aiosqlite:///{tmp_path / 'locks.db'}"

    status, figures = run_harness(url, "sabotaged", processes=3, lockers=2, jobs=1, env=env)

    assert status == 1
    assert figures["ok"] is False
    assert figures["duplicates"] > 0
    assert figures["missing"] > 0
    assert figures["not_finished"] > 0
    assert figures["worker_mismatches"] > 0
    assert figures["backend_errors"] == 1
    assert figures["errors"] == {"lock: BackendError: sabotaged": 1}
    assert figures["table_kept"] is True
