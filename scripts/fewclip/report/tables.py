"""The report's tables: runs grouped by protocol, laid out as adapter x dataset (per shot count), adapter x shots
(averaged over datasets) and base-to-novel (Base, Novel, HM), with published values and deltas where comparable.

:func:`build_report` returns a :class:`Report`: per protocol group its :class:`DisplayTable` s (strings, shared by
every renderer in render.py) and one tidy summary row per cell (:data:`SUMMARY_COLUMNS`). Runs from different
protocol groups are never averaged together. The statistics are stats.py's.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from fewclip.report.load import PROTOCOL_FIELDS
from fewclip.report.stats import STD_DDOF, average_over_datasets, harmonic_mean, seed_stats

log = logging.getLogger(__name__)

SUMMARY_COLUMNS = ["protocol", "table", "shots", "adapter", "dataset", "metric", "mean", "std", "n_seeds",
                   "n_datasets", "partial", "published", "delta", "published_source"]

# The 11 CoOp datasets under fewclip's config names; a published 11-dataset average is compared only with an
# Average over exactly these.
STANDARD_DATASETS = ("imagenet", "caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101",
                     "fgvc_aircraft", "sun397", "dtd", "eurosat", "ucf101")

# imagenet_ens is ImageNet with the 7-template ensemble: the same images and classes, so it stands in for
# ImageNet in the 11-dataset set, and falls back to ImageNet's published rows when it has none of its own.
DATASET_ALIASES = {"imagenet_ens": "imagenet"}

BACKBONE_NAMES = {"rn50": "RN50", "vit_b16": "ViT-B/16", "vit_b32": "ViT-B/32"}
"""fewclip backbone config names -> the names papers use (and ``published.csv`` holds)."""

ADAPTER_ORDER = ("zero_shot", "linear_probe", "lp_pp", "clap", "coop", "coop_pixels", "cocoop", "kgcoop", "maple",
                 "dpt", "clip_adapter", "taskres", "tip", "tip_f", "ape", "ape_t", "gda", "auto")


@dataclass
class DisplayTable:
    """A table as strings, shared by the Markdown and LaTeX writers."""

    title: str
    header: list[str]
    rows: list[list[str]]
    notes: list[str] = field(default_factory=list)


@dataclass
class ProtocolGroup:
    """Runs sharing one protocol key, with their tables."""

    key: str
    fields: dict[str, Any]
    runs: pd.DataFrame
    tables: list[DisplayTable] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def is_base_to_novel(self) -> bool:
        return self.fields.get("subsample") == "base"


@dataclass
class Report:
    """Everything :func:`render_markdown`, :func:`write_csv` and :func:`write_latex` need.

    ``summary`` is tidy, one row per table cell: :data:`SUMMARY_COLUMNS`, where ``table`` is ``per_shot``
    (adapter x dataset at one shot count), ``over_datasets`` (adapter x shots, dataset "Average") or
    ``base_to_novel``, and ``metric`` is ``test_acc``, ``base``, ``novel`` or ``hm``.
    """

    runs: pd.DataFrame
    groups: list[ProtocolGroup]
    summary: pd.DataFrame
    notes: list[str]
    ddof: int = STD_DDOF
    compared: bool = False


def ordered(values: Iterable[str], preferred: Sequence[str]) -> list[str]:
    """``values`` in the order of ``preferred``, then the others sorted (adapters and datasets in a table)."""
    vals = set(values)
    head = [v for v in preferred if v in vals]
    return head + sorted(vals - set(head))


def _canonical(dataset: str) -> str:
    return DATASET_ALIASES.get(dataset, dataset)


def comparable_rows(rows: pd.DataFrame, protocol: str) -> tuple[pd.DataFrame, list[tuple[pd.DataFrame, str, str]]]:
    """Published rows a run of ``protocol`` may be compared with, and the others as ``(rows, tag, reason)``.

    Comparable: the row's protocol is the run's (``reference`` rows come from the methods' own recipes) or
    ``any`` (nothing was selected, as zero-shot), no extra data, and nothing selected on test (fewclip never does).
    """
    other_protocol = ~rows["protocol"].isin([protocol, "any"])
    extra = rows["extra_data"] != "none"
    on_test = rows["selection_on_test"] != "no"
    skipped = [(rows[other_protocol], "protocol", f"published under protocol '{{}}', this group ran "
                f"protocol={protocol}" + (" (protocol=reference runs compare with them)" if protocol == "fewshot"
                                          else "")),
               (rows[~other_protocol & extra], "extra_data", "extra data: {}"),
               (rows[~other_protocol & ~extra & on_test], "selection_on_test", "selection on test: {}")]
    return rows[~other_protocol & ~extra & ~on_test], skipped


class _Published:
    """Lookups into the published table for one protocol group (or none when not comparable)."""

    def __init__(self, pub: pd.DataFrame | None, fields: Mapping[str, Any], notes: list[str],
                 adapters: Iterable[str] = ()) -> None:
        from caches.weights_id import is_openai

        self.rows: pd.DataFrame | None = None
        if pub is None:
            return
        backbone = str(fields["backbone"])
        name = BACKBONE_NAMES.get(backbone)
        have = sorted(set(pub["backbone"]))
        if name is None or name not in have:
            notes.append(f"No published numbers for backbone {backbone} (the published table covers "
                         f"{', '.join(have)}).")
            return
        weights = fields.get("backbone_weights")
        if weights is not None and not is_openai(weights):
            notes.append(f"Published numbers use OpenAI's weights (the openai tag, or a file with an OpenAI release "
                         f"hash); this group uses {weights}, so none are compared.")
            return
        rows = pub[(pub["backbone"] == name) & pub["adapter"].isin(list(adapters))]
        self.rows, skipped = comparable_rows(rows, str(fields.get("protocol_name") or "fewshot"))
        for part, tag, reason in skipped:
            for (adapter, value), g in part.groupby(["adapter", tag]):
                notes.append(f"Published {adapter} rows skipped ({len(g)}): {reason.format(value)}.")
        if fields.get("templates") not in (None, "default"):
            notes.append("This group uses custom prompt templates; the published numbers use each dataset's "
                         "standard templates, so deltas mix the two effects.")

    def get(self, adapter: str, dataset: str, shots: int, metric: str) -> tuple[float, str | None]:
        if self.rows is None:
            return math.nan, None
        r = self.rows[(self.rows["adapter"] == adapter) & (self.rows["metric"] == metric)
                      & ((self.rows["shots"] == shots) | self.rows["shots"].isna())]
        # Exact dataset only: the published rows name their templates (imagenet: one, imagenet_ens: CLIP's 7).
        for name in (dataset,):
            hit = r[r["dataset"] == name]
            if len(hit):
                # An exact shot count beats a shot-independent row (zero-shot).
                hit = hit.sort_values("shots", na_position="last")
                return float(hit["value"].iloc[0]), str(hit["source"].iloc[0])
        return math.nan, None


def _fmt(mean: float, std: float, n: int, n_full: int) -> str:
    if not np.isfinite(mean):
        return ""
    s = f"{mean:.2f} ± {std:.2f}" if np.isfinite(std) else f"{mean:.2f} ± -" if n == 1 else f"{mean:.2f}"
    if 0 < n < n_full:
        s += f" (n={n})"
    return s


def _with_pub(cell: str, pub: float, mean: float) -> str:
    if not cell or not np.isfinite(pub):
        return cell
    return f"{cell} (pub {pub:.2f}, Δ {mean - pub:+.2f})"


def _is_standard_set(datasets: Iterable[str]) -> bool:
    canon = [_canonical(d) for d in datasets]
    return len(canon) == len(set(canon)) and set(canon) == set(STANDARD_DATASETS)


def _record(group: ProtocolGroup, table: str, shots: int, adapter: str, dataset: str, metric: str, mean: float,
            std: float, n: int, pub: tuple[float, str | None], n_datasets: float = math.nan,
            partial: bool = False) -> dict[str, Any]:
    value, source = pub
    return {"protocol": group.key, "table": table, "shots": int(shots), "adapter": adapter, "dataset": dataset,
            "metric": metric, "mean": mean, "std": std, "n_seeds": int(n), "n_datasets": n_datasets,
            "partial": bool(partial), "published": value,
            "delta": mean - value if np.isfinite(value) else math.nan, "published_source": source}


def common_datasets(cells: pd.DataFrame, by: list[str]) -> tuple[list[str], list[str]]:
    """Datasets present in every ``by`` cell (ordered) and the others present somewhere."""
    sets = [set(g["dataset"]) for _, g in cells.groupby(by)]
    union = set().union(*sets) if sets else set()
    common = set.intersection(*sets) if sets else set()
    return ordered(common, STANDARD_DATASETS), ordered(union - common, STANDARD_DATASETS)


def _shots_label(k: int) -> str:
    return f"{k} shot" if int(k) == 1 else f"{k} shots"


def _cell_label(by: list[str], key: Any) -> str:
    values = dict(zip(by, key if isinstance(key, tuple) else (key,)))
    label = str(values.get("adapter", ""))
    return f"{label} at {_shots_label(values['shots'])}" if "shots" in values else label


def _missing_note(cells: pd.DataFrame, by: list[str], excluded: list[str], common: list[str]) -> str:
    lacking = []
    for d in excluded:
        absent = [_cell_label(by, k) for k, g in cells.groupby(by) if d not in set(g["dataset"])]
        lacking.append(f"{d} (missing for {', '.join(absent)})")
    over = ", ".join(common) if common else "no dataset"
    return f"\\* Average over {over} only; left out: {'; '.join(lacking)}."


def _source_notes(sources: dict[str, str]) -> list[str]:
    return [f"Published ({a}): {s}." for a, s in sources.items()]


def _few_shot_tables(group: ProtocolGroup, pub: _Published, ddof: int) -> list[dict[str, Any]]:
    runs = group.runs
    records: list[dict[str, Any]] = []
    stats = seed_stats(runs, "test_acc", ddof)
    n_full = int(stats["n_seeds"].max()) if len(stats) else 0
    shots_all = sorted(runs["shots"].unique())
    for k in shots_all:
        cells = runs[runs["shots"] == k]
        adapters = ordered(cells["adapter"].unique(), ADAPTER_ORDER)
        datasets = ordered(cells["dataset"].unique(), STANDARD_DATASETS)
        common, excluded = common_datasets(cells, ["adapter"])
        with_avg = len(datasets) > 1
        st = stats[stats["shots"] == k].set_index(["adapter", "dataset"])
        rows, sources = [], {}
        for a in adapters:
            row = [a]
            for d in datasets:
                if (a, d) not in st.index:
                    row.append("")
                    continue
                s = st.loc[(a, d)]
                p = pub.get(a, d, int(k), "test_acc")
                if p[1]:
                    sources[a] = p[1]
                records.append(_record(group, "per_shot", k, a, d, "test_acc", float(s["mean"]), float(s["std"]),
                                       int(s["n_seeds"]), p))
                row.append(_with_pub(_fmt(s["mean"], s["std"], int(s["n_seeds"]), n_full), p[0], s["mean"]))
            if not with_avg:
                rows.append(row)
                continue
            mean, std, n = average_over_datasets(cells[cells["adapter"] == a], common, "test_acc", ddof)
            partial = bool(excluded)
            p = pub.get(a, "Average", int(k), "test_acc") if _is_standard_set(common) else (math.nan, None)
            if p[1]:
                sources[a] = p[1]
            if common:
                records.append(_record(group, "per_shot", k, a, "Average", "test_acc", mean, std, n, p,
                                       n_datasets=len(common), partial=partial))
            cell = _fmt(mean, std, n, n_full) + ("*" if partial and common else "")
            row.append(_with_pub(cell, p[0], mean))
            rows.append(row)
        notes = [_missing_note(cells, ["adapter"], excluded, common)] if excluded else []
        if pub.rows is not None and len(datasets) > 1 and not _is_standard_set(common):
            notes.append("The Average is compared with published 11-dataset averages only when it covers "
                         "exactly the 11 standard datasets.")
        notes += _source_notes(sources)
        header = ["adapter", *datasets] + (["Average"] if with_avg else [])
        group.tables.append(DisplayTable(f"{_shots_label(k)}: top-1 test accuracy (%)", header, rows, notes))

    # Adapter x shots, averaged over the datasets present in every (adapter, shots) cell, so each column of the
    # table averages the same datasets.
    if len(shots_all) > 0:
        common, excluded = common_datasets(runs, ["adapter", "shots"])
        adapters = ordered(runs["adapter"].unique(), ADAPTER_ORDER)
        rows, sources = [], {}
        for a in adapters:
            row = [a]
            for k in shots_all:
                cell_runs = runs[(runs["adapter"] == a) & (runs["shots"] == k)]
                if cell_runs.empty or not common:
                    row.append("")
                    continue
                mean, std, n = average_over_datasets(cell_runs, common, "test_acc", ddof)
                p = pub.get(a, "Average", int(k), "test_acc") if _is_standard_set(common) else (math.nan, None)
                if p[1]:
                    sources[a] = p[1]
                records.append(_record(group, "over_datasets", k, a, "Average", "test_acc", mean, std, n, p,
                                       n_datasets=len(common), partial=bool(excluded)))
                row.append(_with_pub(_fmt(mean, std, n, n_full) + ("*" if excluded else ""), p[0], mean))
            rows.append(row)
        over = ", ".join(common) if common else "no dataset common to every cell"
        notes = [f"Averaged over: {over}."]
        if excluded:
            notes.append(_missing_note(runs, ["adapter", "shots"], excluded, common))
        notes += _source_notes(sources)
        group.tables.append(DisplayTable("Average over datasets vs shots: top-1 test accuracy (%)",
                                         ["adapter", *[_shots_label(k) for k in shots_all]], rows, notes))
    return records


def _b2n_row(group: ProtocolGroup, pub: _Published, k: int, a: str, d: str, b: tuple[float, float, int],
             nv: tuple[float, float, int], *, partial: bool, n_datasets: float, compare: bool, n_full: int,
             sources: dict[str, str], records: list[dict[str, Any]]) -> list[str]:
    """One base-to-novel table row from (mean, std, n_seeds) of Base and Novel; appends its summary records."""
    h = harmonic_mean(b[0], nv[0])
    out = [d, a]
    for metric, (m, s, n) in (("base", b), ("novel", nv), ("hm", (h, math.nan, min(b[2], nv[2])))):
        p = pub.get(a, d, k, metric) if compare else (math.nan, None)
        if p[1]:
            sources[a] = p[1]
        records.append(_record(group, "base_to_novel", k, a, d, metric, m, s, n, p, n_datasets=n_datasets,
                               partial=partial))
        # HM has no seed spread of its own (it is computed from the means), so only its value is shown.
        cell = f"{m:.2f}" if metric == "hm" else _fmt(m, s, n, n_full)
        out.append(_with_pub(cell + ("*" if partial else ""), p[0], m))
    return out


def _b2n_tables(group: ProtocolGroup, pub: _Published, ddof: int) -> list[dict[str, Any]]:
    runs = group.runs
    without = runs["novel_acc"].isna()
    if without.any():
        group.notes.append(f"{int(without.sum())} run(s) of this base-class group have no novel accuracy and are "
                           "left out of the base-to-novel table.")
    runs = runs[~without]
    records: list[dict[str, Any]] = []
    base = seed_stats(runs, "test_acc", ddof).set_index(["adapter", "dataset", "shots"])
    novel = seed_stats(runs, "novel_acc", ddof).set_index(["adapter", "dataset", "shots"])
    n_full = int(base["n_seeds"].max()) if len(base) else 0
    for k in sorted(runs["shots"].unique()):
        cells = runs[runs["shots"] == k]
        adapters = ordered(cells["adapter"].unique(), ADAPTER_ORDER)
        datasets = ordered(cells["dataset"].unique(), STANDARD_DATASETS)
        common, excluded = common_datasets(cells, ["adapter"])
        rows, sources = [], {}

        for d in datasets:
            for a in adapters:
                if (a, d, k) in base.index and (a, d, k) in novel.index:
                    b, nv = base.loc[(a, d, k)], novel.loc[(a, d, k)]
                    rows.append(_b2n_row(group, pub, int(k), a, d,
                                         (float(b["mean"]), float(b["std"]), int(b["n_seeds"])),
                                         (float(nv["mean"]), float(nv["std"]), int(nv["n_seeds"])),
                                         partial=False, n_datasets=math.nan, compare=True, n_full=n_full,
                                         sources=sources, records=records))
        if common:
            for a in adapters:
                ar = cells[cells["adapter"] == a]
                rows.append(_b2n_row(group, pub, int(k), a, "Average",
                                     average_over_datasets(ar, common, "test_acc", ddof),
                                     average_over_datasets(ar, common, "novel_acc", ddof),
                                     partial=bool(excluded), n_datasets=len(common),
                                     compare=_is_standard_set(common), n_full=n_full, sources=sources,
                                     records=records))
        notes = ["HM = 2·B·N/(B+N) from the seed-averaged Base and Novel; the Average row's HM is the HM of the "
                 "averaged Base and Novel."]
        if excluded:
            notes.append(_missing_note(cells, ["adapter"], excluded, common))
        notes += _source_notes(sources)
        group.tables.append(DisplayTable(f"Base-to-novel, {_shots_label(k)}: top-1 test accuracy (%)",
                                         ["dataset", "adapter", "Base", "Novel", "HM"], rows, notes))
    return records


def _separation(groups: list[ProtocolGroup]) -> str | None:
    if len(groups) < 2:
        return None
    differ = []
    for f in PROTOCOL_FIELDS:
        vals = list(dict.fromkeys("na" if g.fields[f] is None else str(g.fields[f]) for g in groups))
        if len(vals) > 1:
            differ.append(f"{f} ({', '.join(vals)})")
    return (f"The runs fall into {len(groups)} protocol groups, reported separately and never averaged together; "
            f"they differ in: {'; '.join(differ)}.")


def build_report(df: pd.DataFrame, shots: Sequence[int] | None = None, published: pd.DataFrame | None = None,
                 ddof: int = STD_DDOF) -> Report:
    """Group the runs of :func:`load_results` by protocol and build every table.

    Args:
        df: runs from :func:`load_results`.
        shots: keep only these shot counts (None: all).
        published: from :func:`load_published` to add published values and deltas; None for no comparison.
        ddof: delta degrees of freedom of the std over seeds (default :data:`STD_DDOF` = 0).
    """
    runs = df if shots is None else df[df["shots"].isin([int(k) for k in shots])]
    notes: list[str] = []
    n_skip, n_dup = len(df.attrs.get("skipped", [])), len(df.attrs.get("duplicates", []))
    head = f"{len(runs)} run(s)"
    if shots is not None:
        head += f" with shots in {{{', '.join(str(k) for k in shots)}}} (of {len(df)})"
    if n_skip:
        head += f"; {n_skip} unreadable result file(s) skipped"
    if n_dup:
        head += f"; {n_dup} duplicate run(s) ignored, the newest file kept"
    notes.append(head + ".")

    groups: list[ProtocolGroup] = []
    for key, g in runs.groupby("protocol", sort=True):
        fields = {f: (None if pd.isna(g[f].iloc[0]) else g[f].iloc[0]) for f in PROTOCOL_FIELDS}
        groups.append(ProtocolGroup(str(key), fields, g.reset_index(drop=True)))
    # Largest group first: it is usually the main experiment.
    groups.sort(key=lambda grp: (-len(grp.runs), grp.key))
    if (sep := _separation(groups)) is not None:
        notes.append(sep)
        log.info("%s", sep)

    records: list[dict[str, Any]] = []
    for grp in groups:
        pub = _Published(published, grp.fields, grp.notes, set(grp.runs["adapter"]))
        if grp.is_base_to_novel:
            records += _b2n_tables(grp, pub, ddof)
        else:
            records += _few_shot_tables(grp, pub, ddof)
    summary = pd.DataFrame(records, columns=SUMMARY_COLUMNS)
    return Report(runs=runs, groups=groups, summary=summary, notes=notes, ddof=ddof, compared=published is not None)
