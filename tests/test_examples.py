"""The programs in examples/ run as their docstrings say and do what they print.

Each example runs as a subprocess on a SQLite file of the test's own. The tests
check its ``ran <job> tick=<ISO UTC> worker=<name>`` lines against the rows in the
lock table: one FINISHED row per printed run, nothing else, consecutive ticks, and
nothing left RUNNING after it stopped.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import re
import signal
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest

from aiocronlock import AsyncDBLocker, JobRun

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
RAN = re.compile(r"ran (?P<job>\S+) tick=(?P<tick>\S+) worker=(?P<worker>.+)")
SECOND = timedelta(seconds=1)
#: How long the examples stopped by their own timer run: three or four ticks.
RUN_SECONDS = "3.5"


@dataclass(frozen=True)
class Run:
    """One ``ran ...`` line of an example's output."""

    job: str
    tick: datetime
    worker: str


def parse_runs(lines: list[str]) -> list[Run]:
    runs = []
    for line in lines:
        if match := RAN.fullmatch(line):
            runs.append(Run(match["job"], datetime.fromisoformat(match["tick"]), match["worker"]))
    return runs


def tick_of(row: JobRun) -> datetime:
    return datetime.fromisoformat(row.identifier)


def example_env(database: Path, **settings: str) -> dict[str, str]:
    """The environment of an example: the test's database, unbuffered output, ``settings``."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("AIOCRONLOCK_")}
    env.update(AIOCRONLOCK_URL=f"sqlite:///{database}", PYTHONUNBUFFERED="1")
    env.update(settings)
    return env


class Example:
    """A running example: its process and the output read so far."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        assert process.stdout is not None and process.stderr is not None
        self.process = process
        self.stdout: list[str] = []
        self.stderr = ""
        self._stdout = process.stdout
        self._stderr = asyncio.ensure_future(process.stderr.read())

    def runs(self, job: str | None = None) -> list[Run]:
        return [run for run in parse_runs(self.stdout) if job is None or run.job == job]

    async def wait_for_runs(self, job: str, count: int) -> list[Run]:
        """Read output until ``count`` runs of ``job`` have been printed."""
        while len(self.runs(job)) < count:
            line = await self._stdout.readline()
            if not line:
                await self.finish()
                pytest.fail(
                    f"the example ended after {len(self.runs(job))} run(s) of {job!r}, "
                    f"status {self.process.returncode}:\n" + "\n".join(self.stdout) + self.stderr
                )
            self.stdout.append(line.decode().rstrip("\n"))
        return self.runs(job)

    async def finish(self) -> int:
        """Read the rest of the output and wait for the process to exit."""
        rest = await self._stdout.read()
        self.stdout.extend(rest.decode().splitlines())
        self.stderr = (await self._stderr).decode(errors="replace")
        return await self.process.wait()

    def send_signal_at_next_tick(self, signum: int) -> None:
        """Send ``signum`` just after the next whole second, while that tick is being run."""
        now = datetime.now(UTC)
        next_tick = now.replace(microsecond=0) + SECOND
        delay = (next_tick - now).total_seconds() + 0.002
        asyncio.get_running_loop().call_later(delay, self.process.send_signal, signum)


