"""Bad input raises ``ValueError``/``TypeError`` naming the parameter, before any SQL runs."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from datetime import UTC, date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from aiocronlock import AsyncDBLocker, precision
from conftest import Backend, LockerFactory, StatementCounter, fetch_rows

NOW = object()  # stands for "a valid run time", computed when the test runs
PLUS_5 = timezone(timedelta(hours=5))
MINUS_5 = timezone(timedelta(hours=-5))


def _now() -> datetime:
    return datetime.now(UTC)


# -- lock() -------------------------------------------------------------------------------

BAD_LOCK_ARGUMENTS = [
    pytest.param("", NOW, ValueError, "job_name", id="empty-name"),
    pytest.param(" ", NOW, ValueError, "job_name", id="space-name"),
    pytest.param(" \t\n ", NOW, ValueError, "job_name", id="whitespace-name"),
    pytest.param("x" * 256, NOW, ValueError, "job_name", id="256-char-name"),
    pytest.param(42, NOW, TypeError, "job_name", id="int-name"),
    pytest.param(None, NOW, TypeError, "job_name", id="none-name"),
    pytest.param(b"job", NOW, TypeError, "job_name", id="bytes-name"),
    pytest.param("job-\udc80", NOW, ValueError, "job_name", id="lone-surrogate-name"),
    pytest.param("job\x00name", NOW, ValueError, "job_name", id="nul-in-name"),
    pytest.param("\x00", NOW, ValueError, "job_name", id="nul-name"),
    pytest.param("job", datetime(2025, 1, 1, 10, 0), ValueError, "run_time", id="naive"),
    pytest.param("job", "2025-01-01T10:00:00Z", TypeError, "run_time", id="str-run-time"),
    pytest.param("job", 1735725600, TypeError, "run_time", id="int-run-time"),
    pytest.param("job", 1735725600.0, TypeError, "run_time", id="float-run-time"),
    pytest.param("job", date(2025, 1, 1), TypeError, "run_time", id="date-run-time"),
    # Aware, but their UTC time falls outside what a datetime can hold.
    pytest.param("job", datetime(1, 1, 1, tzinfo=PLUS_5), ValueError, "run_time", id="utc-year-0"),
    pytest.param(
        "job", datetime(9999, 12, 31, 23, tzinfo=MINUS_5), ValueError, "run_time", id="utc-year-10k"
    ),
]


@pytest.mark.parametrize("step", [timedelta(days=7), timedelta(seconds=420)], ids=str)
async def test_a_run_time_whose_step_starts_before_year_1_raises_before_sql(
    backend: Backend,
    engine: AsyncEngine,
    make_locker: LockerFactory,
    count_statements: StatementCounter,
    step: timedelta,
) -> None:
    """In range itself, but its tick's step (counted from the Unix epoch) starts in
    year 0: the same named error as other bad run times, not an OverflowError."""
    locker = await make_locker(identifier=precision(step))
    count_statements.statements.clear()

    with pytest.raises(ValueError, match="run_time 0001-01-01T00:00:00"):
        await locker.lock("job", datetime(1, 1, 1, tzinfo=UTC))

    assert len(count_statements) == 0
    assert await fetch_rows(engine, backend.table_name) == []


@pytest.mark.parametrize(("job_name", "run_time", "error", "parameter"), BAD_LOCK_ARGUMENTS)
async def test_bad_lock_arguments_raise_before_sql(
    backend: Backend,
    engine: AsyncEngine,
    make_locker: LockerFactory,
    count_statements: StatementCounter,
    job_name: Any,
    run_time: Any,
    error: type[Exception],
    parameter: str,
) -> None:
    locker = await make_locker()
    count_statements.statements.clear()

    with pytest.raises(error) as info:
        await locker.lock(job_name, _now() if run_time is NOW else run_time)

    assert parameter in str(info.value)
    assert len(count_statements) == 0
    assert await fetch_rows(engine, backend.table_name) == []


@pytest.mark.parametrize(
    ("names", "run_time", "parameter"),
    [
        pytest.param(["ok", "bad\x00"], NOW, "job_names item", id="nul-in-a-name"),
        pytest.param(["a", "b"], datetime(1, 1, 1, tzinfo=PLUS_5), "run_time", id="utc-year-0"),
        pytest.param(
            ["a"], datetime(9999, 12, 31, 23, tzinfo=MINUS_5), "run_time", id="utc-year-10k"
        ),
    ],
)
async def test_bad_lock_many_arguments_raise_before_sql(
    backend: Backend,
    engine: AsyncEngine,
    make_locker: LockerFactory,
    count_statements: StatementCounter,
    names: list[str],
    run_time: Any,
    parameter: str,
) -> None:
    locker = await make_locker()
    count_statements.statements.clear()

    with pytest.raises(ValueError) as info:
        await locker.lock_many(names, _now() if run_time is NOW else run_time)

    assert parameter in str(info.value)
    assert len(count_statements) == 0
    assert await fetch_rows(engine, backend.table_name) == []


async def test_longest_names_are_accepted(
    backend: Backend, engine: AsyncEngine, make_locker: LockerFactory
) -> None:
    locker = await make_locker(worker="w" * 255)
    lock = await locker.lock("j" * 255, _now())
    assert lock is not None
    rows = await fetch_rows(engine, backend.table_name)
    assert [(r["job_name"], r["worker"]) for r in rows] == [("j" * 255, "w" * 255)]


# -- identifier strategies -------------------------------------------------------------------


class StrategyBroke(Exception):
    pass


def _raising(job_name: str, run_time: datetime) -> str:
    raise StrategyBroke(job_name)


def _returning(value: Any) -> Callable[[str, datetime], Any]:
    def strategy(job_name: str, run_time: datetime) -> Any:
        return value

    return strategy


BAD_STRATEGIES = [
    pytest.param(_returning(None), TypeError, id="none"),
    pytest.param(_returning(""), ValueError, id="empty"),
    pytest.param(_returning("   "), ValueError, id="blank"),
    pytest.param(_returning(42), TypeError, id="int"),
    pytest.param(_returning(b"tick"), TypeError, id="bytes"),
    pytest.param(_returning("x" * 256), ValueError, id="256-chars"),
    pytest.param(_returning("x" * 10_000), ValueError, id="10kB"),
    pytest.param(_returning("tick-\udc80"), ValueError, id="lone-surrogate"),
    pytest.param(_returning("tick\x00"), ValueError, id="nul"),
]


@pytest.mark.parametrize(("strategy", "error"), BAD_STRATEGIES)
async def test_bad_identifier_results_raise_before_sql(
    backend: Backend,
    engine: AsyncEngine,
    make_locker: LockerFactory,
    count_statements: StatementCounter,
    strategy: Callable[[str, datetime], Any],
    error: type[Exception],
) -> None:
    locker = await make_locker(identifier=strategy)
    count_statements.statements.clear()

    with pytest.raises(error) as info:
        await locker.lock("job", _now())

    assert "identifier" in str(info.value)
    assert len(count_statements) == 0
    assert await fetch_rows(engine, backend.table_name) == []


async def test_a_raising_strategy_propagates_its_own_exception(
    backend: Backend,
    engine: AsyncEngine,
    make_locker: LockerFactory,
    count_statements: StatementCounter,
) -> None:
    locker = await make_locker(identifier=_raising)
    count_statements.statements.clear()

    with pytest.raises(StrategyBroke, match="my-job"):
        await locker.lock("my-job", _now())

    assert len(count_statements) == 0
    assert await fetch_rows(engine, backend.table_name) == []


async def test_a_255_char_identifier_is_accepted(
    backend: Backend, engine: AsyncEngine, make_locker: LockerFactory
) -> None:
    locker = await make_locker(identifier=_returning("i" * 255))
    assert await locker.lock("job", _now()) is not None
    rows = await fetch_rows(engine, backend.table_name)
    assert [r["job_identifier"] for r in rows] == ["i" * 255]


# -- the constructor ---------------------------------------------------------------------------


@pytest.fixture
async def sqlite_engine(tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    """An engine for constructor tests, which never touch the database."""
    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'unused.db'}")
    yield engine
    await engine.dispose()


BAD_CONSTRUCTOR_ARGUMENTS = [
    # ttl
    pytest.param({"ttl": 0}, ValueError, "ttl", id="ttl-zero"),
    pytest.param({"ttl": 0.0}, ValueError, "ttl", id="ttl-zero-float"),
    pytest.param({"ttl": timedelta(0)}, ValueError, "ttl", id="ttl-zero-timedelta"),
    pytest.param({"ttl": -1}, ValueError, "ttl", id="ttl-negative"),
    pytest.param({"ttl": timedelta(seconds=-5)}, ValueError, "ttl", id="ttl-negative-td"),
    pytest.param({"ttl": float("nan")}, ValueError, "ttl", id="ttl-nan"),
    pytest.param({"ttl": float("inf")}, ValueError, "ttl", id="ttl-inf"),
    pytest.param({"ttl": "1d"}, TypeError, "ttl", id="ttl-str"),
    pytest.param({"ttl": True}, TypeError, "ttl", id="ttl-bool"),
    pytest.param({"ttl": None}, TypeError, "ttl", id="ttl-none"),
    # clean_interval
    pytest.param({"clean_interval": 0}, ValueError, "clean_interval", id="interval-zero"),
    pytest.param(
        {"clean_interval": timedelta(0)}, ValueError, "clean_interval", id="interval-zero-td"
    ),
    pytest.param({"clean_interval": -0.5}, ValueError, "clean_interval", id="interval-negative"),
    pytest.param({"clean_interval": "5m"}, TypeError, "clean_interval", id="interval-str"),
    pytest.param({"clean_interval": True}, TypeError, "clean_interval", id="interval-bool"),
    pytest.param({"clean_interval": False}, TypeError, "clean_interval", id="interval-false"),
    # timeout
    pytest.param({"timeout": 0}, ValueError, "timeout", id="timeout-zero"),
    pytest.param({"timeout": -1.0}, ValueError, "timeout", id="timeout-negative"),
    pytest.param({"timeout": "5"}, TypeError, "timeout", id="timeout-str"),
    pytest.param({"timeout": True}, TypeError, "timeout", id="timeout-bool"),
    pytest.param({"timeout": None}, TypeError, "timeout", id="timeout-none"),
    # worker
    pytest.param({"worker": ""}, ValueError, "worker", id="worker-empty"),
    pytest.param({"worker": "  "}, ValueError, "worker", id="worker-blank"),
    pytest.param({"worker": "w" * 256}, ValueError, "worker", id="worker-256"),
    pytest.param({"worker": 7}, TypeError, "worker", id="worker-int"),
    pytest.param({"worker": "w\ud800"}, ValueError, "worker", id="worker-lone-surrogate"),
    pytest.param({"worker": "pod\x00a"}, ValueError, "worker", id="worker-nul"),
    # table_name
    pytest.param({"table_name": "bad-name"}, ValueError, "table_name", id="table-dash"),
    pytest.param({"table_name": "1abc"}, ValueError, "table_name", id="table-digit"),
    pytest.param({"table_name": "x; DROP TABLE y"}, ValueError, "table_name", id="table-injection"),
    pytest.param({"table_name": "a" * 49}, ValueError, "table_name", id="table-49-chars"),
    pytest.param({"table_name": ""}, ValueError, "table_name", id="table-empty"),
    pytest.param({"table_name": "locks "}, ValueError, "table_name", id="table-space"),
    pytest.param({"table_name": "tâble"}, ValueError, "table_name", id="table-non-ascii"),
    pytest.param({"table_name": "a.b"}, ValueError, "table_name", id="table-dotted"),
    pytest.param({"table_name": 5}, TypeError, "table_name", id="table-int"),
    # schema
    pytest.param({"schema": "bad-name"}, ValueError, "schema", id="schema-dash"),
    pytest.param({"schema": "1abc"}, ValueError, "schema", id="schema-digit"),
    pytest.param({"schema": "x; DROP SCHEMA y"}, ValueError, "schema", id="schema-injection"),
    pytest.param({"schema": ""}, ValueError, "schema", id="schema-empty"),
    pytest.param({"schema": "s" * 64}, ValueError, "schema", id="schema-64-chars"),
    pytest.param({"schema": 5}, TypeError, "schema", id="schema-int"),
    # clean_batch_size
    pytest.param({"clean_batch_size": 0}, ValueError, "clean_batch_size", id="batch-zero"),
    pytest.param({"clean_batch_size": -3}, ValueError, "clean_batch_size", id="batch-negative"),
    pytest.param({"clean_batch_size": 2.5}, TypeError, "clean_batch_size", id="batch-float"),
    pytest.param({"clean_batch_size": True}, TypeError, "clean_batch_size", id="batch-bool"),
    # identifier
    pytest.param({"identifier": "precision"}, TypeError, "identifier", id="identifier-str"),
    pytest.param({"identifier": 1}, TypeError, "identifier", id="identifier-int"),
    # engine
    pytest.param({"engine": 42}, TypeError, "engine", id="engine-int"),
    pytest.param({"engine": None}, TypeError, "engine", id="engine-none"),
    pytest.param({"engine": object()}, TypeError, "engine", id="engine-object"),
    pytest.param({"engine": b"sqlite://"}, TypeError, "engine", id="engine-bytes"),
]


@pytest.mark.parametrize(("kwargs", "error", "parameter"), BAD_CONSTRUCTOR_ARGUMENTS)
def test_bad_constructor_arguments(
    sqlite_engine: AsyncEngine, kwargs: dict[str, Any], error: type[Exception], parameter: str
) -> None:
    arguments: dict[str, Any] = {"engine": sqlite_engine, **kwargs}
    engine = arguments.pop("engine")
    with pytest.raises(error) as info:
        AsyncDBLocker(engine, **arguments)
    assert parameter in str(info.value)


def test_sync_engine_is_refused(sqlite_engine: AsyncEngine) -> None:
    with pytest.raises(TypeError, match="engine"):
        AsyncDBLocker(sqlite_engine.sync_engine)  # type: ignore[arg-type]


async def test_durations_are_normalised(sqlite_engine: AsyncEngine) -> None:
    locker = AsyncDBLocker(sqlite_engine, ttl=3600, clean_interval=0.25, timeout=2)
    assert locker.ttl == timedelta(hours=1)
    assert locker.clean_interval == timedelta(milliseconds=250)
    assert locker.timeout == 2.0
    await locker.aclose()


async def test_clean_interval_none_means_no_cleaner(sqlite_engine: AsyncEngine) -> None:
    locker = AsyncDBLocker(sqlite_engine, worker="no-cleaner", clean_interval=None)
    assert locker.clean_interval is None
    async with locker:
        names = {task.get_name() for task in asyncio.all_tasks()}
        assert not any("cleaner" in name for name in names)


async def test_defaults(sqlite_engine: AsyncEngine) -> None:
    locker = AsyncDBLocker(sqlite_engine)
    assert locker.ttl == timedelta(days=1)
    assert locker.clean_interval == timedelta(minutes=5)
    assert locker.timeout == 5.0
    assert locker.clean_batch_size == 2000
    assert locker.table.name == "cron_job_locks"
    assert locker.table.schema is None
    assert locker.identifier("job", datetime(2025, 1, 1, 10, 11, 12, 345000, tzinfo=UTC)) == (
        "2025-01-01T10:11:12Z"
    )
    await locker.aclose()
