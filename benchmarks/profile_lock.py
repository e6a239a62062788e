"""Where ``lock()`` spends its time beyond the raw driver: ``python -m benchmarks.profile_lock``.

Not one of the benchmarks: a diagnostic for the library's maintainers. On a lost tick
(no disk write, so the database's share is small and steady) it times, interleaved,
the same INSERT sent through successively more of what a URL-built locker does:

1. the raw driver, through its own pool;
2. the driver call on one connection held for the whole run (what the locker's
   kept connections give it);
3. the same as the locker runs it: in an ``Attempt``, which keeps the deadline and
   carries the call on if its caller is cancelled;
4. ``locker.lock()`` itself (adds validation, the identifier, the ``Lock`` and events).

and, for comparison with step 1, two other ways: the driver call on a connection
checked out of SQLAlchemy's pool for each call (what keeping connections saves), and
``AsyncConnection.execute`` of the locker's statement (how a locker given an engine
of yours sends it). It also counts event-loop iterations per call for the raw driver
and for ``lock()``, then profiles ``lock()`` with cProfile and prints the functions
with the most own time. It reads the locker's private parts (``_sql``, ``Attempt``,
``Deadlines``) and wraps the loop's private ``_run_once``: a diagnostic, not an API user.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import io
import pstats
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiocronlock import precision
from aiocronlock._attempt import Attempt
from aiocronlock._deadline import Deadlines

from ._backends import BACKENDS, WORKER, drop_tables, make_backend, new_table_name
from ._raw import open_raw
from .acquire import capture_acquire


async def loop_iterations(call: Callable[[], Awaitable[None]], calls: int = 500) -> float:
    """How many times the event loop runs its ``_run_once`` step per call."""
    loop = asyncio.get_running_loop()
    original = loop._run_once  # type: ignore[attr-defined]
    count = 0

    def counting() -> None:
        nonlocal count
        count += 1
        original()

    loop._run_once = counting  # type: ignore[attr-defined]
    try:
        for _ in range(calls):
            await call()
    finally:
        loop._run_once = original  # type: ignore[attr-defined]
    return count / calls


async def breakdown(name: str, url: str | None, calls: int, rounds: int) -> str:
    backend = make_backend(name, url, Path(tempfile.mkdtemp()), new_table_name())
    locker = backend.locker()
    await locker.create_table()
    raw = await open_raw(backend)
    kept: Any = None
    try:
        run_time = datetime.now(UTC)
        statement = await capture_acquire(locker, run_time)  # its key now exists: every
        job = next(  # call below loses
            (v.decode() if isinstance(v, bytes) else v)
            for pos, key, _ in statement.slots
            if key == "job"
            for v in [statement.params[pos]]
        )
        identifier = precision()(job, run_time)
        params = statement.bind({"job": job, "ident": identifier})
        core = locker._sql.acquire
        core_params = {"job_name": job, "job_identifier": identifier, "worker": WORKER}
        engine = locker.engine

        async def raw_driver() -> None:
            await raw.insert_returning_id(statement.sql, params)

        async def pooled_driver() -> None:
            pooled = await engine.raw_connection()
            try:
                await driver_insert(pooled.driver_connection)
            finally:
                pooled.close()

        async def driver_insert(conn: Any) -> None:
            if backend.name == "postgresql":
                await conn.fetchval(statement.sql, *params)
            elif backend.name == "mysql":
                async with conn.cursor() as cursor:
                    await cursor.execute(statement.sql, params)
            else:
                await conn.execute_fetchall(statement.sql, params)

        kept = await engine.raw_connection()

        async def kept_driver() -> None:
            await driver_insert(kept.driver_connection)

        deadlines = Deadlines(5.0)

        async def attempted() -> None:
            await Attempt(kept_driver(), deadlines)

        async def core_execute() -> None:
            async with engine.connect() as conn:
                result = await conn.execute(core, core_params)
                if result.returns_rows:
                    result.all()

        async def lock() -> None:
            if await locker.lock(job, run_time) is not None:
                raise RuntimeError("expected to lose")

        chain: dict[str, Callable[[], Awaitable[None]]] = {
            "1 raw driver": raw_driver,
            "2 driver call, connection kept": kept_driver,
            "3 + deadline, cancel-safe (Attempt)": attempted,
            "4 locker.lock()": lock,
        }
        others: dict[str, Callable[[], Awaitable[None]]] = {
            "driver call, pool checkout per call": pooled_driver,
            "SQLAlchemy execute (engine of yours)": core_execute,
        }
        steps = {**chain, **others}
        samples: dict[str, list[int]] = {step: [] for step in steps}
        for warm in steps.values():
            for _ in range(50):
                await warm()
        for _ in range(rounds):
            for step, call in steps.items():
                gc.collect()
                for _ in range(calls // rounds):
                    start = time.perf_counter_ns()
                    await call()
                    samples[step].append(time.perf_counter_ns() - start)

        lines = [f"lock() on a lost tick, {backend.name}: median per call, interleaved rounds"]
        medians = {label: statistics.median(values) / 1000 for label, values in samples.items()}
        previous = None
        for label in chain:
            added = "" if previous is None else f"  ({medians[label] - previous:+6.1f} us)"
            lines.append(f"  {label:38} {medians[label]:8.1f} us{added}")
            previous = medians[label]
        raw_median = medians["1 raw driver"]
        lines.append("  other ways, against the raw driver:")
        for label in others:
            added = f"  ({medians[label] - raw_median:+6.1f} us)"
            lines.append(f"  {label:38} {medians[label]:8.1f} us{added}")

        for label, call in (("raw driver", raw_driver), ("locker.lock()", lock)):
            per_call = await loop_iterations(call)
            lines.append(f"  event-loop iterations per call, {label}: {per_call:.1f}")

        profile = cProfile.Profile()
        profile.enable()
        for _ in range(calls // 2):
            await lock()
        profile.disable()
        text = io.StringIO()
        stats = pstats.Stats(profile, stream=text)
        stats.sort_stats("tottime").print_stats(25)
        lines.append("\ncProfile of lock(), by own time:")
        lines.append(text.getvalue())
        return "\n".join(lines)
    finally:
        if kept is not None:
            kept.close()
        await raw.aclose()
        await locker.aclose()
        await drop_tables(backend, backend.table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile_lock")
    parser.add_argument("--backend", default="postgresql", choices=BACKENDS)
    parser.add_argument("--url", help="server URL (default: as for python -m benchmarks)")
    parser.add_argument("--calls", type=int, default=3000, help="timed calls per step")
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args(argv)
    report: Any = asyncio.run(breakdown(args.backend, args.url, args.calls, args.rounds))
    print(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
