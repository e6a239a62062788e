"""Database URLs: parsing one, and showing one with every password hidden."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING
from urllib.parse import quote_plus, unquote_plus

if TYPE_CHECKING:
    from sqlalchemy.engine import URL
    from sqlalchemy.ext.asyncio import AsyncEngine

#: The asyncio driver used when a URL names only the database.
_DEFAULT_DRIVERS = {
    "postgresql": "asyncpg",
    "postgres": "asyncpg",
    "mysql": "asyncmy",
    "mariadb": "asyncmy",
    "sqlite": "aiosqlite",
}
_HIDDEN = "***"
#: A query parameter of a URL that does not parse: its name and its value.
_QUERY_PARAMETER = re.compile(r"(?P<sep>[?&;])(?P<key>[^=&;#]*)=(?P<value>[^&;#]*)")


def parse_url(url: str | URL) -> URL:
    """Parse a database URL, filling in the asyncio driver when none is named.

    ``postgresql://`` becomes ``postgresql+asyncpg://``, ``mysql://`` and
    ``mariadb://`` become ``+asyncmy``, ``sqlite://`` becomes ``+aiosqlite``.
    """
    from sqlalchemy import exc
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
    except (exc.ArgumentError, ValueError) as error:
        raise ValueError(
            f"engine: {mask_url(url)!r} is not a database URL; expected e.g. "
            "'postgresql+asyncpg://user@host/db' or 'sqlite+aiosqlite:///locks.db'"
        ) from error
    backend = parsed.get_backend_name()
    if "+" not in parsed.drivername and backend in _DEFAULT_DRIVERS:
        name = "postgresql" if backend == "postgres" else backend
        parsed = parsed.set(drivername=f"{name}+{_DEFAULT_DRIVERS[backend]}")
    return parsed


def is_secret(key: str) -> bool:
    """Whether a URL's query parameter holds a password. SQLAlchemy hands the query
    to the driver as keyword arguments, so ``?password=`` (asyncpg, asyncmy) and
    ``?passwd=`` (MySQL drivers) are passwords as much as the one in the user part."""
    key = key.lower()
    return "passw" in key or key in ("pwd", "pass")


def mask_url(url: str | URL) -> str:
    """A URL as text with every password, in the user part or the query string,
    replaced by ``***``, even when it does not parse."""
    from sqlalchemy.engine import make_url

    if isinstance(url, str):
        try:
            parsed = make_url(url)
        except Exception:
            return _mask_text(url)
    else:
        parsed = url
    query = parsed.query
    if not any(is_secret(key) for key in query):
        return parsed.render_as_string(hide_password=True)
    # Rendered by hand: SQLAlchemy would percent-encode the ``***``.
    parameters = [
        f"{quote_plus(key)}={_HIDDEN if is_secret(key) else quote_plus(value)}"
        for key, values in sorted(query.items())
        for value in ((values,) if isinstance(values, str) else values)
    ]
    bare = parsed.set(query={}).render_as_string(hide_password=True)
    return f"{bare}?{'&'.join(parameters)}"


def _mask_text(url: str) -> str:
    """:func:`mask_url` for text that is not a URL SQLAlchemy can parse."""
    scheme, sep, rest = url.partition("://")
    location, question, query = rest.partition("?")
    credentials, at, host = location.rpartition("@")
    if sep and at and ":" in credentials:
        user = credentials.partition(":")[0]
        url = f"{scheme}://{user}:{_HIDDEN}@{host}{question}{query}"

    def hide(match: re.Match[str]) -> str:
        if not is_secret(unquote_plus(match["key"])):
            return match[0]
        return f"{match['sep']}{match['key']}={_HIDDEN}"

    return _QUERY_PARAMETER.sub(hide, url)


def describe(engine: AsyncEngine) -> str:
    """The engine's URL with the password hidden, for messages and reprs."""
    return mask_url(engine.url)
