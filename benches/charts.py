"""Charts of one benchmark run, from the same pytest-benchmark JSON that compare.py turns into tables.

Usage: python benches/charts.py .benchmarks/latest.json [OUT_DIR]   (default OUT_DIR: docs/benchmarks)

One PNG per job (save, sharded, load, convert, checkpoint, and any other job the run has: the first
word of a group names its job). Each of the job's benchmark groups (an adapter in a setting: `save llama
(new_dir)`, ...) is one panel: a bar per contender, the median time of its pooled rounds, fastadapter
first, the peers after it, the ceilings last and hatched; each bar is labelled with its time and its
ratio to fastadapter's. The time axis is shared by the panels of one row, so a row compares settings of
one adapter on one scale.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt

from compare import CEILINGS, OURS, Result, load, machine_line

OURS_COLOUR, OURS_VARIANT_COLOUR, PEER_COLOUR, CEILING_COLOUR = "#1f77b4", "#9ecae1", "#bbbbbb", "#2ca02c"


def job_of(group: str) -> str:
    """The job a group belongs to is its first word: `save llama (new_dir)` -> save, `checkpoint sync
    many (fsync)` -> checkpoint, `convert_2GiB_bf16` -> convert, `load-cuda 1GB` -> load-cuda. Every job
    in the JSON gets its chart, whichever benchmark files the run included."""
    return re.split(r"[\s_]", group, maxsplit=1)[0].lower()


def rows_of(groups: dict[str, list[Result]]) -> list[list[str]]:
    """Panels in rows: groups that differ only in their parenthesised setting share a row."""
    rows: dict[str, list[str]] = {}
    for group in groups:
        rows.setdefault(group.split(" (")[0], []).append(group)
    return list(rows.values())


def colour(contender: str) -> str:
    if contender == OURS:
        return OURS_COLOUR
    if contender.startswith(OURS + "_"):  # fastadapter in another mode or host (sync, fsync, PEFT's layers)
        return OURS_VARIANT_COLOUR
    return CEILING_COLOUR if contender in CEILINGS else PEER_COLOUR


def panel(ax: plt.Axes, group: str, results: list[Result]) -> None:
    ours = next((r for r in results if r.contender == OURS), None)
    names = [r.contender for r in results]
    times = [r.median_s * 1e3 for r in results]
    bars = ax.barh(names, times, color=[colour(n) for n in names])
    for bar, r in zip(bars, results, strict=True):
        if r.contender in CEILINGS:
            bar.set_hatch("//")
        label = f" {r.median_s * 1e3:.1f} ms"
        if ours is not None and r.contender != OURS:
            label += f" ({r.median_s / ours.median_s:.2f}x)"
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, label, va="center", fontsize=8)
    ax.invert_yaxis()  # fastadapter on top
    ax.set_title(f"{group}\n{results[0].nbytes / 1e6:.0f} MB, {results[0].tensors} tensors", fontsize=9)
    ax.set_xlabel("median time (ms), lower is better", fontsize=8)
    ax.tick_params(labelsize=8)
    ax.margins(x=0.35)


def chart(job: str, groups: dict[str, list[Result]], subtitle: str, out: Path) -> Path:
    rows = rows_of(groups)
    columns = max(len(r) for r in rows)
    fig, axes = plt.subplots(
        len(rows),
        columns,
        # At least two columns' width: one would not fit the title line.
        figsize=(4.6 * max(columns, 2), 0.45 * _bars(groups) / len(rows) + 1.6 * len(rows) + 0.6),
        squeeze=False,
    )
    for i, row in enumerate(rows):
        for j in range(columns):
            ax = axes[i][j]
            if j >= len(row):
                ax.axis("off")
                continue
            panel(ax, row[j], groups[row[j]])
            if j > 0:
                ax.sharex(axes[i][0])
    fig.suptitle(
        f"{job}: fastadapter (blue; its other modes light blue), peers (grey), ceilings (green, hatched)"
        f"\n{subtitle.replace('; run ', chr(10) + 'run ')}",  # the run's date on its own line: narrow charts
        fontsize=9,
    )
    fig.tight_layout()
    path = out / f"{job}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _bars(groups: dict[str, list[Result]]) -> int:
    return max(len(r) for r in groups.values()) * len(groups)


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3):
        print(f"usage: {argv[0]} BENCHMARK_JSON [OUT_DIR]", file=sys.stderr)
        return 2
    data, groups = load(argv[1])
    out = Path(argv[2] if len(argv) == 3 else os.path.join("docs", "benchmarks"))
    out.mkdir(parents=True, exist_ok=True)
    by_job: dict[str, dict[str, list[Result]]] = {}
    for group, results in groups.items():
        by_job.setdefault(job_of(group), {})[group] = results
    subtitle = machine_line(data)
    for job, job_groups in by_job.items():
        print(f"chart: {chart(job, job_groups, subtitle, out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
