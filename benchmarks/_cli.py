"""``python -m benchmarks``: run the benchmarks, print the tables, write JSON and a chart."""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from . import acquire, contention, import_time, many_jobs, prune
from ._backends import (
    BACKENDS,
    Backend,
    drop_tables,
    durability,
    make_backend,
    new_table_name,
    server_version,
    unreachable,
)
from ._capture import Statement
from ._report import describe, machine, targets_table, write_chart, write_json
from ._stats import Section

BENCHMARKS = ("acquire", "contention", "many", "prune", "import")
RESULTS = Path(__file__).parent / "results"


@dataclass(frozen=True)
class Config:
    iterations: int
    rounds: int
    warmup: int
    processes: list[int]
    concurrency: int
    ticks: int
    contention_rounds: int
    prune_rows: int
    probes: int
    clean_batch_size: int | None
    disk_probe_dir: str | None
    jobs: int
    many_rounds: int
    import_repeats: int


FULL = Config(
    iterations=2000,
    rounds=10,
    warmup=100,
    processes=[2, 4],
    concurrency=8,
    ticks=200,
    contention_rounds=6,
    prune_rows=1_000_000,
    probes=2000,
    clean_batch_size=None,
    disk_probe_dir=None,
    jobs=500,
    many_rounds=15,
    import_repeats=15,
)
SMOKE = Config(
    iterations=300,
    rounds=3,
    warmup=20,
    processes=[2],
    concurrency=4,
    ticks=40,
    contention_rounds=1,
    prune_rows=20_000,
    probes=200,
    clean_batch_size=None,
    disk_probe_dir=None,
    jobs=100,
    many_rounds=2,
    import_repeats=3,
)


def _csv(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=(
            "Benchmark aiocronlock against the raw asyncio drivers (and a naive ORM port), "
            "measuring both in the same run and printing ratios."
        ),
    )
    parser.add_argument(
        "--backend",
        default=",".join(BACKENDS),
        help="comma-separated backends: postgresql, mysql, sqlite (default: all three)",
    )
    parser.add_argument(
        "--only",
        default=",".join(BENCHMARKS),
        help=f"comma-separated benchmarks to run (default: all of {', '.join(BENCHMARKS)})",
    )
    parser.add_argument("--smoke", action="store_true", help="a quick run with small sizes")
    parser.add_argument("--iterations", type=int, help="acquire calls per contender and phase")
    parser.add_argument("--prune-rows", type=int, help="expired rows in the pruning table")
    parser.add_argument(
        "--clean-batch-size",
        type=int,
        help="pruning: the locker's clean_batch_size (default: the library's default)",
    )
    parser.add_argument(
        "--disk-probe-dir",
        help=(
            "pruning: where a separate process flushes 4 KiB every 20 ms to watch the disk "
            "(default: the SQLite file's folder, or benchmarks/ for a server on this "
            "machine; none for a server elsewhere)"
        ),
    )
    parser.add_argument("--processes", help="contention: comma-separated process counts")
    parser.add_argument("--concurrency", type=int, help="contention: callers per process")
    parser.add_argument("--ticks", type=int, help="contention: ticks per phase")
    parser.add_argument(
        "--out",
        type=Path,
        help=f"where to write results (default: {RESULTS}, or its smoke/ folder with --smoke)",
    )
    parser.add_argument(
        "--postgresql-url", help="default: $AIOCRONLOCK_BENCH_POSTGRES_URL or local"
    )
    parser.add_argument("--mysql-url", help="default: $AIOCRONLOCK_BENCH_MYSQL_URL or local")
    return parser.parse_args(argv)


def make_config(args: argparse.Namespace) -> Config:
    config = asdict(SMOKE if args.smoke else FULL)
    if args.iterations is not None:
        config["iterations"] = args.iterations
    if args.prune_rows is not None:
        config["prune_rows"] = args.prune_rows
    if args.clean_batch_size is not None:
        config["clean_batch_size"] = args.clean_batch_size
    if args.disk_probe_dir is not None:
        config["disk_probe_dir"] = args.disk_probe_dir
    if args.processes is not None:
        config["processes"] = [int(p) for p in _csv(args.processes)]
    if args.concurrency is not None:
        config["concurrency"] = args.concurrency
    if args.ticks is not None:
        config["ticks"] = args.ticks
    return Config(**config)


def emit(section: Section, sections: list[Section]) -> None:
    sections.append(section)
    print(section.render() + "\n", flush=True)


