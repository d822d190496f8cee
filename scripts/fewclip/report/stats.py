"""The statistics of the report: mean and std over seeds, averages over datasets, the base-to-novel HM.

A cell is the mean over seeds and the **population** standard deviation over seeds (``ddof=0``, :data:`STD_DDOF`),
the convention of CoOp/Dassl's ``parse_test_res`` that produced most published ± values in this literature, so our
spreads compare like for like. With one seed there is no spread: std is NaN. An average over datasets is the mean
of the per-dataset seed means; its std is the std over seeds of the per-seed dataset average, given only when
every seed exists for every dataset averaged. HM is ``2 B N / (B + N)`` of the (seed- and dataset-averaged) Base
and Novel accuracies, the CoOp/CoCoOp convention.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import pandas as pd

STD_DDOF = 0
"""Delta degrees of freedom for the std over seeds (0: population std, as CoOp/Dassl's ``parse_test_res``)."""


def harmonic_mean(base: float, novel: float) -> float:
    """HM = 2 B N / (B + N); NaN when either is missing, 0 when both are 0."""
    if not (np.isfinite(base) and np.isfinite(novel)):
        return math.nan
    return 0.0 if base + novel == 0 else 2.0 * base * novel / (base + novel)


def seed_stats(runs: pd.DataFrame, value: str = "test_acc", ddof: int = STD_DDOF) -> pd.DataFrame:
    """Mean, std and seed count of ``value`` per (protocol, adapter, dataset, shots).

    Returns a frame with those four key columns and ``mean``, ``std`` (NaN for a single seed), ``n_seeds``.
    """
    keys = ["protocol", "adapter", "dataset", "shots"]
    sub = runs.dropna(subset=[value])
    g = sub.groupby(keys, sort=True)[value]
    out = pd.DataFrame({"mean": g.mean(), "std": g.std(ddof=ddof), "n_seeds": g.count()}).reset_index()
    out.loc[out["n_seeds"] < 2, "std"] = math.nan
    return out


def average_over_datasets(runs: pd.DataFrame, datasets: Iterable[str], value: str = "test_acc",
                          ddof: int = STD_DDOF) -> tuple[float, float, int]:
    """Average of ``value`` over ``datasets`` for the runs of one (adapter, shots): (mean, std, n_seeds).

    mean is the mean of the per-dataset seed means. std is the std over seeds of the per-seed average over the
    datasets, NaN unless every seed exists for every dataset (otherwise the per-seed averages would mix different
    dataset sets) and there are at least two seeds; n_seeds counts the seeds present for every dataset.
    """
    ds = list(datasets)
    sub = runs[runs["dataset"].isin(ds)].dropna(subset=[value])
    if sub.empty:
        return math.nan, math.nan, 0
    mean = float(sub.groupby("dataset")[value].mean().reindex(ds).mean(skipna=False))
    wide = sub.pivot_table(index="seed", columns="dataset", values=value, aggfunc="mean").reindex(columns=ds)
    complete = wide.dropna()
    std = math.nan
    if len(complete) == len(wide) and len(complete) >= 2:
        std = float(complete.mean(axis=1).std(ddof=ddof))
    return mean, std, len(complete)
