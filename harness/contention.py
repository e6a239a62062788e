"""Exactly-once under contention: many processes of many lockers race for the same ticks.

Run from the project root::

    .venv/bin/python -m harness.contention --url URL --processes P --lockers C \\
        --jobs J --ticks T [--table NAME] [--window W] [--seed S] [--json]

The parent creates a fresh lock table and computes ``T`` scheduled times, 10 ms apart
and ending a minute ago (so nobody waits for the clock, and every run time is well
within the locker's ttl). It starts ``P`` processes (``python -m harness._racer``);
each runs ``C`` lockers, every one with an engine of its own and the worker name
``p<i>-l<j>``. Once all have connected, they race for the same ``J x T`` ticks, each
locker in its own order; a winner records ``(job, tick, worker, lock.id)`` and leaves
``async with lock`` (FINISHED).

Then the parent checks both records: the processes' wins (no tick won twice, none
missing), and the table (one row per tick, FINISHED, written by the worker that
reported the win, with the id it was given). ``BackendError`` must never happen.
Exit status 0 when every check passes, 1 when one fails, 2 when the run could not
start (bad options, an existing table, no database); the table is dropped, unless
``--keep-table`` is given or a check failed (then it is kept for inspection).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import MetaData, select
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from aiocronlock import (
    AiocronlockError,
    AsyncDBLocker,
    Status,
    TableMissingError,
    lock_table,
    precision,
)

from ._racer import GO, READY, RacerReport, RacerSpec, Win

#: The project root, the racers' working directory, so that ``-m harness._racer`` imports.
ROOT = Path(__file__).resolve().parent.parent
TICK = timedelta(milliseconds=10)
#: The last tick is this far in the past: old enough to be a "missed" tick, young
#: enough to pass the default ttl (one day) by a wide margin.
LAST_TICK_AGE = timedelta(minutes=1)
#: How long the processes may take to start and connect before the race.
STARTUP_TIMEOUT_S = 120.0
#: The longest line a racer may print: its report lists every tick it won.
REPORT_LIMIT = 1 << 26
#: Offending ticks quoted per failed check.
SAMPLES = 5


@dataclass(frozen=True, slots=True)
class Options:
    url: str
    processes: int
    lockers: int
    jobs: int
    ticks: int
    table: str | None
    window: float
    seed: int
    timeout: float | None
    keep_table: bool
    json: bool


@dataclass
class Outcome:
    """The figures of one run; ``ok`` when every check passed. Printed with ``--json``."""

    url: str
    backend: str
    table: str
    processes: int
    lockers: int
    jobs: int
    ticks: int
    tick_ms: float
    window: float
    seed: int
    # What the processes did.
    attempts: int = 0
    decisions: int = 0
    wins: int = 0
    losses: int = 0
    duplicates: int = 0
    missing: int = 0
    # What the table says.
    rows: int = 0
    duplicate_rows: int = 0
    missing_rows: int = 0
    extra_rows: int = 0
    not_finished: int = 0
    worker_mismatches: int = 0
    id_mismatches: int = 0
    # What went wrong.
    backend_errors: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    process_failures: list[str] = field(default_factory=list)
    #: Ticks won by each locker that won any: how evenly the race was spread.
    wins_per_locker: dict[str, int] = field(default_factory=dict)
    #: What the processes wrote to stderr (warnings logged by aiocronlock, say).
    stderr: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    # How fast.
    wall_seconds: float = 0.0
    decisions_per_second: float = 0.0
    #: False when a process failed to start: then no tick was raced, nothing checked.
    raced: bool = False
    table_kept: bool = False

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> str:
        return json.dumps({"ok": self.ok, **asdict(self)}, indent=2)


# -- the race ------------------------------------------------------------------------------


@dataclass
class Racer:
    """One child process and what it wrote to stderr."""

    index: int
    process: asyncio.subprocess.Process
    stderr: bytearray = field(default_factory=bytearray)
    drain: asyncio.Task[None] | None = None

    def tail(self, lines: int = 12) -> str:
        """The end of what the process wrote to stderr: a traceback's last frames."""
        return "\n".join(self.stderr.decode(errors="replace").strip().splitlines()[-lines:])

    async def failure(self, what: str) -> str:
        """Why this process failed, with the end of its stderr once it has exited."""
        try:
            async with asyncio.timeout(10):
                await self.process.wait()
                if self.drain is not None:
                    await self.drain
        except TimeoutError:
            pass
        tail = self.tail()
        code = self.process.returncode
        status = "still running" if code is None else f"exit status {code}"
        return f"process {self.index} {what} ({status})" + (f":\n{tail}" if tail else "")


