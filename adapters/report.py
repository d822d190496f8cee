"""``fewclip report``: aggregate ``result.json`` files into mean ± std tables, CSV, LaTeX and accuracy-vs-shots plots.

Every run writes one ``result.json``. :func:`load_results` collects them into one row per run;
:func:`build_report` splits the runs into *protocol groups* (runs are comparable only when backbone, weights,
prompt templates, split source, validation shots, augmented views, selection rule and class subset agree),
averages over seeds inside each group and lays out the tables; :func:`render_markdown`, :func:`write_csv`,
:func:`write_latex` and :func:`plot` turn a report into text and files. Runs from different protocol groups
are never averaged together.

Statistics: a cell is the mean over seeds and the **population** standard deviation over seeds (``ddof=0``,
:data:`STD_DDOF`), the convention of CoOp/Dassl's ``parse_test_res`` that produced most published ± values in
this literature, so our spreads compare like for like. With one seed there is no spread: std is NaN and shown
as ``-``. An ``Average`` over datasets is the mean of the per-dataset seed means; its ± is the std over seeds of
the per-seed dataset average, given only when every seed exists for every dataset averaged. Base-to-novel HM is
``2 B N / (B + N)`` computed from the seed-averaged (and, for the Average, dataset-averaged) Base and Novel
accuracies, the CoOp/CoCoOp convention.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

# Same name as adapters.runner.RESULT_FILE; not imported from there because the runner pulls in torch and the
# backbone code, which a report over finished runs never needs.
RESULT_FILE = "result.json"

STD_DDOF = 0
"""Delta degrees of freedom for the std over seeds (0: population std, as CoOp/Dassl's ``parse_test_res``)."""

KEY = ("protocol", "dataset", "adapter", "shots", "seed")
"""What identifies one run; two files with the same key are duplicates."""

PROTOCOL_FIELDS = ("protocol_name", "sampler", "backbone", "backbone_weights", "templates", "split_source",
                   "val_shots", "views", "selection", "subsample")

RUN_COLUMNS = ["dataset", "adapter", "backbone", "shots", "seed", "val_acc", "test_acc", "novel_acc", "protocol",
               "protocol_name", "sampler", "backbone_weights", "templates", "split_source", "val_shots", "views",
               "selection", "subsample", "template_list", "path", "mtime"]

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

FORMATS = ("md", "csv", "latex")


class ReportError(ValueError):
    """Bad input to the report (unknown format, unreadable published table, ...)."""


# ----------------------------------------------------------------------------------------------------- loading


def _hash_templates(templates: Sequence[str]) -> str:
    # Order matters for nothing in a mean text embedding, but a reordered list is rare and hashing it as written
    # keeps the key obvious to reproduce by hand.
    return hashlib.sha1(json.dumps(list(templates), ensure_ascii=False).encode()).hexdigest()[:8]


def default_templates() -> dict[str, list[str]]:
    """Each dataset config's own ``templates`` list, from ``conf/dataset/*.yaml``; empty when conf is missing.

    Templates differ between datasets by design (DTD's "{} texture.", Pets' "..., a type of pet."), so the
    protocol key records "default" when a run used its dataset's configured templates and a hash otherwise;
    hashing them outright would put every dataset in a protocol of its own.
    """
    try:
        import yaml

        from adapters.config import conf_dir

        folder = conf_dir() / "dataset"
    except (ImportError, FileNotFoundError) as e:
        log.warning("dataset configs unavailable (%s): templates are identified by hash only", e)
        return {}
    out: dict[str, list[str]] = {}
    for f in sorted(folder.glob("*.yaml")):
        try:
            cfg = yaml.safe_load(f.read_text())
        except (OSError, yaml.YAMLError) as e:
            log.warning("cannot read %s: %s", f, e)
            continue
        if isinstance(cfg, dict) and isinstance(cfg.get("templates"), list):
            out[f.stem] = [str(t) for t in cfg["templates"]]
    return out


def _val_rule(val_shots: Any, shots: int) -> str | None:
    # The validation size follows min(K, 4) (CoOp), so it changes with the shot count; recording the rule
    # rather than the number keeps one protocol across 1..16 shots.
    if val_shots is None:
        return None
    if isinstance(val_shots, str) and not val_shots.isdigit():
        return val_shots  # "full": the whole val split
    if int(val_shots) == min(int(shots), 4):
        return "min(K,4)"
    return str(int(val_shots))


def _protocol_key(row: Mapping[str, Any]) -> str:
    def s(v: Any) -> str:
        return "na" if v is None else str(v)

    return (f"{s(row['protocol_name'])}|draw:{s(row['sampler'])}|"
            f"{s(row['backbone'])}/{s(row['backbone_weights'])}|tpl:{s(row['templates'])}"
            f"|split:{s(row['split_source'])}|val:{s(row['val_shots'])}|views:{s(row['views'])}"
            f"|sel:{s(row['selection'])}|sub:{s(row['subsample'])}")


def _as_float(v: Any) -> float:
    return math.nan if v is None else float(v)


def _parse_result(path: Path, defaults: Mapping[str, Sequence[str]]) -> dict[str, Any]:
    """One ``result.json`` -> one run row. Raises ValueError/KeyError/TypeError/OSError on a bad file."""
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    proto = data.get("protocol") or {}
    if not isinstance(proto, dict):
        raise ValueError("'protocol' is not an object")
    dataset_cfg = ((data.get("config") or {}).get("dataset") or {}) if isinstance(data.get("config"), dict) else {}
    subsample = proto.get("subsample") or dataset_cfg.get("subsample") or "all"
    novel = data.get("novel")
    novel_acc = novel.get("test_acc") if isinstance(novel, dict) else novel
    templates = proto.get("templates")
    if templates is None:
        tpl_id, tpl_list = None, None
    else:
        templates = [str(t) for t in templates]
        tpl_list = json.dumps(templates, ensure_ascii=False)
        tpl_id = "default" if list(defaults.get(str(data["dataset"]), ())) == templates else _hash_templates(templates)
    shots = int(data["shots"])
    views = proto.get("views")
    # Results written before the protocol switch ran fewclip's protocol with fewclip's sampler.
    name = str(proto.get("name") or "fewshot")
    sampler = str(proto.get("sampler") or "fewclip")
    sampler = "dassl" if sampler.startswith("import:") else sampler  # CoOp's saved draws are Dassl's draws
    val_rule = _val_rule(proto.get("val_shots"), shots)
    if name == "reference":
        # Each method's recipe fixes its own val split and views: one reference protocol across methods.
        val_rule, views = "recipe", None
    row: dict[str, Any] = {
        "dataset": str(data["dataset"]),
        "adapter": str(data["adapter"]),
        "backbone": str(data["backbone"]),
        "shots": shots,
        "seed": int(data["seed"]),
        "val_acc": _as_float(data.get("val_acc")),
        "test_acc": float(data["test_acc"]),
        "novel_acc": _as_float(novel_acc),
        "protocol_name": name,
        "sampler": sampler,
        "backbone_weights": proto.get("backbone_weights"),
        "templates": tpl_id,
        "split_source": proto.get("split_source"),
        "val_shots": val_rule,
        "views": None if views is None else int(views),
        "selection": proto.get("selection"),
        "subsample": str(subsample),
        "template_list": tpl_list,
        "path": str(path),
        "mtime": path.stat().st_mtime,
    }
    row["protocol"] = _protocol_key(row)
    return row


def _find_files(dirs: Iterable[str | Path]) -> list[Path]:
    found: set[Path] = set()
    for d in dirs:
        p = Path(d)
        if p.is_file():
            found.add(p.resolve())
        elif p.is_dir():
            found.update(f.resolve() for f in p.rglob(RESULT_FILE) if f.is_file())
        else:
            log.warning("%s does not exist", p)
    return sorted(found)


def load_results(dirs: Sequence[str | Path], templates: Mapping[str, Sequence[str]] | None = None) -> pd.DataFrame:
    """Every ``result.json`` found recursively under ``dirs`` (a file path is taken as is), one row per run.

    Args:
        dirs: folders to search (or ``result.json`` files).
        templates: dataset name -> its default prompt templates, used to tell "default" templates from custom
            ones in the protocol key; None reads them from ``conf/dataset/*.yaml`` (:func:`default_templates`).

    Returns:
        A frame with the columns :data:`RUN_COLUMNS`: dataset, adapter, backbone, shots, seed, val_acc, test_acc,
        novel_acc (NaN when the run has no novel split), the protocol fields and ``protocol`` (the key built
        from them), template_list (JSON), path and mtime. Unreadable files are skipped with a warning and
        listed in ``df.attrs["skipped"]`` as (path, reason); when two files hold the same run (same protocol,
        dataset, adapter, shots, seed) the newer file (mtime) is kept and the older listed in
        ``df.attrs["duplicates"]`` as (dropped path, kept path).
    """
    defaults = default_templates() if templates is None else templates
    rows: list[dict[str, Any]] = []
    skipped: list[tuple[str, str]] = []
    for f in _find_files(dirs):
        try:
            rows.append(_parse_result(f, defaults))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            reason = f"{type(e).__name__}: {e}"
            log.warning("skipping unreadable %s (%s)", f, reason)
            skipped.append((str(f), reason))
    if skipped:
        log.warning("%d result file(s) skipped as unreadable", len(skipped))
    df = pd.DataFrame(rows, columns=RUN_COLUMNS)
    duplicates: list[tuple[str, str]] = []
    if not df.empty:
        # Newest first, so keep="first" keeps the latest re-run of a job.
        df = df.sort_values(["mtime", "path"], ascending=[False, True], kind="stable")
        dup = df.duplicated(list(KEY), keep="first")
        if dup.any():
            kept = df[~dup].set_index(list(KEY))["path"]
            for _, r in df[dup].iterrows():
                k = kept.loc[tuple(r[c] for c in KEY)]
                duplicates.append((r["path"], k))
                log.info("duplicate run %s %s k=%d seed=%d: keeping %s, ignoring %s", r["dataset"], r["adapter"],
                         r["shots"], r["seed"], k, r["path"])
            log.warning("%d duplicate run(s) ignored (the newest file of each is kept)", len(duplicates))
        df = df[~dup].sort_values(["protocol", "dataset", "adapter", "shots", "seed"], kind="stable")
        df = df.reset_index(drop=True)
    df.attrs["skipped"] = skipped
    df.attrs["duplicates"] = duplicates
    return df


def published_path() -> Path:
    """The packaged table of published numbers (``adapters/published.csv``)."""
    return Path(str(resources.files("adapters").joinpath("published.csv")))


PUBLISHED_TAGS = {"protocol": "reference", "val": "unknown", "extra_data": "none", "selection_on_test": "unknown",
                  "seeds": "not stated"}
"""Protocol tags of ``published.csv`` and what a table without them is taken to say (compared with nothing)."""


def load_published(path: str | Path | None = None) -> pd.DataFrame:
    """Published numbers: columns backbone, adapter, dataset, shots (NaN: any shot count), metric, value, source,
    and the protocol tags ``protocol`` (``reference``: the method's own recipe; ``any``: no selection at all, as
    zero-shot), ``val``, ``extra_data``, ``selection_on_test``, ``seeds``.

    ``path`` None or "published" reads the packaged table; otherwise a CSV with the same columns (missing tags
    take the values of ``PUBLISHED_TAGS``, under which a row is never compared).
    """
    p = published_path() if path in (None, "published") else Path(path)
    try:
        pub = pd.read_csv(p)
    except (OSError, pd.errors.ParserError) as e:
        raise ReportError(f"cannot read published numbers from {p}: {e}") from e
    missing = {"backbone", "adapter", "dataset", "shots", "metric", "value", "source"} - set(pub.columns)
    if missing:
        raise ReportError(f"{p} lacks column(s) {sorted(missing)}")
    pub["shots"] = pd.to_numeric(pub["shots"], errors="coerce")
    pub["value"] = pd.to_numeric(pub["value"], errors="raise")
    for tag, default in PUBLISHED_TAGS.items():
        pub[tag] = pub[tag].fillna(default).astype(str) if tag in pub.columns else default
    return pub


# ------------------------------------------------------------------------------------------------- aggregation


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


def _order(values: Iterable[str], preferred: Sequence[str]) -> list[str]:
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


def _common_datasets(cells: pd.DataFrame, by: list[str]) -> tuple[list[str], list[str]]:
    """Datasets present in every ``by`` cell (ordered) and the others present somewhere."""
    sets = [set(g["dataset"]) for _, g in cells.groupby(by)]
    union = set().union(*sets) if sets else set()
    common = set.intersection(*sets) if sets else set()
    return _order(common, STANDARD_DATASETS), _order(union - common, STANDARD_DATASETS)


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
        adapters = _order(cells["adapter"].unique(), ADAPTER_ORDER)
        datasets = _order(cells["dataset"].unique(), STANDARD_DATASETS)
        common, excluded = _common_datasets(cells, ["adapter"])
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
        common, excluded = _common_datasets(runs, ["adapter", "shots"])
        adapters = _order(runs["adapter"].unique(), ADAPTER_ORDER)
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
        adapters = _order(cells["adapter"].unique(), ADAPTER_ORDER)
        datasets = _order(cells["dataset"].unique(), STANDARD_DATASETS)
        common, excluded = _common_datasets(cells, ["adapter"])
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


# ------------------------------------------------------------------------------------------------------ output


def describe_protocol(fields: Mapping[str, Any], template_list: str | None = None) -> list[str]:
    """Human-readable lines for a protocol group's header."""
    def s(v: Any) -> str:
        return "unknown" if v is None else str(v)

    tpl = fields.get("templates")
    if tpl == "default":
        tpl_text = "each dataset's configured templates"
    elif tpl is None:
        tpl_text = "unknown"
    else:
        shown = ""
        if template_list:
            items = json.loads(template_list)
            shown = ": " + "; ".join(f'"{t}"' for t in items[:3]) + (f" (+{len(items) - 3} more)"
                                                                     if len(items) > 3 else "")
        tpl_text = f"custom (hash {tpl}){shown}"
    sub = fields.get("subsample")
    sub_text = {"all": "all classes", "base": "base classes (base-to-novel)", "new": "novel classes only"}.get(
        str(sub), s(sub))
    proto = {"fewshot": "fewshot (fewclip's: every choice on min(K, 4) val images per class)",
             "reference": "reference (each method's published recipe, conf/recipe/; val and views per recipe)"}
    return [f"protocol: {proto.get(str(fields.get('protocol_name')), s(fields.get('protocol_name')))}; "
            f"few-shot draw: {s(fields.get('sampler'))}",
            f"backbone: {s(fields.get('backbone'))} (weights {s(fields.get('backbone_weights'))})",
            f"prompt templates: {tpl_text}",
            f"split: {s(fields.get('split_source'))}; validation images per class: {s(fields.get('val_shots'))}; "
            f"augmented views: {s(fields.get('views'))}; model selection: {s(fields.get('selection'))}; "
            f"classes: {sub_text}"]


def _stats_footnote(ddof: int) -> str:
    kind = "population std (ddof=0, as CoOp/Dassl's parse_test_res)" if ddof == 0 else f"sample std (ddof={ddof})"
    return (f"Cells: mean ± {kind} over seeds; '± -' = a single seed; (n=...) = fewer seeds than the most in this "
            "group. Average = mean of the per-dataset seed means; its ± is the std of the per-seed average, shown "
            "only when every seed exists for every dataset.")


def _md_table(t: DisplayTable) -> str:
    def esc(c: str) -> str:
        return c.replace("|", "\\|")

    lines = ["| " + " | ".join(esc(h) for h in t.header) + " |",
             "|" + "|".join([":---"] + ["---:"] * (len(t.header) - 1)) + "|"]
    lines += ["| " + " | ".join(esc(c) for c in r) + " |" for r in t.rows]
    return "\n".join(lines)


def render_markdown(report: Report) -> str:
    """The whole report as Markdown: a header, then per protocol group its description and tables."""
    out = ["# fewclip report", ""]
    out += [*report.notes, ""]
    for i, g in enumerate(report.groups, 1):
        out += [f"## Protocol {i}: `{g.key}`", ""]
        tl = g.runs["template_list"].dropna()
        out += [f"- {line}" for line in describe_protocol(g.fields, tl.iloc[0] if len(tl) else None)]
        out += [f"- runs: {len(g.runs)} ({g.runs['adapter'].nunique()} adapter(s), {g.runs['dataset'].nunique()} "
                f"dataset(s), shots {', '.join(str(k) for k in sorted(g.runs['shots'].unique()))})", ""]
        out += [f"> {n}" for n in g.notes] + ([""] if g.notes else [])
        for t in g.tables:
            out += [f"### {t.title}", "", _md_table(t), ""]
            out += [f"{n}  " for n in t.notes] + ([""] if t.notes else [])
    out += [_stats_footnote(report.ddof), ""]
    return "\n".join(out)


def write_csv(report: Report, out_dir: str | Path) -> list[Path]:
    """Write ``runs.csv`` (one row per run) and ``summary.csv`` (one row per table cell, tidy) into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs_path, summary_path = out / "runs.csv", out / "summary.csv"
    report.runs.to_csv(runs_path, index=False)
    report.summary.to_csv(summary_path, index=False)
    log.info("wrote %s and %s", runs_path, summary_path)
    return [runs_path, summary_path]


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                  "|": r"\textbar{}", "<": r"\textless{}", ">": r"\textgreater{}",
                  "±": r"$\pm$", "Δ": r"$\Delta$", "·": r"$\cdot$"}


def latex_escape(text: str) -> str:
    """Escape LaTeX's special characters (and the few non-ASCII symbols the tables use)."""
    return "".join(_LATEX_SPECIAL.get(c, c) for c in text)


def _latex_table(t: DisplayTable, caption: str) -> str:
    # Hand-written rather than DataFrame.to_latex: that needs jinja2, which fewclip does not declare.
    n_text = 2 if t.header[:2] == ["dataset", "adapter"] else 1
    spec = "l" * n_text + "r" * (len(t.header) - n_text)
    lines = [r"\begin{table}[t]", r"\centering", r"\small", f"\\caption{{{latex_escape(caption)}}}",
             f"\\begin{{tabular}}{{{spec}}}", r"\toprule",
             " & ".join(latex_escape(h) for h in t.header) + r" \\", r"\midrule"]
    lines += [" & ".join(latex_escape(c) for c in r) + r" \\" for r in t.rows]
    lines += [r"\bottomrule", r"\end{tabular}"]
    if t.notes:
        lines += [r"\par\footnotesize " + latex_escape(" ".join(n.replace("\\*", "*") for n in t.notes))]
    lines.append(r"\end{table}")
    return "\n".join(lines)


def write_latex(report: Report, out_dir: str | Path) -> Path:
    """Write every table into ``out_dir/report.tex`` (needs ``\\usepackage{booktabs}``)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    parts = ["% fewclip report; needs \\usepackage{booktabs}", "% " + _stats_footnote(report.ddof), ""]
    for i, g in enumerate(report.groups, 1):
        parts.append(f"% Protocol {i}: {g.key}")
        for t in g.tables:
            parts += [_latex_table(t, f"{t.title}. Protocol {i}: {g.key}"), ""]
    path = out / "report.tex"
    path.write_text("\n".join(parts))
    log.info("wrote %s", path)
    return path


def write_markdown(report: Report, out_dir: str | Path) -> Path:
    """Write :func:`render_markdown` into ``out_dir/report.md``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "report.md"
    path.write_text(render_markdown(report))
    return path


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
        datasets = _order(runs["dataset"].unique(), STANDARD_DATASETS)
        common, _ = _common_datasets(runs, ["adapter", "shots"])
        adapters = _order(runs["adapter"].unique(), ADAPTER_ORDER)
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


# --------------------------------------------------------------------------------------------------------- CLI


def _int_list(text: str) -> list[int]:
    try:
        vals = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not vals:
        raise argparse.ArgumentTypeError("expected at least one shot count")
    return vals


def _formats(text: str) -> list[str]:
    vals = [t.strip() for t in text.split(",") if t.strip()]
    bad = [v for v in vals if v not in FORMATS]
    if bad or not vals:
        raise argparse.ArgumentTypeError(f"formats are {', '.join(FORMATS)}; got {text!r}")
    return vals


def build_parser() -> argparse.ArgumentParser:
    """The ``fewclip report`` argument parser."""
    p = argparse.ArgumentParser(
        prog="fewclip report",
        description="Aggregate result.json files into mean ± std tables (printed as Markdown), CSV, LaTeX and "
                    "accuracy-vs-shots plots. Runs under different protocols are reported separately.")
    p.add_argument("dirs", nargs="+", metavar="DIR", help="folders searched recursively for result.json")
    p.add_argument("--out", metavar="DIR", help="write report files here (report.md, runs.csv, summary.csv, "
                                                "report.tex, per --format)")
    p.add_argument("--format", type=_formats, default=None, metavar="md,csv,latex",
                   help="files to write into --out (default: all three when --out is given)")
    p.add_argument("--plot", metavar="FILE", help="write accuracy-vs-shots curves to this PNG")
    p.add_argument("--compare", metavar="published",
                   help="'published' (the packaged published numbers) or a CSV with the same columns: add the "
                        "published value and the delta next to each cell that has one")
    p.add_argument("--shots", type=_int_list, metavar="1,2,...", help="only these shot counts")
    return p


def main(argv: list[str] | None = None) -> int:
    """``fewclip report DIR... [--out DIR] [--format md,csv,latex] [--plot FILE] [--compare published]
    [--shots 1,2,...]``: print the Markdown report; 0 on success, 2 on bad input or when nothing is found."""
    args = build_parser().parse_args(argv)
    formats = args.format if args.format is not None else (list(FORMATS) if args.out else ["md"])
    if args.out is None and any(f != "md" for f in formats):
        sys.stderr.write("fewclip report: --format csv/latex writes files and needs --out DIR\n")
        return 2
    df = load_results(args.dirs)
    if df.empty:
        n_bad = len(df.attrs.get("skipped", []))
        why = f"{n_bad} found, none readable" if n_bad else "none found"
        sys.stderr.write(f"fewclip report: no readable {RESULT_FILE} under {', '.join(args.dirs)} ({why})\n")
        return 2
    try:
        published = load_published(args.compare) if args.compare else None
    except ReportError as e:
        sys.stderr.write(f"fewclip report: {e}\n")
        return 2
    report = build_report(df, shots=args.shots, published=published)
    if report.runs.empty:
        sys.stderr.write(f"fewclip report: no run with shots in {args.shots}\n")
        return 2
    sys.stdout.write(render_markdown(report))
    if args.out:
        if "md" in formats:
            write_markdown(report, args.out)
        if "csv" in formats:
            write_csv(report, args.out)
        if "latex" in formats:
            write_latex(report, args.out)
    if args.plot:
        try:
            plot(df, args.plot, shots=args.shots)
        except ImportError as e:
            sys.stderr.write(f"fewclip report: {e}\n")
            return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
