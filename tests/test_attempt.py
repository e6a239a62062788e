"""The acquire's attempt: run in the caller's task, carried on alone if the caller goes."""

from __future__ import annotations

import asyncio
import contextvars
import time
from typing import Any

import pytest

from aiocronlock._attempt import Attempt
from aiocronlock._deadline import Deadlines

#: How late a deadline may fire on a busy machine and still count as on time.
_SLACK = 0.5


def _future() -> asyncio.Future[Any]:
    return asyncio.get_running_loop().create_future()


async def _turns(count: int = 3) -> None:
    for _ in range(count):
        await asyncio.sleep(0)


async def test_it_runs_in_the_awaiting_task_and_returns_the_result() -> None:
    ran_in: list[asyncio.Task[Any] | None] = []

    async def work() -> int:
        ran_in.append(asyncio.current_task())
        await asyncio.sleep(0)
        await asyncio.sleep(0.001)
        ran_in.append(asyncio.current_task())
        return 42

    assert await Attempt(work(), Deadlines(10.0)) == 42
    assert ran_in == [asyncio.current_task()] * 2


async def test_an_error_of_the_work_reaches_the_caller_unchanged() -> None:
    async def work() -> None:
        await asyncio.sleep(0.001)
        raise KeyError("boom")

    with pytest.raises(KeyError, match="boom"):
        await Attempt(work(), Deadlines(10.0))


async def test_a_cancelled_caller_returns_at_once_and_the_work_goes_on() -> None:
    reply = _future()
    attempt: Attempt[str] | None = None

    async def work() -> str:
        return f"got {await reply}"

    async def caller() -> None:
        nonlocal attempt
        attempt = Attempt(work(), Deadlines(10.0))
        await attempt

    task = asyncio.create_task(caller())
    await _turns()
    task.cancel("shutting down")
    with pytest.raises(asyncio.CancelledError, match="shutting down"):
        await task
    # The caller is gone before the reply came, and the reply was not cancelled.
    assert not reply.done()
    assert attempt is not None and attempt.detached is not None
    assert not attempt.detached.done()
    reply.set_result("the row")
    assert await attempt.detached == "got the row"


async def test_a_cancel_racing_the_reply_still_cancels_the_caller() -> None:
    """The reply lands and the caller is cancelled in the same turn, before it woke:
    the caller is still cancelled (once), and the work gets the reply."""
    reply = _future()
    attempt = Attempt(_echo(reply), Deadlines(10.0))
    task = asyncio.create_task(_await(attempt))
    await _turns()
    reply.set_result("row 7")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert task.cancelling() == 1
    assert attempt.detached is not None
    assert await attempt.detached == "row 7"


async def test_cancelling_twice_detaches_once() -> None:
    reply = _future()
    attempt = Attempt(_echo(reply), Deadlines(10.0))
    task = asyncio.create_task(_await(attempt))
    await _turns()
    task.cancel()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    detached = attempt.detached
    assert detached is not None
    reply.set_result("once")
    assert await detached == "once"
    assert attempt.detached is detached


async def test_a_cancel_at_a_bare_yield_detaches_too() -> None:
    steps: list[int] = []

    async def work() -> int:
        for step in range(20):
            steps.append(step)
            await asyncio.sleep(0)
        return len(steps)

    attempt = Attempt(work(), Deadlines(10.0))
    detached = await _cancel_caller(attempt)
    assert await detached == 20


async def test_the_caller_keeps_no_cancellation_after_the_attempt() -> None:
    """An attempt that ended normally leaves its task's cancel count as it was, and
    a later cancel of the caller reaches whatever it awaits next."""
    reply = _future()
    attempt = Attempt(_echo(reply), Deadlines(10.0))
    after = asyncio.Event()

    async def caller() -> None:
        await attempt
        await after.wait()

    task = asyncio.create_task(caller())
    await _turns()
    reply.set_result(None)
    await _turns()
    assert task.cancelling() == 0
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert attempt.detached is None


async def test_past_the_deadline_the_work_is_cancelled_and_it_raises_timeout_error() -> None:
    reply = _future()
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        await Attempt(_echo(reply), Deadlines(0.05))
    assert 0.05 <= time.monotonic() - started < 0.05 + _SLACK
    assert reply.cancelled(), "the deadline cancels what the work waits on"
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0


async def test_past_the_deadline_cleanup_that_awaits_again_is_cancelled_again() -> None:
    cancels = 0

    async def stubborn() -> None:
        nonlocal cancels
        while True:
            try:
                await _future()
            except asyncio.CancelledError:
                cancels += 1
                if cancels == 3:
                    raise

    with pytest.raises(TimeoutError):
        await Attempt(stubborn(), Deadlines(0.01))
    assert cancels == 3


async def test_the_deadline_still_applies_to_detached_work() -> None:
    reply = _future()
    attempt = Attempt(_echo(reply), Deadlines(0.1))
    detached = await _cancel_caller(attempt)
    with pytest.raises(TimeoutError):
        await detached
    assert reply.cancelled()


