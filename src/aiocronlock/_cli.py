"""The ``aiocronlock`` command line: demo, init, history, prune, release."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import sys
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from ._errors import AiocronlockError
from ._schema import DEFAULT_TABLE_NAME

DEFAULT_URL = "sqlite:///aiocronlock.db"
URL_ENV = "AIOCRONLOCK_URL"

_DURATION = re.compile(r"(?P<value>\d+(?:\.\d+)?)\s*(?P<unit>ms|s|m|h|d|w)?")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, None: 1}


def parse_duration(text: str) -> timedelta:
    """``90``, ``90s``, ``15m``, ``12h``, ``7d``, ``1w`` or ``500ms`` as a timedelta."""
    match = _DURATION.fullmatch(text.strip())
    if not match:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a duration; use e.g. 90s, 15m, 12h or 7d"
        )
    seconds = float(match["value"]) * _UNITS[match["unit"]]
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: a duration must be positive")
    return timedelta(seconds=seconds)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be at least 1")
    return value


def _add_common(parser: argparse.ArgumentParser, *, top: bool) -> None:
    # Given before or after the command; only the top level holds the defaults, so
    # a subcommand does not overwrite a value given before it.
    parser.add_argument(
        "--url",
        default=None if top else argparse.SUPPRESS,
        help=f"database URL (default: ${URL_ENV}, else {DEFAULT_URL}; "
        "the demo uses a fresh SQLite file)",
    )
    parser.add_argument(
        "--table",
        default=DEFAULT_TABLE_NAME if top else argparse.SUPPRESS,
        help=f"lock table name (default: {DEFAULT_TABLE_NAME})",
    )


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    _add_common(common, top=False)
    parser = argparse.ArgumentParser(
        prog="aiocronlock",
        description="Run each tick of a scheduled job on exactly one instance.",
    )
    _add_common(parser, top=True)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser(
        "demo",
        help="race several worker processes for the same ticks and prove each ran once",
        description=(
            "Start several worker processes that all schedule the same jobs on one "
            "database, show live which worker ran each tick, and end with a summary "
            "proving that every tick ran exactly once. Uses a fresh SQLite file unless "
            "--url is given."
        ),
        parents=[common],
    )
    demo.add_argument("--workers", type=_positive_int, default=3, help="worker processes (3)")
    demo.add_argument("--jobs", type=_positive_int, default=2, help="jobs per worker (2)")
    demo.add_argument(
        "--duration", type=parse_duration, default=timedelta(seconds=15), help="ticking time (15s)"
    )
    demo.add_argument(
        "--interval", type=parse_duration, default=timedelta(seconds=1), help="tick interval (1s)"
    )
    demo.add_argument("--json", action="store_true", help="print the summary as JSON only")

    commands.add_parser("init", help="create the lock table if it is missing", parents=[common])

    history = commands.add_parser("history", help="show recent runs", parents=[common])
    history.add_argument("--job", help="only this job")
    history.add_argument("--limit", type=_positive_int, default=20, help="rows (20)")

    prune = commands.add_parser("prune", help="delete runs older than --ttl now", parents=[common])
    prune.add_argument("--ttl", type=parse_duration, required=True, help="e.g. 7d, 12h, 90m")

    release = commands.add_parser(
        "release",
        help="force-release the lease of a stuck exclusive job",
        description=(
            "End the live lease of an exclusive job whose holder is gone, and mark its "
            "run LOST, so the next tick can run. Asks for confirmation unless --yes."
        ),
        parents=[common],
    )
    release.add_argument("job", help="the job name")
    release.add_argument("--yes", action="store_true", help="do not ask for confirmation")

    worker = commands.add_parser("_demo-worker", parents=[common])  # started by `demo`
    worker.add_argument("--worker", required=True)
    worker.add_argument("--jobs", type=_positive_int, required=True)
    worker.add_argument("--interval", type=parse_duration, required=True)
    worker.add_argument("--until", type=float, required=True)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (2 for a usage or database error)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="aiocronlock: %(levelname)s: %(message)s")
    try:
        return asyncio.run(_dispatch(args))
    except (AiocronlockError, ValueError, TypeError, ModuleNotFoundError) as error:
        print(f"aiocronlock: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


async def _dispatch(args: argparse.Namespace) -> int:
    from . import _demo

    if args.url is None:
        args.url = os.environ.get(URL_ENV) or (None if args.command == "demo" else DEFAULT_URL)
    if args.command == "demo":
        return await _demo.run_demo(
            url=args.url,
            table=args.table,
            workers=args.workers,
            jobs=args.jobs,
            duration=args.duration,
            interval=args.interval,
            as_json=args.json,
        )
    if args.command == "_demo-worker":
        return await _demo.run_worker(
            url=args.url,
            table=args.table,
            worker=args.worker,
            jobs=args.jobs,
            interval=args.interval,
            until=args.until,
        )
    return await _maintenance(args)


async def _maintenance(args: argparse.Namespace) -> int:
    from ._engine import describe
    from ._locker import AsyncDBLocker

    console = _console()
    ttl = args.ttl if args.command == "prune" else timedelta(days=1)
    # Not `async with`: one-off commands need no cleaner and no clock check.
    locker = AsyncDBLocker(args.url, table_name=args.table, ttl=ttl, clean_interval=None)
    try:
        where = f"{locker.table.name} on {describe(locker.engine)}"
        if args.command == "init":
            await locker.create_table()
            console.print(f"table {where} is ready")
        elif args.command == "prune":
            pruned = await locker.clean()
            console.print(f"deleted {pruned} run(s) older than {args.ttl} from {where}")
        elif args.command == "release":
            return await _release(locker, args.job, yes=args.yes, console=console)
        else:
            runs = await locker.history(job_name=args.job, limit=args.limit)
            console.print(_history_table(runs, title=f"recent runs in {where}"))
            leases = [
                lease
                for lease in await locker.leases()
                if args.job is None or lease.job_name == args.job
            ]
            if leases:
                console.print(_lease_table(leases))
    finally:
        await locker.aclose()
    return 0


async def _release(locker: Any, job: str, *, yes: bool, console: Any) -> int:
    live = [lease for lease in await locker.leases() if lease.job_name == job and lease.live]
    if not live:
        console.print(f"{job!r} holds no live lease: nothing to release")
        return 0
    lease = live[0]
    if not yes:
        if not sys.stdin.isatty():
            raise ValueError("release: not a terminal, so no confirmation: pass --yes")
        answer = await asyncio.to_thread(
            input,
            f"release the lease of {job!r} held by {lease.worker} (run {lease.holder_id}) "
            f"until {lease.lease_until:%Y-%m-%d %H:%M:%S} UTC? [y/N] ",
        )
        if answer.strip().lower() not in ("y", "yes"):
            console.print("left as it is")
            return 1
    if await locker.release(job):
        console.print(f"released {job!r}; run {lease.holder_id} is marked LOST")
    else:
        console.print(f"{job!r} holds no live lease any more: nothing to release")
    return 0


def _console() -> Any:
    try:
        from rich.console import Console
    except ModuleNotFoundError:
        raise ModuleNotFoundError(
            "the command line needs rich: pip install 'aiocronlock[cli]'"
        ) from None
    return Console()


def _lease_table(leases: Sequence[Any]) -> Any:
    from rich.table import Table

    table = Table(title="leases of exclusive jobs", title_justify="left")
    for column in ("job", "held by", "run", "lease until (UTC)", "state"):
        table.add_column(column)
    for lease in leases:
        table.add_row(
            lease.job_name,
            lease.worker,
            str(lease.holder_id),
            lease.lease_until.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3],
            "[yellow]live[/]" if lease.live else "[dim]expired[/]",
        )
    return table


def _history_table(runs: Sequence[Any], *, title: str) -> Any:
    from rich.table import Table

    styles = {
        "FINISHED": "green",
        "FAILED": "red",
        "RUNNING": "yellow",
        "LOST": "bold red",
        "SKIPPED": "dim",
    }
    table = Table(title=title, title_justify="left")
    for column in ("id", "job", "tick", "worker", "status", "started (UTC)", "duration"):
        table.add_column(column, justify="right" if column in ("id", "duration") else "left")
    for run in runs:
        duration = run.duration
        table.add_row(
            str(run.id),
            run.job_name,
            run.identifier,
            run.worker,
            f"[{styles.get(run.status, 'white')}]{run.status}[/]",
            run.started_at.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3],
            "-" if duration is None else f"{duration.total_seconds():.3f}s",
        )
    if not runs:
        table.caption = "no runs recorded yet"
    return table
