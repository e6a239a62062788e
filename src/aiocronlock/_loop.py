"""The one event loop a locker works in."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any


class OneLoop:
    """Remembers the event loop of a locker's first database call, and refuses any other.

    A driver connection belongs to the loop that opened it: used from another loop
    (one ``asyncio.run`` after another) it fails part-way, after an INSERT may have
    won a tick that nothing could then record. Refusing before any statement keeps
    that from happening.
    """

    __slots__ = ("_loop",)

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None

    def check(self) -> asyncio.AbstractEventLoop:
        """The running loop; ``RuntimeError`` if it is not the locker's."""
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            if self._loop is not None:
                raise RuntimeError(
                    "this locker was first used in another event loop, and its connections "
                    "belong to that loop: create the locker (and its engine) in the loop "
                    "that uses it, and `await locker.aclose()` before that loop ends"
                )
            self._loop = loop
        return loop

    def is_current(self) -> bool:
        """Whether the running loop is the locker's (or none was used yet)."""
        return self._loop is None or self._loop is asyncio.get_running_loop()


def writes_in_turn(dialect_name: str) -> contextlib.AbstractAsyncContextManager[Any]:
    """What a locker's statements pass through on their way to the database.

    SQLite has one writer at a time. Statements of one locker on different
    connections (the acquire's, the cleaner's DELETE) would otherwise wait for each
    other in SQLite's busy handler, which sleeps up to 100 ms between tries: a prune
    batch then waited most of a second behind a stream of INSERTs. An asyncio lock
    hands the file to them in turn instead. Other databases need no such thing.
    """
    return asyncio.Lock() if dialect_name == "sqlite" else contextlib.nullcontext()
