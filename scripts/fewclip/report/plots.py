"""Accuracy-vs-shots plots (``fewclip report --plot``): one PNG per few-shot protocol group, matplotlib only here."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from fewclip.report.stats import STD_DDOF, average_over_datasets, seed_stats
from fewclip.report.tables import ADAPTER_ORDER, STANDARD_DATASETS, build_report, common_datasets, ordered

log = logging.getLogger(__name__)


def plot(df: pd.DataFrame, path: str | Path, shots: Sequence[int] | None = None,
         ddof: int = STD_DDOF) -> list[Path]:
    """Accuracy-vs-shots curves: one subplot per dataset plus "Average", one line per adapter, ±std bands.

    One PNG per few-shot protocol group (base-to-novel groups have no shot axis and are skipped): the largest
    group is written to ``path``, further groups to ``<stem>_p<i><suffix>``. The Average panel averages the
    datasets present for every (adapter, shots), as the "over datasets" table does. Returns the files written.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError("plotting needs matplotlib: pip install 'fewclip[report]'") from e

    report = build_report(df, shots=shots, ddof=ddof)
    groups = [g for g in report.groups if not g.is_base_to_novel]
    for g in report.groups:
        if g.is_base_to_novel:
            log.info("not plotting base-to-novel group %s (no shot axis)", g.key)
    path = Path(path)
    written: list[Path] = []
    for i, g in enumerate(groups):
        runs = g.runs
        stats = seed_stats(runs, "test_acc", ddof)
        datasets = ordered(runs["dataset"].unique(), STANDARD_DATASETS)
        common, _ = common_datasets(runs, ["adapter", "shots"])
        adapters = ordered(runs["adapter"].unique(), ADAPTER_ORDER)
        panels = [*datasets, "Average"] if common else datasets
        ncols = min(4, len(panels))
        nrows = math.ceil(len(panels) / ncols)
        # A bare Figure renders through Agg on savefig without touching pyplot's global backend.
        fig = Figure(figsize=(3.4 * ncols, 2.8 * nrows + 0.6), layout="constrained")
        axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
        all_shots = sorted(runs["shots"].unique())
        for ax, panel in zip(axes, panels):
            for j, a in enumerate(adapters):
                color = f"C{j % 10}"
                if panel == "Average":
                    ar = runs[runs["adapter"] == a]
                    pts = [(k, *average_over_datasets(ar[ar["shots"] == k], common, "test_acc", ddof)[:2])
                           for k in sorted(ar["shots"].unique())]
                else:
                    st = stats[(stats["adapter"] == a) & (stats["dataset"] == panel)].sort_values("shots")
                    pts = list(zip(st["shots"], st["mean"], st["std"]))
                if not pts:
                    continue
                x = np.array([p[0] for p in pts], dtype=float)
                m = np.array([p[1] for p in pts], dtype=float)
                s = np.nan_to_num(np.array([p[2] for p in pts], dtype=float))
                if a == "zero_shot" and len(x) == 1:
                    # Zero-shot does not use the shots: a flat reference line reads better than one dot.
                    ax.axhline(m[0], color=color, linestyle="--", linewidth=1.2, label=a)
                    continue
                ax.plot(x, m, marker="o", markersize=3, color=color, label=a)
                ax.fill_between(x, m - s, m + s, color=color, alpha=0.2, linewidth=0)
            ax.set_title(panel if panel != "Average" else f"Average ({len(common)} datasets)", fontsize=9)
            ax.set_xscale("log", base=2)
            ax.set_xticks(all_shots, [str(k) for k in all_shots])
            ax.minorticks_off()
            ax.grid(alpha=0.3)
            ax.tick_params(labelsize=8)
        for ax in axes[len(panels):]:
            ax.set_visible(False)
        fig.supxlabel("shots per class", fontsize=9)
        fig.supylabel("top-1 test accuracy (%)", fontsize=9)
        handles, labels = axes[0].get_legend_handles_labels()
        for ax in axes[1:len(panels)]:
            for h, lab in zip(*ax.get_legend_handles_labels()):
                if lab not in labels:
                    handles.append(h)
                    labels.append(lab)
        fig.legend(handles, labels, loc="outside right center", fontsize=8)
        fig.suptitle(g.key.replace("|", "  "), fontsize=8)
        target = path if i == 0 else path.with_name(f"{path.stem}_p{i + 1}{path.suffix}")
        target.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(target, dpi=120, format="png")
        log.info("wrote %s", target)
        written.append(target)
    if not groups:
        log.warning("nothing to plot: no few-shot (subsample=all) runs")
    return written
