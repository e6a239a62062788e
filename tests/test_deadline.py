"""The deadline every database call runs under: one timer shared by a locker's calls."""

from __future__ import annotations

import asyncio
import gc
import time

import pytest

from aiocronlock._deadline import Deadlines

#: How late a deadline may fire on a busy machine and still count as on time.
_SLACK = 0.5


async def _forever() -> None:
    await asyncio.Event().wait()


async def _stubborn(cancelled: asyncio.Event) -> None:
    """Like a driver whose cleanup after a cancellation awaits again, for ever."""
    try:
        await _forever()
    except asyncio.CancelledError:
        cancelled.set()
        await _forever()


async def test_a_block_that_overruns_raises_timeout_error_after_its_time() -> None:
    deadlines = Deadlines(0.05)
    started = time.monotonic()
    with pytest.raises(TimeoutError), deadlines.guard():
        await _forever()
    assert 0.05 <= time.monotonic() - started < 0.05 + _SLACK
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0


async def test_a_block_that_ends_in_time_is_left_alone() -> None:
    deadlines = Deadlines(0.05)
    with deadlines.guard():
        await asyncio.sleep(0)
    await asyncio.sleep(0.1)  # the shared timer fires with nothing to do
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0


async def test_cleanup_that_awaits_again_is_cancelled_again() -> None:
    """A driver's cleanup after the first cancellation awaits once more: it is cut too."""
    deadlines = Deadlines(0.05)
    cancelled = 0

    async def stubborn() -> None:
        nonlocal cancelled
        try:
            await _forever()
        except asyncio.CancelledError:
            cancelled += 1
            await _forever()  # "closing the connection politely", forever

    with pytest.raises(TimeoutError), deadlines.guard():
        await stubborn()
    assert cancelled == 1


async def test_blocks_under_way_together_each_end_at_their_own_time() -> None:
    """The timer armed for the first block also serves one entered later, and a block
    that finished early does not delay the end of the next."""
    deadlines = Deadlines(0.2)
    ended: list[tuple[str, float]] = []
    started = time.monotonic()

    async def block(name: str) -> None:
        with pytest.raises(TimeoutError), deadlines.guard():
            await _forever()
        ended.append((name, time.monotonic() - started))

    with deadlines.guard():  # arms the timer, then leaves at once
        pass
    first = asyncio.create_task(block("first"))
    await asyncio.sleep(0.1)
    second = asyncio.create_task(block("second"))
    await asyncio.gather(first, second)

    assert [name for name, _ in ended] == ["first", "second"]
    assert 0.2 <= ended[0][1] < 0.2 + _SLACK
    assert 0.3 <= ended[1][1] < 0.3 + _SLACK


async def test_a_cancellation_from_outside_stays_a_cancellation() -> None:
    deadlines = Deadlines(10.0)

    async def guarded() -> None:
        with deadlines.guard():
            await _forever()

    task = asyncio.create_task(guarded())
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_outside_a_task_it_says_so() -> None:
    loop = asyncio.get_running_loop()
    said: asyncio.Future[str | None] = loop.create_future()

    def outside() -> None:  # a plain callback: no task is running
        try:
            Deadlines(1.0).guard().__enter__()
        except RuntimeError as error:
            said.set_result(str(error))
        else:
            said.set_result(None)

    loop.call_soon(outside)
    assert await said == "a deadline must be used inside a task"


async def test_a_cancellation_from_outside_during_an_overrun_stays_a_cancellation() -> None:
    """The deadline has fired and keeps re-cancelling when someone else cancels too:
    the caller's cancellation wins, it is not turned into a TimeoutError."""
    deadlines = Deadlines(0.01)
    cancelled = asyncio.Event()

    async def guarded() -> None:
        with deadlines.guard():
            await _stubborn(cancelled)

    task = asyncio.create_task(guarded())
    await cancelled.wait()  # the deadline's first cancellation has arrived
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_a_block_that_ends_before_the_armed_timer_rearms_it() -> None:
    """While an overrun is re-cancelled every 50 ms, the timer waits on that; a block
    shorter than 50 ms entered then must not wait for it."""
    deadlines = Deadlines(0.01)
    cancelled = asyncio.Event()

    async def overrun() -> None:
        with deadlines.guard():
            await _stubborn(cancelled)

    task = asyncio.create_task(overrun())
    await cancelled.wait()
    guard = deadlines.guard()
    with pytest.raises(TimeoutError), guard:
        assert deadlines._timer is not None
        assert deadlines._timer.when() == guard.ends
        await _forever()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def test_a_new_event_loop_gets_its_own_timer() -> None:
    """One asyncio.run after another, the first closed while a block was still under
    way: deadlines still fire in the second."""
    deadlines = Deadlines(0.05)
    first = asyncio.new_event_loop()

    async def left_hanging() -> None:
        with deadlines.guard():
            await _forever()

    hanging = first.create_task(left_hanging())
    first.run_until_complete(asyncio.sleep(0.01))  # the block has started
    first.close()  # with the block still under way

    async def second() -> float:
        started = time.monotonic()
        with pytest.raises(TimeoutError), deadlines.guard():
            await _forever()
        return time.monotonic() - started

    assert 0.05 <= asyncio.run(second()) < 0.05 + _SLACK
    assert not hanging.done()
    # The first loop's task is gone with its loop; let it be collected here, where
    # asyncio's "destroyed but pending" report lands in this test's captured log.
    del hanging
    gc.collect()
