"""Security: no SQL built from strings, hostile job names stored verbatim, no leaked passwords."""

from __future__ import annotations

import ast
import asyncio
import logging
import re
import socket
import traceback
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import inspect
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

import aiocronlock
from _proxy import Proxy
from aiocronlock import AsyncDBLocker, BackendError
from conftest import (
    MYSQL_URL,
    POSTGRES_URL,
    Backend,
    LockerFactory,
    fetch_rows,
    server_url,
    watch_log,
)

SOURCE_DIR = Path(aiocronlock.__file__).parent

# -- (1) no SQL built by string formatting ---------------------------------------------------------

#: SQL statements, not the English words: "SELECT x", "INSERT INTO", "DELETE FROM"...
_SQL = re.compile(
    r"\b(SELECT\b.*\bFROM\b|SELECT\s+(\d|\*|\w+\()|INSERT\s+INTO|UPDATE\s+\S+\s+SET\b|DELETE\s+FROM|"
    r"CREATE\s+(UNIQUE\s+)?(TABLE|INDEX|VIEW)|DROP\s+(TABLE|INDEX|VIEW)|ALTER\s+TABLE|"
    r"TRUNCATE\s|PRAGMA\s)",
    re.IGNORECASE,
)
#: Calls whose first argument is SQL text, sent as is.
_RAW_SQL_CALLS = {"text", "exec_driver_sql", "literal_column", "DDL", "executescript"}
#: Calls that take either SQL text or a statement object.
_EXECUTE_CALLS = {"execute", "executemany"}


def _call_name(node: ast.Call) -> str | None:
    if isinstance(node.func, ast.Name):
        return node.func.id
    if isinstance(node.func, ast.Attribute):
        return node.func.attr
    return None


def _formatting_text(node: ast.AST) -> str | None:
    """The constant text of a string built at run time (f-string, %, .format, +), else None."""
    if isinstance(node, ast.JoinedStr):
        return "{}".join(
            part.value
            for part in node.values
            if isinstance(part, ast.Constant) and isinstance(part.value, str)
        )
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mod | ast.Add):
        parts = [
            side.value
            for side in (node.left, node.right)
            if isinstance(side, ast.Constant) and isinstance(side.value, str)
        ]
        if parts:
            return " ".join(parts)
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "format"
        and isinstance(node.func.value, ast.Constant)
        and isinstance(node.func.value.value, str)
    ):
        return node.func.value.value
    return None


def audit_sql(source: str, filename: str = "<source>") -> tuple[list[str], set[str]]:
    """Find SQL built from strings in ``source``; also return the constant raw SQL it sends."""
    findings: list[str] = []
    raw_sql: set[str] = set()
    for node in ast.walk(ast.parse(source, filename)):
        where = f"{filename}:{getattr(node, 'lineno', '?')}"
        text = _formatting_text(node)
        if text is not None and _SQL.search(text):
            findings.append(f"{where}: SQL built by string formatting: {ast.unparse(node)}")
        if not isinstance(node, ast.Call) or not node.args:
            continue
        name, first = _call_name(node), node.args[0]
        constant = first.value if isinstance(first, ast.Constant) else None
        if name in _RAW_SQL_CALLS:
            if isinstance(constant, str):
                raw_sql.add(constant)
            else:
                findings.append(f"{where}: {name}() of non-constant SQL: {ast.unparse(node)}")
        elif name in _EXECUTE_CALLS:
            if isinstance(constant, str):
                raw_sql.add(constant)
            elif _formatting_text(first) is not None:
                findings.append(f"{where}: {name}() of a formatted string: {ast.unparse(node)}")
    return findings, raw_sql


def _library_sources() -> Iterator[Path]:
    yield from sorted(SOURCE_DIR.glob("*.py"))


def test_the_audit_catches_sql_built_from_strings() -> None:
    """The audit below can fail: each of these is found, none of the harmless ones is."""
    bad = [
        'conn.execute(text(f"SELECT * FROM {table}"))',
        'cursor.execute("DELETE FROM locks WHERE id = %s" % row_id)',
        'query = "INSERT INTO {} (job_name) VALUES (1)".format(table)',
        'conn.exec_driver_sql("DROP TABLE " + name)',
        "conn.execute(text(query))",
        'statement = f"update {table} set status = :s"',
        "literal_column(expression)",
        'cursor.execute(f"PRAGMA {pragma}")',
        'query = f"SELECT now()"',
        'query = "select id from %s" % table',
    ]
    for snippet in bad:
        findings, _ = audit_sql(snippet)
        assert findings, snippet
    harmless = [
        'cursor.execute("PRAGMA journal_mode=WAL")',
        'bindparam(f"job_name_{i}")',
        'raise ValueError(f"table {table!r} does not exist: call create_table()")',
        'logger.info("pruned %d rows older than %s", total, ttl)',
        'message = f"select a job name, not {value!r}"',
        'hint = f"update {what} settings, or drop {it} from the list"',
        "conn.execute(self._sql.acquire, params)",
    ]
    for snippet in harmless:
        findings, _ = audit_sql(snippet)
        assert findings == [], snippet