@asynccontextmanager
async def start(*args: str, env: dict[str, str]) -> AsyncIterator[Example]:
    """Run ``python *args`` from the repository's root; kill it if the test fails."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        *args,
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    example = Example(process)
    try:
        yield example
    except TimeoutError:
        process.kill()
        await example.finish()
        output = "\n".join([*example.stdout, example.stderr])
        pytest.fail(f"timed out; the example's output:\n{output}")
    finally:
        if process.returncode is None:
            process.kill()
            await example.finish()


async def recorded(database: Path, job: str, table: str = "cron_job_locks") -> list[JobRun]:
    """The rows of ``job``, oldest first, read through the public API."""
    locker = AsyncDBLocker(f"sqlite:///{database}", table_name=table, clean_interval=None)
    try:
        return list(reversed(await locker.history(job, limit=1000)))
    finally:
        await locker.aclose()


def check_runs(example: Example, rows: list[JobRun], *, job: str, worker: str) -> list[Run]:
    """Every printed run of ``job`` has its FINISHED row and vice versa; ticks are consecutive."""
    assert "Traceback" not in example.stderr, example.stderr
    runs = example.runs(job)
    assert len(runs) >= 2, example.stdout
    ticks = [run.tick for run in runs]
    assert all(tick.tzinfo == UTC and tick.microsecond == 0 for tick in ticks), ticks
    assert all(later - earlier == SECOND for earlier, later in pairwise(ticks)), ticks
    assert {run.worker for run in runs} == {worker}
    assert [(tick_of(row), row.worker, row.status) for row in rows] == [
        (run.tick, run.worker, "FINISHED") for run in runs
    ]
    return runs


# -- the command-line examples ----------------------------------------------------------

SCRIPTS = [
    pytest.param("quickstart.py", "unique_name", id="quickstart"),
    pytest.param("plain_loop.py", "plain-loop", id="plain_loop"),
    pytest.param("apscheduler_job.py", "apscheduler-report", id="apscheduler_job"),
    pytest.param("aiocron_job.py", "aiocron-report", id="aiocron_job"),
]


@pytest.mark.parametrize(("script", "job"), SCRIPTS)
async def test_example_runs_until_its_timer(script: str, job: str, tmp_path: Path) -> None:
    database = tmp_path / "locks.db"
    env = example_env(database, AIOCRONLOCK_EXAMPLE_SECONDS=RUN_SECONDS)
    async with start(f"examples/{script}", env=env) as example, asyncio.timeout(30):
        status = await example.finish()
    assert status == 0, example.stderr
    # No AIOCRONLOCK_WORKER: the library's default name, <hostname>:<pid>.
    worker = f"{socket.gethostname()}:{example.process.pid}"
    check_runs(example, await recorded(database, job), job=job, worker=worker)


@pytest.mark.parametrize(
    ("script", "job", "signum"),
    [
        pytest.param("quickstart.py", "unique_name", signal.SIGINT, id="quickstart-SIGINT"),
        pytest.param("plain_loop.py", "plain-loop", signal.SIGTERM, id="plain_loop-SIGTERM"),
        pytest.param("plain_loop.py", "plain-loop", signal.SIGINT, id="plain_loop-SIGINT"),
        pytest.param(
            "apscheduler_job.py", "apscheduler-report", signal.SIGINT, id="apscheduler-SIGINT"
        ),
        pytest.param("aiocron_job.py", "aiocron-report", signal.SIGTERM, id="aiocron-SIGTERM"),
    ],
)
async def test_example_stops_on_a_signal_after_the_tick_in_progress(
    script: str, job: str, signum: int, tmp_path: Path
) -> None:
    database = tmp_path / "locks.db"
    async with start(f"examples/{script}", env=example_env(database)) as example:
        async with asyncio.timeout(30):
            await example.wait_for_runs(job, 2)
        # Aim at the next tick's run, so that stopping has a run to wait for.
        example.send_signal_at_next_tick(signum)
        async with asyncio.timeout(20):
            status = await example.finish()
    assert status == 0, example.stderr
    worker = f"{socket.gethostname()}:{example.process.pid}"
    # Nothing RUNNING or FAILED: the run in progress, if any, finished first.
    check_runs(example, await recorded(database, job), job=job, worker=worker)


async def test_quickstart_prints_call_1s_and_honours_its_settings(tmp_path: Path) -> None:
    database = tmp_path / "locks.db"
    env = example_env(
        database,
        AIOCRONLOCK_EXAMPLE_SECONDS=RUN_SECONDS,
        AIOCRONLOCK_WORKER="worker one",
        AIOCRONLOCK_TABLE="quickstart_locks",
    )
    async with start("examples/quickstart.py", env=env) as example, asyncio.timeout(30):
        status = await example.finish()
    assert status == 0, example.stderr
    rows = await recorded(database, "unique_name", table="quickstart_locks")
    runs = check_runs(example, rows, job="unique_name", worker="worker one")
    # The Go original's output, once per run, just before the run's line.
    assert example.stdout == [line for run in runs for line in ("call 1s", run_line(run))]


def run_line(run: Run) -> str:
    return f"ran {run.job} tick={run.tick.isoformat()} worker={run.worker}"


# -- the web apps -------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass(frozen=True)
class WebApp:
    job: str
    #: The command, with ``{port}`` for the port.
    args: tuple[str, ...]
    #: The status of a bad ``limit``.
    bad_request: int


FASTAPI = WebApp("fastapi-report", ("-m", "uvicorn", "examples.fastapi_app:app"), 422)
FASTAPI_MAIN = WebApp("fastapi-report", ("examples/fastapi_app.py",), 422)
AIOHTTP = WebApp("aiohttp-report", ("examples/aiohttp_app.py",), 400)


@pytest.mark.parametrize(
    ("app", "stop", "expected_status"),
    [
        # uvicorn re-raises SIGTERM after its graceful shutdown, so the process dies of it.
        pytest.param(FASTAPI, signal.SIGTERM, -signal.SIGTERM, id="uvicorn-fastapi-SIGTERM"),
        pytest.param(FASTAPI_MAIN, None, -signal.SIGTERM, id="python-fastapi-timer"),
        pytest.param(AIOHTTP, signal.SIGINT, 0, id="python-aiohttp-SIGINT"),
        pytest.param(AIOHTTP, None, 0, id="python-aiohttp-timer"),
    ],
)
async def test_web_app_serves_the_runs_it_made(
    app: WebApp, stop: int | None, expected_status: int, tmp_path: Path
) -> None:
    database = tmp_path / "locks.db"
    port = free_port()
    settings = {"AIOCRONLOCK_WORKER": "web-1", "AIOCRONLOCK_EXAMPLE_PORT": str(port)}
    if stop is None:
        settings["AIOCRONLOCK_EXAMPLE_SECONDS"] = "4"
    args = app.args + (("--port", str(port)) if "-m" in app.args else ())
    async with start(*args, env=example_env(database, **settings)) as example, asyncio.timeout(30):
        await example.wait_for_runs(app.job, 2)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            served = (await client.get("/runs", params={"job": app.job})).raise_for_status().json()
            everything = (await client.get("/runs", params={"limit": 500})).json()
            bad = await client.get("/runs", params={"limit": 0})
        if stop is not None:
            example.process.send_signal(stop)
        status = await example.finish()

    assert status == expected_status, example.stderr
    rows = await recorded(database, app.job)
    check_runs(example, rows, job=app.job, worker="web-1")
    assert bad.status_code == app.bad_request
    # Newest first, at least the two runs printed before the request, each one a row.
    assert len(served) >= 2
    assert [entry["id"] for entry in served] == sorted((e["id"] for e in served), reverse=True)
    # Without ``job``, every job's runs (a tick may have come between the two requests).
    assert {entry["id"] for entry in served} <= {entry["id"] for entry in everything}
    by_id = {row.id: row for row in rows}
    for entry in served:
        row = by_id[entry["id"]]
        assert entry["job_name"] == row.job_name
        assert entry["identifier"] == row.identifier
        assert entry["worker"] == "web-1"
        assert datetime.fromisoformat(entry["started_at"]) == row.started_at
        assert entry["status"] in ("RUNNING", "FINISHED")
        if entry["status"] == "FINISHED":
            assert datetime.fromisoformat(entry["finished_at"]) == row.finished_at
        else:
            assert entry["finished_at"] is None


# -- many_instances.py --------------------------------------------------------------------

SUMMARY = re.compile(
    r"tick=(?P<tick>\S+) worker=(?P<worker>\S+) instance=(?P<instance>\S+) status=(?P<status>\S+)"
)
ECHOED = re.compile(r"\[(?P<instance>\d+)\] (?P<line>.*)")


async def test_many_instances_proves_each_tick_ran_once(tmp_path: Path) -> None:
    database = tmp_path / "locks.db"
    env = example_env(database, AIOCRONLOCK_WORKER="many")
    args = ("examples/many_instances.py", "--instances", "3", "--seconds", "4")
    async with start(*args, env=env) as example, asyncio.timeout(60):
        status = await example.finish()
    assert status == 0, [*example.stdout, example.stderr]
    assert "Traceback" not in example.stderr, example.stderr
    assert example.stdout[-1].startswith("ok: "), example.stdout

    # What the instances printed: each tick once, by the instance the worker name says.
    echoed = [m for line in example.stdout if (m := ECHOED.fullmatch(line))]
    runs = [(m["instance"], run) for m in echoed for run in parse_runs([m["line"]])]
    assert all(run.worker == f"many-{instance}" for instance, run in runs), runs
    ticks = sorted(run.tick for _, run in runs)
    assert len(ticks) >= 3
    assert len(set(ticks)) == len(ticks), ticks
    assert all(later - earlier == SECOND for earlier, later in pairwise(ticks)), ticks

    # The summary is the table, and the table is what they printed.
    summary = [m.groupdict() for line in example.stdout if (m := SUMMARY.fullmatch(line))]
    rows = await recorded(database, "unique_name")
    assert [(s["tick"], s["worker"], s["status"]) for s in summary] == [
        (tick_of(row).isoformat(), row.worker, row.status) for row in rows
    ]
    assert sorted((tick_of(row), row.worker) for row in rows) == sorted(
        (run.tick, run.worker) for _, run in runs
    )
    assert {s["status"] for s in summary} == {"FINISHED"}


def load_example(name: str, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """Import ``examples/<name>.py`` for the duration of the test."""
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_many_instances_verdict_reports_duplicates_gaps_and_failures(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    many = load_example("many_instances", monkeypatch)
    t0 = datetime(2025, 1, 1, 10, 0, 0, tzinfo=UTC)
    started = datetime(2025, 1, 1, 10, 0, 0, 1000, tzinfo=UTC)

    def row(seconds: int, worker: str, status: str = "FINISHED") -> JobRun:
        identifier = (t0 + seconds * SECOND).strftime("%Y-%m-%dT%H:%M:%SZ")
        return JobRun(seconds, "unique_name", identifier, worker, status, started, started)

    def printed(seconds: int, worker: str, instance: int) -> Any:
        return many.Run(t0 + seconds * SECOND, worker, instance)

    good_rows = [row(0, "a"), row(1, "b"), row(2, "a")]
    good_runs = [printed(0, "a", 1), printed(1, "b", 2), printed(2, "a", 1)]
    assert many.verdict(good_rows, good_runs, [0, 0]) == []

    problems = many.verdict(
        [row(0, "a"), row(2, "a", "FAILED"), row(3, "b")],
        [printed(0, "a", 1), printed(0, "b", 2), printed(2, "a", 1), printed(3, "b", 2)],
        [0, 1],
    )
    assert problems == [
        "instance 2 exited with status 1",
        "1 tick(s) ran more than once: 2025-01-01T10:00:00+00:00",
        "1 run(s) without their row: 2025-01-01T10:00:00+00:00",
        "1 row(s) not FINISHED: 2025-01-01T10:00:02+00:00",
        "1 tick(s) ran nowhere: 2025-01-01T10:00:01+00:00",
    ]
    assert many.verdict([], [], [0]) == ["no tick ran"]
