"""OpenTelemetry: a span around each run and counters per job and outcome.

Active when ``opentelemetry-api`` is installed (``pip install 'aiocronlock[otel]'``)
and the locker's ``telemetry`` is true; without an SDK configured, the API's
no-op implementations make it nearly free.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ._events import EventKind, LockEvent

if TYPE_CHECKING:
    from ._locker import AsyncDBLocker

#: Outcomes that end a run's span, and the span status each gives.
_ENDINGS = {EventKind.FINISHED: True, EventKind.FAILED: False, EventKind.LEASE_LOST: False}


def instrument(locker: AsyncDBLocker) -> Callable[[], None]:
    """Subscribe spans and metrics to ``locker``'s events; returns the unsubscribe function."""
    from opentelemetry import metrics, trace

    tracer = trace.get_tracer("aiocronlock")
    meter = metrics.get_meter("aiocronlock")
    ticks = meter.create_counter(
        "aiocronlock.ticks",
        unit="{tick}",
        description="Ticks decided or run by this instance, by job and outcome",
    )
    cleaned = meter.create_counter(
        "aiocronlock.cleaned_rows", unit="{row}", description="Rows pruned by this instance"
    )
    spans: dict[int, Any] = {}

    def on_event(event: LockEvent) -> None:
        if event.kind == EventKind.CLEANED:
            cleaned.add(event.rows or 0, {"aiocronlock.worker": event.worker})
            return
        if event.kind == EventKind.LEASE_RENEWED:
            return
        attributes = {
            "aiocronlock.job": event.job_name or "",
            "aiocronlock.outcome": event.kind.value,
            "aiocronlock.worker": event.worker,
        }
        if event.reason:
            attributes["aiocronlock.reason"] = event.reason
        ticks.add(1, attributes)
        if event.lock_id is None:
            return
        if event.kind == EventKind.ACQUIRED:
            spans[event.lock_id] = tracer.start_span(
                f"aiocronlock run {event.job_name}",
                attributes={
                    "aiocronlock.job": event.job_name or "",
                    "aiocronlock.identifier": event.identifier or "",
                    "aiocronlock.worker": event.worker,
                    "aiocronlock.lock_id": event.lock_id,
                },
            )
        elif event.kind in _ENDINGS:
            span = spans.pop(event.lock_id, None)
            if span is not None:
                span.set_attribute("aiocronlock.outcome", event.kind.value)
                if not _ENDINGS[event.kind]:
                    span.set_status(trace.Status(trace.StatusCode.ERROR, event.kind.value))
                span.end()

    return locker.subscribe(on_event)
