"""When ticks happen: epoch-aligned intervals, cron expressions (across DST), ``ticks()``."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncGenerator
from datetime import UTC, date, datetime, timedelta, timezone
from typing import cast
from zoneinfo import ZoneInfo

import pytest

from aiocronlock import CronTrigger, IntervalTrigger, ticks
from aiocronlock._triggers import latest_due

BERLIN = ZoneInfo("Europe/Berlin")


def _utc(
    year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0, us: int = 0
) -> datetime:
    return datetime(year, month, day, hour, minute, second, us, tzinfo=UTC)


# -- IntervalTrigger -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("moment", "expected"),
    [
        pytest.param(_utc(2026, 1, 1, 12, 0, 3, 500000), _utc(2026, 1, 1, 12, 0, 10), id="inside"),
        pytest.param(
            _utc(2026, 1, 1, 12, 0, 9, 999999), _utc(2026, 1, 1, 12, 0, 10), id="just-before"
        ),
        pytest.param(_utc(2026, 1, 1, 12, 0, 10), _utc(2026, 1, 1, 12, 0, 20), id="exact-multiple"),
        pytest.param(_utc(2026, 1, 1, 12, 0, 10, 1), _utc(2026, 1, 1, 12, 0, 20), id="just-after"),
        pytest.param(_utc(2026, 1, 1, 23, 59, 55), _utc(2026, 1, 2, 0, 0, 0), id="midnight"),
    ],
)
def test_interval_next_after_is_the_next_multiple_strictly_after(
    moment: datetime, expected: datetime
) -> None:
    assert IntervalTrigger(timedelta(seconds=10)).next_after(moment) == expected


def test_interval_is_counted_from_the_epoch_not_the_minute() -> None:
    # 7 s does not divide a minute: the ticks are multiples of 7 s since 1970-01-01 UTC.
    trigger = IntervalTrigger(7)
    epoch = _utc(1970, 1, 1)
    moment = _utc(2026, 5, 17, 8, 30, 0)
    tick = trigger.next_after(moment)
    elapsed = tick - epoch
    assert elapsed % timedelta(seconds=7) == timedelta(0)
    assert moment < tick <= moment + timedelta(seconds=7)
    assert trigger.next_after(tick) == tick + timedelta(seconds=7)


def test_interval_ticks_are_the_same_instants_from_any_time_zone() -> None:
    trigger = IntervalTrigger(timedelta(hours=1))
    instant = _utc(2026, 3, 29, 0, 40)
    kathmandu = instant.astimezone(timezone(timedelta(hours=5, minutes=45)))
    berlin = instant.astimezone(BERLIN)

    expected = _utc(2026, 3, 29, 1, 0)  # the top of the UTC hour, not of a local one
    for moment in (instant, kathmandu, berlin):
        tick = trigger.next_after(moment)
        assert tick == expected
        assert tick.utcoffset() == timedelta(0)


def test_interval_accepts_seconds_and_sub_second_steps() -> None:
    trigger = IntervalTrigger(0.25)
    assert trigger.interval == timedelta(milliseconds=250)
    assert trigger.next_after(_utc(2026, 1, 1, 0, 0, 0, 260000)) == _utc(
        2026, 1, 1, 0, 0, 0, 500000
    )


@pytest.mark.parametrize("interval", [0, -1, timedelta(0), timedelta(seconds=-5)])
def test_interval_must_be_positive(interval: timedelta | float) -> None:
    with pytest.raises(ValueError, match="interval"):
        IntervalTrigger(interval)


# -- CronTrigger -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("moment", "expected"),
    [
        pytest.param(_utc(2026, 1, 1, 12, 3, 30), _utc(2026, 1, 1, 12, 5), id="inside"),
        pytest.param(_utc(2026, 1, 1, 12, 5), _utc(2026, 1, 1, 12, 10), id="exact"),
        pytest.param(_utc(2026, 1, 1, 12, 5, 0, 1), _utc(2026, 1, 1, 12, 10), id="just-after"),
        pytest.param(
            _utc(2026, 1, 1, 12, 4, 59, 999999), _utc(2026, 1, 1, 12, 5), id="just-before"
        ),
        pytest.param(_utc(2026, 12, 31, 23, 57), _utc(2027, 1, 1, 0, 0), id="new-year"),
    ],
)
def test_cron_next_after_is_strictly_after(moment: datetime, expected: datetime) -> None:
    tick = CronTrigger("*/5 * * * *").next_after(moment)
    assert tick == expected
    assert tick.utcoffset() == timedelta(0)


def test_cron_is_evaluated_in_its_time_zone() -> None:
    # 09:00 in Berlin is 08:00 UTC in winter and 07:00 UTC in summer.
    trigger = CronTrigger("0 9 * * *", tz="Europe/Berlin")
    assert trigger.next_after(_utc(2026, 1, 15, 0, 0)) == _utc(2026, 1, 15, 8, 0)
    assert trigger.next_after(_utc(2026, 7, 15, 0, 0)) == _utc(2026, 7, 15, 7, 0)
    assert CronTrigger("0 9 * * *", tz=BERLIN).next_after(_utc(2026, 7, 15)) == _utc(
        2026, 7, 15, 7, 0
    )


@pytest.mark.parametrize(
    "expression",
    ["not cron", "61 * * * *", "* * * *", "* * * * * * *", "*/0 * * * *", "", "0 25 * * *"],
)
def test_invalid_cron_expression_raises_value_error(expression: str) -> None:
    with pytest.raises(ValueError, match="cron expression") as info:
        CronTrigger(expression)
    assert repr(expression) in str(info.value)


def test_unknown_time_zone_raises_value_error_naming_it() -> None:
    with pytest.raises(ValueError, match="tz") as info:
        CronTrigger("0 9 * * *", tz="Mars/Olympus_Mons")
    assert "'Mars/Olympus_Mons'" in str(info.value)


# -- DST: a daily job at 02:30 in Europe/Berlin ------------------------------------------------

DAILY = "30 2 * * *"


def _fires(trigger: CronTrigger, start: datetime, count: int) -> list[datetime]:
    """Iterate like the scheduler does: each tick is the next one after the previous."""
    fires: list[datetime] = []
    moment = start
    for _ in range(count):
        moment = trigger.next_after(moment)
        fires.append(moment)
    return fires


def _assert_one_per_day(fires: list[datetime], first_day: date) -> None:
    assert all(a < b for a, b in itertools.pairwise(fires)), fires
    local_days = [fire.astimezone(BERLIN).date() for fire in fires]
    assert local_days == [first_day + timedelta(days=i) for i in range(len(fires))]


def test_cron_spring_forward_fires_once_right_after_the_jump() -> None:
    # 2026-03-29: 02:00 CET jumps to 03:00 CEST, so 02:30 does not exist that day.
    trigger = CronTrigger(DAILY, tz="Europe/Berlin")
    fires = _fires(trigger, _utc(2026, 3, 27, 12), 4)

    assert fires == [
        _utc(2026, 3, 28, 1, 30),  # 02:30 CET
        _utc(2026, 3, 29, 1, 0),  # 03:00 CEST, right after the jump
        _utc(2026, 3, 30, 0, 30),  # 02:30 CEST
        _utc(2026, 3, 31, 0, 30),
    ]
    _assert_one_per_day(fires, date(2026, 3, 28))
    assert fires[1].astimezone(BERLIN).replace(tzinfo=None) == datetime(2026, 3, 29, 3, 0)


def test_cron_fall_back_fires_once_at_the_first_occurrence() -> None:
    # 2026-10-25: 03:00 CEST goes back to 02:00 CET, so 02:30 happens twice that day.
    trigger = CronTrigger(DAILY, tz="Europe/Berlin")
    fires = _fires(trigger, _utc(2026, 10, 23, 12), 4)

    assert fires == [
        _utc(2026, 10, 24, 0, 30),  # 02:30 CEST
        _utc(2026, 10, 25, 0, 30),  # the first 02:30 (CEST), not the second (01:30 UTC)
        _utc(2026, 10, 26, 1, 30),  # 02:30 CET
        _utc(2026, 10, 27, 1, 30),
    ]
    _assert_one_per_day(fires, date(2026, 10, 24))


@pytest.mark.parametrize(
    "start", [_utc(2026, 3, 27, 12), _utc(2026, 10, 23, 12)], ids=["spring", "autumn"]
)
def test_cron_across_dst_asked_at_any_moment_gives_one_tick_per_day(start: datetime) -> None:
    # An instance may start (or wake up) at any time, including inside the repeated
    # hour; whenever it asks, it must land on the same once-a-day ticks.
    trigger = CronTrigger(DAILY, tz="Europe/Berlin")
    expected = _fires(trigger, start, 5)
    moment = start
    seen: set[datetime] = set()
    while moment < expected[-2]:
        tick = trigger.next_after(moment)
        assert tick == min(fire for fire in expected if fire > moment), moment
        seen.add(tick)
        moment += timedelta(minutes=10)
    assert sorted(seen) == expected[:-1]
    _assert_one_per_day(sorted(seen), expected[0].astimezone(BERLIN).date())


def test_cron_more_often_than_hourly_follows_real_time_through_fall_back() -> None:
    trigger = CronTrigger("*/30 * * * *", tz="Europe/Berlin")
    fires = _fires(trigger, _utc(2026, 10, 24, 23, 50), 6)
    # Every 30 real minutes, the repeated local hour included.
    assert fires == [_utc(2026, 10, 25, 0, 0) + timedelta(minutes=30 * i) for i in range(6)]


# -- latest_due ---------------------------------------------------------------------------------


def test_latest_due_coalesces_missed_ticks_into_the_latest() -> None:
    trigger = IntervalTrigger(10)
    ran = _utc(2026, 1, 1, 12, 0, 0)

    # Woke up 35 s later: 12:00:10 and :20 were missed, :30 is due now.
    assert latest_due(trigger, ran, ran + timedelta(seconds=35)) == (
        _utc(2026, 1, 1, 12, 0, 30),
        2,
    )
    # Exactly on a tick: that tick is due.
    assert latest_due(trigger, ran, ran + timedelta(seconds=20)) == (
        _utc(2026, 1, 1, 12, 0, 20),
        1,
    )


def test_latest_due_on_time_gives_the_next_tick_and_nothing_missed() -> None:
    trigger = IntervalTrigger(10)
    ran = _utc(2026, 1, 1, 12, 0, 0)
    assert latest_due(trigger, ran, ran + timedelta(milliseconds=3)) == (
        _utc(2026, 1, 1, 12, 0, 10),
        0,
    )


def test_latest_due_with_cron() -> None:
    trigger = CronTrigger("*/5 * * * *")
    ran = _utc(2026, 1, 1, 12, 0)
    assert latest_due(trigger, ran, _utc(2026, 1, 1, 12, 17, 30)) == (_utc(2026, 1, 1, 12, 15), 2)


# -- ticks() -------------------------------------------------------------------------------------


async def test_ticks_yields_increasing_aligned_times_when_they_come() -> None:
    step = timedelta(milliseconds=200)
    stream = cast(AsyncGenerator[datetime, None], ticks(0.2))
    seen: list[tuple[datetime, datetime]] = []
    try:
        async for tick in stream:
            seen.append((tick, datetime.now(UTC)))
            if len(seen) == 4:
                break
    finally:
        await stream.aclose()

    scheduled = [tick for tick, _ in seen]
    assert scheduled == sorted(set(scheduled))
    for tick, woke in seen:
        assert tick.utcoffset() == timedelta(0)
        assert (tick - datetime(1970, 1, 1, tzinfo=UTC)) % step == timedelta(0), tick
        assert woke >= tick  # never yielded early
    assert [b - a for a, b in itertools.pairwise(scheduled)] == [step] * 3


async def test_ticks_skips_ticks_missed_by_a_slow_body() -> None:
    stream = cast(AsyncGenerator[datetime, None], ticks(timedelta(milliseconds=200)))
    try:
        first = await anext(stream)
        await asyncio.sleep(0.5)  # the body overruns two ticks
        resumed = datetime.now(UTC)
        second = await anext(stream)
    finally:
        await stream.aclose()
    # The missed ticks are not replayed: the next one is after the body finished.
    assert second > resumed
    assert second - first >= timedelta(milliseconds=600)
