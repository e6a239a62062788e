"""The exceptions aiocronlock raises.

Losing the race for a tick is not an error: ``lock()`` returns ``None``.
Exceptions are for misuse (``ValueError``/``TypeError`` from the standard library)
and for a database that could not give an answer (``BackendError``).
"""

from __future__ import annotations


class AiocronlockError(Exception):
    """Base class of every exception defined by aiocronlock."""


class BackendError(AiocronlockError):
    """The database could not decide: unreachable, dropped, timed out or misconfigured.

    The driver's exception is chained as ``__cause__``. When this is raised by
    ``lock()``, the tick was neither won nor lost as far as the caller knows, so
    the job must not run.
    """

    def __init__(self, operation: str, reason: str, *, hint: str | None = None) -> None:
        self.operation = operation
        self.reason = reason
        self.hint = hint
        message = f"{operation} failed: {reason}"
        if hint:
            message = f"{message}: {hint}"
        super().__init__(message)


class TableMissingError(BackendError):
    """The lock table does not exist yet."""

    def __init__(self, operation: str, table: str) -> None:
        self.table = table
        super().__init__(
            operation,
            f"table {table!r} does not exist",
            hint="call `await locker.create_table()` or run `aiocronlock init`",
        )


class LeaseLostError(AiocronlockError):
    """An exclusive run lost its lease while running and was cancelled.

    Raised from the ``async with lock:`` block in place of the cancellation, so the
    caller (and the scheduler's log) sees why the job stopped.
    """

    def __init__(self, job_name: str, lock_id: int, reason: str) -> None:
        self.job_name = job_name
        self.lock_id = lock_id
        self.reason = reason
        super().__init__(
            f"job {job_name!r} (run {lock_id}) lost its lease and was stopped: {reason}; "
            "another instance may now run it"
        )
