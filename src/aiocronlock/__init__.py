"""Run each tick of a scheduled job on exactly one instance, decided by one SQL INSERT."""

from __future__ import annotations

from typing import Any

from ._errors import AiocronlockError, BackendError, TableMissingError
from ._identifiers import IdentifierStrategy, Precision, precision
from ._lock import Lock
from ._locker import AsyncDBLocker, JobRun
from ._schema import Status, lock_table

__all__ = [
    "AiocronlockError",
    "AsyncDBLocker",
    "BackendError",
    "IdentifierStrategy",
    "JobRun",
    "Lock",
    "Precision",
    "Status",
    "TableMissingError",
    "__version__",
    "lock_table",
    "precision",
]


def __getattr__(name: str) -> Any:
    if name == "__version__":
        from importlib.metadata import version

        return version("aiocronlock")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
