"""Every statement aiocronlock sends, built once per locker for its backend.

All values travel as bound parameters; the only names in the SQL text are the
validated table and schema names, quoted by SQLAlchemy.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from contextvars import ContextVar
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Executable,
    Insert,
    Integer,
    Interval,
    Select,
    String,
    Table,
    TextClause,
    Update,
    and_,
    bindparam,
    case,
    delete,
    exists,
    func,
    insert,
    literal,
    literal_column,
    or_,
    select,
    text,
    type_coerce,
    update,
)

from ._schema import LEASES_SUFFIX, Status, _timestamp

MYSQL_DIALECTS = ("mysql", "mariadb")

#: Set while a statement whose duplicate-key warnings are expected runs.
_duplicates_expected: ContextVar[bool] = ContextVar(
    "aiocronlock_duplicates_expected", default=False
)


class _DropExpectedDuplicates(logging.Filter):
    """Drops asyncmy's "Duplicate entry" warnings while ``_duplicates_expected`` is set."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (_duplicates_expected.get() and str(record.msg).startswith("Duplicate entry"))


_drop_expected_duplicates = _DropExpectedDuplicates()


@contextlib.contextmanager
def mysql_duplicates_quiet() -> Iterator[None]:
    """Run an ``INSERT IGNORE`` without asyncmy logging each ignored duplicate as a warning.

    Only duplicate-key warnings of the current task are dropped; anything else asyncmy
    logs (a truncation, say) still is."""
    driver_logger = logging.getLogger("asyncmy")
    if _drop_expected_duplicates not in driver_logger.filters:
        driver_logger.addFilter(_drop_expected_duplicates)
    token = _duplicates_expected.set(True)
    try:
        yield
    finally:
        _duplicates_expected.reset(token)


SUPPORTED_DIALECTS = ("postgresql", "sqlite", *MYSQL_DIALECTS)

#: Added to a tick's identifier for its retry after its run died (``retry_dead``): the
#: unique key then admits one retry per tick.
RETRY_SUFFIX = "#retry"

#: The most dead runs of a job that one ``dead_runs`` query returns.
DEAD_RUNS_BATCH = 10


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


def db_later(dialect_name: str) -> ColumnElement[datetime]:
    """The database's current time plus the bound duration ``lease`` (see lease_params)."""
    expr: ColumnElement[Any]
    if dialect_name == "postgresql":
        expr = func.now() + bindparam("lease", type_=Interval())
    elif dialect_name in MYSQL_DIALECTS:
        expr = func.timestampadd(
            literal_column("MICROSECOND"),
            bindparam("lease", type_=Integer()),
            literal_column("UTC_TIMESTAMP(6)"),
        )
    else:
        expr = func.strftime("%Y-%m-%d %H:%M:%f", "now", bindparam("lease", type_=String()))
    return type_coerce(expr, _timestamp())


def lease_param(dialect_name: str, lease: timedelta) -> Any:
    """The value bound to ``lease`` in :func:`db_later` for this backend."""
    if dialect_name == "postgresql":
        return lease
    if dialect_name in MYSQL_DIALECTS:
        return lease // timedelta(microseconds=1)
    return f"{lease.total_seconds():+.6f} seconds"  # a negative lease: earlier


def _take_over(excluded: Any) -> dict[str, Any]:
    """The SET of an upsert that hands an expired lease row to the inserting run."""
    return {
        column: getattr(excluded, column)
        for column in ("holder_id", "worker", "lease_until", "updated_at")
    }


