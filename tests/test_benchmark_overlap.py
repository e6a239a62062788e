"""The pruning benchmark's DELETE time less its overlap with a probe commit on another
table (``benchmarks.prune.less_overlap``): pure arithmetic on spans, no database."""

from __future__ import annotations

from benchmarks.prune import less_overlap


def test_a_statement_no_probe_commit_overlaps_keeps_its_whole_duration() -> None:
    assert less_overlap([(100, 150)], [(10, 20), (200, 210)]) == [50]


def test_a_statement_inside_one_stalled_probe_commit_has_nothing_beyond_it() -> None:
    assert less_overlap([(100, 150)], [(90, 160)]) == [0]


def test_only_the_part_of_a_probe_commit_inside_the_statement_counts() -> None:
    # In flight when the statement began, stalled until 130: 30 of the 50 were a pause.
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
