"""The ``aiocronlock`` command line: demo, init, history, prune, release.

Each command imports only what it needs: ``--help`` loads none of asyncio, SQLAlchemy and rich.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, NoReturn

from ._errors import AiocronlockError, BackendError

if TYPE_CHECKING:
    from ._locker import AsyncDBLocker, JobRun, Lease

DEFAULT_URL = "sqlite:///aiocronlock.db"
URL_ENV = "AIOCRONLOCK_URL"
#: The locker's default table name (``_schema.DEFAULT_TABLE_NAME``), here so that
#: ``--help`` need not import SQLAlchemy.
DEFAULT_TABLE = "cron_job_locks"
DEFAULT_TIMEOUT = timedelta(seconds=5)
#: The command ``demo`` starts its worker processes with; not listed among the commands.
WORKER_COMMAND = "_demo-worker"

_DURATION = re.compile(r"(?P<value>\d+(?:\.\d+)?)\s*(?P<unit>ms|s|m|h|d|w)?")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, None: 1}


class CommandError(Exception):
    """A command that cannot do what was asked: one line, exit status 2."""


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


def format_duration(duration: timedelta) -> str:
    """A duration the way :func:`parse_duration` reads it: ``7d``, ``1h30m``, ``500ms``."""
    seconds = duration.total_seconds()
    if seconds < 1:
        return f"{round(seconds * 1000, 3):g}ms"
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        count, seconds = divmod(seconds, size)
        if count:
            parts.append(f"{int(count)}{unit}")
    if round(seconds, 3):
        parts.append(f"{round(seconds, 3):g}s")
    return "".join(parts)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be at least 1")
    return value


class _Version(argparse.Action):
    """``--version``, read from the installed package's metadata only when asked."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> NoReturn:
        from importlib.metadata import version

        print(f"aiocronlock {version('aiocronlock')}")
        parser.exit()


