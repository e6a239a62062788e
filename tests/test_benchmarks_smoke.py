"""The benchmark suite still runs: ``python -m benchmarks --smoke`` against each backend.

Only completion and output shape are checked (exit 0, a ratio line per benchmark, the
JSON and chart written); timings are never asserted here. The figures themselves
live in ``benchmarks/README.md``.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import server_url

ROOT = Path(__file__).resolve().parents[1]
PER_BACKEND = ("acquire_won", "acquire_lost", "orm_naive", "contention", "many_jobs", "prune")


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize("backend_name", ["sqlite", "postgresql", "mysql"])
def test_smoke_run_prints_a_ratio_for_each_benchmark(backend_name: str, tmp_path: Path) -> None:
    command = [
        sys.executable,
        "-m",
        "benchmarks",
        "--smoke",
        "--backend",
        backend_name,
        "--out",
        str(tmp_path),
    ]
    expected = {name: backend_name for name in PER_BACKEND}
    if backend_name == "sqlite":
        expected["import_time"] = "python"  # backend-independent: checked once
    else:
        command += [f"--{backend_name}-url", server_url(backend_name)]
        command += ["--only", "acquire,contention,many,prune"]

    result = subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=230, check=False
    )

    output = f"stdout:\n{result.stdout[-4000:]}\nstderr:\n{result.stderr[-4000:]}"
    assert result.returncode == 0, output
    for benchmark, label in expected.items():
        pattern = rf"^ratio {benchmark} \[{label}\] .+ = \S+"
        assert re.search(pattern, result.stdout, re.MULTILINE), (
            f"no ratio for {benchmark}\n{output}"
        )
    written = json.loads((tmp_path / "latest.json").read_text())
    assert {s["benchmark"] for s in written["sections"]} == set(expected)
    assert (tmp_path / "latency.png").stat().st_size > 0
