"""Acquire, won and lost, and the naive ORM way (benchmarks a, b and c).

The contenders decide single ticks one after another:

- ``raw``, the floor: the driver on one dedicated connection (no pool), sending the
  very same INSERT text with the same parameters;
- ``raw pool``: the same through the driver's own pool (a second figure);
- ``aiocronlock (url)``: ``await locker.lock(job, run_time)``, the locker built from a URL;
- ``aiocronlock (engine)``: the same on a locker given the user's own
  ``create_async_engine(url)`` engine, as a FastAPI or aiohttp app would;
- the naive ORM port of the Go original: ``session.add(Row(...))`` then
  ``await session.commit()``, catching ``IntegrityError`` when the tick is taken.

Each contender's CPU time per call is measured too (``time.process_time`` over its
batches, the database's own work aside when it runs in another process).

*Won* attempts use fresh job names; *lost* attempts retry the keys just won. The
contenders take turns in rounds, in a rotating order, after a warm-up of each, so
drift on the machine or in the database lands on all of them alike.
"""

from __future__ import annotations

import gc
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import MetaData, Table
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlalchemy.orm import registry

from aiocronlock import AsyncDBLocker, lock_table, precision

from ._backends import WORKER, Backend
from ._capture import Statement, captured, only_insert
from ._placement import placed
from ._raw import Dedicated, RawClient, open_raw
from ._stats import Latency, Ratio, Section, ms, ratio, times

LIB, ENG, RAW, POOL, ORM = "aiocronlock (url)", "aiocronlock (engine)", "raw", "raw pool", "orm"
CONTENDERS = (LIB, ENG, RAW, POOL, ORM)
#: The issue's targets for acquire p50 against the raw driver, by backend.
ACQUIRE_TARGETS = {"postgresql": 1.10, "mysql": 1.20, "sqlite": 1.20}

Attempt = Callable[[str], Callable[[], Awaitable[bool]]]


class LockRow:
    """The naive port's mapped class: one instance per attempted tick."""

    def __init__(self, **values: Any) -> None:
        for key, value in values.items():
            setattr(self, key, value)


def mapped_row(table: Table) -> type[LockRow]:
    """A fresh subclass of :class:`LockRow` mapped onto ``table`` (one per backend)."""
    cls = type(f"LockRow_{table.name}", (LockRow,), {})
    registry().map_imperatively(cls, table)
    return cls


@dataclass
class AcquireResult:
    sections: list[Section]
    #: Latency samples in ms for the chart: phase ("won"/"lost") -> contender -> samples.
    samples_ms: dict[str, dict[str, list[float]]]
    #: CPU seconds per call: phase -> contender -> seconds.
    cpu_s: dict[str, dict[str, float]]


async def capture_acquire(locker: AsyncDBLocker, run_time: datetime) -> Statement:
    """Make the locker win one tick, and return the INSERT it sent, ready to rebind."""
    job = f"bench-sentinel-{secrets.token_hex(6)}"
    identifier = precision()(job, run_time)
    with captured(locker.engine) as seen:
        if await locker.lock(job, run_time) is None:
            raise RuntimeError("the sentinel tick was already taken")
    sql, params = only_insert(seen)
    return Statement.from_capture(sql, params, {job: "job", identifier: "ident"})


