"""Pruning (benchmark e): ``clean()`` on a big table, and ``lock()`` while it runs.

The table of its own holds ``expired`` rows older than the locker's ``ttl`` (a
million in the full run) and ``expired / 100`` live ones, bulk-loaded by the
database itself: ``generate_series`` on PostgreSQL, the sequence engine's
``seq_1_to_N`` on MariaDB (a doubling numbers table elsewhere), a recursive CTE on
SQLite. Rows go in oldest first, as a real table fills; then, before anything is
measured, the database is let settle as a backlog built over the ttl would have (see
``load``: VACUUM and CHECKPOINT on PostgreSQL, the table flushed and the redo
checkpoint caught up on MariaDB, a WAL checkpoint on SQLite). What it did is in the
report.

Measured: ``lock()`` latency on fresh ticks with the table idle, then the same
while ``clean()`` empties it on the same locker and event loop (as the background
cleaner would); the time ``clean()`` takes; and every DELETE statement's duration,
from SQLAlchemy's ``before_cursor_execute``/``after_cursor_execute`` events on the
locker's engine. On PostgreSQL and MariaDB a probe commits into a table of its own
every 20 ms meanwhile (``CommitProbe``), and each DELETE's time is also reported less
its longest overlap with one of those commits, which no lock of the DELETE's can hold
up. When the database is on this machine, a process of its own flushes 4 KiB to disk
every 20 ms (``DiskProbe``), and each DELETE is reported less its overlap with one of
those flushes too. The statement target counts the DELETE as measured.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection

from aiocronlock import AsyncDBLocker

from ._backends import Backend, run_one
from ._raw import RawClient, open_raw
from ._stats import Latency, Ratio, Section, ms, ratio, times

#: The issue's targets: lock() p99 during pruning at most this multiple of its idle p99,
P99_TARGET = 2.0
#: and no single pruning statement (a DELETE, or on SQLite a WAL checkpoint) longer
#: than this.
DELETE_TARGET_MS = 100.0
TTL = timedelta(days=1)

_COLUMNS = "job_name, job_identifier, worker, status, created_at, updated_at"


async def _load_postgresql(conn: AsyncConnection, table: str, expired: int, live: int) -> None:
    for prefix, count, status, age in (
        ("expired", expired, "FINISHED", "interval '2 days'"),
        ("live", live, "RUNNING", "interval '0 seconds'"),
    ):
        await conn.exec_driver_sql(
            f"INSERT INTO {table} ({_COLUMNS}) "
            f"SELECT '{prefix}-' || (g % 100), 'tick-' || g, 'bench-loader', '{status}', "
            f"now() - {age} - ({count} - g) * interval '1 millisecond', "
            f"now() - {age} - ({count} - g) * interval '1 millisecond' "
            f"FROM generate_series(1, {count}) AS g"
        )
    await conn.exec_driver_sql(f"ANALYZE {table}")


async def _mysql_numbers(conn: AsyncConnection, table: str, count: int) -> tuple[str, str]:
    """A row source of ``seq`` = 1..count: MariaDB's sequence engine, else a doubled table."""
    try:
        await conn.exec_driver_sql("SELECT seq FROM seq_1_to_1")
        return f"seq_1_to_{count}", ""
    except Exception:
        numbers = f"{table}_n"
        await conn.exec_driver_sql(f"CREATE TABLE {numbers} (seq INT PRIMARY KEY)")
        await conn.exec_driver_sql(f"INSERT INTO {numbers} VALUES (1)")
        size = 1
        while size < count:
            await conn.exec_driver_sql(
                f"INSERT INTO {numbers} SELECT seq + {size} FROM {numbers} "
                f"WHERE seq + {size} <= {count}"
            )
            size *= 2
        return numbers, numbers