async def _spawn(spec: RacerSpec) -> Racer:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "harness._racer",
        cwd=ROOT,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        limit=REPORT_LIMIT,
    )
    racer = Racer(spec.process, process)

    async def drain() -> None:
        assert process.stderr is not None
        while chunk := await process.stderr.read(65536):
            racer.stderr.extend(chunk)

    racer.drain = asyncio.create_task(drain())
    assert process.stdin is not None
    # The spec (with the URL, password included) travels on stdin, not on the command line.
    process.stdin.write((json.dumps(asdict(spec)) + "\n").encode())
    await process.stdin.drain()
    return racer


async def _read_line(racer: Racer) -> str:
    assert racer.process.stdout is not None
    return (await racer.process.stdout.readline()).decode(errors="replace").strip()


async def _expect_ready(racer: Racer) -> str | None:
    line = await _read_line(racer)
    if line == READY:
        return None
    return await racer.failure(f"did not get ready, said {line[:200]!r}")


async def _report(racer: Racer) -> RacerReport | str:
    line = await _read_line(racer)
    try:
        return RacerReport.from_json(json.loads(line))
    except (ValueError, KeyError, TypeError):
        return await racer.failure(f"sent no report, said {line[:200]!r}")


async def _race(specs: list[RacerSpec], outcome: Outcome) -> list[RacerReport]:
    """Start the processes, wait for all to be ready, say go, collect their reports."""
    racers: list[Racer] = []
    try:
        for spec in specs:
            racers.append(await _spawn(spec))
        async with asyncio.timeout(STARTUP_TIMEOUT_S):
            not_ready = [f for f in await asyncio.gather(*map(_expect_ready, racers)) if f]
        if not_ready:
            outcome.process_failures.extend(not_ready)
            outcome.problems.append(f"{len(not_ready)} processes failed to start: no race")
            return []
        outcome.raced = True
        started = time.perf_counter()
        for racer in racers:
            assert racer.process.stdin is not None
            racer.process.stdin.write(f"{GO}\n".encode())
        await asyncio.gather(*(r.process.stdin.drain() for r in racers if r.process.stdin))
        answers = await asyncio.gather(*map(_report, racers))
        outcome.wall_seconds = time.perf_counter() - started
        for racer in racers:
            await racer.process.wait()
            if racer.drain is not None:
                await racer.drain
        reports: list[RacerReport] = []
        for racer, answer in zip(racers, answers, strict=True):
            if isinstance(answer, str):
                outcome.process_failures.append(answer)
            elif racer.process.returncode != 0:
                outcome.process_failures.append(await racer.failure("failed after its report"))
            else:
                reports.append(answer)
                if racer.tail():  # failures above quote their stderr already
                    outcome.stderr.append(f"process {racer.index}: {racer.tail()}")
        return reports
    finally:
        for racer in racers:
            if racer.process.returncode is None:
                racer.process.kill()
                await racer.process.wait()
            if racer.drain is not None and not racer.drain.done():
                racer.drain.cancel()


# -- the checks ----------------------------------------------------------------------------


def _describe(win: Win) -> str:
    return f"{win.worker} (id {win.lock_id})"


