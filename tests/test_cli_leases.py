"""The command line and the leases of exclusive jobs, as an operator uses it.

A holder process takes an exclusive job with a long lease and is killed: the lease
stays live with nobody behind it. ``history`` must show it, and ``release`` must free
it, but only when the operator confirms (``--yes`` where there is no terminal).
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from aiocronlock import AsyncDBLocker

HOLDER_SCRIPT = Path(__file__).with_name("_lease_holder.py")
TABLE = "cron_job_locks"
JOB = "nightly-export"
HOLDER = "worker-7"


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


async def cli(*args: str) -> Result:
    """``python -m aiocronlock ARGS``, with no terminal on stdin."""
    env = {k: v for k, v in os.environ.items() if k != "AIOCRONLOCK_URL"}
    env.update(COLUMNS="200", NO_COLOR="1")  # wide enough that rich folds no cell
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "aiocronlock",
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    async with asyncio.timeout(60):
        stdout, stderr = await process.communicate()
    assert process.returncode is not None
    return Result(process.returncode, stdout.decode(), stderr.decode())


def _table(output: str, title: str) -> list[dict[str, str]]:
    """The rows of the table titled ``title`` in ``output``, as {column: cell}.

    Columns are found from the header's positions, so cells may hold spaces, but
    not a folded line.
    """
    lines = iter(output.splitlines())
    for line in lines:
        if line.startswith(title):
            break
    else:
        raise AssertionError(f"no table {title!r} in:\n{output}")
    header = ""
    for line in lines:  # the header is the line above the rule under it
        if line.strip() and set(line.strip()) == {"─"}:
            break
        header = line
    else:
        raise AssertionError(f"table {title!r} has no header in:\n{output}")
    names = re.findall(r"\S+(?: \S+)*", header)
    starts = [header.index(name) for name in names]
    ends = [*starts[1:], None]
    rows: list[dict[str, str]] = []
    for line in lines:
        if not line.strip():
            break
        rows.append({n: line[a:b].strip() for n, a, b in zip(names, starts, ends, strict=True)})
    return rows


def _runs(output: str) -> list[dict[str, str]]:
    return _table(output, "recent runs in")


def _leases(output: str) -> list[dict[str, str]]:
    return _table(output, "leases of exclusive jobs")


@dataclass
class Stuck:
    url: str
    run_id: int


@pytest.fixture
async def stuck(tmp_path: Path) -> Stuck:
    """An exclusive job whose holder was killed with 60 s left on its lease."""
    url = f"sqlite:///{tmp_path / 'locks.db'}"
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(HOLDER_SCRIPT),
        url,
        TABLE,
        HOLDER,
        JOB,
        "60",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None
    try:
        async with asyncio.timeout(30):
            line = await process.stdout.readline()
    finally:
        process.kill()
        _, stderr = await process.communicate()
    if not line.startswith(b"held "):
        pytest.fail(f"the holder did not take the job: {line!r}\n{stderr.decode()}")
    return Stuck(url, int(line.split()[1]))


async def test_history_shows_the_live_lease_of_a_dead_holder(stuck: Stuck) -> None:
    result = await cli("--url", stuck.url, "history")

    assert result.returncode == 0, result.stderr
    (run,) = _runs(result.stdout)
    assert (run["id"], run["job"], run["worker"], run["status"]) == (
        str(stuck.run_id),
        JOB,
        HOLDER,
        "RUNNING",
    )
    (lease,) = _leases(result.stdout)
    assert (lease["job"], lease["held by"], lease["run"], lease["state"]) == (
        JOB,
        HOLDER,
        str(stuck.run_id),
        "live",
    )


async def test_release_without_a_terminal_needs_yes(stuck: Stuck) -> None:
    result = await cli("--url", stuck.url, "release", JOB)

    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("aiocronlock: error: ")
    assert "--yes" in line
    # Nothing was released.
    history = await cli("--url", stuck.url, "history")
    assert [run["status"] for run in _runs(history.stdout)] == ["RUNNING"]
    assert [lease["state"] for lease in _leases(history.stdout)] == ["live"]


async def test_release_with_yes_frees_the_job(stuck: Stuck) -> None:
    result = await cli("--url", stuck.url, "release", JOB, "--yes")

    assert result.returncode == 0, result.stderr
    assert "released" in result.stdout
    assert f"run {stuck.run_id} is marked LOST" in result.stdout
    history = await cli("--url", stuck.url, "history")
    assert history.returncode == 0, history.stderr
    (run,) = _runs(history.stdout)
    assert (run["id"], run["worker"], run["status"]) == (str(stuck.run_id), HOLDER, "LOST")
    (lease,) = _leases(history.stdout)
    assert (lease["run"], lease["state"]) == (str(stuck.run_id), "expired")

    # The next tick of the job runs at once, a minute before the dead holder's lease would end.
    async with AsyncDBLocker(stuck.url, worker="operator", clean_interval=None) as locker:
        run_time = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=1)
        lock = await locker.lock(JOB, run_time, exclusive=True)
        assert lock is not None
        await lock.unlock()

    again = await cli("--url", stuck.url, "release", JOB, "--yes")
    assert again.returncode == 0, again.stderr
    assert "nothing to release" in again.stdout
