"""Acquire, won and lost, and the naive ORM way (benchmarks a, b and c).

Three contenders decide single ticks one after another on one connection each:

- ``aiocronlock``: ``await locker.lock(job, run_time)``, the locker built from a URL;
- the raw driver sending the very same INSERT text with the same parameters;
- the naive ORM port of the Go original: ``session.add(Row(...))`` then
  ``await session.commit()``, catching ``IntegrityError`` when the tick is taken.

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
from ._raw import RawClient, open_raw
from ._stats import Latency, Ratio, Section, ms, ratio, times

LIB, RAW, ORM = "aiocronlock", "raw", "orm"
CONTENDERS = (LIB, RAW, ORM)
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


async def capture_acquire(locker: AsyncDBLocker, run_time: datetime) -> Statement:
    """Make the locker win one tick, and return the INSERT it sent, ready to rebind."""
    job = f"bench-sentinel-{secrets.token_hex(6)}"
    identifier = precision()(job, run_time)
    with captured(locker.engine) as seen:
        if await locker.lock(job, run_time) is None:
            raise RuntimeError("the sentinel tick was already taken")
    driver_path = locker._driver_acquire
    if driver_path is not None:
        # A URL-built locker sends the INSERT through the driver, past SQLAlchemy's
        # events: take the compiled statement and its arguments from the locker.
        sql: str = driver_path.sql
        params: Any = tuple(driver_path._arguments(job, identifier, locker.worker))
    else:
        sql, params = only_insert(seen)
    return Statement.from_capture(sql, params, {job: "job", identifier: "ident"})


async def run(backend: Backend, *, iterations: int, rounds: int, warmup: int) -> AcquireResult:
    run_time = datetime.now(UTC)
    identifier = precision()("any", run_time)
    locker = backend.locker()
    raw: RawClient | None = None
    orm_engine = backend.engine()
    try:
        statement = await capture_acquire(locker, run_time)
        raw = await open_raw(backend)
        session_factory = async_sessionmaker(orm_engine, expire_on_commit=False)
        row_cls = mapped_row(lock_table(MetaData(), name=backend.table))
        naive_utc = backend.name == "mysql"  # DATETIME columns take naive UTC
        client = raw

        def lib_attempt(job: str) -> Callable[[], Awaitable[bool]]:
            async def attempt() -> bool:
                return await locker.lock(job, run_time) is not None

            return attempt

        def raw_attempt(job: str) -> Callable[[], Awaitable[bool]]:
            params = statement.bind({"job": job, "ident": identifier})

            async def attempt() -> bool:
                return await client.insert_returning_id(statement.sql, params) is not None

            return attempt

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

        attempts: dict[str, Attempt] = {LIB: lib_attempt, RAW: raw_attempt, ORM: orm_attempt}
        samples: dict[str, dict[str, list[int]]] = {
            phase: {name: [] for name in CONTENDERS} for phase in ("won", "lost")
        }

        async def batch(name: str, jobs: list[str], expect_won: bool, out: list[int]) -> None:
            prepare = attempts[name]
            gc.collect()
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

        for name in CONTENDERS:  # warm-up: connections, statement caches, first-use paths
            warm = [f"warm-{name}-{i}" for i in range(warmup)]
            await batch(name, warm, True, [])
            await batch(name, warm, False, [])

        per_round = max(1, iterations // rounds)
        for r in range(rounds):
            order = CONTENDERS[r % 3 :] + CONTENDERS[: r % 3]
            jobs = {name: [f"{name}-{r}-{i}" for i in range(per_round)] for name in order}
            for name in order:
                await batch(name, jobs[name], True, samples["won"][name])
            for name in order:
                await batch(name, jobs[name], False, samples["lost"][name])
    finally:
        if raw is not None:
            await raw.aclose()
        await orm_engine.dispose()
        await locker.aclose()

    return AcquireResult(
        sections=_sections(backend, samples),
        samples_ms={
            phase: {name: [s / 1e6 for s in values] for name, values in by_name.items()}
            for phase, by_name in samples.items()
        },
    )


def _sections(backend: Backend, samples: dict[str, dict[str, list[int]]]) -> list[Section]:
    limit = ACQUIRE_TARGETS[backend.name]
    columns = ["contender", "n", "p50 ms", "p90 ms", "p99 ms", "mean ms", "p50 ratio", "p99 ratio"]
    stats = {
        phase: {name: Latency.of_ns(values) for name, values in by_name.items()}
        for phase, by_name in samples.items()
    }

    def row(label: str, lat: Latency, base: Latency) -> list[str]:
        return [
            label,
            str(lat.n),
            ms(lat.p50),
            ms(lat.p90),
            ms(lat.p99),
            ms(lat.mean),
            times(ratio(lat.p50, base.p50)),
            times(ratio(lat.p99, base.p99)),
        ]

    sections = []
    for phase, what in (("won", "fresh tick"), ("lost", "tick already taken")):
        s = stats[phase]
        sections.append(
            Section(
                benchmark=f"acquire_{phase}",
                backend=backend.name,
                title=f"one lock() on a {what}, vs the same INSERT on the raw driver",
                columns=columns,
                rows=[row(backend.raw_name, s[RAW], s[RAW]), row(LIB, s[LIB], s[RAW])],
                ratios=[
                    Ratio(
                        f"acquire_{phase}",
                        backend.name,
                        "p50 aiocronlock/raw",
                        ratio(s[LIB].p50, s[RAW].p50),
                        limit,
                    )
                ],
                figures={name: lat.as_dict() for name, lat in s.items() if name != ORM},
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
