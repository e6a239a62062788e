"""Contention (benchmark d): P processes x C concurrent callers race for the same ticks.

Each process runs one locker (its own engine, like one instance of a service) and C
tasks that all try every tick of one job in turn; the raw harness does the same
with one driver pool of C connections per process. Exactly one attempt per tick
may win, which is checked. The processes start each phase together at a barrier,
and alternate between aiocronlock and raw phases, so both see the same machine.
Throughput is decided ticks per second of wall time, from the first process's start
to the last one's end. "new conns" counts the connections the lockers' engines opened
during the measured phases, after their warm-up (the raw pools are fixed-size).
"""

from __future__ import annotations

import asyncio
import multiprocessing
import sys
import time
import traceback
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import event

from aiocronlock import precision

from ._backends import Backend
from ._capture import Statement
from ._raw import open_raw
from ._stats import Ratio, Section, ratio

LIB, RAW = "aiocronlock", "raw"
#: The issue's target: contention throughput at least this fraction of the raw harness's.
THROUGHPUT_TARGET = 0.9
_BARRIER_TIMEOUT_S = 300.0
_TRIES = 3


@dataclass(frozen=True)
class WorkerSpec:
    backend: Backend
    statement: Statement
    processes: int
    concurrency: int
    ticks: int
    rounds: int
    base_time: datetime
    index: int
    attempt: int


def phase_job(spec: WorkerSpec, mode: str, round_: int) -> str:
    return f"contend-p{spec.processes}-a{spec.attempt}-{mode}-{round_}"


def worker_main(spec: WorkerSpec, barrier: Any, results: Any) -> None:
    """Entry point of one racing process; puts its phases (or its traceback) on ``results``."""
    try:
        results.put(asyncio.run(_worker(spec, barrier)))
    except BaseException:
        barrier.abort()
        results.put({"index": spec.index, "error": traceback.format_exc()})


async def _worker(spec: WorkerSpec, barrier: Any) -> dict[str, Any]:
    """Every phase gets a fresh, warmed-up client, and only one is open at a time.

    One client at a time keeps each process to ``concurrency`` server connections, so
    that P processes fit within a server's connection limit alongside other users.
    """
    statement, concurrency = spec.statement, spec.concurrency
    times = [spec.base_time + timedelta(seconds=k) for k in range(spec.ticks)]
    phases = []
    reconnects = 0
    for round_ in range(spec.rounds):
        for mode in (LIB, RAW) if round_ % 2 == 0 else (RAW, LIB):
            job = phase_job(spec, mode, round_)
            warm = [f"warm-{job}-{spec.index}-{i}" for i in range(concurrency)]
            if mode == LIB:
                phase, extra = await _lib_phase(spec, barrier, job, warm, times)
                reconnects += extra
            else:
                params = [statement.bind({"job": job, "ident": precision()(job, t)}) for t in times]
                warm_params = [
                    statement.bind({"job": w, "ident": precision()(w, spec.base_time)})
                    for w in warm
                ]
                phase = await _raw_phase(spec, barrier, params, warm_params)
            phases.append({"mode": mode, "round": round_, **phase})
    await asyncio.to_thread(barrier.wait, _BARRIER_TIMEOUT_S)
    return {"index": spec.index, "phases": phases, "reconnects": reconnects}


async def _lib_phase(
    spec: WorkerSpec, barrier: Any, job: str, warm: list[str], times: list[datetime]
) -> tuple[dict[str, Any], int]:
    locker = spec.backend.locker()
    connects = 0

    def count_connect(*args: Any) -> None:
        nonlocal connects
        connects += 1

    event.listen(locker.engine.sync_engine, "connect", count_connect)

    async def caller() -> int:
        wins = 0
        for run_time in times:
            if await locker.lock(job, run_time) is not None:
                wins += 1
        return wins

    try:
        # Warm-up: open the pool's connections and prime the statement caches.
        await asyncio.gather(*(locker.lock(w, spec.base_time) for w in warm))
        before = connects
        await asyncio.to_thread(barrier.wait, _BARRIER_TIMEOUT_S)
        start = time.monotonic()
        wins = await asyncio.gather(*(caller() for _ in range(spec.concurrency)))
        end = time.monotonic()
        return {"start": start, "end": end, "wins": sum(wins)}, connects - before
    finally:
        await locker.aclose()


async def _raw_phase(
    spec: WorkerSpec,
    barrier: Any,
    params: list[tuple[Any, ...]],
    warm_params: list[tuple[Any, ...]],
) -> dict[str, Any]:
    raw = await open_raw(spec.backend, spec.concurrency)
    sql = spec.statement.sql

    async def caller() -> int:
        wins = 0
        for p in params:
            if await raw.insert_returning_id(sql, p) is not None:
                wins += 1
        return wins

    try:
        await asyncio.gather(*(raw.insert_returning_id(sql, p) for p in warm_params))
        await asyncio.to_thread(barrier.wait, _BARRIER_TIMEOUT_S)
        start = time.monotonic()
        wins = await asyncio.gather(*(caller() for _ in range(spec.concurrency)))
        end = time.monotonic()
        return {"start": start, "end": end, "wins": sum(wins)}
    finally:
        await raw.aclose()


