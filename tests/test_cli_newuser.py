"""The command line as a new user meets it: through the installed ``aiocronlock`` script."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from importlib.metadata import version
from itertools import pairwise
from pathlib import Path

import pytest
from sqlalchemy import MetaData, inspect, update
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

from aiocronlock import AsyncDBLocker, TableMissingError, lock_table
from conftest import server_url

SCRIPT = Path(sys.executable).with_name("aiocronlock")
LONG_JOB = "nightly-report-for-the-accounting-department"
LONG_WORKER = "worker-on-a-rather-long-hostname.example.internal:123456"


def _env(columns: int | None = 200, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("AIOCRONLOCK_URL", "COLUMNS")}
    env["NO_COLOR"] = "1"
    if columns is not None:
        env["COLUMNS"] = str(columns)
    env.update(extra)
    return env


def run(
    *args: str, columns: int | None = 200, timeout: float = 60, **extra: str
) -> subprocess.CompletedProcess[str]:
    """``aiocronlock ARGS``, its output piped, as a script would run it."""
    return subprocess.run(
        [str(SCRIPT), *args],
        capture_output=True,
        text=True,
        env=_env(columns, **extra),
        timeout=timeout,
        check=False,
    )


def _error_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("aiocronlock: error: ")
    return line


async def _record(url: str, runs: list[tuple[str, str]]) -> list[str]:
    """Win and finish one tick per (job, worker), a second apart; return the identifiers."""
    identifiers = []
    base = datetime.now(UTC).replace(microsecond=0)
    for i, (job, worker) in enumerate(runs):
        async with AsyncDBLocker(url, worker=worker, clean_interval=None) as locker:
            lock = await locker.lock(job, base - timedelta(seconds=i))
            assert lock is not None
            await lock.unlock()
            identifiers.append(lock.identifier)
    return identifiers


async def _move_back(url: str, identifier: str, by: timedelta) -> None:
    """Make one run look as if it had started ``by`` earlier."""
    engine = create_async_engine(url.replace("sqlite://", "sqlite+aiosqlite://", 1))
    table = lock_table(MetaData())
    try:
        async with engine.begin() as conn:
            await conn.execute(
                update(table)
                .where(table.c.job_identifier == identifier)
                .values(created_at=datetime.now(UTC) - by, updated_at=datetime.now(UTC) - by)
            )
    finally:
        await engine.dispose()


@pytest.fixture
def url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'locks.db'}"
    assert run("--url", url, "init").returncode == 0
    return url


# -- item 7: --version, the hidden worker command, the --url help --------------------------------


def test_version_comes_from_the_package_metadata() -> None:
    result = run("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"aiocronlock {version('aiocronlock')}"


def test_an_unknown_command_lists_only_the_public_ones() -> None:
    result = run("foo")
    assert result.returncode == 2
    assert "invalid choice: 'foo'" in result.stderr
    for command in ("demo", "init", "history", "prune", "release"):
        assert f"'{command}'" in result.stderr
    assert "_demo-worker" not in result.stderr
    assert "_demo-worker" not in run("--help").stdout


def _url_help(command: str) -> str:
    result = run(command, "--help", columns=1000)
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    match = re.search(r"--url URL (.*?\))", text)
    assert match, text
    return match[1]


@pytest.mark.parametrize("command", ["init", "history", "prune", "release"])
def test_url_help_of_a_maintenance_command_does_not_mention_the_demo(command: str) -> None:
    help_text = _url_help(command)
    assert "demo" not in help_text
    assert "SQLite file" not in help_text
    assert "$AIOCRONLOCK_URL, else sqlite:///aiocronlock.db" in help_text


def test_url_help_of_the_demo_says_it_uses_a_fresh_file() -> None:
    help_text = _url_help("demo")
    assert "$AIOCRONLOCK_URL" in help_text
    assert "fresh SQLite file" in help_text
    assert "aiocronlock.db" not in help_text


# -- item 11: each command imports what it needs --------------------------------------------------


def _imported(*args: str) -> set[str]:
    result = run(*args, PYTHONPROFILEIMPORTTIME="1")
    assert result.returncode == 0, result.stderr
    return {
        line.rsplit("|", 1)[1].strip()
        for line in result.stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    }


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["history", "--help"]])
def test_help_imports_neither_asyncio_nor_sqlalchemy_nor_rich(args: list[str]) -> None:
    modules = _imported(*args)
    assert "aiocronlock._cli" in modules  # the measure sees the package's own imports
    heavy = ("asyncio", "sqlalchemy", "rich")
    assert {m for m in modules if m.split(".")[0] in heavy} == set()


def test_init_does_not_import_rich(tmp_path: Path) -> None:
    modules = _imported("--url", f"sqlite:///{tmp_path / 'x.db'}", "init")
    assert "sqlalchemy" in modules
    assert {m for m in modules if m.split(".")[0] == "rich"} == set()


def test_the_package_still_exports_every_name() -> None:
    code = (
        "import sys, aiocronlock\n"
        "assert 'sqlalchemy' not in sys.modules, 'import aiocronlock loaded sqlalchemy'\n"
        "from aiocronlock import *\n"
        "missing = [n for n in aiocronlock.__all__ if n not in globals()]\n"
        "assert missing == [], missing\n"
        "assert aiocronlock.__all__ == sorted(aiocronlock.__all__)\n"
        "assert set(aiocronlock.__all__) <= set(dir(aiocronlock))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=60
    )
    assert result.returncode == 0, result.stderr


def test_default_table_name_matches_the_schema() -> None:
    from aiocronlock._cli import DEFAULT_TABLE
    from aiocronlock._schema import DEFAULT_TABLE_NAME

    assert DEFAULT_TABLE == DEFAULT_TABLE_NAME


# -- item 8: history fits 80 columns; --json ------------------------------------------------------


def _assert_fits(output: str, identifiers: list[str], width: int = 80) -> None:
    lines = output.splitlines()
    assert max(len(line) for line in lines) <= width, output
    for identifier in identifiers:
        assert any(identifier in line for line in lines), (identifier, output)


@pytest.mark.parametrize("columns", [None, 80], ids=["piped", "80-columns"])
def test_history_fits_80_columns_and_keeps_times_whole(url: str, columns: int | None) -> None:
    identifiers = asyncio.run(
        _record(url, [(LONG_JOB, LONG_WORKER), ("heartbeat", "pod-a"), ("x", LONG_WORKER)])
    )
    result = run("--url", url, "history", columns=columns)
    assert result.returncode == 0, result.stderr
    _assert_fits(result.stdout, identifiers)
    runs = json.loads(run("--url", url, "history", "--json").stdout)["runs"]
    for shown in runs:
        started = datetime.fromisoformat(shown["started_at"])
        assert started.strftime("%H:%M:%S.%f")[:-3] in result.stdout
        assert f"{shown['duration_s']:.3f}s" in result.stdout
    assert started.strftime("%Y-%m-%d") in " ".join(result.stdout.split())  # the day, once
    # Long names fold onto more lines rather than being cut.
    assert result.stdout.count("FINISHED") == 3
    assert "…" not in result.stdout


@pytest.mark.parametrize("long_names", [False, True], ids=["short-names", "long-names"])
def test_history_over_several_days_shows_each_date(url: str, long_names: bool) -> None:
    job, worker = ("j" * 60, "w" * 60) if long_names else ("a", "pod-a")
    identifiers = asyncio.run(_record(url, [(job, worker), ("b", "pod-b"), (job, worker)]))
    asyncio.run(_move_back(url, identifiers[1], timedelta(days=3)))
    result = run("--url", url, "history", columns=None)
    assert result.returncode == 0, result.stderr
    _assert_fits(result.stdout, identifiers)
    assert "started (UTC)" in result.stdout  # the header on one line
    assert "…" not in result.stdout
    lines = result.stdout.splitlines()
    runs = json.loads(run("--url", url, "history", "--json").stdout)["runs"]
    assert len({run["started_at"][:10] for run in runs}) == 2
    for shown in runs:
        started = datetime.fromisoformat(shown["started_at"])
        day, time_of_day = started.strftime("%Y-%m-%d"), started.strftime("%H:%M:%S.%f")[:-3]
        # Each start whole, to the millisecond: on one line, or its time below its date.
        assert f"{day} {time_of_day}" in result.stdout or any(
            day in above and below.find(time_of_day) == above.rfind(day)
            for above, below in pairwise(lines)
        ), (day, time_of_day, result.stdout)


def test_history_json_is_for_scripts(url: str) -> None:
    identifiers = asyncio.run(_record(url, [("report", "pod-a"), ("heartbeat", "pod-b")]))
    result = run("--url", url, "history", "--json", "--limit", "5")
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["leases"] == []
    runs = document["runs"]
    assert [r["tick"] for r in runs] == identifiers[::-1]  # newest first
    assert [(r["job"], r["worker"], r["status"]) for r in runs] == [
        ("heartbeat", "pod-b", "FINISHED"),
        ("report", "pod-a", "FINISHED"),
    ]
    for r in runs:
        started = datetime.fromisoformat(r["started_at"])
        finished = datetime.fromisoformat(r["finished_at"])
        assert started.tzinfo is not None
        assert r["duration_s"] == pytest.approx((finished - started).total_seconds())
    only = json.loads(run("--url", url, "history", "--json", "--job", "report").stdout)
    assert [r["job"] for r in only["runs"]] == ["report"]
    empty = json.loads(run("--url", url, "history", "--json", "--job", "nope").stdout)
    assert empty == {"runs": [], "leases": []}


# -- item 9: --timeout ---------------------------------------------------------------------------


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A port that accepts connections and never answers: every call times out."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield sock.getsockname()[1]


@pytest.mark.parametrize("where", ["before", "after"])
def test_a_timeout_names_the_option_that_changes_it(silent_server: int, where: str) -> None:
    url = f"postgresql://bob@127.0.0.1:{silent_server}/db"
    args = ["--url", url, "history"]
    args = ["--timeout", "0.5s", *args] if where == "before" else [*args, "--timeout", "500ms"]
    started = time.monotonic()
    line = _error_line(run(*args))
    assert time.monotonic() - started < 4.5  # the default would wait 5 s
    assert line.startswith("aiocronlock: error: history() on postgresql+asyncpg://bob@")
    assert line.endswith(
        "check that the database is reachable, or allow more with --timeout (now 500ms)"
    )
    assert "locker's timeout" not in line


@pytest.mark.parametrize(
    ("value", "why"), [("0", "a duration must be positive"), ("soon", "is not a duration")]
)
def test_a_bad_timeout_is_a_usage_error(value: str, why: str) -> None:
    result = run("--timeout", value, "history")
    assert result.returncode == 2
    assert f"argument --timeout: '{value}'" in result.stderr
    assert why in result.stderr
    assert "Traceback" not in result.stderr


# -- item 10: prune's durations, release of an unknown job, demo on a server ----------------------


@pytest.mark.parametrize(
    ("ttl", "shown"),
    [("7d", "7d"), ("1w", "7d"), ("90m", "1h30m"), ("36h", "1d12h"), ("90", "1m30s")],
)
def test_prune_prints_durations_as_it_reads_them(url: str, ttl: str, shown: str) -> None:
    result = run("--url", url, "prune", "--ttl", ttl)
    assert result.returncode == 0, result.stderr
    assert f"older than {shown} from" in result.stdout
    assert "day" not in result.stdout
    assert ":00" not in result.stdout


def test_release_of_a_job_that_never_ran_fails(url: str) -> None:
    asyncio.run(_record(url, [("report", "pod-a")]))
    line = _error_line(run("--url", url, "release", "nope", "--yes"))
    assert "'nope'" in line
    assert "aiocronlock history" in line

    known = run("--url", url, "release", "report", "--yes")  # ran, but holds no lease
    assert known.returncode == 0, known.stderr
    assert "holds no live lease: nothing to release" in known.stdout


async def _table_exists(url: str, table: str) -> bool:
    async with AsyncDBLocker(url, table_name=table, clean_interval=None) as locker:
        try:
            await locker.history(limit=1)
        except Exception as error:
            assert "does not exist" in str(error)
            return False
        return True


@pytest.mark.slow
def test_demo_on_a_server_drops_the_table_it_created() -> None:
    url = server_url("postgresql").replace("+asyncpg", "")
    table = f"demo_{uuid.uuid4().hex[:12]}"
    args = ["demo", "--url", url, "--table", table, "--workers", "2", "--jobs", "1"]
    result = run(*args, "--duration", "2s", "--json", timeout=90)
    assert result.returncode == 0, (result.stdout, result.stderr)
    assert f"created table {table}" in result.stderr
    assert "dropped it" in result.stderr
    assert not asyncio.run(_table_exists(url, table))


@pytest.mark.slow
def test_demo_on_an_existing_table_says_its_runs_stay() -> None:
    url = server_url("postgresql").replace("+asyncpg", "")
    table = f"demo_{uuid.uuid4().hex[:12]}"
    assert run("--url", url, "--table", table, "init").returncode == 0
    try:
        args = ["demo", "--url", url, "--table", table, "--workers", "2", "--jobs", "1"]
        result = run(*args, "--duration", "2s", "--json", timeout=90)
        assert result.returncode == 0, (result.stdout, result.stderr)
        assert f"stay in table {table}" in result.stderr
        assert asyncio.run(_table_exists(url, table))
    finally:
        asyncio.run(_drop(url, table))


async def _tables_named(url: str, prefix: str) -> list[str]:
    """The tables whose name starts with ``prefix``: the lock table and its leases table."""
    engine = create_async_engine(url.replace("postgresql://", "postgresql+asyncpg://", 1))
    try:
        async with engine.connect() as conn:
            names = await conn.run_sync(lambda sync: inspect(sync).get_table_names())
    finally:
        await engine.dispose()
    return sorted(name for name in names if name.startswith(prefix))


async def _wait_for_a_run(url: str, table: str, demo: subprocess.Popen[str]) -> None:
    """Until the demo's workers have recorded a run: the race is under way."""
    locker = AsyncDBLocker(url, table_name=table, clean_interval=None)
    try:
        async with asyncio.timeout(60):
            while demo.poll() is None:
                with contextlib.suppress(TableMissingError):
                    if await locker.history(limit=1):
                        return
                await asyncio.sleep(0.1)
    finally:
        await locker.aclose()
    raise AssertionError(f"the demo ended early: {demo.communicate()}")


