"""Reading finished runs for the report: ``result.json`` files -> one row per run with its protocol key, and the
packaged table of published numbers.

A run's *protocol key* joins everything that must agree for two runs to be averaged or compared (backbone and
weights, prompt templates, split source, validation shots, augmented views, selection rule, class subset); the
tables (tables.py) never put two keys in one cell. Unreadable files are skipped with a warning and duplicates
(the same run twice) resolve to the newest file; both are recorded on the frame for the report's header.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import pandas as pd

log = logging.getLogger(__name__)

# Same name as fewclip.runner.RESULT_FILE; not imported from there because the runner pulls in torch and the
# backbone code, which a report over finished runs never needs.
RESULT_FILE = "result.json"

KEY = ("protocol", "dataset", "adapter", "shots", "seed")
"""What identifies one run; two files with the same key are duplicates."""

PROTOCOL_FIELDS = ("protocol_name", "sampler", "backbone", "backbone_weights", "templates", "split_source",
                   "val_shots", "views", "selection", "subsample")

RUN_COLUMNS = ["dataset", "adapter", "backbone", "shots", "seed", "val_acc", "test_acc", "novel_acc", "protocol",
               "protocol_name", "sampler", "backbone_weights", "templates", "split_source", "val_shots", "views",
               "selection", "subsample", "template_list", "path", "mtime"]


class ReportError(ValueError):
    """Bad input to the report (unknown format, unreadable published table, ...)."""



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

        from fewclip.config import conf_dir

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
    """The packaged table of published numbers (``fewclip/published.csv``)."""
    return Path(str(resources.files("fewclip").joinpath("published.csv")))


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
