"""Checks on user input, done once and before any SQL runs."""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime, timedelta

#: Longest job name, identifier or worker name the table stores (VARCHAR(255)).
MAX_NAME_LENGTH = 255

_SQL_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_MAX_SQL_IDENTIFIER_LENGTH = 63  # PostgreSQL's limit, the smallest of the three backends


def to_timedelta(name: str, value: object, *, allow_none: bool = False) -> timedelta | None:
    """Normalise a duration given as ``timedelta`` or seconds; it must be positive."""
    if value is None:
        if allow_none:
            return None
        raise TypeError(f"{name} must be a timedelta or a number of seconds, not None")
    if isinstance(value, bool) or not isinstance(value, timedelta | int | float):
        raise TypeError(
            f"{name} must be a timedelta or a number of seconds, not {type(value).__name__}"
        )
    if isinstance(value, timedelta):
        duration = value
    else:
        if not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number of seconds, got {value!r}")
        duration = timedelta(seconds=value)
    if duration <= timedelta(0):
        raise ValueError(f"{name} must be positive, got {value!r}")
    return duration


def require_timedelta(name: str, value: object) -> timedelta:
    """Like :func:`to_timedelta` for a duration that may not be ``None``."""
    duration = to_timedelta(name, value)
    assert duration is not None
    return duration


def check_name(name: str, value: object) -> str:
    """A job name, worker name or identifier: a string of 1 to 255 characters, not
    blank, without NUL, that UTF-8 can encode."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, not {type(value).__name__}")
    if not value.strip():
        raise ValueError(f"{name} must not be empty or blank, got {value!r}")
    if len(value) > MAX_NAME_LENGTH:
        raise ValueError(f"{name} must be at most {MAX_NAME_LENGTH} characters, got {len(value)}")
    if "\x00" in value:  # PostgreSQL cannot store it: refused on every backend alike
        raise ValueError(f"{name} must not contain NUL ('\\x00'), got {value!r}")
    if not value.isascii() and (problem := unencodable(value)):
        raise ValueError(f"{name} must be text that UTF-8 can encode, got {value!r} ({problem})")
    return value


def unencodable(value: str) -> str | None:
    """Why UTF-8 cannot encode ``value``, or None if it can. Only a lone surrogate
    (from a bad decode, say) makes it fail, and no database can store one. Callers
    on the hot path ask only for text that is not ASCII."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        return f"{error.reason} at index {error.start}"
    return None


def check_sql_identifier(name: str, value: object) -> str:
    """A table or schema name: letters, digits and underscores, not starting with a digit."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, not {type(value).__name__}")
    if len(value) > _MAX_SQL_IDENTIFIER_LENGTH or not _SQL_IDENTIFIER.fullmatch(value):
        raise ValueError(
            f"{name} must be a plain SQL identifier (letters, digits and underscores, "
            f"not starting with a digit, at most {_MAX_SQL_IDENTIFIER_LENGTH} characters), "
            f"got {value!r}"
        )
    return value


def to_utc(name: str, value: object) -> datetime:
    """A timezone-aware datetime, converted to UTC."""
    if not isinstance(value, datetime):
        raise TypeError(f"{name} must be a timezone-aware datetime, not {type(value).__name__}")
    if value.tzinfo is UTC:  # most are: no conversion to make
        return value
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(
            f"{name} must be timezone-aware, got the naive {value!r}: "
            "pass e.g. datetime.now(timezone.utc) or attach a tzinfo"
        )
    try:
        return value.astimezone(UTC)
    except OverflowError:
        raise ValueError(
            f"{name} must fall between years 1 and 9999 in UTC, got {value.isoformat()}"
        ) from None
