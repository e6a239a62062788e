"""An acquire that runs in its caller's task, and outlives the caller if it must.

Once an INSERT is on its way, a caller that gives up (is cancelled) must not stop it
half-way: the locker still has to learn whether the row went in, and mark it FAILED
if it did, or nobody would run that tick. ``asyncio.shield`` and its like guarantee
that by running the work in a task of its own, which costs a task and two more turns
of the event loop on every call: on a fast local database, a fifth of the round trip.

:class:`Attempt` gets the same guarantee without them. The caller's task drives the
coroutine itself, and every future the coroutine waits on is handed to that task
behind the attempt, which stands in for it. A cancellation of the caller reaches the
attempt instead of the future: the caller wakes with ``CancelledError`` at once, and
the coroutine, still waiting on its untouched future, goes on in a new task
(:attr:`Attempt.detached`) to its end.

The attempt also keeps the call's deadline (see ``_deadline``): past it, the future the
coroutine waits on is cancelled, whichever task runs it by then, and the attempt
raises ``TimeoutError``.

What the coroutine must not do: cancel the task it runs in. ``asyncio.timeout()`` and
``TaskGroup`` do, and from Python 3.12 so does ``wait_for``; the attempt would take that
cancel for its caller's. The locker runs such parts in a task of their own (a driver's
connect), or the whole acquire (a driver that bounds its reads so, see ``_driver``).
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Callable, Coroutine, Generator
from typing import TYPE_CHECKING, Any, Generic, TypeVar

if TYPE_CHECKING:
    from ._deadline import Deadlines

_T = TypeVar("_T")
#: What drivers wait on, nearly always: checked before asyncio.isfuture's getattrs.
_Future = asyncio.Future


class Attempt(Generic[_T]):
    """``await Attempt(coro, deadlines)`` runs ``coro`` within the deadline, in this task.

    If this task is cancelled while ``coro`` waits, the ``await`` raises
    ``CancelledError`` and ``coro`` carries on in :attr:`detached`, whose result is
    ``coro``'s. Await an attempt once.
    """

    __slots__ = (
        "_asyncio_future_blocking",
        "_cancel_message",
        "_coro",
        "_deadlines",
        "_expired",
        "_interrupted",
        "_over",
        "_started",
        "_throw",
        "_waiting",
        "_wakeup",
        "_wakeup_context",
        "detached",
        "ends",
        "loop",
    )

    def __init__(self, coro: Coroutine[Any, Any, _T], deadlines: Deadlines) -> None:
        self._coro = coro
        self._deadlines = deadlines
        #: The task that runs ``coro`` on after its caller was cancelled.
        self.detached: asyncio.Task[_T] | None = None
        # The future coro waits on, which this attempt stands in for.
        self._waiting: asyncio.Future[Any] | None = None
        # The waiting task's wake-up, as it gave it to add_done_callback.
        self._wakeup: Callable[[Any], object] | None = None
        self._wakeup_context: contextvars.Context | None = None
        # The caller was cancelled (a cancel that reached this attempt).
        self._interrupted = False
        self._cancel_message: Any = None
        # Throw CancelledError into coro when it next resumes (the deadline passed
        # while it was not waiting on a future it could cancel).
        self._throw = False
        # How many times the deadline cancelled coro.
        self._expired = 0
        # The coroutine has waited once (the deadline runs), and has ended.
        self._started = False
        self._over = False
        # asyncio's mark of a future a task may wait on (see asyncio.isfuture).
        self._asyncio_future_blocking = False

    def __await__(self) -> Generator[Any, None, _T]:
        return self._drive(None, stand_in=True)

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        """The deadline starts when the coroutine first waits."""
        self._started = True
        self.loop = loop
        self.ends = loop.time() + self._deadlines.seconds
        self._deadlines.track(self, loop)

    # -- driving the coroutine --------------------------------------------------------

    def _drive(
        self, waiting: asyncio.Future[Any] | None, *, stand_in: bool
    ) -> Generator[Any, None, _T]:
        """Run coro to its end; ``waiting``: the future it waits on already, if any.

        ``stand_in``: show the task this attempt instead of each future, so that a
        cancel of the task does not reach the coroutine (see :meth:`cancel`).
        """
        coro = self._coro
        # What the task threw in that is not the awaited future's own outcome (which
        # coro reads from the future): thrown into coro where it resumes, as a task
        # would.
        thrown: BaseException | None = None
        try:
            while True:
                if waiting is not None:
                    # (A future of another loop goes to the task as it is, to be refused.)
                    standing_in = stand_in and waiting.get_loop() is self.loop
                    if standing_in:
                        # What a task does to a future it waits on; then it waits on us.
                        waiting._asyncio_future_blocking = False
                        self._asyncio_future_blocking = True
                    self._waiting = waiting
                    try:
                        yield self if standing_in else waiting
                    except GeneratorExit:
                        raise
                    except BaseException as error:
                        thrown = _not_outcome_of(waiting, error)
                    self._waiting = None
                    if standing_in and self._interrupted:
                        self._detach(waiting)
                        raise asyncio.CancelledError(self._cancel_message)
                if self._throw:  # the deadline passed where no future could be cancelled
                    self._throw = False
                    if thrown is None:
                        thrown = asyncio.CancelledError()
                try:
                    if thrown is None:
                        yielded = coro.send(None)
                    else:
                        throwing, thrown = thrown, None
                        yielded = coro.throw(throwing)
                except StopIteration as stop:
                    self._end()
                    result: _T = stop.value
                    return result
                except asyncio.CancelledError as error:
                    self._end()
                    if self._expired:
                        raise TimeoutError from error
                    raise
                except BaseException:
                    self._end()
                    raise
                if not self._started:
                    self._start(asyncio.get_running_loop())
                if yielded is None:
                    # A bare yield: coro gives up one turn of the loop.
                    try:
                        yield None
                    except GeneratorExit:
                        raise
                    except asyncio.CancelledError as error:
                        if stand_in:
                            self._detach(None)
                            raise
                        thrown = error
                    except BaseException as error:
                        thrown = error
                    waiting = None
                elif yielded.__class__ is _Future or asyncio.isfuture(yielded):
                    waiting = yielded
                else:
                    # Not a future: the task says what is wrong with it, to coro.
                    try:
                        yield yielded
                    except GeneratorExit:
                        raise
                    except BaseException as error:
                        thrown = error
                    waiting = None
        except GeneratorExit:
            # Whoever awaited this is closed, unfinished: so is coro. (A generator that
            # handed coro to a task of its own has ended already.)
            self._close()
            raise

    def _end(self) -> None:
        self._over = True
        if self._started:
            self._deadlines.untrack(self)

    def _detach(self, waiting: asyncio.Future[Any] | None) -> None:
        """The caller was cancelled: run the coroutine on in a task of its own.

        The task runs in the caller's own context, not a copy: coro started there, and
        a context variable it set before must be reset in the same context. A plain
        Task, not the loop's task factory: an eager one would start it here, inside
        the caller's step, where that context is entered already.
        """
        if waiting is not None:
            waiting._asyncio_future_blocking = True
        # What coro waits on, for a deadline that passes before the task's first step.
        self._waiting = waiting
        context = self._wakeup_context
        if context is None:  # coro never waited on a future here: no context to share
            context = contextvars.copy_context()
        detached = asyncio.Task(_Rest(self, waiting).run(), loop=self.loop, context=context)
        # Cancelled before its first step, the task never runs coro: close it then.
        detached.add_done_callback(self._detached_done)
        self.detached = detached

    def _detached_done(self, task: asyncio.Task[_T]) -> None:
        self._close()

    def _close(self) -> None:
        """End coro unfinished, if it has not ended (it runs its cleanup, which must
        not wait), and stop its deadline."""
        if not self._over:
            self._end()
            self._coro.close()

    # -- the deadline (called by Deadlines) ----------------------------------------

    def ended(self) -> bool:
        return self._over

    def expire(self) -> None:
        """The deadline passed: cancel what the coroutine waits on, as a task's cancel would."""
        self._expired += 1
        waiting = self._waiting
        if waiting is None or not waiting.cancel():
            self._throw = True

    # -- the future the caller's task waits on -------------------------------------

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self.loop

    def add_done_callback(
        self, fn: Callable[[Any], object], *, context: contextvars.Context | None = None
    ) -> None:
        assert self._waiting is not None
        self._wakeup = fn
        self._wakeup_context = context
        self._waiting.add_done_callback(fn, context=context)

    def remove_done_callback(self, fn: Callable[[Any], object]) -> int:
        assert self._waiting is not None
        return self._waiting.remove_done_callback(fn)

    def cancel(self, msg: Any = None) -> bool:
        """The caller's task is cancelled: wake it now, and leave the future alone."""
        waiting = self._waiting
        if waiting is None or self._interrupted:
            return False
        self._interrupted = True
        self._cancel_message = msg
        assert self._wakeup is not None
        if waiting.remove_done_callback(self._wakeup):
            # The future has not woken the task yet, and now it will not.
            self.loop.call_soon(self._wakeup, self, context=self._wakeup_context)
        # else: its wake-up is on its way already; _drive sees _interrupted.
        return True

    def cancelled(self) -> bool:
        return self._interrupted

    def done(self) -> bool:
        return self._interrupted or self._waiting is None or self._waiting.done()

    def result(self) -> None:
        if self._interrupted:
            raise asyncio.CancelledError(self._cancel_message)

    def __repr__(self) -> str:
        return f"<Attempt {self._coro!r} waiting on {self._waiting!r}>"


def _not_outcome_of(future: asyncio.Future[Any], error: BaseException) -> BaseException | None:
    """``error``, thrown by the task into a coroutine waiting on ``future``, unless it
    is the future's own outcome (which the coroutine reads from the future itself)."""
    if future.done():
        if future.cancelled():
            if isinstance(error, asyncio.CancelledError):
                return None
        elif error is future.exception():
            return None
    return error


class _Rest(Generic[_T]):
    """What remains of an attempt, to run in its detached task."""

    __slots__ = ("_attempt", "_waiting")

    def __init__(self, attempt: Attempt[_T], waiting: asyncio.Future[Any] | None) -> None:
        self._attempt = attempt
        self._waiting = waiting

    def __await__(self) -> Generator[Any, None, _T]:
        return self._attempt._drive(self._waiting, stand_in=False)

    async def run(self) -> _T:
        return await self