def test_no_sql_is_built_by_string_formatting() -> None:
    sources = list(_library_sources())
    assert len(sources) >= 10, sources
    findings: list[str] = []
    raw_sql: set[str] = set()
    for path in sources:
        found, raw = audit_sql(path.read_text(encoding="utf-8"), path.name)
        findings += found
        raw_sql |= raw
    assert findings == []
    # The SQL text not built by SQLAlchemy is all constant, such as the PRAGMA that
    # switches SQLite to WAL; none of it chains a second statement.
    assert "PRAGMA journal_mode=WAL" in raw_sql
    assert [sql for sql in raw_sql if ";" in sql] == []


# -- (2) hostile job names -------------------------------------------------------------------------


def _hostile_names(table: str) -> list[str]:
    return [
        "'; DROP TABLE cron_job_locks; --",
        f"'; DROP TABLE {table}; --",
        '" OR 1=1 --',
        "') OR ('1'='1",
        f"x'); DELETE FROM {table}; --",
        "ジョブ名 🚀 Ωμέγα",
        "e\u0301 and \u00e9",  # the same letter, decomposed and composed
        "\u202eright-to-left\u202c and zero\u200bwidth",
        "back\\slash \\' \\\\ \\x00 end\\",
        "%s",
        "%(job_name)s %% %",
        ":param",
        ":job_name_0",
        "?",
        "$1",
        "{job_name}",
        "  padded and\ttabbed\nand newlined  ",
        "🚀" * 255,  # the longest name, in four-byte characters
    ]


HOSTILE_WORKER = "w'; DROP TABLE cron_job_locks; -- \\ %s :worker"


async def test_hostile_job_names_are_stored_and_read_back_verbatim(
    backend: Backend, engine: AsyncEngine, make_locker: LockerFactory
) -> None:
    names = _hostile_names(backend.table_name)
    assert len(set(names)) == len(names)
    locker = await make_locker(worker=HOSTILE_WORKER)
    other = await make_locker(worker="other")
    tick = datetime.now(UTC).replace(microsecond=0)

    for name in names:
        lock = await locker.lock(name, tick)
        assert lock is not None, name
        async with lock:
            pass
        assert await other.lock(name, tick) is None, name
    # The multi-row insert of lock_many(), with its numbered parameters, too.
    won = await locker.lock_many(names, tick + timedelta(seconds=1))
    assert set(won) == set(names)

    runs = await locker.history(limit=100)
    assert sorted(run.job_name for run in runs) == sorted(names * 2)
    assert {run.worker for run in runs} == {HOSTILE_WORKER}
    for name in names:
        # The name as a bound value in a WHERE clause matches itself and nothing else.
        assert [run.job_name for run in await locker.history(name)] == [name, name]

    rows = await fetch_rows(engine, backend.table_name)
    assert sorted(r["job_name"] for r in rows) == sorted(names * 2)
    async with engine.connect() as conn:
        assert await conn.run_sync(lambda sync: inspect(sync).has_table(backend.table_name))


# -- (3) no password in logs, exceptions or reprs --------------------------------------------------

PASSWORD = "s3cret-Hunter2"


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A local port bound by no listener: connecting to it is refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def _with_password(url: str, *, port: int | None = None) -> str:
    """``url`` with the password set (and the port changed, to go through a proxy)."""
    parsed = make_url(url).set(password=PASSWORD)
    if port is not None:
        parsed = parsed.set(host="127.0.0.1", port=port)
    return parsed.render_as_string(hide_password=False)


def _exception_texts(error: BaseException) -> tuple[list[str], list[str]]:
    """(the library's texts, the drivers' texts) of an exception and its chain."""
    library = [str(error), repr(error), "".join(traceback.format_exception(error))]
    drivers: list[str] = []
    seen: set[int] = set()
    cause = error.__cause__ or error.__context__
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        target = library if type(cause).__module__.startswith("aiocronlock") else drivers
        target += [str(cause), repr(cause)]
        cause = cause.__cause__ or cause.__context__
    return library, drivers


def _log_texts(records: list[logging.LogRecord]) -> list[str]:
    formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
    texts = []
    for record in records:
        texts.append(formatter.format(record))  # the message and any formatted exc_info
        texts.append(repr(record.args))
    return texts


