"""Import time (benchmark g): ``import aiocronlock`` vs ``import sqlalchemy.ext.asyncio``.

Each import runs in a fresh interpreter that times only the import statement, both
in CPU time (``time.process_time``: the work the import does, which other load on
the machine barely changes) and in wall time. The two imports alternate, after one
discarded run of each, which also writes bytecode caches: the interpreters run
without ``PYTHONDONTWRITEBYTECODE``, since an installed package has its bytecode and
compiling aiocronlock's sources on every run would be measured instead. ``python -X importtime``
then names the modules aiocronlock brings in beyond SQLAlchemy's asyncio extension.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys

from ._stats import Ratio, Section, ms, ratio, times

#: The issue's target: importing aiocronlock adds at most this much to SQLAlchemy's own.
ADDED_TARGET_MS = 30.0
LIB, BASE = "aiocronlock", "sqlalchemy.ext.asyncio"
_TIMED = (
    "import time; {}c, w = time.process_time(), time.perf_counter(); import {}; "
    "print(time.process_time() - c, time.perf_counter() - w)"
)
#: The third contender: aiocronlock imported where SQLAlchemy's extension already is,
#: which times exactly what it adds, free of the noise of two separate medians.
ADDED = f"{LIB} after {BASE}"


def _environment() -> dict[str, str]:
    """This process's environment, with bytecode caches allowed (see the docstring)."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def _time_import(module: str) -> tuple[float, float]:
    """CPU and wall milliseconds of ``import module`` in a fresh interpreter.

    ``module`` may be ``ADDED``: then SQLAlchemy's extension is imported first, untimed.
    """
    before = f"import {BASE}; " if module == ADDED else ""
    out = subprocess.run(
        [sys.executable, "-c", _TIMED.format(before, LIB if module == ADDED else module)],
        capture_output=True,
        text=True,
        check=True,
        env=_environment(),
    )
    cpu, wall = out.stdout.split()
    return float(cpu) * 1000, float(wall) * 1000


def _import_tree(module: str) -> dict[str, tuple[int, int]]:
    """``-X importtime``: module name -> (self us, cumulative us)."""
    out = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", f"import {module}"],
        capture_output=True,
        text=True,
        check=True,
        env=_environment(),
    )
    tree = {}
    for line in out.stderr.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        own, cumulative, name = line.removeprefix("import time:").split("|")
        tree[name.strip()] = (int(own), int(cumulative))
    return tree


def extra_modules() -> dict[str, float]:
    """The modules only aiocronlock imports, with their own import time in ms, largest first."""
    lib, base = _import_tree(LIB), _import_tree(BASE)
    extra = {name: own / 1000 for name, (own, _) in lib.items() if name not in base}
    return dict(sorted(extra.items(), key=lambda item: -item[1]))


def run(*, repeats: int) -> Section:
    contenders = (BASE, LIB, ADDED)
    cpu: dict[str, list[float]] = {name: [] for name in contenders}
    wall: dict[str, list[float]] = {name: [] for name in contenders}
    for r in range(repeats + 1):
        for module in contenders[r % 3 :] + contenders[: r % 3]:
            cpu_ms, wall_ms = _time_import(module)
            if r:
                cpu[module].append(cpu_ms)
                wall[module].append(wall_ms)
    cpu_median = {name: statistics.median(values) for name, values in cpu.items()}
    wall_median = {name: statistics.median(values) for name, values in wall.items()}
    added_cpu = cpu_median[ADDED]
    added_wall = wall_median[ADDED]
    extras = extra_modules()
    rows = [
        [
            f"import {name}",
            str(len(cpu[name])),
            ms(cpu_median[name]),
            ms(min(cpu[name])),
            ms(wall_median[name]),
            ms(min(wall[name])),
            times(ratio(cpu_median[name], cpu_median[BASE])) if name != ADDED else "-",
        ]
        for name in contenders
    ]
    return Section(
        benchmark="import_time",
        backend="python",
        title="fresh interpreters, the import statement alone (CPU and wall time)",
        columns=[
            "import",
            "n",
            "cpu median ms",
            "cpu min ms",
            "wall median ms",
            "wall min ms",
            "ratio",
        ],
        rows=rows,
        ratios=[
            Ratio(
                "import_time",
                "python",
                f"import {ADDED} (median CPU)",
                added_cpu,
                ADDED_TARGET_MS,
                unit=" ms",
            ),
            Ratio("import_time", "python", f"import {ADDED} (median wall)", added_wall, unit=" ms"),
            Ratio(
                "import_time",
                "python",
                "aiocronlock / sqlalchemy.ext.asyncio (CPU)",
                ratio(cpu_median[LIB], cpu_median[BASE]),
            ),
        ],
        figures={
            "cpu_median_ms": cpu_median,
            "wall_median_ms": wall_median,
            "added_cpu_ms": added_cpu,
            "added_wall_ms": added_wall,
            "cpu_samples_ms": cpu,
            "wall_samples_ms": wall,
            "extra_modules_self_ms": extras,
        },
    )


def describe_extras(section: Section, top: int = 8) -> str:
    """A line naming the heaviest modules aiocronlock adds (from ``-X importtime``)."""
    extras: dict[str, float] = section.figures["extra_modules_self_ms"]
    names = ", ".join(f"{name} {own:.1f}" for name, own in list(extras.items())[:top])
    return (
        f"  -X importtime: {len(extras)} modules only aiocronlock imports, "
        f"{sum(extras.values()):.1f} ms of own time in all; heaviest (ms): {names}"
    )
