"""The gate that orders one process's SQLite statements: acquires together, others alone."""

from __future__ import annotations

import asyncio
from contextlib import AbstractAsyncContextManager

import pytest

from aiocronlock._gate import Gate

Side = AbstractAsyncContextManager[None]


async def _hold(gate_side: Side, inside: asyncio.Event, leave: asyncio.Event) -> None:
    async with gate_side:
        inside.set()
        await leave.wait()


def _task(gate_side: Side) -> tuple[asyncio.Task[None], asyncio.Event, asyncio.Event]:
    inside, leave = asyncio.Event(), asyncio.Event()
    return asyncio.create_task(_hold(gate_side, inside, leave)), inside, leave


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_acquires_pass_together() -> None:
    gate = Gate()
    first, first_in, first_leave = _task(gate.together())
    second, second_in, second_leave = _task(gate.together())
    await asyncio.wait_for(asyncio.gather(first_in.wait(), second_in.wait()), 5)
    first_leave.set()
    second_leave.set()
    await asyncio.gather(first, second)


async def test_a_statement_alone_waits_for_the_acquires_inside_and_holds_back_new_ones() -> None:
    gate = Gate()
    early, early_in, early_leave = _task(gate.together())
    await early_in.wait()

    alone, alone_in, alone_leave = _task(gate.alone())
    await _settle()
    assert not alone_in.is_set(), "it must wait for the acquire already inside"

    late, late_in, late_leave = _task(gate.together())
    await _settle()
    assert not late_in.is_set(), "an acquire arriving now waits behind it"

    early_leave.set()
    await asyncio.wait_for(alone_in.wait(), 5)
    await _settle()
    assert not late_in.is_set(), "and stays out while it is inside"

    alone_leave.set()
    await asyncio.wait_for(late_in.wait(), 5)
    late_leave.set()
    await asyncio.gather(early, alone, late)


async def test_statements_alone_pass_one_at_a_time() -> None:
    gate = Gate()
    first, first_in, first_leave = _task(gate.alone())
    await first_in.wait()
    second, second_in, second_leave = _task(gate.alone())
    await _settle()
    assert not second_in.is_set()
    first_leave.set()
    await asyncio.wait_for(second_in.wait(), 5)
    second_leave.set()
    await asyncio.gather(first, second)


async def test_a_statement_cancelled_while_waiting_reopens_the_gate() -> None:
    gate = Gate()
    early, early_in, early_leave = _task(gate.together())
    await early_in.wait()
    alone, alone_in, _ = _task(gate.alone())
    await _settle()
    late, late_in, late_leave = _task(gate.together())
    await _settle()
    assert not late_in.is_set()

    alone.cancel()
    with pytest.raises(asyncio.CancelledError):
        await alone
    await asyncio.wait_for(late_in.wait(), 5)
    assert not alone_in.is_set()

    # And a later statement alone still gets through once the acquires leave.
    again, again_in, again_leave = _task(gate.alone())
    early_leave.set()
    late_leave.set()
    await asyncio.wait_for(again_in.wait(), 5)
    again_leave.set()
    await asyncio.gather(early, late, again)


async def test_acquires_held_back_go_in_before_the_next_statement_alone() -> None:
    """Statements alone back to back (marking rows FAILED one by one) must not keep the
    acquires waiting behind the first of them out until the last."""
    gate = Gate()
    order: list[str] = []
    first_in, first_leave = asyncio.Event(), asyncio.Event()

    async def back_to_back() -> None:
        async with gate.alone():
            first_in.set()
            await first_leave.wait()
        async with gate.alone():  # no await in between
            order.append("alone")

    async def acquire() -> None:
        async with gate.together():
            order.append("together")

    statements = asyncio.create_task(back_to_back())
    await first_in.wait()
    waiting = asyncio.create_task(acquire())
    await _settle()
    assert order == []
    first_leave.set()
    await asyncio.wait_for(asyncio.gather(statements, waiting), 5)
    assert order == ["together", "alone"]