def _check_reports(
    reports: list[RacerReport], keys: list[tuple[str, str]], outcome: Outcome
) -> dict[tuple[str, str], list[Win]]:
    """The processes' side: each tick won exactly once. Returns the wins of each key."""
    by_key: dict[tuple[str, str], list[Win]] = {}
    wrong_identifier: list[str] = []
    for report in reports:
        outcome.attempts += report.attempts
        outcome.decisions += report.decisions
        for kind, count in report.errors.items():
            outcome.errors[kind] = outcome.errors.get(kind, 0) + count
        for win in report.wins:
            key = keys[win.job * outcome.ticks + win.tick]
            if win.identifier != key[1]:
                wrong_identifier.append(f"{_describe(win)} got {win.identifier!r} for {key}")
            by_key.setdefault(key, []).append(win)
    outcome.wins = sum(len(wins) for wins in by_key.values())
    outcome.losses = outcome.decisions - outcome.wins
    outcome.backend_errors = sum(c for k, c in outcome.errors.items() if ": BackendError: " in k)

    twice = {key: wins for key, wins in by_key.items() if len(wins) > 1}
    outcome.duplicates = sum(len(wins) - 1 for wins in twice.values())
    holes = [key for key in keys if key not in by_key]
    outcome.missing = len(holes)
    if twice:
        quoted = "; ".join(
            f"{key} by " + ", ".join(map(_describe, wins))
            for key, wins in list(twice.items())[:SAMPLES]
        )
        outcome.problems.append(f"{len(twice)} ticks won more than once: {quoted}")
    if holes:
        outcome.problems.append(f"{len(holes)} ticks won by nobody: {holes[:SAMPLES]}")
    if wrong_identifier:
        outcome.problems.append(
            f"{len(wrong_identifier)} wins with an unexpected identifier: "
            + "; ".join(wrong_identifier[:SAMPLES])
        )
    per_locker = Counter(win.worker for wins in by_key.values() for win in wins)
    outcome.wins_per_locker = dict(sorted(per_locker.items()))
    return by_key


def _check_rows(
    rows: Sequence[Any],
    keys: list[tuple[str, str]],
    winners: dict[tuple[str, str], list[Win]],
    outcome: Outcome,
) -> None:
    """The table's side: one FINISHED row per tick, by the reported winner, with its id."""
    expected = set(keys)
    counts = Counter((row.job_name, row.job_identifier) for row in rows)
    outcome.rows = len(rows)
    outcome.duplicate_rows = sum(n - 1 for n in counts.values() if n > 1)
    missing = [key for key in keys if key not in counts]
    outcome.missing_rows = len(missing)
    extra = [key for key in counts if key not in expected]
    outcome.extra_rows = sum(counts[key] for key in extra)
    not_finished: list[str] = []
    wrong_worker: list[str] = []
    wrong_id: list[str] = []
    for row in rows:
        key = (row.job_name, row.job_identifier)
        if row.status != Status.FINISHED:
            not_finished.append(f"{key} {row.status} by {row.worker} (id {row.id})")
        claims = winners.get(key, [])
        mine = [win for win in claims if win.worker == row.worker]
        if not mine:
            reported = ", ".join(map(_describe, claims)) or "nobody"
            wrong_worker.append(f"{key} row by {row.worker} (id {row.id}), won by {reported}")
        elif mine[0].lock_id != row.id:
            wrong_id.append(f"{key} row id {row.id}, {row.worker} reported {mine[0].lock_id}")
    outcome.not_finished = len(not_finished)
    outcome.worker_mismatches = len(wrong_worker)
    outcome.id_mismatches = len(wrong_id)

    if outcome.rows != len(keys):
        outcome.problems.append(f"the table has {outcome.rows} rows, expected {len(keys)}")
    for count, what, samples in (
        (outcome.duplicate_rows, "duplicate rows", [k for k, n in counts.items() if n > 1]),
        (outcome.missing_rows, "ticks without a row", missing),
        (outcome.extra_rows, "rows for unexpected ticks", extra),
        (outcome.not_finished, "rows not FINISHED", not_finished),
        (outcome.worker_mismatches, "rows whose worker is not the reported winner", wrong_worker),
        (outcome.id_mismatches, "rows whose id is not the reported lock id", wrong_id),
    ):
        if count:
            outcome.problems.append(f"{count} {what}: {samples[:SAMPLES]}")


