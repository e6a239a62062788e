"""OpenTelemetry: a span per run and a counter of ticks, seen through the SDK's in-memory exporters.

OpenTelemetry lets a process set its global tracer and meter providers once, so this
module sets them once, in a module-scoped fixture, and tells its tests apart by job
name (each test uses its own) and by clearing the span exporter before each test.
Afterwards the exporter is shut down, so tests that run later record no spans.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest
from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader, NumberDataPoint
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from aiocronlock import EventKind, LeaseLostError, LockEvent
from aiocronlock.testing import memory_locker


@dataclass
class Telemetry:
    spans: InMemorySpanExporter
    metrics: InMemoryMetricReader

    def runs_of(self, job: str) -> list[ReadableSpan]:
        return [s for s in self.spans.get_finished_spans() if s.name == f"aiocronlock run {job}"]

    def points(self, name: str) -> Iterator[NumberDataPoint]:
        """The data points of the counter ``name``."""
        data = self.metrics.get_metrics_data()
        for resource in data.resource_metrics if data is not None else []:
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    if metric.name == name:
                        for point in metric.data.data_points:
                            assert isinstance(point, NumberDataPoint)
                            yield point

    def ticks_of(self, job: str, by: str = "aiocronlock.outcome") -> dict[str, int]:
        """The ``aiocronlock.ticks`` counter's value for ``job``, by outcome (or ``by``)."""
        counts: dict[str, int] = {}
        for point in self.points("aiocronlock.ticks"):
            attributes = dict(point.attributes or {})
            if attributes.get("aiocronlock.job") == job:
                key = str(attributes.get(by))
                counts[key] = counts.get(key, 0) + int(point.value)
        return counts

    def cleaned_by(self, worker: str) -> int:
        return sum(
            int(point.value)
            for point in self.points("aiocronlock.cleaned_rows")
            if dict(point.attributes or {}) == {"aiocronlock.worker": worker}
        )


@pytest.fixture(scope="module")
def _providers() -> Iterator[Telemetry]:
    spans = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    reader = InMemoryMetricReader()
    trace.set_tracer_provider(tracer_provider)
    metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
    if trace.get_tracer_provider() is not tracer_provider:
        pytest.fail("another test set OpenTelemetry's global tracer provider first")
    yield Telemetry(spans, reader)
    # The providers stay (they cannot be unset); later tests' spans are dropped.
    spans.shutdown()


@pytest.fixture
def telemetry(_providers: Telemetry) -> Iterator[Telemetry]:
    _providers.spans.clear()
    yield _providers
    _providers.spans.clear()


def _job() -> str:
    return f"job-{uuid.uuid4().hex[:8]}"


def _tick(second: int) -> datetime:
    return datetime.now(UTC).replace(microsecond=0, second=second)


async def test_a_won_run_is_one_span_and_each_outcome_is_counted(telemetry: Telemetry) -> None:
    job = _job()
    async with memory_locker(worker="w-1") as locker:
        lock = await locker.lock(job, _tick(0))
        assert lock is not None
        assert await locker.lock(job, _tick(0)) is None  # the tick is taken: lost race
        async with lock:
            assert telemetry.runs_of(job) == []  # the span ends with the run

    (span,) = telemetry.runs_of(job)
    assert dict(span.attributes or {}) == {
        "aiocronlock.job": job,
        "aiocronlock.identifier": lock.identifier,
        "aiocronlock.worker": "w-1",
        "aiocronlock.lock_id": lock.id,
        "aiocronlock.outcome": "finished",
    }
    assert span.status.status_code != StatusCode.ERROR
    assert telemetry.ticks_of(job) == {"acquired": 1, "lost_race": 1, "finished": 1}


async def test_a_failed_run_has_an_error_span_and_is_counted(telemetry: Telemetry) -> None:
    job = _job()
    async with memory_locker(worker="w-1") as locker:
        lock = await locker.lock(job, _tick(0))
        assert lock is not None
        with pytest.raises(ZeroDivisionError):
            async with lock:
                1 / 0  # noqa: B018 - the job fails
        again = await locker.lock(job, _tick(1))
        assert again is not None
        await again.unlock()

    spans = {(s.attributes or {}).get("aiocronlock.lock_id"): s for s in telemetry.runs_of(job)}
    assert set(spans) == {lock.id, again.id}
    failed = spans[lock.id]
    assert failed.status.status_code == StatusCode.ERROR
    assert failed.attributes is not None
    assert failed.attributes["aiocronlock.outcome"] == "failed"
    assert spans[again.id].status.status_code != StatusCode.ERROR
    assert telemetry.ticks_of(job) == {"acquired": 2, "failed": 1, "finished": 1}