URLS_WITH_PASSWORD: dict[str, Callable[[int], str]] = {
    "postgresql-unreachable": lambda port: (
        f"postgresql+asyncpg://postgres:{PASSWORD}@127.0.0.1:{port}/test"
    ),
    "mysql-unreachable": lambda port: f"mysql+asyncmy://root:{PASSWORD}@127.0.0.1:{port}/test",
    "mysql-wrong-password": lambda port: _with_password(server_url("mysql")),
}


@pytest.mark.parametrize("which", sorted(URLS_WITH_PASSWORD))
async def test_password_never_appears_when_the_database_refuses(
    which: str, closed_port: int, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    url = URLS_WITH_PASSWORD[which](closed_port)
    assert PASSWORD in url
    locker = AsyncDBLocker(url, timeout=2, clean_interval=0.1)
    errors: list[BackendError] = []
    with watch_log("aiocronlock.cleaner") as cleaner_log:
        async with locker:
            for call in (
                lambda: locker.lock("job"),
                lambda: locker.lock_many(["a", "b"]),
                locker.create_table,
                locker.clean,
                locker.history,
            ):
                with pytest.raises(BackendError) as info:
                    await call()
                errors.append(info.value)
            async with asyncio.timeout(5):
                await cleaner_log.wait_for(1)  # the background cleaner failed and said so

    library = [repr(locker), str(locker.engine.url), repr(locker.engine)]
    drivers: list[str] = []
    for error in errors:
        assert error.__cause__ is not None
        ours, theirs = _exception_texts(error)
        library += ours
        drivers += theirs
    logs = _log_texts(caplog.records)
    assert any(r.name == "aiocronlock.cleaner" for r in caplog.records)

    assert [t for t in library if PASSWORD in t] == []
    assert [t for t in logs if PASSWORD in t] == []
    assert [t for t in drivers if PASSWORD in t] == [], "a driver's own exception text"
    assert "***" in repr(locker)


@pytest.fixture
async def postgres_proxy() -> AsyncIterator[Proxy]:
    async with Proxy.to(server_url("postgresql")) as proxy:
        yield proxy


async def test_password_never_appears_in_a_working_lockers_logs(
    postgres_proxy: Proxy, caplog: pytest.LogCaptureFixture
) -> None:
    """PostgreSQL trusts local connections, so the password is accepted and then carried
    through a working lock, a failed unlock (logged with its traceback) and a scheduler
    skipping ticks during an outage."""
    caplog.set_level(logging.DEBUG)
    url = _with_password(POSTGRES_URL, port=postgres_proxy.port)
    table = "t_security_" + datetime.now(UTC).strftime("%H%M%S%f")
    locker = AsyncDBLocker(
        url,
        table_name=table,
        clean_interval=None,
        timeout=2,
        identifier=aiocronlock.precision(timedelta(seconds=0.1)),
    )
    scheduler = aiocronlock.Scheduler(locker)
    skipped = asyncio.Event()

    @scheduler.every(0.1, name="tick")
    async def tick() -> None:
        pass

    try:
        await locker.create_table()
        lock = await locker.lock("job")
        assert lock is not None
        postgres_proxy.refuse(True)
        postgres_proxy.cut()
        with pytest.raises(RuntimeError, match="the job failed"):
            async with lock:
                raise RuntimeError("the job failed")
        assert not lock.released  # FAILED could not be recorded: logged with exc_info

        with watch_log("aiocronlock.scheduler") as scheduler_log:
            async with scheduler:
                async with asyncio.timeout(5):
                    await scheduler_log.wait_for(1)
                skipped.set()
        postgres_proxy.refuse(False)
    finally:
        postgres_proxy.refuse(False)
        async with locker.engine.begin() as conn:
            await conn.run_sync(locker.table.metadata.drop_all)  # with its leases table
        leaked = locker.engine.pool.checkedout()  # type: ignore[attr-defined]
        await locker.aclose()
    assert leaked == 0
    assert skipped.is_set()

    logged_tracebacks = [r for r in caplog.records if r.exc_info and r.name == "aiocronlock"]
    assert logged_tracebacks, "the failed unlock should be logged with its traceback"
    texts = [*_log_texts(caplog.records), repr(locker), repr(lock), repr(locker.engine)]
    assert [t for t in texts if PASSWORD in t] == []


def test_the_password_checks_look_at_the_right_urls() -> None:
    for url in (POSTGRES_URL, MYSQL_URL):
        assert PASSWORD in _with_password(url)
        assert make_url(_with_password(url)).password == PASSWORD
