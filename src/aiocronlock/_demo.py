"""``aiocronlock demo``: several processes race for the same ticks; each tick runs once.

The parent starts the worker processes, reads from each the runs it executed
(one JSON line per run), shows them live, and checks two independent records at
the end: what the workers say they ran, and the FINISHED rows in the table.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import random
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio

from ._cli import URL_ENV, WORKER_COMMAND
from ._errors import TableMissingError
from ._identifiers import precision
from ._lock import current_lock
from ._locker import AsyncDBLocker
from ._scheduler import Scheduler
from ._triggers import IntervalTrigger
from ._urls import mask_url

#: How long the worker processes may take to start before the demo gives up.
STARTUP_LIMIT_SECONDS = 60.0
#: How long the workers may take to exit once told to stop, before they are killed.
STOP_LIMIT_SECONDS = 5.0
_PALETTE = ("cyan", "magenta", "green", "yellow", "blue", "red", "bright_cyan", "bright_magenta")


# -- the worker process ------------------------------------------------------------------


async def run_worker(
    *,
    url: str,
    table: str,
    worker: str,
    jobs: int,
    interval: timedelta,
    until: float,
    call_timeout: timedelta,
) -> int:
    """One demo instance: schedule ``jobs`` jobs every ``interval`` until ``until``."""
    locker = AsyncDBLocker(
        url,
        worker=worker,
        table_name=table,
        clean_interval=None,
        identifier=precision(min(interval, timedelta(seconds=1))),
        timeout=call_timeout,
    )
    scheduler = Scheduler(locker, grace_period=interval * 2)
    for number in range(1, jobs + 1):
        scheduler.add_job(
            _demo_job(worker, interval), IntervalTrigger(interval), name=f"job-{number}"
        )
    async with locker, scheduler:
        print(json.dumps({"ready": worker}), flush=True)
        # Run until the parent closes our stdin (or, if it died, until `until`).
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(0.0, until - time.time())):
                await _stdin_closed()
    return 0


async def _stdin_closed() -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    transport, _ = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), sys.stdin
    )
    try:
        while await reader.read(4096):
            pass
    finally:
        transport.close()


def _demo_job(worker: str, interval: timedelta) -> Any:
    async def job() -> None:
        lock = current_lock()
        # Pretend to work for part of the interval.
        await asyncio.sleep(random.uniform(0.05, 0.3) * interval.total_seconds())
        line = {"job": lock.job_name, "tick": lock.run_time.timestamp(), "worker": worker}
        print(json.dumps(line), flush=True)

    return job


# -- the parent --------------------------------------------------------------------------


@dataclass
class _Race:
    jobs: list[str]
    ticks: list[float]
    workers: list[str]
    runs: dict[tuple[str, float], list[str]] = field(default_factory=lambda: defaultdict(list))
    ready: set[str] = field(default_factory=set)
    finished_rows: int | None = None

    def record(self, job: str, tick: float, worker: str) -> None:
        if self.ticks and job in self.jobs and self.ticks[0] <= tick <= self.ticks[-1]:
            self.runs[job, round(tick, 6)].append(worker)

    def summary(self) -> dict[str, Any]:
        expected = [(job, round(tick, 6)) for tick in self.ticks for job in self.jobs]
        wins = Counter(worker for runs in self.runs.values() for worker in runs)
        return {
            "workers": len(self.workers),
            "jobs": len(self.jobs),
            "ticks": len(self.ticks),
            "expected_runs": len(expected),
            "runs": sum(len(runs) for runs in self.runs.values()),
            "duplicates": sum(max(0, len(self.runs.get(key, [])) - 1) for key in expected),
            "misses": sum(1 for key in expected if not self.runs.get(key)),
            "finished_rows": self.finished_rows,
            "wins": {worker: wins.get(worker, 0) for worker in self.workers},
        }


async def run_demo(
    *,
    url: str | None,
    table: str,
    workers: int,
    jobs: int,
    duration: timedelta,
    interval: timedelta,
    call_timeout: timedelta,
    as_json: bool,
) -> int:
    step = interval.total_seconds()
    with contextlib.ExitStack() as cleanup:
        temporary = url is None
        if url is None:
            folder = cleanup.enter_context(tempfile.TemporaryDirectory(prefix="aiocronlock-"))
            url = f"sqlite:///{Path(folder) / 'demo.db'}"
        locker = AsyncDBLocker(url, table_name=table, clean_interval=None, timeout=call_timeout)
        race = _Race(
            jobs=[f"job-{n}" for n in range(1, jobs + 1)],
            ticks=[],
            workers=[f"worker-{n}" for n in range(1, workers + 1)],
        )
        processes: list[asyncio.subprocess.Process] = []
        created = dropped = completed = False
        try:
            created = not temporary and not await _has_table(locker)
            await locker.create_table()
            count = max(1, int(duration.total_seconds() // step))
            # A bound in case this process dies and cannot close the workers' stdin.
            until = time.time() + STARTUP_LIMIT_SECONDS + count * step + 30
            for name in race.workers:
                process = await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    "aiocronlock",
                    WORKER_COMMAND,
                    "--table",
                    table,
                    "--timeout",
                    f"{call_timeout.total_seconds()}s",
                    "--worker",
                    name,
                    "--jobs",
                    str(jobs),
                    "--interval",
                    f"{step}s",
                    "--until",
                    repr(until),
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.PIPE,
                    # Not on the command line, where `ps` would show its password.
                    env={**os.environ, URL_ENV: url},
                )
                processes.append(process)
            readers = [asyncio.create_task(_read_runs(p, race)) for p in processes]
            errors = [asyncio.create_task(_read_all(p.stderr)) for p in processes]
            if await _workers_ready(race, readers, as_json=as_json):
                # Count ticks only from when every worker is up.
                first = math.ceil((time.time() + 1.0) / step) * step
                race.ticks = [first + i * step for i in range(count)]
                stopper = asyncio.create_task(
                    _close_stdin_at(processes, race.ticks[-1] + step * 0.9)
                )
                if as_json:
                    await asyncio.gather(*readers)
                else:
                    await _show_live(race, readers, url)
                await stopper
            else:
                await _close_stdin_at(processes, 0.0)
                await asyncio.gather(*readers)
            codes = [await p.wait() for p in processes]
            failures = [
                f"{name} exited with status {code}: {(await err).strip()[-2000:]}"
                for name, code, err in zip(race.workers, codes, errors, strict=True)
                if code != 0
            ]
            if not race.ticks:
                failures.append(f"the workers did not all start within {STARTUP_LIMIT_SECONDS:g} s")
                race.ticks = [time.time()]
            race.finished_rows = await _count_finished(locker, race)
            completed = True
        finally:
            # Also when interrupted (Ctrl-C cancels this task) or failing: the workers
            # stop, and what the demo created goes, each within a bound.
            await _stop_workers(processes)
            if created:
                dropped = await _drop_tables(locker, call_timeout)
            await locker.aclose()
            if not completed and not temporary:
                _note_tables(locker, url, race, created=created, dropped=dropped)
    summary = race.summary()
    if as_json:
        print(json.dumps(summary))
    else:
        _show_summary(summary, failures)
    if not temporary:
        _note_tables(locker, url, race, created=created, dropped=dropped)
    for failure in failures:
        print(f"aiocronlock: error: {failure}", file=sys.stderr)
    ok = summary["duplicates"] == 0 and summary["misses"] == 0 and not failures
    return 0 if ok else 1


def _note_tables(
    locker: AsyncDBLocker, url: str, race: _Race, *, created: bool, dropped: bool
) -> None:
    """Say on stderr what the demo left in a database the user named, and where."""
    where = f"table {locker.table.name} on {mask_url(url)}"
    if created and dropped:
        note = f"the demo created {where} and dropped it again"
    elif created:
        names = " and ".join(sorted(locker.table.metadata.tables))
        note = f"the demo created {where} and could not drop it: drop {names} by hand"
    else:
        note = (
            f"the demo's runs ({', '.join(race.jobs)}) stay in {where}; "
            "`aiocronlock prune` deletes them once they are old enough"
        )
    print(f"aiocronlock: {note}", file=sys.stderr)


async def _read_runs(process: asyncio.subprocess.Process, race: _Race) -> None:
    assert process.stdout is not None
    async for raw in process.stdout:
        with contextlib.suppress(ValueError, KeyError, TypeError):
            line = json.loads(raw)
            if "ready" in line:
                race.ready.add(line["ready"])
            else:
                race.record(line["job"], float(line["tick"]), line["worker"])


async def _workers_ready(race: _Race, readers: list[asyncio.Task[None]], *, as_json: bool) -> bool:
    """Wait until every worker said it is scheduling; False if one exited or time ran out."""

    async def wait() -> bool:
        while len(race.ready) < len(race.workers):
            if any(reader.done() for reader in readers):
                return False
            await asyncio.sleep(0.05)
        return True

    try:
        async with asyncio.timeout(STARTUP_LIMIT_SECONDS):
            if as_json:
                return await wait()
            from rich.console import Console

            with Console().status(f"starting {len(race.workers)} worker processes..."):
                return await wait()
    except TimeoutError:
        return False


async def _close_stdin_at(processes: list[asyncio.subprocess.Process], moment: float) -> None:
    """Tell the workers to stop (by closing their stdin) once ``moment`` has passed."""
    await asyncio.sleep(max(0.0, moment - time.time()))
    for process in processes:
        if process.stdin is not None and not process.stdin.is_closing():
            process.stdin.close()


async def _read_all(stream: asyncio.StreamReader | None) -> str:
    assert stream is not None
    return (await stream.read()).decode(errors="replace")


async def _count_finished(locker: AsyncDBLocker, race: _Race) -> int:
    identifiers = {locker.identifier(job, _utc(tick)) for tick in race.ticks for job in race.jobs}
    runs = await locker.history(limit=len(race.ticks) * len(race.jobs) * 4 + 100)
    return sum(
        1
        for run in runs
        if run.status == "FINISHED" and run.job_name in race.jobs and run.identifier in identifiers
    )


async def _has_table(locker: AsyncDBLocker) -> bool:
    try:
        await locker.history(limit=1)
    except TableMissingError:
        return False
    return True


async def _stop_workers(processes: list[asyncio.subprocess.Process]) -> None:
    """Close the workers' stdin, wait for them to exit, and kill those that do not in time."""
    await _close_stdin_at(processes, 0.0)
    with anyio.move_on_after(STOP_LIMIT_SECONDS, shield=True):
        for process in processes:
            await process.wait()
    with anyio.move_on_after(STOP_LIMIT_SECONDS, shield=True):
        for process in processes:
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()