@pytest.mark.slow
def test_demo_interrupted_drops_the_tables_it_created() -> None:
    parsed = make_url(server_url("postgresql").replace("+asyncpg", ""))
    if parsed.password is None:  # the server trusts: any password shows the masking
        parsed = parsed.set(password="not-a-secret")
    url = parsed.render_as_string(hide_password=False)
    table = f"demo_{uuid.uuid4().hex[:12]}"
    args = ["demo", "--url", url, "--table", table, "--workers", "2", "--jobs", "1"]
    demo = subprocess.Popen(
        [str(SCRIPT), *args, "--duration", "60s"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
        process_group=0,  # Ctrl-C reaches the demo and its workers, as in a terminal
    )
    try:
        asyncio.run(_wait_for_a_run(url, table, demo))
        os.killpg(demo.pid, signal.SIGINT)
        stdout, stderr = demo.communicate(timeout=60)
        assert demo.returncode == 130, (stdout, stderr)
        assert "Traceback" not in stdout + stderr
        masked = parsed.render_as_string(hide_password=True)
        assert f"the demo created table {table} on {masked} and dropped it again" in stderr
        assert str(parsed.password) not in stdout + stderr
        assert asyncio.run(_tables_named(url, table)) == []
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.communicate()
        asyncio.run(_drop(url, table))


async def _drop(url: str, table: str) -> None:
    locker = AsyncDBLocker(url, table_name=table, clean_interval=None)
    try:
        async with locker.engine.begin() as conn:
            await conn.run_sync(locker.table.metadata.drop_all)
    finally:
        await locker.aclose()


def test_the_readme_history_sample_is_laid_out_as_the_command_prints(tmp_path: Path) -> None:
    """The README's sample shows what `aiocronlock history` prints in 80 columns on the
    default database: its title (which holds the day), the header and the rule."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    sample = readme.split("$ aiocronlock history --limit 4\n", 1)[1].split("\n\n", 1)[0]
    url = f"sqlite:///{tmp_path / 'aiocronlock.db'}"
    assert run("--url", url, "init").returncode == 0
    asyncio.run(_record(url, [("heartbeat", "pod-a")]))
    result = subprocess.run(  # in the folder of the default sqlite:///aiocronlock.db
        [str(SCRIPT), "history", "--limit", "4"],
        capture_output=True,
        text=True,
        env=_env(80),
        cwd=tmp_path,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr

    def layout(text: str) -> list[str]:
        title, header, rule = text.split("\nid ", 1)[0], *text.split("\nid ", 1)[1].splitlines()[:2]
        title = "\n".join(line.strip() for line in title.splitlines())
        return [re.sub(r"\d{4}-\d{2}-\d{2}", "DAY", title), " ".join(header.split()), rule[:1]]

    assert layout(sample) == layout(result.stdout), (sample, result.stdout)