def _add_common(parser: argparse.ArgumentParser, *, top: bool, demo: bool = False) -> None:
    # Given before or after the command; only the top level holds the defaults, so
    # a subcommand does not overwrite a value given before it.
    if top:
        default_url = f"${URL_ENV}, else {DEFAULT_URL}; demo: a fresh SQLite file"
    elif demo:
        default_url = f"${URL_ENV}, else a fresh SQLite file in a temporary folder"
    else:
        default_url = f"${URL_ENV}, else {DEFAULT_URL}"
    parser.add_argument(
        "--url",
        default=None if top else argparse.SUPPRESS,
        help=f"database URL (default: {default_url})",
    )
    parser.add_argument(
        "--table",
        default=DEFAULT_TABLE if top else argparse.SUPPRESS,
        help=f"lock table name (default: {DEFAULT_TABLE})",
    )
    parser.add_argument(
        "--timeout",
        type=parse_duration,
        default=DEFAULT_TIMEOUT if top else argparse.SUPPRESS,
        metavar="DURATION",
        help="how long each database call may take, e.g. 10s or 1m "
        f"(default: {format_duration(DEFAULT_TIMEOUT)})",
    )


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    _add_common(common, top=False)
    parser = argparse.ArgumentParser(
        prog="aiocronlock",
        description="Run each tick of a scheduled job on exactly one instance.",
    )
    parser.add_argument("--version", action=_Version, help="print the version and exit")
    _add_common(parser, top=True)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo_common = argparse.ArgumentParser(add_help=False)
    _add_common(demo_common, top=False, demo=True)
    demo = commands.add_parser(
        "demo",
        help="race several worker processes for the same ticks and prove each ran once",
        description=(
            "Start several worker processes that all schedule the same jobs on one "
            "database, show live which worker ran each tick, and end with a summary "
            "proving that every tick ran exactly once. Uses a fresh SQLite file unless "
            "--url (or $AIOCRONLOCK_URL) is given."
        ),
        parents=[demo_common],
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
    history.add_argument(
        "--json", action="store_true", help="print runs and leases as JSON, for scripts"
    )

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
    return parser


def build_worker_parser() -> argparse.ArgumentParser:
    """The parser of ``aiocronlock _demo-worker``, which only ``demo`` starts."""
    worker = argparse.ArgumentParser(prog=f"aiocronlock {WORKER_COMMAND}")
    _add_common(worker, top=True)
    worker.add_argument("--worker", required=True)
    worker.add_argument("--jobs", type=_positive_int, required=True)
    worker.add_argument("--interval", type=parse_duration, required=True)
    worker.add_argument("--until", type=float, required=True)
    worker.set_defaults(command=WORKER_COMMAND)
    return worker


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (2 for a usage or database error)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == [WORKER_COMMAND]:
        args = build_worker_parser().parse_args(argv[1:])
    else:
        args = build_parser().parse_args(argv)
    # Only once the arguments are read: --help and --version exit before this.
    import asyncio
    import logging

    logging.basicConfig(level=logging.WARNING, format="aiocronlock: %(levelname)s: %(message)s")
    try:
        return asyncio.run(_dispatch(args))
    except BackendError as error:
        print(f"aiocronlock: error: {_explain(error, args.timeout)}", file=sys.stderr)
        return 2
    except (AiocronlockError, CommandError, ValueError, TypeError, ModuleNotFoundError) as error:
        print(f"aiocronlock: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _explain(error: BackendError, timeout: timedelta) -> str:
    """The error's message, naming ``--timeout`` when the database did not answer in time."""
    if isinstance(error.__cause__, TimeoutError):
        return (
            f"{error.operation} failed: {error.reason}: check that the database is "
            f"reachable, or allow more with --timeout (now {format_duration(timeout)})"
        )
    return str(error)


async def _dispatch(args: argparse.Namespace) -> int:
    if args.url is None:
        args.url = os.environ.get(URL_ENV) or (None if args.command == "demo" else DEFAULT_URL)
    if args.command in ("demo", WORKER_COMMAND):
        from . import _demo

        if args.command == "demo":
            return await _demo.run_demo(
                url=args.url,
                table=args.table,
                workers=args.workers,
                jobs=args.jobs,
                duration=args.duration,
                interval=args.interval,
                call_timeout=args.timeout,
                as_json=args.json,
            )
        return await _demo.run_worker(
            url=args.url,
            table=args.table,
            worker=args.worker,
            jobs=args.jobs,
            interval=args.interval,
            until=args.until,
            call_timeout=args.timeout,
        )
    return await _maintenance(args)


async def _maintenance(args: argparse.Namespace) -> int:
    from ._locker import AsyncDBLocker
    from ._urls import describe

    ttl = args.ttl if args.command == "prune" else timedelta(days=1)
    # Not `async with`: one-off commands need no cleaner and no clock check.
    locker = AsyncDBLocker(
        args.url, table_name=args.table, ttl=ttl, clean_interval=None, timeout=args.timeout
    )
    try:
        where = f"{locker.table.name} on {describe(locker.engine)}"
        if args.command == "init":
            await locker.create_table()
            print(f"table {where} is ready")
        elif args.command == "prune":
            pruned = await locker.clean()
            print(f"deleted {pruned} run(s) older than {format_duration(args.ttl)} from {where}")
        elif args.command == "release":
            return await _release(locker, args.job, yes=args.yes, where=where)
        else:
            await _history(locker, job=args.job, limit=args.limit, where=where, as_json=args.json)
    finally:
        await locker.aclose()
    return 0


async def _history(
    locker: AsyncDBLocker, *, job: str | None, limit: int, where: str, as_json: bool
) -> None:
    runs = await locker.history(job_name=job, limit=limit)
    leases = [lease for lease in await locker.leases() if job is None or lease.job_name == job]
    if as_json:
        print(_history_json(runs, leases))
        return
    console = _console()
    console.print(_history_table(runs, where=where))
    if leases:
        console.print()
        console.print(_lease_table(leases))


async def _release(locker: AsyncDBLocker, job: str, *, yes: bool, where: str) -> int:
    import asyncio

    leases = [lease for lease in await locker.leases() if lease.job_name == job]
    live = [lease for lease in leases if lease.live]
    if not live:
        if not leases and not await locker.history(job_name=job, limit=1):
            raise CommandError(
                f"release: no job named {job!r} has run in {where}: "
                "check the name with `aiocronlock history`"
            )
        print(f"{job!r} holds no live lease: nothing to release")
        return 0
    lease = live[0]
    if not yes:
        if not sys.stdin.isatty():
            raise CommandError("release: not a terminal, so no confirmation: pass --yes")
        answer = await asyncio.to_thread(
            input,
            f"release the lease of {job!r} held by {lease.worker} (run {lease.holder_id}) "
            f"until {lease.lease_until:%Y-%m-%d %H:%M:%S} UTC? [y/N] ",
        )
        if answer.strip().lower() not in ("y", "yes"):
            print("left as it is")
            return 1
    if await locker.release(job):
        print(f"released {job!r}; run {lease.holder_id} is marked LOST")
    else:
        print(f"{job!r} holds no live lease any more: nothing to release")
    return 0


# -- tables: rich, imported only to draw them ------------------------------------------------


def _console() -> Any:
    try:
        from rich.console import Console
    except ModuleNotFoundError:
        raise ModuleNotFoundError(
            "the command line's tables need rich: pip install 'aiocronlock[cli]', or pass --json"
        ) from None
    return Console()


def _history_json(runs: Sequence[JobRun], leases: Sequence[Lease]) -> str:
    import json

    def when(moment: datetime | None) -> str | None:
        return None if moment is None else moment.isoformat()

    return json.dumps(
        {
            "runs": [
                {
                    "id": run.id,
                    "job": run.job_name,
                    "tick": run.identifier,
                    "worker": run.worker,
                    "status": str(run.status),
                    "started_at": when(run.started_at),
                    "finished_at": when(run.finished_at),
                    "duration_s": None if run.duration is None else run.duration.total_seconds(),
                }
                for run in runs
            ],
            "leases": [
                {
                    "job": lease.job_name,
                    "held_by": lease.worker,
                    "run": lease.holder_id,
                    "lease_until": when(lease.lease_until),
                    "live": lease.live,
                }
                for lease in leases
            ],
        },
        indent=2,
    )


def _table(title: str) -> Any:
    """A table that fits 80 columns: a rule under the header, two spaces between columns."""
    from rich import box
    from rich.table import Table

    return Table(
        title=title,
        title_justify="left",
        box=box.SIMPLE_HEAD,
        show_edge=False,
        pad_edge=False,
        padding=(0, 1, 0, 0),
    )


def _history_table(runs: Sequence[JobRun], *, where: str) -> Any:
    styles = {
        "FINISHED": "green",
        "FAILED": "red",
        "RUNNING": "yellow",
        "LOST": "bold red",
        "SKIPPED": "dim",
    }
    days = {run.started_at.date() for run in runs}
    # One day, the common case: the date goes in the title and a start is its time of day;
    # over several days a start is its date above its time, so the column stays narrow.
    started = "%H:%M:%S.%f" if len(days) == 1 else "%Y-%m-%d\n%H:%M:%S.%f"
    title = f"recent runs in {where}"
    if len(days) == 1:
        title += f", started on {days.pop():%Y-%m-%d} (UTC)"
    table = _table(title)
    # Ticks and start times stay whole (a tick of the default precision is 20
    # characters, a start 12); long job and worker names fold instead.
    short_ticks = all(len(run.identifier) <= 24 for run in runs)
    table.add_column("id", justify="right", no_wrap=True)
    table.add_column("job", overflow="fold")
    table.add_column("tick", overflow="fold", no_wrap=short_ticks)
    table.add_column("worker", overflow="fold")
    table.add_column("status", no_wrap=True)
    table.add_column("started" if len(days) < 2 else "started (UTC)", no_wrap=True)
    table.add_column("took", justify="right", no_wrap=True)
    for run in runs:
        duration = run.duration
        table.add_row(
            str(run.id),
            run.job_name,
            run.identifier,
            run.worker,
            f"[{styles.get(run.status, 'white')}]{run.status}[/]",
            run.started_at.strftime(started)[:-3],
            "-" if duration is None else f"{duration.total_seconds():.3f}s",
        )
    if not runs:
        table.caption = "no runs recorded yet"
    return table


def _lease_table(leases: Sequence[Lease]) -> Any:
    table = _table("leases of exclusive jobs")
    table.add_column("job", overflow="fold")
    table.add_column("held by", overflow="fold")
    table.add_column("run", justify="right", no_wrap=True)
    table.add_column("lease until (UTC)")
    table.add_column("state", no_wrap=True)
    for lease in leases:
        table.add_row(
            lease.job_name,
            lease.worker,
            str(lease.holder_id),
            lease.lease_until.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3],
            "[yellow]live[/]" if lease.live else "[dim]expired[/]",
        )
    return table
