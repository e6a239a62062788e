"""The order of one locker's statements on SQLite, which has one writer at a time.

Left to themselves, statements on different connections of one locker would wait
for each other in SQLite's busy handler, which backs off in sleeps of milliseconds.
Instead they pass this gate: the acquire INSERTs of a locker that shares one
connection among its calls (see ``_driver``) pass together, since that connection
runs them one after another anyway; every other statement passes alone, after the
INSERTs already under way and before any that arrive while it waits. INSERTs that
waited for one statement alone go in before the next statement alone does.
"""

from __future__ import annotations

import asyncio
from types import TracebackType


class Gate:
    __slots__ = ("_alone", "_inside", "_no_one_inside", "_no_one_waiting", "_open", "_waiting")

    def __init__(self) -> None:
        self._inside = 0  # statements passing together
        self._waiting = 0  # statements waiting to pass together
        self._no_one_waiting = asyncio.Event()
        self._no_one_waiting.set()
        self._open = asyncio.Event()  # set unless one is passing alone, or waiting to
        self._open.set()
        self._no_one_inside = asyncio.Event()
        self._no_one_inside.set()
        self._alone = asyncio.Lock()

    def together(self) -> _Together:
        return _Together(self)

    def alone(self) -> _Alone:
        return _Alone(self)


class _Together:
    __slots__ = ("_gate",)

    def __init__(self, gate: Gate) -> None:
        self._gate = gate

    async def __aenter__(self) -> None:
        gate = self._gate
        if not gate._open.is_set():
            gate._waiting += 1
            gate._no_one_waiting.clear()
            try:
                while not gate._open.is_set():
                    await gate._open.wait()
            finally:
                gate._waiting -= 1
                if not gate._waiting:
                    gate._no_one_waiting.set()
        gate._inside += 1
        gate._no_one_inside.clear()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        gate = self._gate
        gate._inside -= 1
        if not gate._inside:
            gate._no_one_inside.set()


class _Alone:
    __slots__ = ("_gate",)

    def __init__(self, gate: Gate) -> None:
        self._gate = gate

    async def __aenter__(self) -> None:
        gate = self._gate
        await gate._alone.acquire()
        try:
            # First let in those that the last statement alone held back.
            await gate._no_one_waiting.wait()
            gate._open.clear()
            await gate._no_one_inside.wait()
        except BaseException:
            gate._open.set()
            gate._alone.release()
            raise

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        gate = self._gate
        gate._open.set()
        gate._alone.release()
