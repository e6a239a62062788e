"""The pruning benchmark's probes: each DELETE's time less its overlap with a probe's
span (pure arithmetic on spans); the commit probe's own table, which it drops whatever
ends the run; and the disk probe, a process of its own that flushes to a file."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from benchmarks import _backends as bench
from benchmarks import prune
from sqlalchemy import inspect

from conftest import server_url

Span = tuple[int, int]


def less_overlap(statements: list[Span], probes: list[Span]) -> list[int]:
    """Each statement's duration less its longest overlap with one probe commit, as
    the benchmark reports it."""
    return prune.less_overlap(statements, prune.overlaps(statements, probes))


def test_a_statement_no_probe_commit_overlaps_keeps_its_whole_duration() -> None:
    assert less_overlap([(100, 150)], [(10, 20), (200, 210)]) == [50]


def test_a_statement_inside_one_stalled_probe_commit_has_nothing_left() -> None:
    assert less_overlap([(100, 150)], [(90, 160)]) == [0]


def test_only_the_part_of_a_probe_commit_inside_the_statement_counts() -> None:
    # In flight when the statement began, stalled until 130: it overlapped 30 of the 50.
    assert less_overlap([(100, 150)], [(60, 130)]) == [20]
    # Began during the statement and outlasted it.
    assert less_overlap([(100, 150)], [(140, 400)]) == [40]


def test_the_longest_single_overlap_counts_not_their_sum() -> None:
    probes = [(100, 110), (112, 140), (141, 145)]
    assert less_overlap([(100, 150)], probes) == [22]


def test_each_statement_is_matched_against_its_own_probe_commits() -> None:
    probes = [(0, 5), (20, 60), (70, 75), (90, 300)]
    statements = [(10, 50), (65, 80), (100, 200)]
    assert less_overlap(statements, probes) == [10, 10, 0]


def test_no_probe_commits_leave_the_durations_as_they_are() -> None:
    assert less_overlap([(0, 7), (10, 30)], []) == [7, 20]


async def _tables(backend: bench.Backend) -> set[str]:
    engine = backend.engine()
    try:
        async with engine.connect() as conn:
            names = await conn.run_sync(lambda sync: inspect(sync).get_table_names())
    finally:
        await engine.dispose()
    return set(names)


@pytest.mark.parametrize("backend_name", ["postgresql", "mysql"])
async def test_the_commit_probe_commits_then_drops_its_table_when_the_run_fails(
    backend_name: str, tmp_path: Path
) -> None:
    backend = bench.make_backend(
        backend_name, server_url(backend_name), tmp_path, bench.new_table_name()
    )
    probe = prune.CommitProbe(backend, backend.table)

    with pytest.raises(RuntimeError, match="the run failed"):
        async with probe:
            assert probe.table in await _tables(backend)
            await asyncio.sleep(10 * prune.CommitProbe.INTERVAL_S)
            raise RuntimeError("the run failed")

    assert probe.table not in await _tables(backend)
    # A commit every 20 ms, each well under that here: several in 0.2 s.
    assert len(probe.spans) >= 2, probe.spans
    assert all(start < end for start, end in probe.spans)


async def test_the_disk_probe_flushes_in_a_process_of_its_own_and_leaves_no_file(
    tmp_path: Path,
) -> None:
    async with prune.DiskProbe(str(tmp_path)) as probe:
        started = asyncio.get_running_loop().time()
        await asyncio.sleep(0.3)
    assert 3 <= len(probe.spans) <= 0.3 / prune.DiskProbe.INTERVAL_S + 2, probe.spans
    # One flush after another, on this process's clock, within the block.
    assert all(start < end for start, end in probe.spans)
    assert all(a[1] <= b[0] for a, b in zip(probe.spans, probe.spans[1:], strict=False))
    assert probe.spans[0][0] >= started * 1e9 - 1e8
    assert probe.during(probe.spans[1][0], probe.spans[-1][0]) == [
        end - start for start, end in probe.spans[1:]
    ]
    assert os.listdir(tmp_path) == []


async def test_a_disk_probe_that_cannot_write_names_its_folder(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-folder"
    with pytest.raises(RuntimeError, match="no-such-folder") as raised:
        async with prune.DiskProbe(str(missing)):
            pass
    assert "FileNotFoundError" in str(raised.value)

    # When the run itself fails, its error is kept and the probe's becomes a note.
    with pytest.raises(ValueError, match="the run failed") as raised_run:
        async with prune.DiskProbe(str(missing)):
            raise ValueError("the run failed")
    assert any("disk probe failed too" in note for note in raised_run.value.__notes__)


def test_the_disk_probe_runs_only_where_the_database_is_on_this_machine(tmp_path: Path) -> None:
    def backend(name: str, url: str) -> bench.Backend:
        return bench.Backend(name=name, url=url, table="t")

    sqlite = backend("sqlite", f"sqlite+aiosqlite:///{tmp_path / 'bench.db'}")
    assert prune.disk_probe_directory(sqlite) == str(tmp_path)
    local = backend("postgresql", "postgresql+asyncpg://postgres@127.0.0.1:5432/test")
    assert prune.disk_probe_directory(local) is not None
    remote = backend("mysql", "mysql+asyncmy://root@db.example:3306/test")
    assert prune.disk_probe_directory(remote) is None
    assert prune.disk_probe_directory(remote, str(tmp_path)) == str(tmp_path)
