"""The command line, run as a user runs it: ``python -m aiocronlock ...`` in a subprocess."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import MetaData, inspect, update
from sqlalchemy.ext.asyncio import create_async_engine

from aiocronlock import AsyncDBLocker, lock_table
from conftest import server_url

PASSWORD = "s3cret-Hunter2"


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "AIOCRONLOCK_URL"}
    # Wide enough that rich does not fold the history table's cells.
    env.update(COLUMNS="200", NO_COLOR="1")
    env.update(extra)
    return env


def cli(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "aiocronlock", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=_env() if env is None else env,
        timeout=timeout,
        check=False,
    )


def _one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The single line of a clean failure: exit status 2, no traceback."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("aiocronlock: error: ")
    return lines[0]


def _failed_cleanly(result: subprocess.CompletedProcess[str]) -> str:
    """Exit status 2, no traceback, and the error as the last line; returns that line."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines, result.stderr
    assert all(line.startswith("aiocronlock: ") for line in lines), result.stderr
    assert lines[-1].startswith("aiocronlock: error: ")
    return lines[-1]


def _sqlite(tmp_path: Path, name: str = "x.db") -> str:
    return f"sqlite:///{tmp_path / name}"


async def _record_runs(url: str, table: str = "cron_job_locks") -> list[str]:
    """Win, finish and fail a few ticks in-process; return their identifiers."""
    async with AsyncDBLocker(url, worker="w-1", table_name=table, clean_interval=None) as locker:
        identifiers = []
        base = datetime.now(UTC).replace(microsecond=0)
        for i, (job, failed) in enumerate(
            [("nightly-report", False), ("nightly-report", True), ("cleanup", False)]
        ):
            lock = await locker.lock(job, base - timedelta(seconds=i))
            assert lock is not None
            await lock.unlock(failed=failed)
            identifiers.append(lock.identifier)
        return identifiers


async def _age_rows(url: str, identifiers: list[str], by: timedelta) -> None:
    """Move rows' creation time into the past, as if they were written long ago."""
    engine = create_async_engine(url.replace("sqlite://", "sqlite+aiosqlite://", 1))
    table = lock_table(MetaData())
    try:
        async with engine.begin() as conn:
            await conn.execute(
                update(table)
                .where(table.c.job_identifier.in_(identifiers))
                .values(created_at=datetime.now(UTC) - by)
            )
    finally:
        await engine.dispose()


async def _drop(url: str, table: str) -> None:
    engine = create_async_engine(url)
    try:
        async with engine.begin() as conn:
            # The lock table and its leases table, as lock_table() defines them.
            tables = lock_table(MetaData(), name=table).metadata
            await conn.run_sync(lambda sync: tables.drop_all(sync, checkfirst=True))
    finally:
        await engine.dispose()


async def _has_table(url: str, table: str) -> bool:
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            return bool(await conn.run_sync(lambda sync: inspect(sync).has_table(table)))
    finally:
        await engine.dispose()


# -- init, history, prune ----------------------------------------------------------------------


def test_init_then_history_shows_the_runs(tmp_path: Path) -> None:
    url = _sqlite(tmp_path)

    init = cli("--url", url, "init")
    assert init.returncode == 0, init.stderr
    assert "cron_job_locks" in init.stdout
    assert "ready" in init.stdout

    empty = cli("history", "--url", url)  # options also work after the command
    assert empty.returncode == 0, empty.stderr
    assert "no runs recorded yet" in empty.stdout

    identifiers = asyncio.run(_record_runs(url))
    shown = cli("--url", url, "history")
    assert shown.returncode == 0, shown.stderr
    assert shown.stderr == ""
    for column in ("id", "job", "tick", "worker", "status", "started", "took"):
        assert column in shown.stdout
    for identifier in identifiers:
        assert identifier in shown.stdout
    assert "nightly-report" in shown.stdout
    assert "cleanup" in shown.stdout
    assert "w-1" in shown.stdout
    assert shown.stdout.count("FINISHED") == 2
    assert shown.stdout.count("FAILED") == 1
    assert "no runs recorded yet" not in shown.stdout

    only = cli("--url", url, "history", "--job", "cleanup")
    assert only.returncode == 0, only.stderr
    assert identifiers[2] in only.stdout
    assert "nightly-report" not in only.stdout

    latest = cli("--url", url, "history", "--limit", "1")
    assert latest.returncode == 0, latest.stderr
    assert identifiers[2] in latest.stdout  # newest first
    assert identifiers[0] not in latest.stdout


def test_prune_deletes_only_runs_older_than_ttl(tmp_path: Path) -> None:
    url = _sqlite(tmp_path)
    assert cli("--url", url, "init").returncode == 0
    identifiers = asyncio.run(_record_runs(url))
    old, fresh = identifiers[:2], identifiers[2]
    asyncio.run(_age_rows(url, old, by=timedelta(hours=2)))

    pruned = cli("--url", url, "prune", "--ttl", "1h")
    assert pruned.returncode == 0, pruned.stderr
    assert "deleted 2 run(s)" in pruned.stdout

    left = cli("--url", url, "history")
    assert fresh in left.stdout
    assert all(identifier not in left.stdout for identifier in old)

    asyncio.run(_age_rows(url, [fresh], by=timedelta(minutes=1)))
    everything = cli("--url", url, "prune", "--ttl", "1s")
    assert everything.returncode == 0, everything.stderr
    assert "deleted 1 run(s)" in everything.stdout
    assert "no runs recorded yet" in cli("--url", url, "history").stdout


