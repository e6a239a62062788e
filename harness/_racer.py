"""One racing process of the contention harness; started by ``harness.contention``.

Protocol, one line each way at a time:

1. the parent writes a :class:`RacerSpec` as one line of JSON on stdin;
2. the process builds its lockers (each with an engine of its own), opens one
   connection per locker, and prints ``ready``;
3. the parent writes ``go``; every locker walks all ``(job, tick)`` pairs in its own
   order, calling ``lock()`` and, when it wins, leaving ``async with lock`` (FINISHED);
4. the process prints a :class:`RacerReport` as one line of JSON, closes its lockers
   and exits 0. A ``BackendError`` is data (counted in the report), not a crash.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any

from aiocronlock import AsyncDBLocker, BackendError, precision

READY = "ready"
GO = "go"


@dataclass(frozen=True, slots=True)
class RacerSpec:
    """What one process races for; every process gets the same jobs and run times."""

    url: str
    table: str
    process: int
    lockers: int
    jobs: list[str]
    #: The ticks' scheduled times, ISO 8601 with offset, computed by the parent.
    run_times: list[str]
    tick_us: int
    #: Each locker visits pair ``(job, k)`` in order of ``k + U(0, window)``; 0 shuffles fully.
    window: float
    seed: int
    #: The lockers' ``timeout``; ``None`` keeps the library's default.
    timeout: float | None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RacerSpec:
        return cls(**data)


@dataclass(frozen=True, slots=True)
class Win:
    """A tick as the locker that won it saw it."""

    job: int
    tick: int
    worker: str
    lock_id: int
    identifier: str


@dataclass
class RacerReport:
    """Everything one process did; printed as its last line of output."""

    process: int
    wins: list[Win] = field(default_factory=list)
    #: ``lock()`` calls made, and those that answered (won or lost) rather than raised.
    attempts: int = 0
    decisions: int = 0
    #: ``"<lock|unlock>: <exception type>: <reason>"`` -> how many times.
    errors: Counter[str] = field(default_factory=Counter)
    race_seconds: float = 0.0

    def to_json(self) -> str:
        return json.dumps(
            {
                "process": self.process,
                "wins": [asdict(win) for win in self.wins],
                "attempts": self.attempts,
                "decisions": self.decisions,
                "errors": dict(self.errors),
                "race_seconds": self.race_seconds,
            }
        )

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RacerReport:
        return cls(
            process=data["process"],
            wins=[Win(**win) for win in data["wins"]],
            attempts=data["attempts"],
            decisions=data["decisions"],
            errors=Counter(data["errors"]),
            race_seconds=data["race_seconds"],
        )


def worker_name(process: int, locker: int) -> str:
    return f"p{process}-l{locker}"


def visiting_order(spec: RacerSpec, worker: str) -> list[tuple[int, int]]:
    """All ``(job, tick)`` pairs in this locker's own, reproducible, order.

    With a window, lockers move through the ticks together, each in a different order
    inside the window, so several of them insert the same key at nearly the same time.
    """
    rng = random.Random(f"{spec.seed}:{worker}")
    pairs = [(job, tick) for tick in range(len(spec.run_times)) for job in range(len(spec.jobs))]
    if spec.window <= 0:
        rng.shuffle(pairs)
    else:
        pairs.sort(key=lambda pair: pair[1] + rng.random() * spec.window)
    return pairs


def _error_kind(phase: str, error: Exception) -> str:
    if isinstance(error, BackendError):
        # The reason names the driver's exception and its first line; the operation
        # (with the job name and URL) would split one kind of failure into many.
        return f"{phase}: BackendError: {error.reason}"
    return f"{phase}: {type(error).__name__}: {error}"


async def _race(
    locker: AsyncDBLocker,
    spec: RacerSpec,
    run_times: list[datetime],
    order: list[tuple[int, int]],
    report: RacerReport,
) -> None:
    for job, tick in order:
        report.attempts += 1
        try:
            lock = await locker.lock(spec.jobs[job], run_times[tick])
        except BackendError as error:
            report.errors[_error_kind("lock", error)] += 1
            continue
        report.decisions += 1
        if lock is None:
            continue
        report.wins.append(Win(job, tick, locker.worker, lock.id, lock.identifier))
        try:
            async with lock:
                pass
        except BackendError as error:
            report.errors[_error_kind("unlock", error)] += 1


async def race(spec: RacerSpec) -> RacerReport:
    run_times = [datetime.fromisoformat(text) for text in spec.run_times]
    options: dict[str, Any] = {} if spec.timeout is None else {"timeout": spec.timeout}
    lockers = [
        AsyncDBLocker(
            spec.url,
            worker=worker_name(spec.process, index),
            identifier=precision(timedelta(microseconds=spec.tick_us)),
            table_name=spec.table,
            clean_interval=None,
            **options,
        )
        for index in range(spec.lockers)
    ]
    report = RacerReport(process=spec.process)
    try:
        orders = [visiting_order(spec, locker.worker) for locker in lockers]
        # One connection per locker is open before the start, so the race measures
        # deciding, not connecting.
        await asyncio.gather(*(locker.history(limit=1) for locker in lockers))
        print(READY, flush=True)
        line = await asyncio.to_thread(sys.stdin.readline)
        if line.strip() != GO:
            raise RuntimeError(f"expected {GO!r} from the parent, got {line!r}")
        started = time.perf_counter()
        await asyncio.gather(
            *(
                _race(locker, spec, run_times, order, report)
                for locker, order in zip(lockers, orders, strict=True)
            )
        )
        report.race_seconds = time.perf_counter() - started
        print(report.to_json(), flush=True)
    finally:
        for locker in lockers:
            await locker.aclose()
    return report


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    spec = RacerSpec.from_json(json.loads(sys.stdin.readline()))
    asyncio.run(race(spec))


if __name__ == "__main__":
    main()
