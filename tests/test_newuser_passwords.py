"""A password in a database URL never shows: wherever in the URL it is, on every backend.

SQLAlchemy hands a URL's query string to the driver as keyword arguments, so
``?password=`` is as much a password as ``user:password@``. Each form below is
checked in the locker's repr, the ``BackendError`` of a failing call, the log and
the command line's output.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import subprocess
import sys
import traceback
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

from aiocronlock import AsyncDBLocker, BackendError
from aiocronlock._engine import describe, mask_url
from conftest import server_url

#: In every password below; found in no other text.
MARK = "Hunter2"

#: (backend, form) -> a URL whose password contains MARK; {where} is host:port/db.
FORMS = {
    "user part": "bob:Hunter2@{where}",
    "user part, percent-encoded": "bob:Hunter2%40x%3Ay%2Fz@{where}",
    "?password=": "bob@{where}?password=Hunter2",
    "?password=, percent-encoded value": "bob@{where}?password=Hunter2%26x%3Dy%25",
    "?password=, percent-encoded name": "bob@{where}?pass%77ord=Hunter2",
    "?password= among others": "bob@{where}?connect_timeout=3&password=Hunter2",
    "?passwd=": "bob@{where}?passwd=Hunter2",
}
#: backend -> the URL's scheme, as a user writes it (the bare ones get a driver filled in).
SCHEMES = {
    "postgresql": "postgresql",
    "psycopg": "postgresql+psycopg",
    "mysql": "mysql",
    "mariadb": "mariadb+asyncmy",
    "sqlite": "sqlite",
}
CASES = [
    pytest.param(backend, form, id=f"{backend}-{form}")
    for backend in SCHEMES
    for form in FORMS
    # connect_timeout is a PostgreSQL setting; asyncmy takes no other parameter by that name.
    if not (backend in ("mysql", "mariadb") and form == "?password= among others")
]


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A local port bound by no listener: connecting to it is refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def _url(backend: str, form: str, port: int, tmp_path: Path) -> str:
    if backend == "sqlite":
        # A SQLite URL has no host: the password form goes where a user would write it.
        where = f"/{tmp_path / 'x.db'}"
        text = FORMS[form].format(where=where)
        user, _, rest = text.partition("@")
        return f"sqlite://{user}@{rest}" if ":" in user else f"sqlite://{rest}"
    return f"{SCHEMES[backend]}://" + FORMS[form].format(where=f"127.0.0.1:{port}/test")


def _env() -> dict[str, str]:
    """A plain environment (no $AIOCRONLOCK_URL), keeping $PYTHONPATH."""
    env = {"PATH": os.environ["PATH"], "COLUMNS": "200", "NO_COLOR": "1"}
    if "PYTHONPATH" in os.environ:
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    return env


def _texts(error: BaseException) -> list[str]:
    return [str(error), repr(error), "".join(traceback.format_exception(error))]


def _log_texts(records: list[logging.LogRecord]) -> list[str]:
    formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
    return [formatter.format(record) for record in records]


@pytest.mark.parametrize(("backend", "form"), CASES)
@pytest.mark.filterwarnings("ignore:Query string argument")  # SQLite ignores ?password=
async def test_no_password_in_repr_errors_or_logs(
    backend: str, form: str, closed_port: int, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    url = _url(backend, form, closed_port, tmp_path)
    assert MARK in url
    texts: list[str] = []
    try:
        locker = AsyncDBLocker(url, timeout=2, clean_interval=None)
    except ValueError as error:  # SQLite refuses a URL with a user part
        assert backend == "sqlite"
        assert "***" in str(error)
        texts += _texts(error)
    else:
        assert "***" in repr(locker)
        texts += [repr(locker), describe(locker.engine)]
        async with locker:  # the clock check fails on a closed port, and logs why
            with pytest.raises(BackendError) as info:
                await locker.lock("job")
        assert "***" in str(info.value)  # the URL is in the message, masked
        texts += _texts(info.value)
        if backend != "sqlite":
            assert any("***" in text for text in _log_texts(caplog.records))
    texts += _log_texts(caplog.records)
    assert [text for text in texts if MARK in text] == []


def _cli_history(url: str) -> subprocess.CompletedProcess[str]:
    """``aiocronlock --url URL history``, run as a user would."""
    return subprocess.run(
        [Path(sys.executable).with_name("aiocronlock"), "--url", url, "history"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=_env(),
    )


@pytest.mark.parametrize(("backend", "form"), CASES)
def test_no_password_in_the_command_line_output(
    backend: str, form: str, closed_port: int, tmp_path: Path
) -> None:
    url = _url(backend, form, closed_port, tmp_path)
    result = _cli_history(url)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    assert "***" in result.stderr  # it says where it tried
    assert MARK not in result.stdout + result.stderr


@pytest.fixture
async def mariadb_user() -> AsyncIterator[str]:
    """A MariaDB account with the password 'right', as ``user@host:port/db``.

    On MariaDB rather than PostgreSQL: the local PostgreSQL may trust every local
    connection, and then accepts a wrong password."""
    root = server_url("mysql")
    engine = create_async_engine(root)
    try:
        async with engine.connect() as conn:
            await conn.execute(text("DROP USER IF EXISTS 'a18pw'@'%'"))
            await conn.execute(text("CREATE USER 'a18pw'@'%' IDENTIFIED BY 'right'"))
            parsed = make_url(root)
            await conn.execute(text(f"GRANT SELECT ON `{parsed.database}`.* TO 'a18pw'@'%'"))
        yield f"a18pw@{parsed.host}:{parsed.port or 3306}/{parsed.database}"
    finally:
        async with engine.connect() as conn:
            await conn.execute(text("DROP USER IF EXISTS 'a18pw'@'%'"))
        await engine.dispose()


async def test_a_wrong_password_refused_by_a_real_server_is_not_shown(
    mariadb_user: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The server checks the ``?password=`` it is sent (the right one logs in), refuses
    the wrong one, and the wrong one shows nowhere: repr, error, log, command line."""
    async with AsyncDBLocker(
        f"mysql://{mariadb_user}?password=right", clean_interval=None
    ) as locker:
        assert locker.clock_offset is not None  # logged in, and asked the server the time

    caplog.set_level(logging.DEBUG)
    url = f"mysql://{mariadb_user}?password=wrong{MARK}"
    locker = AsyncDBLocker(url, timeout=5, clean_interval=None)
    async with locker:
        with pytest.raises(BackendError) as info:
            await locker.lock("job")
    # The server's refusal, for the password it was sent, with the URL masked.
    assert "Access denied for user 'a18pw'" in str(info.value)
    assert "using password: YES" in str(info.value)
    assert "password=***" in str(info.value)
    result = await asyncio.to_thread(_cli_history, url)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Access denied" in result.stderr

    texts = [repr(locker), *_texts(info.value), *_log_texts(caplog.records)]
    texts += [result.stdout, result.stderr]
    assert [text for text in texts if MARK in text] == []


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://app@db/app?password=Hunter2", "postgresql://app@db/app?password=***"),
        ("mysql://app@db/app?passwd=Hunter2&charset=x", "mysql://app@db/app?charset=x&passwd=***"),
        ("mysql://app:Hunter2%40@db/app", "mysql://app:***@db/app"),
        # Text SQLAlchemy cannot parse (the port), masked all the same.
        (
            "postgresql://bob:Hunter2@h:port/db?pass%77ord=Hunter2&sslpassword=Hunter2&a=b",
            "postgresql://bob:***@h:port/db?pass%77ord=***&sslpassword=***&a=b",
        ),
    ],
)
def test_mask_url(url: str, shown: str) -> None:
    assert mask_url(url) == shown
