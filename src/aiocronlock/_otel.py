"""OpenTelemetry: a span around each run and counters per job and outcome.

Active when ``opentelemetry-api`` is installed (``pip install 'aiocronlock[otel]'``)
and the locker's ``telemetry`` is true; without an SDK configured, the API's
no-op implementations make it nearly free.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ._events import EventKind

if TYPE_CHECKING:
    from ._locker import AsyncDBLocker

#: Outcomes that end a run's span, and the span status each gives.
_ENDINGS = {EventKind.FINISHED: True, EventKind.FAILED: False, EventKind.LEASE_LOST: False}
#: The kinds counted as ticks, with their outcome's name (looked up once: an enum's
#: ``.value``, and even ``EventKind.X``, cost more than a dict lookup).
_OUTCOMES: dict[EventKind, str] = {
    kind: kind.value
    for kind in EventKind
    if kind not in (EventKind.CLEANED, EventKind.LEASE_RENEWED)
}
#: Attribute sets kept for reuse, at most this many (one per job and outcome, usually).
_MAX_ATTRIBUTE_SETS = 1024


def instrument(locker: AsyncDBLocker) -> Callable[[], None]:
    """Record spans and metrics of ``locker``'s events; returns the function that stops it.

    It takes the events' fields directly (see ``Events.record_with``): no LockEvent is
    built for it, so a locker nobody else subscribes to pays only for the metric.
    """
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
    # The attributes of each (job, outcome, reason) seen: every lost race records one.
    attribute_sets: dict[tuple[str | None, str, str | None], dict[str, str]] = {}

    def record(
        kind: EventKind, job_name: str | None, identifier: str | None, details: dict[str, Any]
    ) -> None:
        outcome = _OUTCOMES.get(kind)
        if outcome is None:  # not a tick's
            if kind is EventKind.CLEANED:
                cleaned.add(details.get("rows") or 0, {"aiocronlock.worker": locker.worker})
            return
        reason = details.get("reason")
        attributes = attribute_sets.get((job_name, outcome, reason))
        if attributes is None:
            attributes = {
                "aiocronlock.job": job_name or "",
                "aiocronlock.outcome": outcome,
                "aiocronlock.worker": locker.worker,
            }
            if reason:
                attributes["aiocronlock.reason"] = reason
            if len(attribute_sets) >= _MAX_ATTRIBUTE_SETS:
                attribute_sets.clear()
            attribute_sets[job_name, outcome, reason] = attributes
        ticks.add(1, attributes)
        lock_id = details.get("lock_id")
        if lock_id is None:
            return
        if kind is EventKind.ACQUIRED:
            spans[lock_id] = tracer.start_span(
                f"aiocronlock run {job_name}",
                attributes={
                    "aiocronlock.job": job_name or "",
                    "aiocronlock.identifier": identifier or "",
                    "aiocronlock.worker": locker.worker,
                    "aiocronlock.lock_id": lock_id,
                },
            )
        elif kind in _ENDINGS:
            span = spans.pop(lock_id, None)
            if span is not None:
                span.set_attribute("aiocronlock.outcome", outcome)
                if not _ENDINGS[kind]:
                    span.set_status(trace.Status(trace.StatusCode.ERROR, outcome))
                span.end()

    return locker.events.record_with(record)
