"""The exact statements the library sends, captured so the raw driver can send the same.

A benchmark first makes the library decide a tick for sentinel values it chose, records
the SQL text and parameters from SQLAlchemy's ``before_cursor_execute`` event, then
rebinds fresh job names and identifiers into the same positions for the raw driver.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine


@dataclass(frozen=True, slots=True)
class Statement:
    """SQL text as sent to the driver, and where its variable parameters sit.

    ``slots`` holds ``(position, key, as_bytes)``: the value at ``position`` is
    ``values[key]``, encoded to UTF-8 when the library sent bytes (MySQL's
    byte-exact columns). All other parameters are sent as captured.
    """

    sql: str
    params: tuple[Any, ...]
    slots: tuple[tuple[int, str, bool], ...]

    @classmethod
    def from_capture(cls, sql: str, params: Any, sentinels: Mapping[str, str]) -> Statement:
        """``sentinels`` maps each value the library was given to the key that replaces it."""
        values = tuple(params)
        slots = []
        for position, value in enumerate(values):
            if isinstance(value, str) and value in sentinels:
                slots.append((position, sentinels[value], False))
            elif isinstance(value, bytes) and value.decode("utf-8", "replace") in sentinels:
                slots.append((position, sentinels[value.decode("utf-8")], True))
        found = {key for _, key, _ in slots}
        missing = set(sentinels.values()) - found
        if missing:
            raise RuntimeError(f"captured parameters {values!r} do not contain {sorted(missing)}")
        return cls(sql=sql, params=values, slots=tuple(slots))

    def bind(self, values: Mapping[str, str]) -> tuple[Any, ...]:
        params = list(self.params)
        for position, key, as_bytes in self.slots:
            value = values[key]
            params[position] = value.encode("utf-8") if as_bytes else value
        return tuple(params)


class _SentByLocker(logging.Handler):
    """The acquire statements a locker sends through the driver (``aiocronlock.sql``)."""

    def __init__(self, seen: list[tuple[str, Any]]) -> None:
        super().__init__(logging.DEBUG)
        self.seen = seen

    def emit(self, record: logging.LogRecord) -> None:
        assert isinstance(record.args, tuple)
        sql, parameters = record.args
        self.seen.append((str(sql), parameters))


@contextmanager
def captured(engine: AsyncEngine) -> Iterator[list[tuple[str, Any]]]:
    """Record ``(sql, parameters)`` of every statement ``engine`` sends while inside,
    through SQLAlchemy or through a locker's acquire path."""
    seen: list[tuple[str, Any]] = []

    def record(
        conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, many: bool
    ) -> None:
        seen.append((statement, parameters))

    sql_log = logging.getLogger("aiocronlock.sql")
    level, handler = sql_log.level, _SentByLocker(seen)
    sql_log.setLevel(logging.DEBUG)
    sql_log.addHandler(handler)
    event.listen(engine.sync_engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", record)
        sql_log.removeHandler(handler)
        sql_log.setLevel(level)


def only_insert(seen: list[tuple[str, Any]]) -> tuple[str, Any]:
    """The single INSERT among captured statements (first-connect queries aside)."""
    inserts = [(sql, params) for sql, params in seen if sql.lstrip().upper().startswith("INSERT")]
    if len(inserts) != 1:
        raise RuntimeError(f"expected one INSERT, captured {len(inserts)}: {inserts!r}")
    return inserts[0]
