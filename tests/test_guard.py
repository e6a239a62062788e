"""``@locked``: the function runs only on the instance that wins the tick."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from aiocronlock import (
    AsyncDBLocker,
    BackendError,
    Lock,
    TableMissingError,
    current_lock,
    locked,
    precision,
)
from conftest import Backend, LockerFactory, fetch_rows


def _tick(seconds_ago: int = 0) -> datetime:
    return datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=seconds_ago)


def _summary(rows: list[Any]) -> list[tuple[str, str, str, str]]:
    return [(r["job_name"], r["job_identifier"], r["worker"], r["status"]) for r in rows]


# -- who runs ------------------------------------------------------------------------------------


async def test_only_the_winning_instance_runs_the_function(
    backend: Backend, engine: AsyncEngine, make_locker: LockerFactory
) -> None:
    a = await make_locker(own_engine=True, worker="a")
    b = await make_locker(own_engine=True, worker="b")
    tick = _tick()
    ran: list[str] = []

    def instance(worker: str, locker: AsyncDBLocker) -> Callable[[], Awaitable[str | None]]:
        @locked(locker, "report", scheduled_time=lambda: tick)
        async def report() -> str:
            ran.append(worker)
            await asyncio.sleep(0.05)
            return f"report by {worker}"

        return report

    results = await asyncio.gather(instance("a", a)(), instance("b", b)())

    assert len(ran) == 1
    winner = ran[0]
    assert sorted(results, key=lambda r: r is None) == [f"report by {winner}", None]
    assert _summary(await fetch_rows(engine, backend.table_name)) == [
        ("report", precision()("report", tick), winner, "FINISHED")
    ]


async def test_the_result_and_arguments_pass_through(
    backend: Backend, engine: AsyncEngine, make_locker: LockerFactory
) -> None:
    locker = await make_locker(worker="a")
    payload = {"rows": [1, 2, 3]}

    @locked(locker, "echo", scheduled_time=_tick)
    async def echo(value: dict[str, list[int]], *, suffix: str) -> tuple[dict[str, list[int]], str]:
        return value, suffix

    result = await echo(payload, suffix="!")

    assert result is not None
    assert result[0] is payload
    assert result[1] == "!"
    assert echo.__name__ == "echo"  # functools.wraps
    assert [r["status"] for r in await fetch_rows(engine, backend.table_name)] == ["FINISHED"]


async def test_a_second_call_for_the_same_tick_returns_none(
    backend: Backend, engine: AsyncEngine, make_locker: LockerFactory
) -> None:
    locker = await make_locker(worker="a")
    tick = _tick()
    calls: list[datetime] = []

    @locked(locker, "once", scheduled_time=lambda: tick)
    async def once() -> int:
        calls.append(tick)
        return 7

    assert await once() == 7
    assert await once() is None
    assert calls == [tick]
    assert len(await fetch_rows(engine, backend.table_name)) == 1


async def test_the_function_s_exception_propagates_and_the_row_is_failed(
    backend: Backend, engine: AsyncEngine, make_locker: LockerFactory
) -> None:
    locker = await make_locker(worker="a")

    @locked(locker, "broken", scheduled_time=_tick)
    async def broken() -> None:
        raise KeyError("missing")

    with pytest.raises(KeyError, match="missing"):
        await broken()
    assert [r["status"] for r in await fetch_rows(engine, backend.table_name)] == ["FAILED"]


async def test_the_default_name_is_module_and_qualified_name(
    backend: Backend, engine: AsyncEngine, make_locker: LockerFactory
) -> None:
    locker = await make_locker(worker="a")

    @locked(locker, scheduled_time=_tick)
    async def unnamed() -> None:
        pass

    await unnamed()
    rows = await fetch_rows(engine, backend.table_name)
    assert [r["job_name"] for r in rows] == [f"{__name__}.{unnamed.__qualname__}"]


# -- which tick --------------------------------------------------------------------------------


async def test_the_scheduled_time_callable_names_the_tick(
    backend: Backend, engine: AsyncEngine, make_locker: LockerFactory
) -> None:
    locker = await make_locker(worker="a")
    tick = _tick(seconds_ago=600).replace(microsecond=250000)
    seen: list[datetime] = []

    @locked(locker, "given", scheduled_time=lambda: tick)
    async def given() -> None:
        seen.append(current_lock().run_time)

    await given()

    assert seen == [tick]
    rows = await fetch_rows(engine, backend.table_name)
    assert [r["job_identifier"] for r in rows] == [precision()("given", tick)]


def test_precision_nearest_rounds_to_the_closest_step() -> None:
    second = precision()
    base = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
    assert second.nearest(base + timedelta(milliseconds=400)) == base
    assert second.nearest(base + timedelta(milliseconds=600)) == base + timedelta(seconds=1)
    assert second.nearest(base - timedelta(milliseconds=300)) == base
    assert second.nearest(base + timedelta(milliseconds=500)) == base + timedelta(seconds=1)
    assert second.nearest(base) == base
    # Two instances firing a little early and a little late name the same tick.
    early = base - timedelta(milliseconds=120)
    late = base + timedelta(milliseconds=180)
    assert second.nearest(early) == second.nearest(late) == base

    minute = precision(timedelta(minutes=1))
    assert minute.nearest(base + timedelta(seconds=29)) == base
    assert minute.nearest(base - timedelta(seconds=29)) == base
    assert minute.nearest(base + timedelta(seconds=31)) == base + timedelta(minutes=1)


@pytest.mark.parametrize("use_callable", [False, True], ids=["no-callable", "callable-None"])
async def test_without_a_scheduled_time_now_is_rounded_to_the_nearest_step(
    backend: Backend, engine: AsyncEngine, make_locker: LockerFactory, use_callable: bool
) -> None:
    locker = await make_locker(worker="a")
    seen: list[datetime] = []

    async def job() -> None:
        seen.append(current_lock().run_time)

    guarded = (
        locked(locker, "fallback", scheduled_time=lambda: None)(job)
        if use_callable
        else locked(locker, "fallback")(job)
    )
    before = datetime.now(UTC)
    await guarded()
    after = datetime.now(UTC)

    candidates = {precision().nearest(before), precision().nearest(after)}
    assert len(seen) == 1
    assert seen[0] in candidates
    assert seen[0].microsecond == 0
    rows = await fetch_rows(engine, backend.table_name)
    assert [r["job_identifier"] for r in rows] == [precision()("fallback", seen[0])]


# -- errors and context --------------------------------------------------------------------------


async def test_backend_error_propagates_and_the_function_does_not_run(
    backend: Backend, engine: AsyncEngine, make_locker: LockerFactory
) -> None:
    locker = await make_locker(worker="a", create=False)
    ran: list[bool] = []

    @locked(locker, "no-table", scheduled_time=_tick)
    async def job() -> None:
        ran.append(True)

    with pytest.raises(BackendError) as info:
        await job()
    assert isinstance(info.value, TableMissingError)
    assert ran == []

    await locker.create_table()
    assert await fetch_rows(engine, backend.table_name) == []
    await job()
    assert ran == [True]


async def test_current_lock_inside_and_outside(
    backend: Backend, engine: AsyncEngine, make_locker: LockerFactory
) -> None:
    locker = await make_locker(worker="w-1")
    tick = _tick()
    inside: list[Lock] = []

    @locked(locker, "ctx", scheduled_time=lambda: tick)
    async def job() -> None:
        inside.append(current_lock())

    with pytest.raises(LookupError, match="only available inside"):
        current_lock()
    await job()
    with pytest.raises(LookupError):
        current_lock()

    assert len(inside) == 1
    lock = inside[0]
    assert (lock.job_name, lock.worker, lock.run_time) == ("ctx", "w-1", tick)
    assert lock.released
    rows = await fetch_rows(engine, backend.table_name)
    assert [(r["id"], r["status"]) for r in rows] == [(lock.id, "FINISHED")]


async def test_bad_arguments_are_rejected_when_decorating(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="locker"):
        locked("sqlite:///x.db", "job")  # type: ignore[arg-type]
    locker = AsyncDBLocker(f"sqlite:///{tmp_path / 'x.db'}", clean_interval=None)
    try:
        with pytest.raises(ValueError, match="name"):
            locked(locker, "  ")
        with pytest.raises(TypeError, match="scheduled_time"):
            locked(locker, "job", scheduled_time=_tick())  # type: ignore[arg-type]
    finally:
        await locker.aclose()