async def _create_table(backend: Backend) -> Statement:
    locker = backend.locker()
    try:
        await locker.create_table()
        return await acquire.capture_acquire(locker, datetime.now(UTC))
    finally:
        await locker.aclose()


def run_backend(
    backend: Backend,
    config: Config,
    only: list[str],
    sections: list[Section],
    chart: dict[str, dict[str, dict[str, list[float]]]],
) -> None:
    statement = asyncio.run(_create_table(backend))
    if "acquire" in only:
        result = asyncio.run(
            acquire.run(
                backend, iterations=config.iterations, rounds=config.rounds, warmup=config.warmup
            )
        )
        chart[backend.name] = result.samples_ms
        for section in result.sections:
            emit(section, sections)
    if "contention" in only:
        emit(
            contention.run(
                backend,
                statement,
                process_counts=config.processes,
                concurrency=config.concurrency,
                ticks=config.ticks,
                rounds=config.contention_rounds,
            ),
            sections,
        )
    if "many" in only:
        emit(
            asyncio.run(many_jobs.run(backend, jobs=config.jobs, rounds=config.many_rounds)),
            sections,
        )
    if "prune" in only:
        emit(
            asyncio.run(
                prune.run(
                    backend,
                    expired=config.prune_rows,
                    probes=config.probes,
                    batch_size=config.clean_batch_size,
                    disk_probe_dir=config.disk_probe_dir,
                )
            ),
            sections,
        )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config = make_config(args)
    names = _csv(args.backend)
    only = _csv(args.only)
    for name in names:
        if name not in BACKENDS:
            print(f"unknown backend {name!r}: choose from {', '.join(BACKENDS)}", file=sys.stderr)
            return 2
    for bench in only:
        if bench not in BENCHMARKS:
            print(
                f"unknown benchmark {bench!r}: choose from {', '.join(BENCHMARKS)}", file=sys.stderr
            )
            return 2
    urls = {"postgresql": args.postgresql_url, "mysql": args.mysql_url, "sqlite": None}
    sqlite_dir = Path(tempfile.mkdtemp(prefix="aiocronlock-bench-"))
    table = new_table_name()
    backends = [make_backend(name, urls[name], sqlite_dir, table) for name in names]
    for backend in backends:
        problem = unreachable(backend.url)
        if problem:
            print(f"{backend.name} server not reachable: {problem}", file=sys.stderr)
            return 2

    out: Path = args.out or (RESULTS / "smoke" if args.smoke else RESULTS)
    started = time.perf_counter()
    info = machine()
    info["servers"] = {b.name: asyncio.run(server_version(b)) for b in backends}
    info["durability"] = {b.name: asyncio.run(durability(b)) for b in backends}
    print(describe(info))
    print(f"mode: {'smoke' if args.smoke else 'full'}; table {table}; config {asdict(config)}\n")
    if os.getloadavg()[0] > (os.cpu_count() or 1):
        print(
            "warning: the machine is busy (load average above its core count); "
            "absolute times will be noisy, ratios less so\n"
        )

    sections: list[Section] = []
    chart: dict[str, dict[str, dict[str, list[float]]]] = {}
    try:
        for backend in backends:
            try:
                run_backend(backend, config, only, sections, chart)
            finally:
                try:
                    asyncio.run(drop_tables(backend, table, f"{table}_prune"))
                finally:
                    asyncio.run(prune.drop_probe_table(backend, f"{table}_prune"))
        if "import" in only:
            section = import_time.run(repeats=config.import_repeats)
            emit(section, sections)
            print(import_time.describe_extras(section) + "\n")
    finally:
        shutil.rmtree(sqlite_dir, ignore_errors=True)

    summary = targets_table([r for s in sections for r in s.ratios])
    print(summary.render() + "\n")
    info["loadavg_at_end"] = list(os.getloadavg())
    info["duration_s"] = round(time.perf_counter() - started, 1)
    out.mkdir(parents=True, exist_ok=True)
    run_config: dict[str, Any] = {
        "mode": "smoke" if args.smoke else "full",
        "backends": names,
        "benchmarks": only,
        **asdict(config),
    }
    write_json(out / "latest.json", info, run_config, sections)
    written = [out / "latest.json"]
    if chart:
        write_chart(out / "latency.png", chart)
        written.append(out / "latency.png")
    print(f"wrote {', '.join(str(p) for p in written)} in {info['duration_s']} s")
    return 0