async def test_a_deadline_after_the_reply_landed_cancels_the_work_on_resuming() -> None:
    """The deadline passes in the turn the reply landed: the work is cancelled where
    it resumes, as a task's cancel would."""
    reply = _future()
    resumed: list[str] = []

    async def work() -> None:
        try:
            await reply
        except asyncio.CancelledError:
            resumed.append("cancelled")
            raise
        resumed.append("went on")

    attempt = Attempt(work(), Deadlines(10.0))
    task = asyncio.create_task(_await(attempt))
    await _turns()
    reply.set_result(None)
    attempt.expire()
    with pytest.raises(TimeoutError):
        await task
    assert resumed == ["cancelled"]


async def test_cancelling_detached_work_cancels_it() -> None:
    reply = _future()
    attempt = Attempt(_echo(reply), Deadlines(10.0))
    detached = await _cancel_caller(attempt)
    detached.cancel()
    with pytest.raises(asyncio.CancelledError):
        await detached
    assert reply.cancelled()


async def _echo(reply: asyncio.Future[Any]) -> Any:
    return await reply


async def _await(attempt: Attempt[Any]) -> Any:
    return await attempt


async def _waits_for_ever(ended: list[str]) -> None:
    """Work that waits on a future nobody sets, and notes "work" in ``ended`` when it
    ends, closed or cancelled."""
    try:
        await _future()
    finally:
        ended.append("work")


async def _cancel_caller(attempt: Attempt[Any]) -> asyncio.Task[Any]:
    """Await ``attempt`` in a task, cancel that task while the work waits; the task
    that runs the work on."""
    task = asyncio.create_task(_await(attempt))
    await _turns()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert attempt.detached is not None
    return attempt.detached


async def test_the_first_cancel_message_is_the_one_the_caller_gets() -> None:
    reply = _future()
    attempt = Attempt(_echo(reply), Deadlines(10.0))
    task = asyncio.create_task(_await(attempt))
    await _turns()
    task.cancel("first")
    task.cancel("second")
    with pytest.raises(asyncio.CancelledError, match="first"):
        await task
    reply.set_result(None)
    assert attempt.detached is not None
    await attempt.detached


async def test_a_context_variable_the_work_set_is_reset_after_a_detach() -> None:
    """Tracing hooks set a context variable around a driver call and reset it after:
    the detached work runs on in the caller's own context, where the token is valid."""
    span: contextvars.ContextVar[str] = contextvars.ContextVar("span", default="none")
    reply = _future()

    async def work() -> str:
        token = span.set("INSERT")
        try:
            return f"row {await reply}"
        finally:
            span.reset(token)

    attempt = Attempt(work(), Deadlines(10.0))
    detached = await _cancel_caller(attempt)
    reply.set_result(7)
    assert await detached == "row 7"


async def test_closing_the_caller_closes_the_work_and_its_deadline() -> None:
    deadlines = Deadlines(10.0)
    ended: list[str] = []

    async def caller() -> None:
        await Attempt(_waits_for_ever(ended), deadlines)

    waiting = caller()
    waiting.send(None)  # runs to the work's first wait, as a task's first step would
    assert len(deadlines._running) == 1
    waiting.close()
    assert ended == ["work"]
    assert not deadlines._running


async def test_a_future_of_another_loop_is_refused_to_the_work() -> None:
    """As a task does: the work gets the task's error at once, not a wait for ever."""
    other = asyncio.new_event_loop()
    try:
        deadlines = Deadlines(10.0)
        with pytest.raises(RuntimeError, match="different loop"):
            await Attempt(_echo(other.create_future()), deadlines)
        assert not deadlines._running
    finally:
        other.close()


async def test_detached_work_cancelled_before_it_ran_is_closed() -> None:
    """A second cancel of the caller, while it waits for the detached work (as the
    locker does), can land before that task's first step: the work is closed then,
    and its deadline stops."""
    deadlines = Deadlines(0.05)
    ended: list[str] = []
    attempt = Attempt(_waits_for_ever(ended), deadlines)

    async def caller() -> None:
        try:
            await attempt
        except asyncio.CancelledError:
            assert attempt.detached is not None
            await attempt.detached
            raise

    task = asyncio.create_task(caller())
    await _turns()
    task.cancel()
    asyncio.get_running_loop().call_soon(task.cancel)  # before the detached task's step
    with pytest.raises(asyncio.CancelledError):
        await task
    assert attempt.detached is not None and attempt.detached.cancelled()
    assert ended == ["work"]
    assert not deadlines._running


async def test_a_deadline_right_after_the_detach_cancels_the_wait_at_once() -> None:
    reply = _future()
    attempt = Attempt(_echo(reply), Deadlines(10.0))
    cancelled_at_expiry: list[bool] = []

    async def caller() -> None:
        try:
            await attempt
        except asyncio.CancelledError:
            attempt.expire()  # before the detached task's first step
            cancelled_at_expiry.append(reply.cancelled())
            raise

    task = asyncio.create_task(caller())
    await _turns()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert cancelled_at_expiry == [True]
    assert attempt.detached is not None
    with pytest.raises(TimeoutError):
        await attempt.detached