def _check_errors(outcome: Outcome) -> None:
    if outcome.process_failures:
        outcome.problems.append(f"{len(outcome.process_failures)} processes failed")
    if outcome.errors:
        total = sum(outcome.errors.values())
        kinds = "; ".join(
            f"{count} x {kind}" for kind, count in Counter(outcome.errors).most_common(SAMPLES)
        )
        outcome.problems.append(f"{total} exceptions from the library: {kinds}")
    expected = outcome.processes * outcome.lockers * outcome.jobs * outcome.ticks
    if not outcome.process_failures and outcome.attempts != expected:
        outcome.problems.append(f"{outcome.attempts} lock() calls made, expected {expected}")


# -- the run -------------------------------------------------------------------------------


async def _read_rows(engine: AsyncEngine, name: str) -> Sequence[Any]:
    table = lock_table(MetaData(), name=name)
    c = table.c
    query = select(c.id, c.job_name, c.job_identifier, c.worker, c.status).order_by(c.id)
    async with engine.connect() as connection:
        return (await connection.execute(query)).all()


async def _drop_tables(engine: AsyncEngine, name: str) -> None:
    """Drop the lock table and whatever tables ``lock_table()`` defines along with it."""
    metadata = MetaData()
    lock_table(metadata, name=name)
    async with engine.begin() as connection:
        await connection.run_sync(metadata.drop_all, checkfirst=True)


async def run(options: Options) -> Outcome:
    """One contention run on a fresh table.

    :raises ValueError: the table exists already.
    :raises BackendError: the database cannot be reached.
    """
    name = options.table or f"contention_{uuid.uuid4().hex[:12]}"
    last = datetime.now(UTC).replace(microsecond=0) - LAST_TICK_AGE
    run_times = [last - TICK * (options.ticks - 1 - k) for k in range(options.ticks)]
    identify = precision(TICK)
    jobs = [f"job-{j}" for j in range(options.jobs)]
    keys = [(job, identify(job, run_time)) for job in jobs for run_time in run_times]
    assert len(set(keys)) == len(keys), "two ticks share an identifier"

    async with AsyncDBLocker(
        options.url, worker="harness", table_name=name, clean_interval=None
    ) as admin:
        engine = admin.engine
        try:
            await admin.history(limit=1)
        except TableMissingError:
            pass  # as it should be; a BackendError (no database) propagates
        else:
            raise ValueError(
                f"table {name!r} already exists: the harness needs a fresh table; "
                "choose another --table or drop it"
            )
        outcome = Outcome(
            url=make_url(options.url).render_as_string(hide_password=True),
            backend=engine.dialect.name,
            table=name,
            processes=options.processes,
            lockers=options.lockers,
            jobs=options.jobs,
            ticks=options.ticks,
            tick_ms=TICK / timedelta(milliseconds=1),
            window=options.window,
            seed=options.seed,
        )
        await admin.create_table()
        try:
            specs = [
                RacerSpec(
                    url=options.url,
                    table=name,
                    process=index,
                    lockers=options.lockers,
                    jobs=jobs,
                    run_times=[t.isoformat() for t in run_times],
                    tick_us=TICK // timedelta(microseconds=1),
                    window=options.window,
                    seed=options.seed,
                    timeout=options.timeout,
                )
                for index in range(options.processes)
            ]
            reports = await _race(specs, outcome)
            if outcome.raced:
                winners = _check_reports(reports, keys, outcome)
                _check_rows(await _read_rows(engine, name), keys, winners, outcome)
                _check_errors(outcome)
            if outcome.wall_seconds > 0:
                outcome.decisions_per_second = outcome.decisions / outcome.wall_seconds
        finally:
            outcome.table_kept = options.keep_table or (outcome.raced and not outcome.ok)
            if not outcome.table_kept:
                await _drop_tables(engine, name)
    return outcome


