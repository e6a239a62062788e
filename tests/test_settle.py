"""The shield around each acquire: the caller may go, the INSERT always finishes."""

from __future__ import annotations

import asyncio
import gc
import logging

import pytest

from aiocronlock._locker import _shielded


async def test_the_caller_gets_the_result() -> None:
    work = asyncio.get_running_loop().create_future()
    outcome, task = _shielded(work)
    work.set_result(7)
    assert await outcome == 7
    assert await task == (7,)


async def test_an_error_reaches_the_caller_and_nothing_is_logged_as_unretrieved(
    caplog: pytest.LogCaptureFixture,
) -> None:
    work = asyncio.get_running_loop().create_future()
    outcome, task = _shielded(work)
    work.set_exception(ValueError("boom"))
    with pytest.raises(ValueError, match="boom"):
        await outcome
    await asyncio.sleep(0)
    assert task.done() and task.result() is None
    del task
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        gc.collect()
    assert not [r for r in caplog.records if "never retrieved" in r.getMessage()]


async def test_cancelling_the_caller_leaves_the_work_running() -> None:
    work = asyncio.get_running_loop().create_future()
    outcome, task = _shielded(work)
    caller = asyncio.ensure_future(outcome)
    await asyncio.sleep(0)
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    assert not work.cancelled()
    work.set_result(3)
    assert await task == (3,)


async def test_after_the_caller_left_the_error_is_kept_for_whoever_abandons_the_attempt() -> None:
    work = asyncio.get_running_loop().create_future()
    outcome, task = _shielded(work)
    outcome.cancel()  # what cancelling the caller does
    work.set_exception(ValueError("late"))
    with pytest.raises(ValueError, match="late"):
        await task


async def test_cancelling_the_work_cancels_the_caller() -> None:
    work = asyncio.get_running_loop().create_future()
    outcome, task = _shielded(work)
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await outcome
    assert task.cancelled() or isinstance(task.exception(), asyncio.CancelledError)
