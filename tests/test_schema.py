"""The lock table: its definition for Alembic, and what ``create_table()`` builds."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import Index, MetaData, UniqueConstraint, inspect
from sqlalchemy.ext.asyncio import AsyncEngine

from aiocronlock import AsyncDBLocker, lock_table
from conftest import Backend, LockerFactory, fetch_rows

COLUMNS = ["id", "job_name", "job_identifier", "worker", "status", "created_at", "updated_at"]


def test_lock_table_adds_the_table_to_metadata() -> None:
    metadata = MetaData()
    table = lock_table(metadata, name="my_locks")

    assert metadata.tables["my_locks"] is table
    assert [c.name for c in table.columns] == COLUMNS
    assert [c.name for c in table.primary_key.columns] == ["id"]
    assert all(not c.nullable for c in table.columns)


def test_lock_table_default_name() -> None:
    metadata = MetaData()
    table = lock_table(metadata)
    assert table.name == "cron_job_locks"
    assert metadata.tables["cron_job_locks"] is table


def test_lock_table_unique_key_and_index() -> None:
    table = lock_table(MetaData(), name="my_locks")

    uniques = [c for c in table.constraints if isinstance(c, UniqueConstraint)]
    assert [[col.name for col in u.columns] for u in uniques] == [["job_name", "job_identifier"]]
    indexes: list[Index] = list(table.indexes)
    assert [[col.name for col in ix.columns] for ix in indexes] == [["created_at"]]
    assert not indexes[0].unique


def test_lock_table_with_schema() -> None:
    metadata = MetaData()
    table = lock_table(metadata, name="my_locks", schema="ops")
    assert table.schema == "ops"
    assert table.fullname == "ops.my_locks"
    assert metadata.tables["ops.my_locks"] is table
    assert all(t.schema == "ops" for t in metadata.tables.values())


def test_two_lock_tables_in_one_metadata() -> None:
    metadata = MetaData()
    a = lock_table(metadata, name="locks_a")
    b = lock_table(metadata, name="locks_b")
    assert metadata.tables["locks_a"] is a
    assert metadata.tables["locks_b"] is b
    # Index and constraint names are per schema on PostgreSQL: they must not clash.
    names = [str(ix.name) for t in metadata.tables.values() for ix in t.indexes]
    names += [str(c.name) for t in metadata.tables.values() for c in t.constraints if c.name]
    assert len(names) == len(set(names)), names


@pytest.mark.parametrize(
    ("kwargs", "parameter"),
    [
        ({"name": "bad-name"}, "table_name"),
        ({"name": "1abc"}, "table_name"),
        ({"name": "x; DROP TABLE y"}, "table_name"),
        ({"name": "a" * 49}, "table_name"),
        ({"name": "ok", "schema": "bad schema"}, "schema"),
        ({"name": "ok", "schema": "1abc"}, "schema"),
    ],
)
def test_lock_table_rejects_bad_names(kwargs: dict[str, Any], parameter: str) -> None:
    with pytest.raises(ValueError, match=parameter):
        lock_table(MetaData(), **kwargs)


# -- on the database ------------------------------------------------------------------------


def _reflect(sync: Any, name: str, schema: str | None = None) -> dict[str, Any]:
    inspector = inspect(sync)
    uniques = inspector.get_unique_constraints(name, schema=schema)
    return {
        "columns": [c["name"] for c in inspector.get_columns(name, schema=schema)],
        "pk": inspector.get_pk_constraint(name, schema=schema)["constrained_columns"],
        "uniques": [u["column_names"] for u in uniques],
        "indexes": [
            ix["column_names"]
            for ix in inspector.get_indexes(name, schema=schema)
            if not ix.get("unique")
        ],
    }


async def test_create_table_builds_columns_unique_key_and_index(
    backend: Backend, engine: AsyncEngine, make_locker: LockerFactory
) -> None:
    await make_locker()

    async with engine.connect() as conn:
        reflected = await conn.run_sync(_reflect, backend.table_name)

    assert sorted(reflected["columns"]) == sorted(COLUMNS)
    assert reflected["pk"] == ["id"]
    assert reflected["uniques"] == [["job_name", "job_identifier"]]
    assert reflected["indexes"] == [["created_at"]]


async def test_a_table_created_from_your_own_metadata_is_usable(
    backend: Backend, engine: AsyncEngine, make_locker: LockerFactory
) -> None:
    metadata = MetaData()
    lock_table(metadata, name=backend.table_name)
    async with engine.begin() as conn:
        await conn.run_sync(metadata.create_all)

    locker = await make_locker(create=False, worker="alembic")
    other = await make_locker(create=False, own_engine=True, worker="other")
    won = await locker.lock("job")
    assert won is not None
    assert await other.lock("job", won.run_time) is None
    async with won:
        pass

    rows = await fetch_rows(engine, backend.table_name)
    assert [(r["job_name"], r["worker"], r["status"]) for r in rows] == [
        ("job", "alembic", "FINISHED")
    ]


DEFAULT_SCHEMA = {"sqlite": "main", "postgresql": "public", "mysql": "test"}


async def test_a_schema_qualified_table(
    backend: Backend, engine: AsyncEngine, make_locker: LockerFactory
) -> None:
    schema = DEFAULT_SCHEMA[backend.dialect]
    locker = await make_locker(schema=schema, worker="schema")
    assert locker.table.schema == schema

    won = await locker.lock("job")
    assert won is not None
    async with won:
        pass
    assert [r.status for r in await locker.history()] == ["FINISHED"]
    assert await locker.clean() == 0

    # The same table as the unqualified one, seen from outside.
    rows = await fetch_rows(engine, backend.table_name)
    assert [(r["job_name"], r["worker"]) for r in rows] == [("job", "schema")]
    async with engine.connect() as conn:
        reflected = await conn.run_sync(_reflect, backend.table_name, schema)
    assert reflected["uniques"] == [["job_name", "job_identifier"]]


async def test_the_longest_table_name(backend: Backend, engine: AsyncEngine) -> None:
    name = backend.table_name.ljust(48, "x")
    metadata = MetaData()
    lock_table(metadata, name=name)
    try:
        async with AsyncDBLocker(engine, table_name=name, clean_interval=None) as locker:
            await locker.create_table()
            lock = await locker.lock("job")
            assert lock is not None
        rows = await fetch_rows(engine, name)
        assert [r["job_name"] for r in rows] == ["job"]
    finally:
        async with engine.begin() as conn:
            await conn.run_sync(lambda sync: metadata.drop_all(sync, checkfirst=True))


# -- MySQL/MariaDB: text columns, compared byte for byte -----------------------------------

EXACT_NAMES = ["job", "Job", "job ", "résumé", "resume"]


async def _mysql_only(backend: Backend) -> None:
    if backend.name != "mysql":
        pytest.skip("collations that fold case and trailing spaces are MySQL's and MariaDB's")


async def test_mysql_names_are_text_a_sql_client_reads_as_such(
    backend: Backend, engine: AsyncEngine, make_locker: LockerFactory
) -> None:
    await _mysql_only(backend)
    locker = await make_locker()
    tick = datetime.now(UTC)
    assert all([await locker.lock(name, tick) for name in EXACT_NAMES])

    async with engine.connect() as conn:
        columns = (
            await conn.exec_driver_sql(
                "SELECT column_name, data_type, collation_name FROM information_schema.columns"
                f" WHERE table_schema = DATABASE() AND table_name = '{backend.table_name}'"
                " AND column_name IN ('job_name', 'job_identifier') ORDER BY column_name"
            )
        ).all()
        plain = (
            await conn.exec_driver_sql(f"SELECT job_name FROM {backend.table_name} ORDER BY id")
        ).scalars()
        read = list(plain)
    assert [
        (str(c.data_type).lower(), str(c.collation_name).endswith("_bin")) for c in columns
    ] == [
        ("varchar", True),
        ("varchar", True),
    ]
    assert read == EXACT_NAMES  # str, not b'job': what a BI tool or Alembic sees


async def test_mysql_tables_of_version_0_1_with_binary_columns_keep_working(
    backend: Backend, engine: AsyncEngine, make_locker: LockerFactory
) -> None:
    await _mysql_only(backend)
    locker = await make_locker()
    async with engine.begin() as conn:
        for column in ("job_name", "job_identifier"):
            await conn.exec_driver_sql(
                f"ALTER TABLE {backend.table_name} MODIFY {column} VARBINARY(1020) NOT NULL"
            )
    other = await make_locker(own_engine=True, worker="b")
    tick = datetime.now(UTC)
    won = [await locker.lock(name, tick) for name in EXACT_NAMES]
    lost = [await other.lock(name, tick) for name in EXACT_NAMES]
    many = await locker.lock_many([f"{name}-many" for name in EXACT_NAMES], tick)

    assert all(won) and lost == [None] * len(EXACT_NAMES)
    assert sorted(many) == sorted(f"{name}-many" for name in EXACT_NAMES)
    history = await locker.history(limit=100)
    assert sorted(run.job_name for run in history) == sorted(
        EXACT_NAMES + [f"{name}-many" for name in EXACT_NAMES]
    )
    assert [r["job_name"] for r in await fetch_rows(engine, backend.table_name)][:5] == EXACT_NAMES