async def _load_mysql(conn: AsyncConnection, table: str, expired: int, live: int) -> None:
    source, temporary = await _mysql_numbers(conn, table, max(expired, live))
    try:
        for prefix, count, status, age in (
            ("expired", expired, "FINISHED", "INTERVAL 2 DAY"),
            ("live", live, "RUNNING", "INTERVAL 0 SECOND"),
        ):
            stamp = f"UTC_TIMESTAMP(6) - {age} - INTERVAL ({count} - seq) * 1000 MICROSECOND"
            await conn.exec_driver_sql(
                f"INSERT INTO {table} ({_COLUMNS}) "
                f"SELECT CONCAT('{prefix}-', MOD(seq, 100)), CONCAT('tick-', seq), 'bench-loader', "
                f"'{status}', {stamp}, {stamp} FROM {source} WHERE seq <= {count}"
            )
    finally:
        if temporary:
            await conn.exec_driver_sql(f"DROP TABLE {temporary}")
    await conn.exec_driver_sql(f"ANALYZE TABLE {table}")


async def _load_sqlite(conn: AsyncConnection, table: str, expired: int, live: int) -> None:
    for prefix, count, status, age in (
        ("expired", expired, "FINISHED", "-2 days"),
        ("live", live, "RUNNING", "-0 days"),
    ):
        stamp = (
            f"strftime('%Y-%m-%d %H:%M:%f', 'now', '{age}', "
            f"'-' || (({count} - n) / 1000.0) || ' seconds')"
        )
        await conn.exec_driver_sql(
            f"WITH RECURSIVE g(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM g WHERE n < {count}) "
            f"INSERT INTO {table} ({_COLUMNS}) "
            f"SELECT '{prefix}-' || (n % 100), 'tick-' || n, 'bench-loader', '{status}', "
            f"{stamp}, {stamp} FROM g"
        )
    await conn.exec_driver_sql(f"ANALYZE {table}")


_LOADERS = {"postgresql": _load_postgresql, "mysql": _load_mysql, "sqlite": _load_sqlite}

#: How long to wait at most for MariaDB to write the loaded pages out,
_SETTLE_TIMEOUT_S = 120.0
#: and how long for its checkpoint age to fall lower than it has been; it is read
#: every ``_SETTLE_POLL_S``.
_SETTLE_STALLED_S = 10.0
_SETTLE_POLL_S = 0.5


async def _settle_postgresql(conn: AsyncConnection, table: str) -> str:
    """VACUUM (which autovacuum would run on a table this size, and would have long
    ago on a real one), then write every dirty page out."""
    await conn.exec_driver_sql(f"VACUUM {table}")
    try:
        await conn.exec_driver_sql("CHECKPOINT")
    except Exception as error:  # CHECKPOINT needs a superuser or pg_checkpoint
        return f"VACUUM; no CHECKPOINT ({type(error).__name__})"
    return "VACUUM; CHECKPOINT"


async def _mysql_variable(conn: AsyncConnection, sql: str) -> int | None:
    """The integer value of a ``SHOW ... LIKE`` row, or None where the server has none."""
    row: Any = (await conn.exec_driver_sql(sql)).first()
    return None if row is None else int(row[1])