async def _drop_tables(locker: AsyncDBLocker, limit: timedelta) -> bool:
    """Drop the lock table the demo created, and its leases table; False (and why, on
    stderr) if that failed."""
    with anyio.move_on_after(limit.total_seconds(), shield=True):
        try:
            async with locker.engine.begin() as conn:
                await conn.run_sync(
                    lambda sync: locker.table.metadata.drop_all(sync, checkfirst=True)
                )
        except Exception as error:
            print(
                f"aiocronlock: error: dropping the demo's tables failed: {error}", file=sys.stderr
            )
            return False
        return True
    print(
        f"aiocronlock: error: dropping the demo's tables took over {limit.total_seconds():g} s",
        file=sys.stderr,
    )
    return False


def _utc(tick: float) -> datetime:
    return datetime.fromtimestamp(tick, UTC)


# -- the display -------------------------------------------------------------------------


async def _show_live(race: _Race, readers: list[asyncio.Task[None]], url: str) -> None:
    from rich.console import Group
    from rich.live import Live
    from rich.text import Text

    colours = {name: _PALETTE[i % len(_PALETTE)] for i, name in enumerate(race.workers)}
    header = Text.assemble(
        ("aiocronlock demo", "bold"),
        f": {len(race.workers)} worker processes race for {len(race.jobs)} job(s) "
        f"every {race.ticks[1] - race.ticks[0] if len(race.ticks) > 1 else 1:g}s on ",
        (mask_url(url), "italic"),
    )

    def render() -> Group:
        return Group(header, _tick_table(race, colours), _progress(race, colours))

    with Live(render(), refresh_per_second=8, transient=False) as live:
        while not all(reader.done() for reader in readers):
            await asyncio.sleep(0.125)
            live.update(render())
        live.update(render())
    await asyncio.gather(*readers)


