"""Run each tick of a scheduled job on exactly one instance, decided by one SQL INSERT."""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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

#: Where each public name lives. Modules load on first use, so that the command
#: line's ``--help`` (which imports this package) loads neither SQLAlchemy nor rich.
_MODULES = {
    "AiocronlockError": "_errors",
    "AsyncDBLocker": "_locker",
    "BackendError": "_errors",
    "Clock": "_clock",
    "CronTrigger": "_triggers",
    "EventKind": "_events",
    "IdentifierStrategy": "_identifiers",
    "IntervalTrigger": "_triggers",
    "Job": "_scheduler",
    "JobRun": "_locker",
    "LeaseLostError": "_errors",
    "Lock": "_lock",
    "LockEvent": "_events",
    "Precision": "_identifiers",
    "Scheduler": "_scheduler",
    "Status": "_schema",
    "SystemClock": "_clock",
    "TableMissingError": "_errors",
    "Trigger": "_triggers",
    "current_lock": "_lock",
    "lock_table": "_schema",
    "locked": "_guard",
    "precision": "_identifiers",
    "ticks": "_triggers",
}


def __getattr__(name: str) -> Any:
    if name == "__version__":
        from importlib.metadata import version

        return version("aiocronlock")
    module = _MODULES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value  # found directly from now on
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
