"""Run each tick of a scheduled job on exactly one instance, decided by one SQL INSERT."""

from __future__ import annotations

from typing import Any

from ._clock import Clock, SystemClock
from ._errors import AiocronlockError, BackendError, LeaseLostError, TableMissingError
from ._events import EventKind, LockEvent
from ._guard import locked
from ._identifiers import IdentifierStrategy, Precision, precision
from ._lock import Lock, current_lock
from ._locker import AsyncDBLocker, JobRun
from ._scheduler import Job, Scheduler
from ._schema import Status, lock_table
from ._triggers import CronTrigger, IntervalTrigger, Trigger, ticks

__all__ = [
    "AiocronlockError",
    "AsyncDBLocker",
    "BackendError",
    "Clock",
    "CronTrigger",
    "EventKind",
    "IdentifierStrategy",
    "IntervalTrigger",
    "Job",
    "JobRun",
    "LeaseLostError",
    "Lock",
    "LockEvent",
    "Precision",
    "Scheduler",
    "Status",
    "SystemClock",
    "TableMissingError",
    "Trigger",
    "__version__",
    "current_lock",
    "lock_table",
    "locked",
    "precision",
    "ticks",
]


def __getattr__(name: str) -> Any:
    if name == "__version__":
        from importlib.metadata import version

        return version("aiocronlock")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
