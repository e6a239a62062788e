"""Identifier strategies: which string names the tick a run belongs to."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from aiocronlock import IdentifierStrategy, Precision, precision
from conftest import Backend, LockerFactory, fetch_rows

T = datetime(2025, 1, 1, 10, 11, 12, 345000, tzinfo=UTC)


@pytest.mark.parametrize(
    ("step", "expected"),
    [
        (timedelta(seconds=1), "2025-01-01T10:11:12Z"),
        (1, "2025-01-01T10:11:12Z"),
        (1.0, "2025-01-01T10:11:12Z"),
        (timedelta(seconds=10), "2025-01-01T10:11:10Z"),
        (timedelta(minutes=1), "2025-01-01T10:11:00Z"),
        (timedelta(minutes=5), "2025-01-01T10:10:00Z"),
        (300, "2025-01-01T10:10:00Z"),
        (timedelta(hours=1), "2025-01-01T10:00:00Z"),
        (timedelta(days=1), "2025-01-01T00:00:00Z"),
    ],
)
def test_precision_truncates_to_the_step(step: timedelta | float, expected: str) -> None:
    assert precision(step)("job", T) == expected


def test_precision_defaults_to_one_second() -> None:
    assert precision()("job", T) == "2025-01-01T10:11:12Z"
    assert precision().step == timedelta(seconds=1)


@pytest.mark.parametrize(
    ("step", "expected"),
    [
        (timedelta(milliseconds=1), "2025-01-01T10:11:12.345000Z"),
        (timedelta(milliseconds=100), "2025-01-01T10:11:12.300000Z"),
        (0.25, "2025-01-01T10:11:12.250000Z"),
        (timedelta(microseconds=1), "2025-01-01T10:11:12.345000Z"),
    ],
)
def test_sub_second_steps_keep_fractional_digits(step: timedelta | float, expected: str) -> None:
    assert precision(step)("job", T) == expected


def test_sub_second_step_on_a_whole_second() -> None:
    # 12.345 falls in the half second that starts at 12.0.
    assert precision(0.5)("job", T) == "2025-01-01T10:11:12Z"
    assert precision(0.5)("job", T + timedelta(milliseconds=200)) == "2025-01-01T10:11:12.500000Z"


def test_precision_distinguishes_neighbouring_steps() -> None:
    minute = precision(timedelta(minutes=1))
    assert minute("job", T) == minute("job", T.replace(second=59, microsecond=999999))
    assert minute("job", T) != minute("job", T.replace(minute=12, second=0, microsecond=0))


def test_precision_names_the_tick_in_utc_whatever_the_time_zone() -> None:
    in_tokyo = T.astimezone(timezone(timedelta(hours=9)))
    in_new_york = T.astimezone(timezone(timedelta(hours=-5)))
    assert precision()("job", in_tokyo) == "2025-01-01T10:11:12Z"
    assert precision()("job", in_new_york) == "2025-01-01T10:11:12Z"
    # Steps count from the Unix epoch in UTC, not from local midnight.
    assert precision(timedelta(days=1))("job", in_tokyo) == "2025-01-01T00:00:00Z"


def test_precision_does_not_depend_on_the_job_name() -> None:
    assert precision()("a", T) == precision()("b", T)


@pytest.mark.parametrize(
    ("step", "error"),
    [
        pytest.param(0, ValueError, id="zero"),
        pytest.param(0.0, ValueError, id="zero-float"),
        pytest.param(timedelta(0), ValueError, id="zero-timedelta"),
        pytest.param(-1, ValueError, id="negative"),
        pytest.param(timedelta(minutes=-5), ValueError, id="negative-timedelta"),
        pytest.param(1e-9, ValueError, id="below-a-microsecond"),
        pytest.param(float("nan"), ValueError, id="nan"),
        pytest.param("1s", TypeError, id="str"),
        pytest.param(True, TypeError, id="bool"),
        pytest.param(None, TypeError, id="none"),
    ],
)
def test_bad_precision_step(step: Any, error: type[Exception]) -> None:
    with pytest.raises(error, match="step"):
        precision(step)


def test_precision_is_an_identifier_strategy() -> None:
    assert isinstance(precision(), Precision)
    assert isinstance(precision(), IdentifierStrategy)


# -- strategies in a locker ----------------------------------------------------------------


def per_day(job_name: str, run_time: datetime) -> str:
    return run_time.date().isoformat()


async def test_custom_strategy_replaces_precision(
    backend: Backend, engine: AsyncEngine, make_locker: LockerFactory
) -> None:
    a = await make_locker(own_engine=True, worker="a", identifier=per_day, ttl=timedelta(days=7))
    b = await make_locker(own_engine=True, worker="b", identifier=per_day, ttl=timedelta(days=7))
    day = (datetime.now(UTC) - timedelta(days=3)).replace(hour=0, minute=0, second=0, microsecond=0)
    morning = day.replace(hour=8)
    evening = day.replace(hour=17, minute=30)
    next_day = day + timedelta(days=1, hours=8)

    won = await a.lock("daily", morning)
    same_day = await b.lock("daily", evening)
    tomorrow = await b.lock("daily", next_day)

    assert won is not None
    assert won.identifier == day.date().isoformat()
    assert same_day is None
    assert tomorrow is not None
    rows = await fetch_rows(engine, backend.table_name)
    assert [(r["job_identifier"], r["worker"]) for r in rows] == [
        (day.date().isoformat(), "a"),
        ((day + timedelta(days=1)).date().isoformat(), "b"),
    ]


async def test_strategy_receives_job_name_and_utc_run_time(make_locker: LockerFactory) -> None:
    calls: list[tuple[str, datetime]] = []

    def recording(job_name: str, run_time: datetime) -> str:
        calls.append((job_name, run_time))
        return "tick"

    locker = await make_locker(identifier=recording)
    instant = datetime.now(UTC).replace(microsecond=0)
    await locker.lock("recorded", instant.astimezone(timezone(timedelta(hours=-3))))

    assert calls == [("recorded", instant)]
    assert calls[0][1].utcoffset() == timedelta(0)


async def test_identifiers_are_compared_verbatim(
    backend: Backend, engine: AsyncEngine, make_locker: LockerFactory
) -> None:
    values = ["tick", "Tick", "tick ", "tíck", "тик", "tick\u00a0"]
    current = {"value": ""}

    def chosen(job_name: str, run_time: datetime) -> str:
        return current["value"]

    a = await make_locker(own_engine=True, worker="a", identifier=chosen)
    b = await make_locker(own_engine=True, worker="b", identifier=chosen)
    for value in values:
        current["value"] = value
        assert await a.lock("job") is not None, value
        assert await b.lock("job") is None, value

    rows = await fetch_rows(engine, backend.table_name)
    assert [r["job_identifier"] for r in rows] == values


async def test_a_custom_strategy_is_asked_on_every_call(make_locker: LockerFactory) -> None:
    """Only a precision's identifier is kept between calls (it depends on the time
    alone); a strategy of yours may depend on anything, and is asked every time."""
    calls: list[str] = []

    def counting(job_name: str, run_time: datetime) -> str:
        calls.append(job_name)
        return f"tick-{len(calls)}"

    locker = await make_locker(identifier=counting)
    instant = datetime.now(UTC).replace(microsecond=0)
    first = await locker.lock("job", instant)
    second = await locker.lock("job", instant)
    assert calls == ["job", "job"]
    assert first is not None and first.identifier == "tick-1"
    assert second is not None and second.identifier == "tick-2"


async def test_a_precision_names_each_tick_right_call_after_call(
    make_locker: LockerFactory,
) -> None:
    """The precision's last identifier is reused only for the same run time and the
    same strategy: a new tick, or a strategy swapped in, gets its own."""
    locker = await make_locker()
    tick = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=2)
    seen = []
    for job, run_time in [
        ("a", tick),
        ("b", tick),  # the same tick: the same identifier
        ("c", tick.astimezone(timezone(timedelta(hours=5)))),  # the same instant
        ("d", tick + timedelta(milliseconds=400)),  # another time, the same second
        ("e", tick + timedelta(seconds=1)),  # the next tick
    ]:
        won = await locker.lock(job, run_time)
        assert won is not None, job
        seen.append(won.identifier)
    second = precision()("any", tick)
    next_second = precision()("any", tick + timedelta(seconds=1))
    assert seen == [second, second, second, second, next_second]

    locker.identifier = precision(timedelta(hours=1))
    won = await locker.lock("f", tick + timedelta(seconds=1))  # the last call's time
    assert won is not None
    assert won.identifier == precision(timedelta(hours=1))("any", tick)
    assert won.identifier != next_second