def _spread(outcome: Outcome) -> str:
    counts = sorted(outcome.wins_per_locker.values())
    lockers = outcome.processes * outcome.lockers
    if not counts:
        return f"no locker of {lockers} won a tick"
    return (
        f"{len(counts)} of {lockers} lockers won ticks "
        f"(from {counts[0]} to {counts[-1]} each, median {counts[len(counts) // 2]})"
    )


def summary(outcome: Outcome) -> str:
    o = outcome
    lines = [
        f"contention on {o.backend} ({o.url}), table {o.table}",
        f"  {o.processes} processes x {o.lockers} lockers racing for {o.jobs} jobs x "
        f"{o.ticks} ticks ({o.tick_ms:g} ms apart), window {o.window:g}, seed {o.seed}",
        f"  decisions  {o.decisions} of {o.attempts} lock() calls ({o.wins} won, "
        f"{o.losses} lost) in {o.wall_seconds:.2f} s: {o.decisions_per_second:.0f}/s",
        f"  processes  duplicates {o.duplicates}, missing {o.missing}; {_spread(o)}",
        f"  table      rows {o.rows}, duplicates {o.duplicate_rows}, missing {o.missing_rows}, "
        f"extra {o.extra_rows}, not FINISHED {o.not_finished}, "
        f"wrong worker {o.worker_mismatches}, wrong id {o.id_mismatches}",
        f"  errors     BackendError {o.backend_errors}, other "
        f"{sum(o.errors.values()) - o.backend_errors}, failed processes "
        f"{len(o.process_failures)}",
    ]
    lines += [f"  {count:>9} x {kind}" for kind, count in Counter(o.errors).most_common()]
    lines += [f"  {failure}" for failure in o.process_failures]
    lines += [f"  stderr of {text}" for text in o.stderr]
    if o.ok:
        lines.append("OK: every tick was won exactly once")
    else:
        lines += ["FAILED:"] + [f"  - {problem}" for problem in o.problems]
    if o.table_kept:
        lines.append(f"table {o.table} kept for inspection")
    return "\n".join(lines)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def parse_args(argv: Sequence[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(
        prog="python -m harness.contention",
        description="Race P processes x C lockers for J jobs x T ticks; check exactly-once.",
    )
    parser.add_argument("--url", required=True, help="database URL, e.g. postgresql://...")
    parser.add_argument("--processes", type=_positive, required=True, metavar="P")
    parser.add_argument("--lockers", type=_positive, required=True, metavar="C")
    parser.add_argument("--jobs", type=_positive, required=True, metavar="J")
    parser.add_argument("--ticks", type=_positive, required=True, metavar="T")
    parser.add_argument("--table", help="a table that does not exist yet (default: random)")
    parser.add_argument(
        "--window",
        type=float,
        default=4.0,
        help="each locker visits tick k at k + U(0, WINDOW) in its order, so lockers "
        "collide on the same ticks; 0 for a full shuffle (default: 4)",
    )
    parser.add_argument("--seed", type=int, help="for the lockers' orders (default: random)")
    parser.add_argument("--timeout", type=float, help="the lockers' timeout in seconds")
    parser.add_argument("--keep-table", action="store_true", help="do not drop the table")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    return Options(
        url=args.url,
        processes=args.processes,
        lockers=args.lockers,
        jobs=args.jobs,
        ticks=args.ticks,
        table=args.table,
        window=args.window,
        seed=uuid.uuid4().int % 2**31 if args.seed is None else args.seed,
        timeout=args.timeout,
        keep_table=args.keep_table,
        json=args.json,
    )


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_args(argv)
    try:
        outcome = asyncio.run(run(options))
    except (ValueError, AiocronlockError) as error:  # bad options, or no database
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(outcome.to_json() if options.json else summary(outcome))
    return 0 if outcome.ok else 1


if __name__ == "__main__":
    sys.exit(main())
