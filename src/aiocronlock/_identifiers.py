"""Identifier strategies: which string names the tick a run belongs to.

Two instances that compute the same ``(job_name, identifier)`` compete for the
same row, so the strategy decides what "the same tick" means.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Protocol, runtime_checkable

from ._validation import MAX_NAME_LENGTH, require_timedelta, unencodable

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_NAIVE_EPOCH = datetime(1970, 1, 1)
_MICROSECOND = timedelta(microseconds=1)


@runtime_checkable
class IdentifierStrategy(Protocol):
    """Any callable ``(job_name, run_time_utc) -> str`` that names a tick.

    ``run_time_utc`` is always a timezone-aware datetime in UTC. The result must
    be a non-empty string of at most 255 characters.
    """

    def __call__(self, job_name: str, run_time: datetime, /) -> str: ...


@dataclass(frozen=True, slots=True)
class Precision:
    """The run time truncated to a multiple of ``step`` since the Unix epoch, in ISO 8601.

    Build it with :func:`precision`.
    """

    step: timedelta

    def _start(self, run_time: datetime, epoch: datetime) -> datetime:
        """The start of the step that holds ``run_time``, counted from ``epoch`` (the
        Unix epoch, aware or naive)."""
        step_us = self.step // _MICROSECOND
        elapsed_us = (run_time - _EPOCH) // _MICROSECOND
        try:
            return epoch + timedelta(microseconds=elapsed_us - elapsed_us % step_us)
        except OverflowError:  # in the first step of year 1, which starts before it
            raise ValueError(
                f"run_time {run_time.isoformat()} falls in a step of {self.step} that "
                "starts before year 1: no identifier can name its tick"
            ) from None

    def truncate(self, run_time: datetime) -> datetime:
        """The start of the step that holds ``run_time``, in UTC."""
        return self._start(run_time, _EPOCH)

    def nearest(self, moment: datetime) -> datetime:
        """The multiple of ``step`` closest to ``moment``: a guess at the scheduled time
        of a tick that woke up a little early or late."""
        return self.truncate(moment + self.step / 2)

    def __call__(self, job_name: str, run_time: datetime, /) -> str:
        # 2025-01-01T10:11:12Z, or 2025-01-01T10:11:12.345000Z when the step starts
        # within a second (isoformat of a naive datetime, as strftime's %S.%f would be).
        return self._start(run_time, _NAIVE_EPOCH).isoformat() + "Z"


def precision(step: timedelta | float = timedelta(seconds=1)) -> Precision:
    """Identify a tick by its UTC run time truncated to ``step`` (the default is 1 second).

    >>> from datetime import datetime, timezone, timedelta
    >>> t = datetime(2025, 1, 1, 10, 11, 12, 345000, tzinfo=timezone.utc)
    >>> precision()("job", t)
    '2025-01-01T10:11:12Z'
    >>> precision(timedelta(hours=1))("job", t)
    '2025-01-01T10:00:00Z'
    """
    duration = require_timedelta("precision step", step)
    if duration < _MICROSECOND or duration % _MICROSECOND:
        raise ValueError(f"precision step must be a whole number of microseconds, got {step!r}")
    return Precision(duration)


def compute_identifier(strategy: IdentifierStrategy, job_name: str, run_time: datetime) -> str:
    """Call ``strategy`` and check what it returned; its own exceptions propagate unchanged."""
    value = strategy(job_name, run_time)
    if not isinstance(value, str):
        raise TypeError(
            f"identifier strategy {strategy!r} must return a str, "
            f"returned {type(value).__name__} for job {job_name!r}"
        )
    if not value.strip():
        raise ValueError(
            f"identifier strategy {strategy!r} returned an empty identifier for job {job_name!r}"
        )
    if len(value) > MAX_NAME_LENGTH:
        raise ValueError(
            f"identifier strategy {strategy!r} returned {len(value)} characters for job "
            f"{job_name!r}; identifiers must be at most {MAX_NAME_LENGTH}"
        )
    if "\x00" in value:
        raise ValueError(
            f"identifier strategy {strategy!r} returned {value!r} for job {job_name!r}; "
            "identifiers must not contain NUL ('\\x00')"
        )
    if not value.isascii() and (problem := unencodable(value)):
        raise ValueError(
            f"identifier strategy {strategy!r} returned {value!r} for job {job_name!r}, "
            f"which UTF-8 cannot encode ({problem})"
        )
    return value