def race(
    backend: Backend,
    statement: Statement,
    *,
    processes: int,
    concurrency: int,
    ticks: int,
    rounds: int,
    attempt: int = 0,
) -> list[dict[str, Any]]:
    """Run the racing processes and return each one's report."""
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(processes)
    results = ctx.Queue()
    base_time = datetime.now(UTC).replace(microsecond=0)
    workers = [
        ctx.Process(
            target=worker_main,
            args=(
                WorkerSpec(
                    backend, statement, processes, concurrency, ticks, rounds, base_time, i, attempt
                ),
                barrier,
                results,
            ),
            daemon=True,
        )
        for i in range(processes)
    ]
    for worker in workers:
        worker.start()
    try:
        reports = [results.get(timeout=_BARRIER_TIMEOUT_S * 2) for _ in workers]
    finally:
        for worker in workers:
            worker.join(timeout=30)
            if worker.is_alive():
                worker.terminate()
    errors = [r["error"] for r in reports if "error" in r]
    if errors:
        raise RuntimeError("a racing process failed:\n" + errors[0])
    return reports


def _refused(error: RuntimeError) -> bool:
    """Whether a race failed because the server refused connections (it is shared)."""
    text = str(error).lower()
    return "too many clients" in text or "too many connections" in text


def summarise(
    backend: Backend, processes: int, concurrency: int, ticks: int, reports: list[dict[str, Any]]
) -> dict[str, Any]:
    """Per mode: wall time over all phases, decided ticks per second, attempts per second."""
    out: dict[str, Any] = {}
    rounds = {p["round"] for r in reports for p in r["phases"]}
    for mode in (LIB, RAW):
        wall = 0.0
        for round_ in rounds:
            phase = [
                p for r in reports for p in r["phases"] if (p["mode"], p["round"]) == (mode, round_)
            ]
            won = sum(p["wins"] for p in phase)
            if won != ticks:
                raise RuntimeError(
                    f"{backend.name}: {won} wins for {ticks} ticks in the {mode} phase "
                    f"{round_} with P={processes}: every tick must be won exactly once"
                )
            wall += max(p["end"] for p in phase) - min(p["start"] for p in phase)
        decided = ticks * len(rounds)
        out[mode] = {
            "wall_s": wall,
            "ticks_per_s": decided / wall,
            "attempts_per_s": decided * processes * concurrency / wall,
        }
    out["lib_reconnects"] = sum(r["reconnects"] for r in reports)
    return out


def _race_with_retries(
    backend: Backend,
    statement: Statement,
    *,
    processes: int,
    concurrency: int,
    ticks: int,
    rounds: int,
) -> list[dict[str, Any]] | None:
    """:func:`race`, tried again while a shared server refuses connections; else ``None``."""
    for attempt in range(_TRIES):
        try:
            return race(
                backend,
                statement,
                processes=processes,
                concurrency=concurrency,
                ticks=ticks,
                rounds=rounds,
                attempt=attempt,
            )
        except RuntimeError as error:
            if not _refused(error):
                raise
            again = "retrying in 10 s" if attempt < _TRIES - 1 else "giving up"
            print(
                f"contention [{backend.name}] P={processes}: the server refused "
                f"connections (too many clients); {again}",
                file=sys.stderr,
            )
            if attempt < _TRIES - 1:
                time.sleep(10)
    return None


def run(
    backend: Backend,
    statement: Statement,
    *,
    process_counts: list[int],
    concurrency: int,
    ticks: int,
    rounds: int,
) -> Section:
    rows = []
    ratios = []
    figures: dict[str, Any] = {}
    for processes in process_counts:
        reports = _race_with_retries(
            backend,
            statement,
            processes=processes,
            concurrency=concurrency,
            ticks=ticks,
            rounds=rounds,
        )
        if reports is None:
            figures[f"P={processes}"] = {"error": "the server refused connections"}
            rows.append([f"P={processes}: not measured, the server refused connections"])
            rows[-1] += ["-"] * 7
            continue
        s = summarise(backend, processes, concurrency, ticks, reports)
        figures[f"P={processes}"] = s
        value = ratio(s[LIB]["ticks_per_s"], s[RAW]["ticks_per_s"])
        for mode, label in ((RAW, backend.raw_name), (LIB, LIB)):
            rows.append(
                [
                    f"P={processes} {label}",
                    f"{processes}x{concurrency}",
                    f"{ticks * rounds}",
                    f"{s[mode]['wall_s']:.2f}",
                    f"{s[mode]['ticks_per_s']:.0f}",
                    f"{s[mode]['attempts_per_s']:.0f}",
                    str(s["lib_reconnects"]) if mode == LIB else "0",
                    "1.00x" if mode == RAW else f"{value:.2f}x",
                ]
            )
        ratios.append(
            Ratio(
                "contention",
                backend.name,
                f"P={processes} ticks/s aiocronlock/raw",
                value,
                THROUGHPUT_TARGET,
                higher_is_better=True,
            )
        )
    return Section(
        benchmark="contention",
        backend=backend.name,
        title=f"P processes x {concurrency} callers race for the same ticks; decided ticks/s",
        columns=[
            "contender",
            "callers",
            "ticks",
            "wall s",
            "ticks/s",
            "attempts/s",
            "new conns",
            "ratio",
        ],
        rows=rows,
        ratios=ratios,
        figures=figures,
    )