async def test_telemetry_false_records_nothing(telemetry: Telemetry) -> None:
    job = _job()
    async with memory_locker(worker="w-1", telemetry=False) as locker:
        lock = await locker.lock(job, _tick(0))
        assert lock is not None
        assert await locker.lock(job, _tick(0)) is None
        with pytest.raises(ZeroDivisionError):
            async with lock:
                1 / 0  # noqa: B018 - the job fails

    assert telemetry.runs_of(job) == []
    assert telemetry.ticks_of(job) == {}


async def test_a_subscriber_sees_every_event_telemetry_records(telemetry: Telemetry) -> None:
    # Telemetry takes the events' fields without a LockEvent; a subscriber beside it
    # still gets each event, whole.
    job = _job()
    seen: list[LockEvent] = []
    async with memory_locker(worker="w-1") as locker:
        locker.subscribe(seen.append)
        lock = await locker.lock(job, _tick(0))
        assert lock is not None
        assert await locker.lock(job, _tick(0)) is None
        async with lock:
            pass

    assert [(e.kind, e.worker, e.job_name, e.identifier, e.lock_id) for e in seen] == [
        (EventKind.ACQUIRED, "w-1", job, lock.identifier, lock.id),
        (EventKind.LOST_RACE, "w-1", job, lock.identifier, None),
        (EventKind.FINISHED, "w-1", job, lock.identifier, lock.id),
    ]
    assert telemetry.ticks_of(job) == {"acquired": 1, "lost_race": 1, "finished": 1}
    assert len(telemetry.runs_of(job)) == 1


async def test_a_skip_is_counted_with_its_reason_and_pruned_rows_are_counted(
    telemetry: Telemetry,
) -> None:
    job, worker = _job(), f"w-{uuid.uuid4().hex[:8]}"
    async with memory_locker(worker=worker, ttl=timedelta(hours=1)) as locker:
        stale = datetime.now(UTC) - timedelta(hours=2)
        assert await locker.lock(job, stale) is None
        old = await locker.lock(f"{job}-old", datetime.now(UTC))
        assert old is not None
        await old.unlock()
        async with locker.engine.begin() as conn:  # age the row past the ttl
            await conn.execute(
                locker.table.update().values(created_at=datetime.now(UTC) - timedelta(hours=2))
            )
        assert await locker.clean() == 1

    assert telemetry.ticks_of(job) == {"skipped": 1}
    assert telemetry.ticks_of(job, by="aiocronlock.reason") == {"stale": 1}
    assert telemetry.cleaned_by(worker) == 1


def _block_event_loop(seconds: float) -> None:
    """Hold the event loop, as blocking code in a job would."""
    time.sleep(seconds)


async def test_an_overlap_is_a_skip_with_its_reason(telemetry: Telemetry) -> None:
    job = _job()
    async with memory_locker(worker="w-1") as locker:
        held = await locker.lock(job, _tick(0), exclusive=True, lease=60)
        assert held is not None
        assert await locker.lock(job, _tick(1), exclusive=True, lease=60) is None
        await held.unlock()

    assert telemetry.ticks_of(job) == {"acquired": 1, "skipped": 1, "finished": 1}
    assert telemetry.ticks_of(job, by="aiocronlock.reason") == {"None": 2, "overlap": 1}


async def test_a_lost_lease_ends_the_span_in_error(telemetry: Telemetry) -> None:
    job = _job()
    async with memory_locker(worker="w-1") as locker:
        lock = await locker.lock(job, _tick(0), exclusive=True, lease=0.5)
        assert lock is not None
        with pytest.raises(LeaseLostError):
            async with lock:
                _block_event_loop(1.0)  # past the lease
                await asyncio.sleep(10)

    (span,) = telemetry.runs_of(job)
    assert span.status.status_code == StatusCode.ERROR
    assert (span.attributes or {})["aiocronlock.outcome"] == "lease_lost"
    assert telemetry.ticks_of(job) == {"acquired": 1, "lease_lost": 1}
    reasons = telemetry.ticks_of(job, by="aiocronlock.reason")
    assert reasons["None"] == 1 and len(reasons) == 2  # lease_lost carries why
