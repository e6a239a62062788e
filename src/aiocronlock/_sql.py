"""Every statement aiocronlock sends, built once per locker for its backend.

All values travel as bound parameters; the only names in the SQL text are the
validated table and schema names, quoted by SQLAlchemy.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Delete,
    Executable,
    Select,
    Table,
    Update,
    bindparam,
    delete,
    func,
    literal_column,
    select,
    type_coerce,
    update,
)
from sqlalchemy.dialects import mysql, postgresql, sqlite

from ._schema import Status, _timestamp

MYSQL_DIALECTS = ("mysql", "mariadb")
SUPPORTED_DIALECTS = ("postgresql", "sqlite", *MYSQL_DIALECTS)


def db_now(dialect_name: str) -> ColumnElement[datetime]:
    """The database's current UTC time, with microseconds where the backend has them."""
    expr: ColumnElement[Any]
    if dialect_name == "postgresql":
        expr = func.now()
    elif dialect_name in MYSQL_DIALECTS:
        # UTC_TIMESTAMP does not depend on the session's time_zone, unlike NOW().
        expr = literal_column("UTC_TIMESTAMP(6)")
    else:
        expr = func.strftime("%Y-%m-%d %H:%M:%f", "now")
    return type_coerce(expr, _timestamp())


class Statements:
    """The statements of one locker: table and backend fixed, values bound at run time."""

    def __init__(self, table: Table, dialect_name: str) -> None:
        if dialect_name not in SUPPORTED_DIALECTS:
            raise ValueError(
                f"unsupported database {dialect_name!r}: aiocronlock works with "
                "PostgreSQL (asyncpg), MySQL/MariaDB (asyncmy) and SQLite (aiosqlite)"
            )
        self.table = table
        self.dialect_name = dialect_name
        c = table.c
        now = db_now(dialect_name)
        row = {
            "job_name": bindparam("job_name"),
            "job_identifier": bindparam("job_identifier"),
            "worker": bindparam("worker"),
            "status": Status.RUNNING.value,
            "created_at": now,
            "updated_at": now,
        }
        #: True when ``acquire`` returns the new id as a row (RETURNING). On MySQL and
        #: MariaDB the id comes back as lastrowid in the same round trip instead: the
        #: new id when the row was inserted, 0 when the key already existed.
        self.acquire_returns_id = dialect_name not in MYSQL_DIALECTS
        self.acquire: Executable
        if dialect_name == "postgresql":
            self.acquire = (
                postgresql.insert(table)
                .values(row)
                .on_conflict_do_nothing(index_elements=[c.job_name, c.job_identifier])
                .returning(c.id)
            )
        elif dialect_name == "sqlite":
            self.acquire = (
                sqlite.insert(table)
                .values(row)
                .on_conflict_do_nothing(index_elements=[c.job_name, c.job_identifier])
                .returning(c.id)
            )
        else:
            # A no-op update on conflict, rather than INSERT IGNORE: IGNORE would also
            # downgrade other errors to warnings, and a warning makes the driver send
            # SHOW WARNINGS, a second round trip on every lost race.
            self.acquire = mysql.insert(table).values(row).on_duplicate_key_update(id=c.id)

        self._now = now
        self.finish: Update = (
            update(table)
            .where(c.id == bindparam("lock_id"), c.status == Status.RUNNING.value)
            .values(status=bindparam("new_status"), updated_at=now)
        )
        self.now: Select[datetime] = select(now)

    def acquire_many(self, count: int) -> Executable:
        """A multi-row version of ``acquire`` (PostgreSQL and SQLite) returning id and job.

        Parameters are numbered per row: ``job_name_0``, ``job_identifier_0``, ``worker_0``...
        """
        c = self.table.c
        rows = [
            {
                "job_name": bindparam(f"job_name_{i}", type_=c.job_name.type),
                "job_identifier": bindparam(f"job_identifier_{i}", type_=c.job_identifier.type),
                "worker": bindparam(f"worker_{i}", type_=c.worker.type),
                "status": Status.RUNNING.value,
                "created_at": self._now,
                "updated_at": self._now,
            }
            for i in range(count)
        ]
        insert = postgresql.insert if self.dialect_name == "postgresql" else sqlite.insert
        return (
            insert(self.table)
            .values(rows)
            .on_conflict_do_nothing(index_elements=[c.job_name, c.job_identifier])
            .returning(c.id, c.job_name)
        )

    def prune_batch(self, cutoff: datetime, limit: int) -> Delete:
        """Delete at most ``limit`` rows created before ``cutoff``, oldest first."""
        c = self.table.c
        if self.dialect_name in MYSQL_DIALECTS:
            return delete(self.table).where(c.created_at < cutoff).ext(mysql.limit(limit))
        oldest = select(c.id).where(c.created_at < cutoff).order_by(c.created_at).limit(limit)
        return delete(self.table).where(c.id.in_(oldest.scalar_subquery()))

    def history(self, job_name: str | None, limit: int) -> Select[Any]:
        c = self.table.c
        query = select(
            c.id, c.job_name, c.job_identifier, c.worker, c.status, c.created_at, c.updated_at
        )
        if job_name is not None:
            query = query.where(c.job_name == job_name)
        return query.order_by(c.id.desc()).limit(limit)