async def _settle_mysql(
    conn: AsyncConnection,
    table: str,
    *,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> str:
    """Write the table's pages out, then wait for InnoDB's checkpoint to catch up
    (MariaDB 10.5+ reports its age; MySQL does not, and only the flush is done)."""
    try:
        await conn.exec_driver_sql(f"FLUSH TABLES {table} FOR EXPORT")
        await conn.exec_driver_sql("UNLOCK TABLES")
    except Exception as error:  # needs the RELOAD and LOCK TABLES privileges
        return f"no FLUSH TABLES ... FOR EXPORT ({type(error).__name__})"
    how = "FLUSH TABLES ... FOR EXPORT"
    age_sql = "SHOW GLOBAL STATUS LIKE 'Innodb_checkpoint_age'"
    size_sql = "SHOW GLOBAL VARIABLES LIKE 'innodb_log_file_size'"
    age, log_size = await _mysql_variable(conn, age_sql), await _mysql_variable(conn, size_sql)
    if age is None or log_size is None:
        return f"{how}; checkpoint age unknown"
    deadline = clock() + _SETTLE_TIMEOUT_S
    lowest, lowest_at = age, clock()
    while age > log_size // 20:
        now = clock()
        if now > deadline:
            waited = f"after {_SETTLE_TIMEOUT_S:g} s"
            return f"{how}; checkpoint age still {age / 2**20:.1f} MiB {waited}"
        if now - lowest_at > _SETTLE_STALLED_S:
            # An idle server may stop short of the mark: nothing left to flush soon.
            stalled = f"no lower for {_SETTLE_STALLED_S:g} s"
            return f"{how}; checkpoint age {age / 2**20:.1f} MiB, {stalled}"
        await sleep(_SETTLE_POLL_S)
        age = await _mysql_variable(conn, age_sql) or 0
        if age < lowest:
            lowest, lowest_at = age, clock()
    return f"{how}; checkpoint age {age / 2**20:.1f} MiB"


async def _settle_sqlite(conn: AsyncConnection, table: str) -> str:
    busy = (await conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")).first()
    return "wal_checkpoint(TRUNCATE)" + (" (busy)" if busy is not None and busy[0] else "")


_SETTLERS = {"postgresql": _settle_postgresql, "mysql": _settle_mysql, "sqlite": _settle_sqlite}


async def load(backend: Backend, table: str, expired: int, live: int) -> tuple[float, float, str]:
    """Bulk-load the table, then let the database write it out.

    A real backlog builds up over the ttl, and is on disk long before a prune starts;
    a million rows loaded seconds ago are still being written out, and a prune begun
    then would meet the database's own catch-up (on MariaDB with the default 96 MiB
    redo log, flushes that pause every statement). Returns the seconds the load took,
    the seconds settling took, and what settling did.
    """
    engine = backend.engine(isolation_level="AUTOCOMMIT")
    start = time.perf_counter()
    try:
        async with engine.connect() as conn:
            await _LOADERS[backend.name](conn, table, expired, live)
            loaded = time.perf_counter()
            how = await _SETTLERS[backend.name](conn, table)
    finally:
        await engine.dispose()
    return loaded - start, time.perf_counter() - loaded, how


#: A span of time, as ``(start, end)`` in ``time.perf_counter_ns()``.
Span = tuple[int, int]


class StatementTimer:
    """Durations of the DELETE statements an engine sends, and of the WAL checkpoints
    the cleaner runs after them on SQLite, from its cursor events."""

    def __init__(self, locker: AsyncDBLocker) -> None:
        self.delete_spans: list[Span] = []
        self.checkpoints_ns: list[int] = []
        self._engine = locker.engine.sync_engine
        event.listen(self._engine, "before_cursor_execute", self._before)
        event.listen(self._engine, "after_cursor_execute", self._after)

    def _before(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        conn.info["bench_started_ns"] = time.perf_counter_ns()

    def _after(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        started = conn.info.pop("bench_started_ns", None)
        if started is None:
            return
        if "DELETE FROM" in statement.upper():
            self.delete_spans.append((started, time.perf_counter_ns()))
        elif "WAL_CHECKPOINT" in statement.upper():
            self.checkpoints_ns.append(time.perf_counter_ns() - started)

    def close(self) -> None:
        event.remove(self._engine, "before_cursor_execute", self._before)
        event.remove(self._engine, "after_cursor_execute", self._after)


_PROBE_DDL = {
    "postgresql": "CREATE TABLE IF NOT EXISTS {} (id BIGSERIAL PRIMARY KEY, x INT)",
    "mysql": "CREATE TABLE IF NOT EXISTS {} (id BIGINT AUTO_INCREMENT PRIMARY KEY, x INT)",
}
_PROBE_INSERT = {
    "postgresql": "INSERT INTO {} (x) VALUES ($1) RETURNING id",
    "mysql": "INSERT INTO {} (x) VALUES (%s)",
}


def probe_table(table: str) -> str:
    """The table of the commit probe of the pruning table ``table``."""
    return f"{table}_probe"


async def drop_probe_table(backend: Backend, table: str) -> None:
    """Drop the probe's table of the pruning table ``table``, if a run left it.

    Most often the probe has dropped it already: MariaDB then answers with a note
    ("Unknown table"), which asyncmy would log as a warning; it is not logged.
    """
    if backend.name not in _PROBE_DDL:
        return
    driver_logger = logging.getLogger("asyncmy")
    level = driver_logger.level
    if backend.name == "mysql":
        driver_logger.setLevel(logging.ERROR)
    try:
        await run_one(backend, f"DROP TABLE IF EXISTS {probe_table(table)}")
    finally:
        driver_logger.setLevel(level)


@contextlib.contextmanager
def _raised_or_noted(exc: BaseException | None, what: str) -> Iterator[None]:
    """For a probe's ``__aexit__``: an error of ``what`` in the block is raised, unless
    ``exc`` already ends the probe's block; then it is added to ``exc`` as a note."""
    try:
        yield
    except Exception as error:
        if exc is None:
            raise
        exc.add_note(f"{what} failed too: {error!r}")


class CommitProbe:
    """A one-row commit every ``INTERVAL_S`` into a table of its own, through the raw
    driver, while ``lock()`` is measured, in both phases so that both carry its load.

    No lock a DELETE takes can hold it up. When one of its commits stalls while a
    DELETE runs, something beyond the DELETE's locks held up commits: the disk, the
    log every commit must flush (which the prune's writes load too), or this process,
    which the probe shares with the DELETEs and ``lock()``; ``DiskProbe``, which
    shares only the machine, tells the disk apart. The report shows each DELETE's
    time less its overlap with one probe commit (see ``less_overlap``) beside the
    time itself. Not on SQLite, where every write takes the one database-wide lock,
    the DELETE's included.
    """

    #: Seconds between two commits: a stall shows in the probe at most this late.
    INTERVAL_S = 0.02
    #: The longest the probe's last commit, closing its connection, or creating or
    #: dropping its table may take.
    STOP_TIMEOUT_S = 30.0

    def __init__(self, backend: Backend, table: str) -> None:
        self.spans: list[Span] = []
        self.table = probe_table(table)
        self._backend = backend
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._cleanup = contextlib.AsyncExitStack()

    @staticmethod
    def applies(backend: Backend) -> bool:
        return backend.name in _PROBE_DDL

    async def __aenter__(self) -> Self:
        async with contextlib.AsyncExitStack() as stack:
            await self._run_sql(_PROBE_DDL[self._backend.name].format(self.table))
            stack.push_async_callback(self._run_sql, f"DROP TABLE IF EXISTS {self.table}")
            raw = await open_raw(self._backend)
            self._task = asyncio.create_task(self._commits(raw))
            self._cleanup = stack.pop_all()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop committing and drop the table. An error of the probe's is raised here,
        or added as a note to the error that ended the block."""
        self._stop.set()
        async with self._cleanup:
            if self._task is None:
                return
            with _raised_or_noted(exc, "the commit probe"):
                async with asyncio.timeout(self.STOP_TIMEOUT_S):
                    await self._task

    async def _run_sql(self, sql: str) -> None:
        async with asyncio.timeout(self.STOP_TIMEOUT_S):
            await run_one(self._backend, sql)

    async def _commits(self, raw: RawClient) -> None:
        sql = _PROBE_INSERT[self._backend.name].format(self.table)
        try:
            while not self._stop.is_set():
                started = time.perf_counter_ns()
                await raw.insert_returning_id(sql, [1])
                self.spans.append((started, time.perf_counter_ns()))
                await asyncio.sleep(self.INTERVAL_S)
        finally:
            async with asyncio.timeout(self.STOP_TIMEOUT_S):
                await raw.aclose()

    def during(self, first: int, last: int) -> list[int]:
        """Durations of the probe's commits that began in ``[first, last]``."""
        return started_within(self.spans, first, last)


class DiskProbe:
    """A 4 KiB write and ``fsync`` every ``INTERVAL_S`` into a file of its own, in a
    process of its own (``_disk_probe.py``), from entering the block to leaving it.

    It shares nothing with the database but the machine: a flush of its that stalls
    while a DELETE runs shows flushes on this machine held up (by the disk, or by
    the machine itself), whatever the database and this process were doing. It runs
    only when the database is on this machine (see ``disk_probe_directory``), and
    only tells about the disk its directory is on.
    """

    INTERVAL_S = 0.02
    #: The longest the probe may take to stop and report once asked.
    STOP_TIMEOUT_S = 30.0
    SCRIPT = Path(__file__).with_name("_disk_probe.py")

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.spans: list[Span] = []
        self._process: asyncio.subprocess.Process | None = None

    async def __aenter__(self) -> Self:
        self._process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-I",  # isolated: nothing from the project or the environment
            str(self.SCRIPT),
            self.directory,
            str(self.INTERVAL_S),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Close the probe's stdin, which stops it, and read its flushes. An error of
        the probe's is raised here, or added as a note to the error that ended the block."""
        process = self._process
        assert process is not None and process.stdin is not None
        with _raised_or_noted(exc, "the disk probe"):
            process.stdin.close()
            try:
                async with asyncio.timeout(self.STOP_TIMEOUT_S):
                    out, err = await process.communicate()
            except BaseException as error:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
                if isinstance(error, TimeoutError):
                    raise RuntimeError(
                        f"the disk probe did not stop within {self.STOP_TIMEOUT_S:g} s"
                    ) from error
                raise
            if process.returncode != 0:
                raise RuntimeError(
                    f"the disk probe in {self.directory} exited with {process.returncode}: "
                    f"{err.decode(errors='replace').strip()}"
                )
            self.spans = [(start, end) for start, end in json.loads(out)]

    def during(self, first: int, last: int) -> list[int]:
        """Durations of the probe's flushes that began in ``[first, last]``."""
        return started_within(self.spans, first, last)


def disk_probe_directory(backend: Backend, override: str | None = None) -> str | None:
    """Where the disk probe writes: ``override`` if given, else the SQLite file's
    folder, or, when the server's host is this machine, this folder of the project
    (the system's temporary folder is often a RAM disk, where a flush waits for
    nothing); None (no probe) for a server elsewhere, whose disk no local flush can
    tell about. ``disk_probe_device`` says whether it shares the data's device."""
    if override is not None:
        return override
    if backend.name == "sqlite":
        return os.path.dirname(os.path.abspath(backend.sqlite_path))
    if make_url(backend.url).host in {"127.0.0.1", "localhost", "::1"}:
        return str(Path(__file__).resolve().parent)
    return None


_DATA_DIRECTORY_SQL = {
    "postgresql": "SELECT current_setting('data_directory')",  # superusers and monitors
    "mysql": "SELECT @@datadir",
}


async def disk_probe_device(backend: Backend, directory: str) -> str:
    """Whether ``directory`` is on the device of the database's data, as far as this
    machine can tell: the report's words for it."""
    if backend.name == "sqlite":
        return "in the database file's folder"
    try:
        data = await run_one(backend, _DATA_DIRECTORY_SQL[backend.name])
        same = os.stat(str(data)).st_dev == os.stat(directory).st_dev
    except Exception as error:  # no privilege, or a data directory not on this machine
        return f"on a device not compared with the data's ({type(error).__name__})"
    return "on the data's device" if same else "on another device than the data's"


def started_within(spans: Sequence[Span], first: int, last: int) -> list[int]:
    """Durations of the spans that began in ``[first, last]``."""
    return [end - start for start, end in spans if first <= start <= last]


def overlaps(statements: Sequence[Span], probes: Sequence[Span]) -> list[int]:
    """For each statement, its longest overlap with one probe commit.

    ``probes`` come in order of start and do not overlap one another, as one
    connection sends them one after the other.
    """
    starts = [start for start, _ in probes]
    longest = []
    for start, end in statements:
        overlap = 0
        # The probe commit in flight when the statement began, and every later one
        # that began before it ended.
        i = max(0, bisect.bisect_right(starts, start) - 1)
        while i < len(probes) and probes[i][0] < end:
            overlap = max(overlap, min(end, probes[i][1]) - max(start, probes[i][0]))
            i += 1
        longest.append(overlap)
    return longest


def less_overlap(statements: Sequence[Span], overlap: Sequence[int]) -> list[int]:
    """Each statement's duration less its overlap (from ``overlaps``)."""
    return [end - start - o for (start, end), o in zip(statements, overlap, strict=True)]


@dataclass(frozen=True, slots=True)
class _Probed:
    """What one probe showed: its durations while clean() ran, and each DELETE's
    overlap with its longest span, and durations less those overlaps."""

    name: str
    key: str
    what: str
    during: Latency
    less: Latency
    overlap: list[int]


def _latency_row(what: str, latency: Latency, ratio_text: str = "-") -> list[str]:
    """A row of the report's table: how many, p50, p99 and max."""
    return [what, str(latency.n), ms(latency.p50), ms(latency.p99), ms(latency.max), ratio_text]


async def _probe(locker: AsyncDBLocker, prefix: str, run_time: datetime, out: list[int]) -> None:
    job = f"{prefix}-{len(out)}"
    start = time.perf_counter_ns()
    lock = await locker.lock(job, run_time)
    out.append(time.perf_counter_ns() - start)
    if lock is None:
        raise RuntimeError(f"probe {job!r} lost a fresh tick")


async def run(
    backend: Backend,
    *,
    expired: int,
    probes: int,
    batch_size: int | None = None,
    disk_probe_dir: str | None = None,
) -> Section:
    """``batch_size`` overrides the locker's ``clean_batch_size`` (default: the
    library's); ``disk_probe_dir``, the disk probe's folder (see ``disk_probe_directory``)."""
    table = f"{backend.table}_prune"
    live = max(1, expired // 100)
    options: dict[str, Any] = {} if batch_size is None else {"clean_batch_size": batch_size}
    locker = backend.locker(table=table, ttl=TTL, **options)
    timer: StatementTimer | None = None
    commits: CommitProbe | None = None
    disk: DiskProbe | None = None
    disk_dir = disk_probe_directory(backend, disk_probe_dir)
    disk_device: str | None = None
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(locker.aclose)
        await locker.create_table()
        load_s, settle_s, settled_by = await load(backend, table, expired, live)
        if CommitProbe.applies(backend):
            commits = await stack.enter_async_context(CommitProbe(backend, table))
        if disk_dir is not None:
            disk_device = await disk_probe_device(backend, disk_dir)
            disk = await stack.enter_async_context(DiskProbe(disk_dir))
        run_time = datetime.now(UTC)
        warm: list[int] = []
        for _ in range(min(50, probes)):
            await _probe(locker, "warm", run_time, warm)

        idle: list[int] = []
        for _ in range(probes):
            await _probe(locker, "idle", run_time, idle)

        timer = StatementTimer(locker)
        stack.callback(timer.close)
        busy: list[int] = []

        async def timed_clean() -> tuple[int, float]:
            start = time.perf_counter()
            deleted = await locker.clean()
            return deleted, time.perf_counter() - start

        cleaning = asyncio.create_task(timed_clean())
        clean_started = time.perf_counter_ns()
        while not cleaning.done():
            await _probe(locker, "busy", run_time, busy)
        deleted, clean_s = await cleaning
        clean_ended = time.perf_counter_ns()
        if deleted != expired:
            raise RuntimeError(f"clean() deleted {deleted} rows, expected the {expired} expired")

    idle_lat, busy_lat = Latency.of_ns(idle), Latency.of_ns(busy)
    durations = [end - start for start, end in timer.delete_spans]
    deletes = Latency.of_ns(durations)
    checkpoints = Latency.of_ns(timer.checkpoints_ns) if timer.checkpoints_ns else None
    longest = max(deletes.max, checkpoints.max if checkpoints else 0.0)
    # Each probe that ran: its durations during clean(), each DELETE less its overlap.
    probed: list[_Probed] = []
    for name, key, what, probe in (
        ("probe commit", "probe_commit", "probe commit, another table, during clean()", commits),
        ("disk flush", "disk_flush", f"disk flush, another process, {disk_device}", disk),
    ):
        if probe is not None:
            overlap = overlaps(timer.delete_spans, probe.spans)
            probed.append(
                _Probed(
                    name,
                    key,
                    what,
                    Latency.of_ns(probe.during(clean_started, clean_ended)),
                    Latency.of_ns(less_overlap(timer.delete_spans, overlap)),
                    overlap,
                )
            )
    # The slowest DELETEs, each with every probe's overlap, for the report.
    slowest = [
        {
            "delete_ms": durations[i] / 1e6,
            **{f"{p.key}_overlap_ms": p.overlap[i] / 1e6 for p in probed},
        }
        for i in sorted(range(len(durations)), key=durations.__getitem__, reverse=True)[:5]
    ]
    p99_ratio = ratio(busy_lat.p99, idle_lat.p99)
    return Section(
        benchmark="prune",
        backend=backend.name,
        title=(
            f"clean() of {expired:,} expired rows ({live:,} live), batches of at most "
            f"{locker.clean_batch_size} (mean {expired / max(1, deletes.n):.0f}); "
            "lock() latency idle vs during clean()"
        ),
        columns=["what", "n", "p50 ms", "p99 ms", "max ms", "ratio"],
        rows=[
            _latency_row("lock() idle", idle_lat, "1.00x"),
            _latency_row("lock() during clean()", busy_lat, times(p99_ratio)),
            _latency_row("DELETE statement", deletes),
            *(
                row
                for p in probed
                for row in (
                    _latency_row(f"DELETE less an overlapping {p.name}", p.less),
                    _latency_row(p.what, p.during),
                )
            ),
            *([] if checkpoints is None else [_latency_row("checkpoint statement", checkpoints)]),
            ["clean() total", "1", "-", "-", ms(clean_s * 1000), "-"],
            ["bulk load", "1", "-", "-", ms(load_s * 1000), "-"],
            [f"settle after load: {settled_by}", "1", "-", "-", ms(settle_s * 1000), "-"],
        ],
        ratios=[
            Ratio("prune", backend.name, "lock() p99 during/idle", p99_ratio, P99_TARGET),
            Ratio(
                "prune",
                backend.name,
                "longest statement",
                longest,
                DELETE_TARGET_MS,
                unit=" ms",
            ),
            *(
                Ratio(
                    "prune",
                    backend.name,
                    f"longest DELETE less an overlapping {p.name}",
                    p.less.max,
                    unit=" ms",
                )
                for p in probed
            ),
        ],
        figures={
            "expired_rows": expired,
            "live_rows": live,
            "batch_size": locker.clean_batch_size,
            "load_s": load_s,
            "settle_s": settle_s,
            "settled_by": settled_by,
            "clean_s": clean_s,
            "lock_idle": idle_lat.as_dict(),
            "lock_during_clean": busy_lat.as_dict(),
            "delete_statements": deletes.as_dict(),
            **{  # a probe that did not run: None
                key: None
                for name in ("probe_commit", "disk_flush")
                for key in (f"delete_less_{name}_overlap", f"{name}_during_clean")
            },
            **{
                key: value
                for p in probed
                for key, value in (
                    (f"delete_less_{p.key}_overlap", p.less.as_dict()),
                    (f"{p.key}_during_clean", p.during.as_dict()),
                )
            },
            "disk_probe_dir": disk_dir,
            "disk_probe_device": disk_device,
            "slowest_deletes": slowest,
            "checkpoint_statements": checkpoints.as_dict() if checkpoints else None,
        },
    )
