"""The lock table, and how to add it to your own ``MetaData`` (for Alembic)."""

from __future__ import annotations

import enum
from typing import Any

from sqlalchemy import (
    VARBINARY,
    BigInteger,
    Column,
    DateTime,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeEngine

from ._validation import MAX_NAME_LENGTH, check_sql_identifier

DEFAULT_TABLE_NAME = "cron_job_locks"
#: Room for the ``ix_``/``uq_`` prefixes and suffixes within the 63-character limit.
MAX_TABLE_NAME_LENGTH = 48
#: The leases table of exclusive jobs is named after the lock table, with this suffix.
LEASES_SUFFIX = "_leases"


class Status(enum.StrEnum):
    """What became of a run. Stored as its value in the ``status`` column."""

    RUNNING = "RUNNING"
    FINISHED = "FINISHED"
    FAILED = "FAILED"
    #: An exclusive run that could not keep its lease; it was cancelled.
    LOST = "LOST"
    #: An exclusive tick won while another run held the job's lease; not run.
    SKIPPED = "SKIPPED"


def exact_collation(dialect: Dialect) -> str | None:
    """A binary, NO PAD collation of MySQL or MariaDB: text compared byte for byte,
    trailing spaces included; None where the server has none (MySQL before 8.0.17)."""
    if getattr(dialect, "is_mariadb", False):
        return "utf8mb4_nopad_bin"
    version = getattr(dialect, "server_version_info", None) or ()
    return "utf8mb4_0900_bin" if tuple(version) >= (8, 0, 17) else None


class ExactText(TypeDecorator[str]):
    """Text compared byte for byte on every backend.

    PostgreSQL and SQLite compare strings exactly already. MySQL's and MariaDB's usual
    collations fold case, accents or trailing spaces, which would make ``"job"`` and
    ``"Job "`` the same tick: there the column takes a binary NO PAD collation (see
    :func:`exact_collation`), and stays text that SQL clients and BI tools read as
    such. On a MySQL without one, and in tables made by aiocronlock 0.1, the column is
    VARBINARY: values are sent as text all the same, and bytes read back are decoded.
    """

    impl = String(MAX_NAME_LENGTH)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name in ("mysql", "mariadb"):
            from sqlalchemy.dialects.mysql import VARCHAR  # slow to import: only here

            collation = exact_collation(dialect)
            if collation is None:
                return dialect.type_descriptor(VARBINARY(MAX_NAME_LENGTH * 4))
            text = VARCHAR(MAX_NAME_LENGTH, charset="utf8mb4", collation=collation)
            return dialect.type_descriptor(text)
        return dialect.type_descriptor(String(MAX_NAME_LENGTH))

    def process_result_value(self, value: Any, dialect: Dialect) -> str | None:
        if isinstance(value, bytes | bytearray):
            return bytes(value).decode("utf-8")
        return value  # type: ignore[no-any-return]


def _timestamp() -> TypeEngine[Any]:
    # Microsecond precision everywhere; MySQL's DATETIME would otherwise keep whole seconds.
    from sqlalchemy.dialects.mysql import DATETIME  # here: the dialect is slow to import

    return DateTime(timezone=True).with_variant(DATETIME(fsp=6), "mysql", "mariadb")


def lock_table(
    metadata: MetaData,
    *,
    name: str = DEFAULT_TABLE_NAME,
    schema: str | None = None,
) -> Table:
    """Define the lock table in ``metadata`` and return it.

    Use it to let Alembic manage the table::

        from aiocronlock import lock_table
        lock_table(Base.metadata)  # then: alembic revision --autogenerate

    Columns: ``id`` (increasing, usable as a fencing token), ``job_name``,
    ``job_identifier``, ``worker``, ``status``, ``created_at`` and ``updated_at``
    (both from the database clock). ``(job_name, job_identifier)`` is unique and
    ``created_at`` is indexed for pruning.

    It also defines ``<name>_leases``, one row per exclusive job: who holds its
    lease (``holder_id``, the run's row id, and ``worker``) and until when
    (``lease_until``, database clock).
    """
    check_sql_identifier("table_name", name)
    if len(name) > MAX_TABLE_NAME_LENGTH:
        raise ValueError(
            f"table_name must be at most {MAX_TABLE_NAME_LENGTH} characters, got {len(name)}"
        )
    if schema is not None:
        check_sql_identifier("schema", schema)
    Table(
        name + LEASES_SUFFIX,
        metadata,
        Column("job_name", ExactText(), primary_key=True),
        Column("holder_id", BigInteger().with_variant(Integer, "sqlite"), nullable=False),
        Column("worker", String(MAX_NAME_LENGTH), nullable=False),
        Column("lease_until", _timestamp(), nullable=False),
        Column("updated_at", _timestamp(), nullable=False),
        schema=schema,
        mysql_charset="utf8mb4",
    )
    return Table(
        name,
        metadata,
        Column(
            "id",
            BigInteger().with_variant(Integer, "sqlite"),
            primary_key=True,
            autoincrement=True,
        ),
        Column("job_name", ExactText(), nullable=False),
        Column("job_identifier", ExactText(), nullable=False),
        Column("worker", String(MAX_NAME_LENGTH), nullable=False),
        Column("status", String(16), nullable=False),
        Column("created_at", _timestamp(), nullable=False),
        Column("updated_at", _timestamp(), nullable=False),
        UniqueConstraint("job_name", "job_identifier", name=f"uq_{name}_job"),
        Index(f"ix_{name}_created_at", "created_at"),
        schema=schema,
        # Ids never reused after deletes, so they stay increasing fencing tokens.
        sqlite_autoincrement=True,
        mysql_charset="utf8mb4",
    )