class Statements:
    """The statements of one locker: table and backend fixed, values bound at run time."""

    def __init__(self, table: Table, dialect_name: str) -> None:
        # Dialect modules load here, for the one backend in use, not at import time.
        from sqlalchemy.dialects import mysql

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
        self.acquire: Insert
        self._row = row
        #: The row inserted unless its tick is taken, returning ``(id, job_name)``, for
        #: lock_many(): executed with a list of rows, SQLAlchemy sends it as multi-row
        #: INSERTs ("insertmanyvalues"). On MySQL it needs RETURNING (MariaDB 10.5+).
        self.acquire_returning_job: Insert = self._skipping_taken(row).returning(c.id, c.job_name)
        if dialect_name in MYSQL_DIALECTS:
            # A no-op update on conflict, rather than INSERT IGNORE: IGNORE would also
            # downgrade other errors to warnings, and a warning makes the driver send
            # SHOW WARNINGS, a second round trip on every lost race.
            self.acquire = mysql.insert(table).values(row).on_duplicate_key_update(id=c.id)
        else:
            self.acquire = self._skipping_taken(row).returning(c.id)

        #: After a lock() was cancelled or timed out mid-INSERT, whatever became of it:
        #: the tick recorded FAILED. It updates the row if that INSERT landed, waits for
        #: it on the unique key if it is still on its way, and takes the key as FAILED
        #: if it never arrives (a tick nobody runs either way); another worker's row is
        #: left alone.
        failed = {**row, "status": Status.FAILED.value}
        ours = and_(c.worker == bindparam("worker"), c.status == Status.RUNNING.value)
        if dialect_name in MYSQL_DIALECTS:
            self.abandon: Insert = (
                mysql.insert(table)
                .values(failed)
                .on_duplicate_key_update(
                    [  # in this order: the first assignment still sees the old status
                        ("updated_at", case((ours, now), else_=c.updated_at)),
                        ("status", case((ours, Status.FAILED.value), else_=c.status)),
                    ]
                )
            )
        else:
            from sqlalchemy.dialects import postgresql, sqlite

            insert = postgresql.insert if dialect_name == "postgresql" else sqlite.insert
            self.abandon = (
                insert(table)
                .values(failed)
                .on_conflict_do_update(
                    index_elements=[c.job_name, c.job_identifier],
                    set_={"status": Status.FAILED.value, "updated_at": now},
                    where=ours,
                )
            )

        self._now = now
        self.finish: Update = (
            update(table)
            .where(c.id == bindparam("lock_id"), c.status == Status.RUNNING.value)
            .values(status=bindparam("new_status"), updated_at=now)
        )
        self.now: Select[datetime] = select(now)
        #: Run by clean() after each DELETE batch on SQLite (see there); elsewhere None.
        self.after_prune: TextClause | None = (
            text("PRAGMA wal_checkpoint(PASSIVE)") if dialect_name == "sqlite" else None
        )
        self._build_lease_statements()
        self._build_retry_statements()

    def _build_lease_statements(self) -> None:
        from sqlalchemy.dialects import mysql, postgresql, sqlite

        locks = self.table
        leases = locks.metadata.tables[locks.key + LEASES_SUFFIX]
        lc = leases.c
        now = self._now
        later = db_later(self.dialect_name)
        # Bound names differ from column names: SQLAlchemy reserves those in VALUES/SET.
        job = bindparam("lease_job", type_=lc.job_name.type)
        worker = bindparam("lease_worker", type_=lc.worker.type)
        self.leases = leases
        #: Another instance holds a live lease on the job.
        self.lease_is_live = select(exists().where(lc.job_name == job, lc.lease_until > now))
        # Extend a live lease we hold; the holder id is the fencing token.
        self.renew: Update = (
            update(leases)
            .where(lc.job_name == job, lc.holder_id == bindparam("lock_id"), lc.lease_until > now)
            .values(lease_until=later, updated_at=now)
        )
        self.release: Update = (
            update(leases)
            .where(lc.job_name == job, lc.holder_id == bindparam("lock_id"))
            .values(lease_until=now, updated_at=now)
        )
        self.force_release: Update = (
            update(leases)
            .where(lc.job_name == job, lc.lease_until > now)
            .values(lease_until=now, updated_at=now)
        )
        self.fence = self._fence(leases, job)
        self.list_leases: Select[Any] = select(
            lc.job_name,
            lc.holder_id,
            lc.worker,
            lc.lease_until,
            (lc.lease_until > now).label("live"),
        ).order_by(lc.job_name)
        self.mark: Update = (
            update(locks)
            .where(locks.c.id == bindparam("lock_id"), locks.c.status == Status.RUNNING.value)
            .values(status=bindparam("new_status"), updated_at=now)
        )
        claim_row = {
            "job_name": job,
            "holder_id": bindparam("lock_id"),
            "worker": worker,
            "lease_until": later,
            "updated_at": now,
        }
        self.acquire_exclusive: Executable | None = None
        self.claim: Executable
        self.ensure_lease_row: Executable | None = None
        if self.dialect_name == "postgresql":
            # One statement: insert the tick row only while no live lease exists, and
            # take the lease in the same statement for the row just inserted. The lease
            # row's lock serialises concurrent claims; the WHERE re-checks its expiry.
            cols = ["job_name", "job_identifier", "worker", "status", "created_at", "updated_at"]
            tick = (
                postgresql.insert(locks)
                .from_select(
                    cols,
                    select(
                        job,
                        bindparam("job_identifier", type_=locks.c.job_identifier.type),
                        worker,
                        literal(Status.RUNNING.value),
                        now,
                        now,
                    ).where(~exists().where(lc.job_name == job, lc.lease_until > now)),
                )
                .on_conflict_do_nothing(index_elements=[locks.c.job_name, locks.c.job_identifier])
                .returning(locks.c.id)
                .cte("tick")
            )
            take = postgresql.insert(leases).from_select(
                ["job_name", "holder_id", "worker", "lease_until", "updated_at"],
                select(job, tick.c.id, worker, later, now).select_from(tick),
            )
            claim = (
                take.on_conflict_do_update(
                    index_elements=[lc.job_name],
                    set_=_take_over(take.excluded),
                    where=lc.lease_until <= now,
                )
                .returning(lc.holder_id)
                .cte("claim")
            )
            self.acquire_exclusive = select(
                select(tick.c.id).scalar_subquery().label("tick_id"),
                select(claim.c.holder_id).scalar_subquery().label("holder_id"),
                exists().where(lc.job_name == job, lc.lease_until > now).label("live"),
            )
            self.claim = select(1)  # unused on PostgreSQL
        elif self.dialect_name == "sqlite":
            take_sqlite = sqlite.insert(leases).values(claim_row)
            self.claim = take_sqlite.on_conflict_do_update(
                index_elements=[lc.job_name],
                set_=_take_over(take_sqlite.excluded),
                where=lc.lease_until <= now,
            ).returning(lc.holder_id)
        else:
            # MySQL has no conditional upsert that reports its outcome; an UPDATE on an
            # existing row does (matched rows), so make sure the row exists first.
            self.ensure_lease_row = (
                mysql.insert(leases)
                .values(
                    job_name=job,
                    holder_id=0,
                    worker="",
                    lease_until=literal_column("UTC_TIMESTAMP(6)"),
                    updated_at=now,
                )
                .on_duplicate_key_update(job_name=lc.job_name)
            )
            self.claim = (
                update(leases)
                .where(lc.job_name == job, lc.lease_until <= now)
                .values(
                    holder_id=bindparam("lock_id"),
                    worker=worker,
                    lease_until=later,
                    updated_at=now,
                )
            )

    def _fence(self, leases: Table, job: ColumnElement[Any]) -> Executable:
        """``Lock.fence()``: one row while run ``lock_id`` holds ``lease_job``'s live lease,
        and that row locked until the caller's transaction ends.

        Every statement that ends or moves a lease (claim, renewal, release) updates its
        row, and waits on the lock. FOR SHARE suffices for that; unlike FOR UPDATE it lets
        several fenced transactions of one run go on side by side. PostgreSQL compares with
        ``clock_timestamp()``: ``now()`` is when the caller's transaction began. On SQLite
        a transaction holding the write lock excludes every other writer, but a SELECT
        does not take it (a deferred transaction takes it at its first write, and
        pysqlite starts none before a SELECT): the fence is a no-op UPDATE, which does.
        """
        lc = leases.c
        now: ColumnElement[Any] = self._now
        if self.dialect_name == "postgresql":
            now = type_coerce(func.clock_timestamp(), _timestamp())
        held = and_(lc.job_name == job, lc.holder_id == bindparam("lock_id"), lc.lease_until > now)
        if self.dialect_name == "sqlite":
            return update(leases).where(held).values(holder_id=lc.holder_id).returning(lc.holder_id)
        return select(lc.holder_id).where(held).with_for_update(read=True)

    def _build_retry_statements(self) -> None:
        """The statements of ``retry_dead`` runs: a heartbeat on the run's own row, and
        the retry of a tick whose run stopped beating (see ``Store.retry``)."""
        from sqlalchemy.dialects import postgresql, sqlite

        locks = self.table
        c = locks.c
        now = self._now
        running = c.status == Status.RUNNING.value
        lost = c.status == Status.LOST.value
        #: A retry_dead run's heartbeat, fenced by its row id: False once the row is
        #: no longer RUNNING (another instance marked it LOST).
        self.heartbeat: Update = (
            update(locks).where(c.id == bindparam("lock_id"), running).values(updated_at=now)
        )
        # RUNNING, and no heartbeat within the lease: db_later(), with the lease bound
        # negative, is the database's clock less the lease.
        expired = and_(running, c.updated_at < db_later(self.dialect_name))
        retry = locks.alias("retry")
        retried = exists().where(
            retry.c.job_name == c.job_name,
            retry.c.job_identifier == c.job_identifier + RETRY_SUFFIX,
        )
        #: The runs of ``dead_job`` that died: RUNNING with an expired heartbeat, or LOST
        #: already (by their holder, or by an instance that then failed to insert the
        #: retry), with no retry yet; a retry itself is never retried.
        self.dead_runs: Select[Any] = (
            select(
                c.id, c.job_name, c.job_identifier, c.worker, c.status, c.created_at, c.updated_at
            )
            .where(
                c.job_name == bindparam("dead_job"),
                or_(lost, expired),
                ~c.job_identifier.endswith(RETRY_SUFFIX, autoescape=True),
                ~retried,
            )
            .order_by(c.id)
            .limit(DEAD_RUNS_BATCH)
        )
        dead = c.id == bindparam("dead_id")
        #: Mark run ``dead_id`` LOST if it is RUNNING with an expired heartbeat: from
        #: then on its heartbeat fails. None on PostgreSQL, where ``retry`` does it.
        self.mark_dead: Update | None = (
            update(locks).where(dead, expired).values(status=Status.LOST.value, updated_at=now)
        )
        # The retry's row, made from the LOST one: the tick's key plus the suffix.
        cols = ["job_name", "job_identifier", "worker", "status", "created_at", "updated_at"]
        source = select(
            c.job_name,
            c.job_identifier + RETRY_SUFFIX,
            bindparam("retry_worker", type_=c.worker.type),  # not "worker": a column
            literal(Status.RUNNING.value),
            now,
            now,
        )
        #: Insert the retry of run ``dead_id`` once it is LOST, unless one exists:
        #: exactly one instance wins it. Returns the new id (lastrowid on MySQL).
        self.retry: Insert
        if self.dialect_name == "postgresql":
            # One statement: mark_dead as a CTE, whose change the INSERT's own snapshot
            # does not see, hence the EXISTS.
            marked = self.mark_dead.returning(c.id).cte("marked")
            self.mark_dead = None
            self.retry = (
                postgresql.insert(locks)
                .from_select(cols, source.where(dead, or_(lost, exists(select(marked.c.id)))))
                .on_conflict_do_nothing(index_elements=[c.job_name, c.job_identifier])
                .returning(c.id)
            )
        elif self.dialect_name == "sqlite":
            self.retry = (
                sqlite.insert(locks)
                .from_select(cols, source.where(dead, lost))
                .on_conflict_do_nothing(index_elements=[c.job_name, c.job_identifier])
                .returning(c.id)
            )
        else:
            # IGNORE: a taken retry is a duplicate, and the identifier fits (lock()
            # checks its length), so there is nothing else for it to downgrade.
            self.retry = (
                insert(locks).prefix_with("IGNORE").from_select(cols, source.where(dead, lost))
            )

    def _skipping_taken(self, values: dict[str, Any] | list[dict[str, Any]]) -> Insert:
        """An INSERT of ``values`` that skips the rows whose tick is taken, without error.

        On MySQL that is INSERT IGNORE, for the statements that return their rows
        (ON DUPLICATE KEY UPDATE would return the existing rows too). The columns are
        sized for every valid input, so IGNORE has no other error to downgrade; each
        taken tick is a warning that the driver fetches (see mysql_duplicates_quiet).
        """
        from sqlalchemy.dialects import mysql, postgresql, sqlite

        if self.dialect_name in MYSQL_DIALECTS:
            return mysql.insert(self.table).prefix_with("IGNORE").values(values)
        dialect_insert = postgresql.insert if self.dialect_name == "postgresql" else sqlite.insert
        c = self.table.c
        return (
            dialect_insert(self.table)
            .values(values)
            .on_conflict_do_nothing(index_elements=[c.job_name, c.job_identifier])
        )

    def acquire_rows(self, count: int) -> Insert:
        """lock_many()'s INSERT of ``count`` rows, as one statement with one VALUES list.

        Row ``i`` binds ``job_name_<i>`` and ``job_identifier_<i>``; all share
        ``worker``. It returns ``(id, job_name)`` of the rows inserted, and needs
        RETURNING: PostgreSQL, SQLite and MariaDB 10.5+.
        """
        c = self.table.c
        rows = [
            {
                **self._row,
                "job_name": bindparam(f"job_name_{i}", type_=c.job_name.type),
                "job_identifier": bindparam(f"job_identifier_{i}", type_=c.job_identifier.type),
            }
            for i in range(count)
        ]
        return self._skipping_taken(rows).returning(c.id, c.job_name)

    def prune_batch(
        self, cutoff: datetime, limit: int, floor: datetime | None = None
    ) -> Executable:
        """Delete at most ``limit`` rows created before ``cutoff``, oldest first.

        On PostgreSQL it returns one row, ``(deleted, newest)``: how many rows went and
        the newest ``created_at`` among them, the ``floor`` of the next batch. Deleted
        rows stay in the index until vacuum, and an index scan from the start would
        step over all of them again on every batch; starting at the floor does not.
        Elsewhere the index forgets deleted rows (SQLite) or soon purges them (InnoDB),
        and the statement is a plain DELETE whose row count says how many went.

        On PostgreSQL the statement also turns ``synchronous_commit`` off for its own
        transaction (the implicit one of an autocommit statement; ``set_config`` with
        ``is_local`` true, undone as it ends), whatever the server or the role sets.
        Its commit then releases the rows' locks without waiting for the write-ahead
        log to reach the disk (or, with synchronous replication, a standby), so a
        stall of the disk then does not lengthen the batch; the DELETE itself may
        still wait on the disk, to read pages or to write some out. A crash may lose
        the most recent batches, never the database's consistency: their rows come
        back expired and the next prune deletes them again.
        """
        from sqlalchemy.dialects import mysql

        c = self.table.c
        if self.dialect_name in MYSQL_DIALECTS:
            expired = delete(self.table).where(c.created_at < cutoff)
            if hasattr(mysql, "limit"):  # SQLAlchemy 2.1's DELETE ... LIMIT
                return expired.ext(mysql.limit(limit))
            return expired.with_dialect_options(**{f"{self.dialect_name}_limit": limit})
        window = c.created_at < cutoff
        if floor is not None:
            window = window & (c.created_at >= floor)
        oldest = select(c.id).where(window).order_by(c.created_at).limit(limit)
        deleting = delete(self.table).where(c.id.in_(oldest.scalar_subquery()))
        if self.dialect_name != "postgresql":
            return deleting
        gone = deleting.returning(c.created_at).cte("gone")
        return select(
            func.count().label("deleted"),
            func.max(gone.c.created_at).label("newest"),
            func.set_config("synchronous_commit", "off", True).label("synchronous_commit"),
        )

    def history(self, job_name: str | None, limit: int) -> Select[Any]:
        c = self.table.c
        query = select(
            c.id, c.job_name, c.job_identifier, c.worker, c.status, c.created_at, c.updated_at
        )
        if job_name is not None:
            query = query.where(c.job_name == job_name)
        return query.order_by(c.id.desc()).limit(limit)