@pytest.mark.parametrize("command", [[], ["demo"], ["init"], ["history"], ["prune"]])
def test_help_for_every_command_exits_zero(command: list[str], tmp_path: Path) -> None:
    result = cli(*command, "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: aiocronlock")
    assert "--url" in result.stdout
    assert list(tmp_path.iterdir()) == []  # --help touches no database


def test_aiocronlock_url_is_honoured_and_url_overrides_it(tmp_path: Path) -> None:
    from_env = tmp_path / "from-env.db"
    env = _env(AIOCRONLOCK_URL=f"sqlite:///{from_env}")

    init = cli("init", cwd=tmp_path, env=env)
    assert init.returncode == 0, init.stderr
    assert str(from_env) in init.stdout
    assert asyncio.run(_has_table(f"sqlite+aiosqlite:///{from_env}", "cron_job_locks"))
    assert not (tmp_path / "aiocronlock.db").exists()  # the default was not used

    given = tmp_path / "given.db"
    explicit = cli("--url", f"sqlite:///{given}", "init", cwd=tmp_path, env=env)
    assert explicit.returncode == 0, explicit.stderr
    assert str(given) in explicit.stdout
    assert asyncio.run(_has_table(f"sqlite+aiosqlite:///{given}", "cron_job_locks"))


# -- errors: one line, exit status 2 ---------------------------------------------------------------


def test_history_on_a_missing_table_says_to_run_init(tmp_path: Path) -> None:
    line = _one_error_line(cli("--url", _sqlite(tmp_path, "empty.db"), "history"))
    assert "cron_job_locks" in line
    assert "aiocronlock init" in line
    assert "create_table" in line


@pytest.mark.parametrize(
    "url",
    [
        pytest.param("nonsense://x", id="unknown-database"),
        pytest.param("not a url at all", id="garbage"),
        pytest.param("mysql+nosuchdriver://x/y", id="unknown-driver"),
    ],
)
def test_an_unusable_url_is_one_line(url: str, tmp_path: Path) -> None:
    line = _one_error_line(cli("--url", url, "history", cwd=tmp_path))
    assert "engine" in line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "url",
    [
        pytest.param(f"postgresql://bob:{PASSWORD}@127.0.0.1:1/db", id="postgresql"),
        pytest.param(f"mysql://bob:{PASSWORD}@127.0.0.1:1/db", id="mysql"),
        pytest.param(f"postgresql://bob:{PASSWORD}@127.0.0.1:notaport/db", id="malformed"),
    ],
)
@pytest.mark.parametrize("command", ["init", "history"])
def test_the_password_never_appears(url: str, command: str) -> None:
    result = cli("--url", url, command)
    line = _failed_cleanly(result)
    assert PASSWORD not in result.stdout
    assert PASSWORD not in result.stderr
    assert "127.0.0.1" in line  # it still says where it tried


def test_wrong_password_on_a_real_server_is_not_echoed() -> None:
    url = server_url("mysql").replace("root@", f"root:{PASSWORD}@").replace("+asyncmy", "")
    result = cli("--url", url, "history")
    _failed_cleanly(result)
    assert PASSWORD not in result.stdout + result.stderr


# -- against PostgreSQL ---------------------------------------------------------------------------


def test_init_and_history_on_postgresql() -> None:
    url = server_url("postgresql")
    table = f"cli_{uuid.uuid4().hex[:12]}"
    try:
        init = cli("--url", url, "--table", table, "init")
        assert init.returncode == 0, init.stderr
        assert table in init.stdout
        assert asyncio.run(_has_table(url, table))

        identifiers = asyncio.run(_record_runs(url, table))
        shown = cli("--url", url, "history", "--table", table)
        assert shown.returncode == 0, shown.stderr
        assert all(identifier in shown.stdout for identifier in identifiers)
        assert table in shown.stdout
    finally:
        asyncio.run(_drop(url, table))


# -- demo ----------------------------------------------------------------------------------------


def _demo_summary(*args: str) -> dict[str, Any]:
    result = cli(
        "demo", "--workers", "3", "--jobs", "2", "--duration", "5s", "--json", *args, timeout=90
    )
    assert result.returncode == 0, (result.stdout, result.stderr)
    summary: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return summary


def _assert_exactly_once(summary: dict[str, Any]) -> None:
    assert (summary["workers"], summary["jobs"], summary["ticks"]) == (3, 2, 5)
    assert summary["duplicates"] == 0
    assert summary["misses"] == 0
    assert summary["runs"] == summary["expected_runs"] == summary["ticks"] * summary["jobs"]
    assert summary["finished_rows"] == summary["runs"]
    assert sum(summary["wins"].values()) == summary["runs"]
    assert set(summary["wins"]) == {"worker-1", "worker-2", "worker-3"}


@pytest.mark.slow
def test_demo_json_summary_shows_every_tick_ran_once() -> None:
    _assert_exactly_once(_demo_summary())


@pytest.mark.slow
def test_demo_prints_a_readable_summary(tmp_path: Path) -> None:
    result = cli(
        "demo", "--workers", "3", "--jobs", "2", "--duration", "5s", cwd=tmp_path, timeout=90
    )
    assert result.returncode == 0, (result.stdout, result.stderr)
    assert "duplicates" in result.stdout
    assert "every tick ran exactly once" in result.stdout
    assert list(tmp_path.iterdir()) == []  # the demo's SQLite file was temporary


@pytest.mark.slow
def test_demo_on_postgresql() -> None:
    url = server_url("postgresql")
    table = f"demo_{uuid.uuid4().hex[:12]}"
    try:
        _assert_exactly_once(_demo_summary("--url", url, "--table", table))
    finally:
        asyncio.run(_drop(url, table))
