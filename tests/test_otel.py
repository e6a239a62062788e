"""OpenTelemetry: a span per run and a counter of ticks, seen through the SDK's in-memory exporters.

OpenTelemetry lets a process set its global tracer and meter providers once, so this
module sets them once, in a module-scoped fixture, and tells its tests apart by job
name (each test uses its own) and by clearing the span exporter before each test.
Afterwards the exporter is shut down, so tests that run later record no spans.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

import pytest
from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader, NumberDataPoint
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from aiocronlock.testing import memory_locker


@dataclass
class Telemetry:
    spans: InMemorySpanExporter
    metrics: InMemoryMetricReader

    def runs_of(self, job: str) -> list[ReadableSpan]:
        return [s for s in self.spans.get_finished_spans() if s.name == f"aiocronlock run {job}"]

    def ticks_of(self, job: str) -> dict[str, int]:
        """The ``aiocronlock.ticks`` counter's value for ``job``, by outcome."""
        counts: dict[str, int] = {}
        data = self.metrics.get_metrics_data()
        for resource in data.resource_metrics if data is not None else []:
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    if metric.name != "aiocronlock.ticks":
                        continue
                    for point in metric.data.data_points:
                        attributes = dict(point.attributes or {})
                        if attributes.get("aiocronlock.job") != job:
                            continue
                        assert isinstance(point, NumberDataPoint)
                        outcome = str(attributes["aiocronlock.outcome"])
                        counts[outcome] = counts.get(outcome, 0) + int(point.value)
        return counts


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