async def run(backend: Backend, *, iterations: int, rounds: int, warmup: int) -> AcquireResult:
    run_time = datetime.now(UTC)
    identifier = precision()("any", run_time)
    locker = backend.locker()
    raw: RawClient | None = None
    pool: RawClient | None = None
    orm_engine = backend.engine()
    user_engine = backend.engine()  # as an application makes it, defaults and all
    engine_locker = backend.locker(engine=user_engine)
    try:
        statement = await capture_acquire(locker, run_time)
        raw = await Dedicated.open(backend)
        pool = await open_raw(backend)
        session_factory = async_sessionmaker(orm_engine, expire_on_commit=False)
        row_cls = mapped_row(lock_table(MetaData(), name=backend.table))
        naive_utc = backend.name == "mysql"  # DATETIME columns take naive UTC

        def locking(on: AsyncDBLocker) -> Attempt:
            def prepare(job: str) -> Callable[[], Awaitable[bool]]:
                async def attempt() -> bool:
                    return await on.lock(job, run_time) is not None

                return attempt

            return prepare

        def sending(client: RawClient) -> Attempt:
            def prepare(job: str) -> Callable[[], Awaitable[bool]]:
                params = statement.bind({"job": job, "ident": identifier})

                async def attempt() -> bool:
                    return await client.insert_returning_id(statement.sql, params) is not None

                return attempt

            return prepare

        def orm_attempt(job: str) -> Callable[[], Awaitable[bool]]:
            async def attempt() -> bool:
                now = datetime.now(UTC)
                if naive_utc:
                    now = now.replace(tzinfo=None)
                async with session_factory() as session:
                    session.add(
                        row_cls(
                            job_name=job,
                            job_identifier=identifier,
                            worker=WORKER,
                            status="RUNNING",
                            created_at=now,
                            updated_at=now,
                        )
                    )
                    try:
                        await session.commit()
                    except IntegrityError:
                        await session.rollback()
                        return False
                    return True

            return attempt

        attempts: dict[str, Attempt] = {
            LIB: locking(locker),
            ENG: locking(engine_locker),
            RAW: sending(raw),
            POOL: sending(pool),
            ORM: orm_attempt,
        }
        samples: dict[str, dict[str, list[int]]] = {
            phase: {name: [] for name in CONTENDERS} for phase in ("won", "lost")
        }
        cpu: dict[str, dict[str, float]] = {
            phase: dict.fromkeys(CONTENDERS, 0.0) for phase in ("won", "lost")
        }

        async def batch(name: str, jobs: list[str], expect_won: bool, out: list[int]) -> None:
            prepare = attempts[name]
            gc.collect()
            started = time.process_time()
            for job in jobs:
                call = prepare(job)
                start = time.perf_counter_ns()
                won = await call()
                out.append(time.perf_counter_ns() - start)
                if won is not expect_won:
                    raise RuntimeError(
                        f"{name} {'lost' if expect_won else 'won'} {job!r}: "
                        "the benchmark's keys are not what it thinks"
                    )
            if out:
                cpu["won" if expect_won else "lost"][name] += time.process_time() - started

        with placed(backend) as placement:
            for name in CONTENDERS:  # warm-up: connections, statement caches, first-use paths
                warm = [f"warm-{name}-{i}" for i in range(warmup)]
                await batch(name, warm, True, [])
                await batch(name, warm, False, [])

            per_round = max(1, iterations // rounds)
            for r in range(rounds):
                order = CONTENDERS[r % len(CONTENDERS) :] + CONTENDERS[: r % len(CONTENDERS)]
                jobs = {name: [f"{name}-{r}-{i}" for i in range(per_round)] for name in order}
                for name in order:
                    await batch(name, jobs[name], True, samples["won"][name])
                for name in order:
                    await batch(name, jobs[name], False, samples["lost"][name])
    finally:
        for client in (raw, pool):
            if client is not None:
                await client.aclose()
        await orm_engine.dispose()
        await locker.aclose()
        await engine_locker.aclose()
        await user_engine.dispose()

    cpu_s = {
        phase: {name: spent / max(1, len(samples[phase][name])) for name, spent in by.items()}
        for phase, by in cpu.items()
    }
    return AcquireResult(
        sections=_sections(backend, samples, cpu_s, placement),
        samples_ms={
            phase: {name: [s / 1e6 for s in values] for name, values in by_name.items()}
            for phase, by_name in samples.items()
        },
        cpu_s=cpu_s,
    )


def _sections(
    backend: Backend,
    samples: dict[str, dict[str, list[int]]],
    cpu_s: dict[str, dict[str, float]],
    placement: str,
) -> list[Section]:
    limit = ACQUIRE_TARGETS[backend.name]
    columns = [
        "contender",
        "n",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "mean ms",
        "cpu us/call",
        "p50 ratio",
        "p99 ratio",
    ]
    stats = {
        phase: {name: Latency.of_ns(values) for name, values in by_name.items()}
        for phase, by_name in samples.items()
    }

    def row(label: str, lat: Latency, base: Latency, cpu: float | None = None) -> list[str]:
        return [
            label,
            str(lat.n),
            ms(lat.p50),
            ms(lat.p90),
            ms(lat.p99),
            ms(lat.mean),
            "" if cpu is None else f"{cpu * 1e6:.0f}",
            times(ratio(lat.p50, base.p50)),
            times(ratio(lat.p99, base.p99)),
        ]

    sections = []
    for phase, what in (("won", "fresh tick"), ("lost", "tick already taken")):
        s, c = stats[phase], cpu_s[phase]
        base = s[RAW]
        sections.append(
            Section(
                benchmark=f"acquire_{phase}",
                backend=backend.name,
                title=f"one lock() on a {what}, vs the same INSERT on one dedicated "
                f"connection ({placement})",
                columns=columns,
                rows=[
                    row(f"{backend.raw_name} (dedicated)", base, base, c[RAW]),
                    row(f"{backend.raw_name} (pool)", s[POOL], base, c[POOL]),
                    row(LIB, s[LIB], base, c[LIB]),
                    row(ENG, s[ENG], base, c[ENG]),
                ],
                ratios=[
                    Ratio(
                        f"acquire_{phase}",
                        backend.name,
                        "p50 url locker/raw",
                        ratio(s[LIB].p50, base.p50),
                        limit,
                    ),
                    Ratio(
                        f"acquire_{phase}",
                        backend.name,
                        "p50 engine locker/raw",
                        ratio(s[ENG].p50, base.p50),
                        limit,
                    ),
                    Ratio(
                        f"acquire_{phase}",
                        backend.name,
                        "p50 raw pool/raw",
                        ratio(s[POOL].p50, base.p50),
                    ),
                ],
                figures={
                    name: {**lat.as_dict(), "cpu_us": c[name] * 1e6}
                    for name, lat in s.items()
                    if name != ORM
                },
            )
        )
    won, lost = stats["won"], stats["lost"]
    sections.append(
        Section(
            benchmark="orm_naive",
            backend=backend.name,
            title="session.add() + commit(), IntegrityError when taken, vs the raw INSERT",
            columns=columns,
            rows=[
                row(f"{backend.raw_name} (won)", won[RAW], won[RAW]),
                row("ORM naive (won)", won[ORM], won[RAW]),
                row(f"{backend.raw_name} (lost)", lost[RAW], lost[RAW]),
                row("ORM naive (lost)", lost[ORM], lost[RAW]),
            ],
            ratios=[
                Ratio(
                    "orm_naive", backend.name, "won p50 ORM/raw", ratio(won[ORM].p50, won[RAW].p50)
                ),
                Ratio(
                    "orm_naive",
                    backend.name,
                    "lost p50 ORM/raw",
                    ratio(lost[ORM].p50, lost[RAW].p50),
                ),
                Ratio(
                    "orm_naive",
                    backend.name,
                    "won p50 ORM/aiocronlock",
                    ratio(won[ORM].p50, won[LIB].p50),
                ),
            ],
            figures={"won": won[ORM].as_dict(), "lost": lost[ORM].as_dict()},
        )
    )
    return sections
