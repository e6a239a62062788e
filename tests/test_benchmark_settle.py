"""The pruning benchmark's settle step on MariaDB: it waits for InnoDB's checkpoint
to catch up after the bulk load, and stops waiting once it no longer does. Time
passes only when the step sleeps (see ``_Clock``)."""

from __future__ import annotations

from typing import Any

from benchmarks import prune

MIB = 2**20
LOG_SIZE = 96 * MIB  # the mark is a twentieth of it: 4.8 MiB


class _Result:
    def __init__(self, row: Any) -> None:
        self._row = row

    def first(self) -> Any:
        return self._row


class _Server:
    """Answers the settle step's statements; the checkpoint age follows ``ages``,
    then stays at its last value."""

    def __init__(self, ages: list[int]) -> None:
        self.ages = ages
        self.reads = 0

    async def exec_driver_sql(self, sql: str) -> _Result:
        if "Innodb_checkpoint_age" in sql:
            age = self.ages[min(self.reads, len(self.ages) - 1)]
            self.reads += 1
            return _Result(("Innodb_checkpoint_age", str(age)))
        if "innodb_log_file_size" in sql:
            return _Result(("innodb_log_file_size", str(LOG_SIZE)))
        return _Result(None)  # FLUSH TABLES ... FOR EXPORT, UNLOCK TABLES


class _Clock:
    """Time that passes only when the settle step sleeps."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += seconds


async def _settle(server: _Server) -> tuple[str, float]:
    """The settle step's report, and how long it waited."""
    clock = _Clock()
    how = await prune._settle_mysql(server, "t", clock=clock, sleep=clock.sleep)  # type: ignore[arg-type]
    return how, clock.now - 1000.0


async def test_it_waits_until_the_checkpoint_is_under_a_twentieth_of_the_log() -> None:
    server = _Server([60 * MIB, 30 * MIB, 10 * MIB, 4 * MIB])
    how, waited = await _settle(server)
    assert how == "FLUSH TABLES ... FOR EXPORT; checkpoint age 4.0 MiB"
    assert (server.reads, waited) == (4, 3 * prune._SETTLE_POLL_S)


async def test_it_stops_once_the_age_no_longer_falls() -> None:
    # An idle server that stopped flushing above the mark, 1 s in: not waited for
    # until the deadline, but until 10 s later.
    server = _Server([60 * MIB, 20 * MIB, 6 * MIB + MIB // 3])
    how, waited = await _settle(server)
    assert how == "FLUSH TABLES ... FOR EXPORT; checkpoint age 6.3 MiB, no lower for 10 s"
    assert 1.0 + prune._SETTLE_STALLED_S <= waited <= 1.0 + prune._SETTLE_STALLED_S + 1.0


async def test_an_age_that_keeps_falling_is_waited_for_up_to_the_deadline() -> None:
    server = _Server([60 * MIB - i * 1024 for i in range(1000)])
    how, waited = await _settle(server)
    assert how.startswith("FLUSH TABLES ... FOR EXPORT; checkpoint age still 59"), how
    assert how.endswith("MiB after 120 s"), how
    assert prune._SETTLE_TIMEOUT_S <= waited <= prune._SETTLE_TIMEOUT_S + 1.0
