"""Many jobs on one tick (benchmark f): 500 jobs due at the same second on one instance.

Contenders, each deciding all the jobs for a fresh set of names, in rotating order:

- ``lock_many(names, t)`` (one multi-row INSERT on PostgreSQL, SQLite and MariaDB
  10.5+; one INSERT per job on one connection on MySQL, which cannot report which
  rows of a multi-row insert won);
- ONE multi-row INSERT on the raw driver: the library's own statement text, and on
  MySQL the library's single-row statement with all rows in its VALUES list;
- 500 sequential ``lock()`` calls, for contrast.
"""

from __future__ import annotations

import gc
import secrets
import statistics
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

from aiocronlock import AsyncDBLocker, precision

from ._backends import Backend
from ._capture import Statement, captured
from ._raw import RawClient, open_raw
from ._stats import Ratio, Section, ms, ratio, times

#: The issue's target: lock_many() of 500 jobs within this multiple of one raw INSERT.
MANY_TARGET = 1.5
MANY, RAW, SEQUENTIAL = "lock_many()", "raw", "sequential lock()"
CONTENDERS = (MANY, RAW, SEQUENTIAL)


async def capture_many(locker: AsyncDBLocker, jobs: int, run_time: datetime) -> Statement:
    """Make the locker win ``jobs`` sentinel jobs at once; return one multi-row INSERT."""
    prefix = f"bench-sentinel-{secrets.token_hex(6)}"
    names = [f"{prefix}-{i}" for i in range(jobs)]
    identifier = precision()(names[0], run_time)
    with captured(locker.engine) as seen:
        won = await locker.lock_many(names, run_time)
    if len(won) != jobs:
        raise RuntimeError(f"the sentinel jobs were taken: won {len(won)} of {jobs}")
    sentinels = {name: f"job{i}" for i, name in enumerate(names)} | {identifier: "ident"}
    inserts = [(sql, p) for sql, p in seen if sql.lstrip().upper().startswith("INSERT")]
    if len(inserts) == 1:
        return Statement.from_capture(inserts[0][0], inserts[0][1], sentinels)
    # MySQL: one single-row INSERT per job; put all their rows in one VALUES list.
    sql = inserts[0][0]
    head, sep, rest = sql.partition(" VALUES ")
    values, sep2, tail = rest.partition(" ON DUPLICATE KEY UPDATE ")
    if not (sep and sep2) or any(s != sql for s, _ in inserts):
        raise RuntimeError(f"unexpected acquire statements: {sql!r}")
    multi = f"{head} VALUES {', '.join([values] * len(inserts))} ON DUPLICATE KEY UPDATE {tail}"
    params = tuple(value for _, p in inserts for value in p)
    return Statement.from_capture(multi, params, sentinels)


async def run(backend: Backend, *, jobs: int, rounds: int) -> Section:
    locker = backend.locker()
    raw: RawClient | None = None
    run_time = datetime.now(UTC)
    identifier = precision()("any", run_time)
    samples: dict[str, list[int]] = {name: [] for name in CONTENDERS}
    try:
        statement = await capture_many(locker, jobs, run_time)
        raw = await open_raw(backend)
        client = raw

        def prepare(contender: str, names: list[str]) -> Callable[[], Awaitable[int]]:
            if contender == MANY:

                async def many() -> int:
                    return len(await locker.lock_many(names, run_time))

                return many
            if contender == RAW:
                params = statement.bind(
                    {f"job{i}": name for i, name in enumerate(names)} | {"ident": identifier}
                )

                async def one_insert() -> int:
                    return await client.insert_rows(statement.sql, params)

                return one_insert

            async def sequential() -> int:
                won = 0
                for name in names:
                    if await locker.lock(name, run_time) is not None:
                        won += 1
                return won

            return sequential

        for r in range(-1, rounds):  # round -1 warms every contender up
            order = CONTENDERS[r % 3 :] + CONTENDERS[: r % 3]
            for contender in order:
                names = [f"many-{contender[:3]}-{r}-{i}" for i in range(jobs)]
                call = prepare(contender, names)
                gc.collect()
                start = time.perf_counter_ns()
                won = await call()
                elapsed = time.perf_counter_ns() - start
                if won != jobs:
                    raise RuntimeError(f"{contender} decided {won} of {jobs} fresh jobs")
                if r >= 0:
                    samples[contender].append(elapsed)
    finally:
        if raw is not None:
            await raw.aclose()
        await locker.aclose()

    medians = {name: statistics.median(values) / 1e6 for name, values in samples.items()}
    labels = {
        RAW: f"{backend.raw_name}, one INSERT",
        MANY: "aiocronlock lock_many()",
        SEQUENTIAL: f"aiocronlock {jobs} x lock()",
    }
    rows = [
        [
            labels[name],
            str(len(samples[name])),
            ms(medians[name]),
            ms(min(samples[name]) / 1e6),
            ms(max(samples[name]) / 1e6),
            ms(medians[name] * 1000 / jobs),
            times(ratio(medians[name], medians[RAW])),
        ]
        for name in (RAW, MANY, SEQUENTIAL)
    ]
    return Section(
        benchmark="many_jobs",
        backend=backend.name,
        title=f"{jobs} jobs due at the same tick on one instance, until all decided",
        columns=["contender", "rounds", "median ms", "min ms", "max ms", "us/job", "ratio"],
        rows=rows,
        ratios=[
            Ratio(
                "many_jobs",
                backend.name,
                f"lock_many({jobs}) / one raw INSERT",
                ratio(medians[MANY], medians[RAW]),
                MANY_TARGET,
            ),
            Ratio(
                "many_jobs",
                backend.name,
                f"{jobs} x lock() / one raw INSERT",
                ratio(medians[SEQUENTIAL], medians[RAW]),
            ),
        ],
        figures={
            "jobs": jobs,
            **{
                name: {"median_ms": medians[name], "samples_ms": [s / 1e6 for s in samples[name]]}
                for name in CONTENDERS
            },
        },
    )
