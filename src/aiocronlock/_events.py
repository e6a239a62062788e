"""What happened to a tick, for whoever subscribes: metrics, tracing, audit logs."""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

logger = logging.getLogger("aiocronlock.events")


class EventKind(enum.StrEnum):
    ACQUIRED = "acquired"  #: this instance won the tick
    LOST_RACE = "lost_race"  #: another instance has the tick
    SKIPPED = "skipped"  #: not attempted or not run; ``reason`` says why
    FINISHED = "finished"  #: the run ended normally
    FAILED = "failed"  #: the run raised or was cancelled
    LEASE_RENEWED = "lease_renewed"  #: an exclusive run extended its lease
    LEASE_LOST = "lease_lost"  #: an exclusive run could not keep its lease
    CLEANED = "cleaned"  #: old rows were pruned; ``rows`` says how many


@dataclass(frozen=True, slots=True)
class LockEvent:
    """One event. Fields that do not apply to a kind are ``None``."""

    kind: EventKind
    worker: str
    job_name: str | None = None
    identifier: str | None = None
    lock_id: int | None = None
    #: For SKIPPED: "stale" (older than ttl), "running" (previous run still going
    #: here) or "overlap" (another instance holds the job's lease).
    reason: str | None = None
    #: For CLEANED: rows deleted.
    rows: int | None = None
    #: The tick's scheduled time, when there is one.
    run_time: datetime | None = None


Subscriber = Callable[[LockEvent], None]
#: The locker's own telemetry (see _otel), which takes an event's fields as they are:
#: ``(kind, job_name, identifier, other fields by name)``. Building a LockEvent costs
#: more than recording a metric, and every lost race on every tick emits one.
Recorder = Callable[[EventKind, str | None, str | None, dict[str, Any]], None]


class Events:
    """A list of callbacks, and the locker's own recorder. A callback that raises is
    logged and does not stop the others."""

    __slots__ = ("_recorder", "_subscribers")

    def __init__(self) -> None:
        self._subscribers: list[Subscriber] = []
        self._recorder: Recorder | None = None

    def __bool__(self) -> bool:
        """Whether anyone listens: if not, the locker does not emit."""
        return self._recorder is not None or bool(self._subscribers)

    def subscribe(self, callback: Subscriber) -> Callable[[], None]:
        if not callable(callback):
            raise TypeError(f"callback must be callable, not {type(callback).__name__}")
        self._subscribers.append(callback)

        def unsubscribe() -> None:
            if callback in self._subscribers:
                self._subscribers.remove(callback)

        return unsubscribe

    def record_with(self, recorder: Recorder) -> Callable[[], None]:
        """Hand every event's fields to ``recorder``; returns the undo. There is one
        recorder, the locker's telemetry: callbacks of users subscribe()."""
        if self._recorder is not None:
            raise RuntimeError("these events have a recorder already")
        self._recorder = recorder

        def stop() -> None:
            if self._recorder is recorder:
                self._recorder = None

        return stop

    def emit(
        self,
        kind: EventKind,
        worker: str,
        job_name: str | None,
        identifier: str | None,
        details: dict[str, Any],
    ) -> None:
        """Record the event, and build a LockEvent of it only if someone subscribed."""
        recorder = self._recorder
        if recorder is not None:
            try:
                recorder(kind, job_name, identifier, details)
            except Exception:
                logger.exception("the event recorder %r failed on %s", recorder, kind)
        if not self._subscribers:
            return
        event = LockEvent(
            kind=kind, worker=worker, job_name=job_name, identifier=identifier, **details
        )
        for callback in list(self._subscribers):
            try:
                callback(event)
            except Exception:
                logger.exception("event subscriber %r failed on %s", callback, event.kind)