def _tick_table(race: _Race, colours: dict[str, str]) -> Any:
    from rich.table import Table

    now = time.time()
    table = Table(expand=False, show_edge=True, header_style="bold")
    table.add_column("tick (UTC)", style="dim")
    for job in race.jobs:
        table.add_column(job, min_width=12)
    shown = [tick for tick in race.ticks if tick <= now][-10:]
    for tick in shown:
        cells = []
        for job in race.jobs:
            runs = race.runs.get((job, round(tick, 6)), [])
            if len(runs) == 1:
                cells.append(f"[{colours[runs[0]]}]{runs[0]}[/]")
            elif runs:
                cells.append(f"[bold red]DUPLICATE: {', '.join(runs)}[/]")
            else:
                cells.append("[dim]…[/]" if now - tick < 3 else "[bold red]missed[/]")
        table.add_row(_utc(tick).strftime("%H:%M:%S.%f")[:-4], *cells)
    if not shown:
        table.add_row(f"first tick in {max(0.0, race.ticks[0] - now):.1f}s", *[""] * len(race.jobs))
    return table


def _progress(race: _Race, colours: dict[str, str]) -> Any:
    from rich.text import Text

    summary = race.summary()
    due = sum(1 for tick in race.ticks if tick <= time.time())
    text = Text(f"tick {due}/{len(race.ticks)}   runs {summary['runs']}   ")
    text.append(
        f"duplicates {summary['duplicates']}", "green" if not summary["duplicates"] else "red"
    )
    text.append("   wins: ")
    for worker, wins in summary["wins"].items():
        text.append(f"{worker} {wins}  ", colours[worker])
    return text


def _show_summary(summary: dict[str, Any], failures: list[str]) -> None:
    from rich.console import Console
    from rich.panel import Panel
    from rich.table import Table

    ok = summary["duplicates"] == 0 and summary["misses"] == 0 and not failures
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold")
    table.add_column()
    table.add_row("ticks", f"{summary['ticks']} per job x {summary['jobs']} job(s)")
    table.add_row("expected runs", str(summary["expected_runs"]))
    table.add_row("runs", str(summary["runs"]))
    table.add_row("duplicates", _flag(summary["duplicates"]))
    table.add_row("misses", _flag(summary["misses"]))
    table.add_row("FINISHED rows", str(summary["finished_rows"]))
    table.add_row("wins", ", ".join(f"{w} {n}" for w, n in summary["wins"].items()))
    verdict = (
        "[bold green]every tick ran exactly once[/]"
        if ok
        else "[bold red]some ticks did not run exactly once[/]"
    )
    console = Console()
    console.print()
    console.print(Panel(table, title="summary", subtitle=verdict, expand=False))


def _flag(value: int) -> str:
    return f"[green]{value}[/]" if value == 0 else f"[bold red]{value}[/]"
