"""Outputs: the machine description, ``latest.json`` and the latency chart."""

from __future__ import annotations

import json
import os
import platform
import sys
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any

from ._stats import Ratio, Section


def machine() -> dict[str, Any]:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.partition(":")[2].strip()
                break
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu or platform.processor(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "packages": {
            name: version(name)
            for name in ("aiocronlock", "SQLAlchemy", "asyncpg", "asyncmy", "aiosqlite")
        },
        "loadavg_at_start": list(os.getloadavg()),
    }


def describe(info: dict[str, Any]) -> str:
    packages = ", ".join(f"{k} {v}" for k, v in info["packages"].items())
    servers = "; ".join(info.get("servers", {}).values())
    durability = "; ".join(f"{k}: {v}" for k, v in info.get("durability", {}).items())
    load = " ".join(f"{x:.2f}" for x in info["loadavg_at_start"])
    return (
        f"machine: {info['nproc']} cores ({info['cpu']}), Python {info['python']}, "
        f"{info['platform']}\n"
        f"packages: {packages}\n"
        f"servers: {servers or '-'}\n"
        f"durability: {durability or '-'}\n"
        f"load average at start: {load}"
    )


def targets_table(ratios: list[Ratio]) -> Section:
    checked = [r for r in ratios if r.limit is not None]
    return Section(
        benchmark="targets",
        backend="all",
        title="the issue's targets",
        columns=["benchmark", "backend", "measured", "target", "verdict"],
        rows=[
            [f"{r.benchmark}: {r.what}", r.backend, f"{r.value:.2f}{r.unit}", r.target, r.verdict]
            for r in checked
        ],
        ratios=[],
    )


def write_json(
    path: Path, info: dict[str, Any], config: dict[str, Any], sections: list[Section]
) -> None:
    ratios = [r for s in sections for r in s.ratios]
    document = {
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": info,
        "config": config,
        "sections": [s.as_dict() for s in sections],
        "targets": [r.as_dict() for r in ratios if r.limit is not None],
    }
    path.write_text(json.dumps(document, indent=2) + "\n")


def write_chart(path: Path, samples: dict[str, dict[str, dict[str, list[float]]]]) -> None:
    """Box plots of acquire latency: one column per backend, won on top, lost below.

    Boxes span p25-p75, whiskers p1-p99, the line is the median; outliers are not drawn.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    backends = list(samples)
    labels = {
        "raw": "raw driver\n(dedicated)",
        "aiocronlock (url)": "aiocronlock\n(URL)",
        "aiocronlock (engine)": "aiocronlock\n(your engine)",
        "orm": "ORM naive",
    }
    colors = {
        "raw": "#8da0cb",
        "aiocronlock (url)": "#66c2a5",
        "aiocronlock (engine)": "#a6d854",
        "orm": "#fc8d62",
    }
    fig, axes = plt.subplots(
        2, len(backends), figsize=(4.2 * len(backends), 7), squeeze=False, sharey=True
    )
    for col, backend in enumerate(backends):
        for row, phase in enumerate(("won", "lost")):
            ax = axes[row][col]
            names = [n for n in labels if samples[backend][phase].get(n)]
            data = [samples[backend][phase][n] for n in names]
            box = ax.boxplot(
                data,
                whis=(1, 99),
                showfliers=False,
                patch_artist=True,
                widths=0.6,
                medianprops={"color": "black"},
            )
            ax.set_xticks(range(1, len(names) + 1), [labels[n] for n in names])
            for patch, name in zip(box["boxes"], names, strict=True):
                patch.set_facecolor(colors[name])
            for i, values in enumerate(data, start=1):
                median = sorted(values)[len(values) // 2]
                ax.text(i + 0.33, median, f"{median:.2f}", fontsize=8, va="center")
            ax.set_yscale("log")
            ax.set_title(f"{backend}: acquire {phase}", fontsize=10)
            ax.grid(axis="y", which="both", alpha=0.3)
            if col == 0:
                ax.set_ylabel("latency per call, ms (log)")
    fig.suptitle("aiocronlock lock() vs raw driver vs naive ORM (box p25-p75, whiskers p1-p99)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
