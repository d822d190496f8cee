"""Fitting an artifact: one job run exactly as ``fewclip run`` runs it (selection on val only, the test split
evaluated once, ``result.json``), then exported into an artifact directory. ``fit`` is the notebook entry point."""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fewclip.artifact.format import check_destination, export_artifact, tmp_sibling
from fewclip.artifact.predict import Artifact, load_artifact
from fewclip.config import compose
from fewclip.runner import group_choice, run


def _hydra_value(v: Any) -> str:
    """A Python value as a Hydra override value."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "null"
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_hydra_value(x) for x in v) + "]"
    s = str(v)
    if isinstance(v, (int, float)) or all(c.isalnum() or c in "_-./:~+@" for c in s):
        return s
    return "'" + s.replace("\\", "\\\\").replace("'", "\\'") + "'"


def default_out(cfg: Any) -> Path:
    """``artifacts/<dataset>-<adapter>-<backbone>-k<K>-s<seed>`` for a composed run config."""
    adapter = group_choice(cfg, "adapter")
    return Path("artifacts") / f"{cfg.dataset.name}-{adapter}-{cfg.backbone.name}-k{cfg.shots}-s{cfg.seed}"


def fit_run(overrides: Sequence[str], out: str | os.PathLike | None = None) -> tuple[dict[str, Any], Path]:
    """Run one job with ``fewclip run``'s overrides and export it as an artifact.

    The job runs in a temporary directory beside the artifact (removed afterwards: the artifact keeps its
    ``result.json``). Returns ``(result, artifact directory)``.
    """
    cfg = compose(list(overrides))
    out_dir = Path(out) if out is not None else default_out(cfg)
    check_destination(out_dir)  # before the work, not after it
    run_dir = tmp_sibling(out_dir, "run")
    try:
        result = run(cfg, out_dir=run_dir)
        export_artifact(run_dir, out_dir)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    return result, out_dir


def _dataset_overrides(dataset: str | os.PathLike) -> list[str]:
    """``dataset=NAME``, or a folder / CSV path as ``dataset=folder dataset.root=...`` / ``dataset=csv ...``."""
    p = Path(dataset)
    if p.is_dir():
        return ["dataset=folder", f"dataset.root={_hydra_value(str(p.resolve()))}"]
    if p.is_file() and p.suffix.lower() == ".csv":
        return ["dataset=csv", f"dataset.path={_hydra_value(str(p.resolve()))}"]
    return [f"dataset={dataset}"]


def fit(dataset: str | os.PathLike = "digits", adapter: str = "tip", backbone: str = "tiny", shots: int = 16,
        out: str | os.PathLike | None = None, device: str = "auto", **overrides: Any) -> Artifact:
    """Fit an adapter and return the loaded artifact: ``fewclip fit`` for notebooks.

    Args:
        dataset: a config name (``digits``, ``oxford_pets``), a folder of class sub-folders, or a CSV file
            (``path,label[,split]``).
        adapter, backbone: config option names (``conf/adapter``, ``conf/backbone``).
        shots: K images per class.
        out: the artifact directory (default ``artifacts/<dataset>-<adapter>-<backbone>-k<K>-s<seed>``).
        device: ``auto``, ``cpu`` or ``cuda``.
        **overrides: any other setting, e.g. ``seed=2``, ``views=4``, ``cache_dir="..."``; nested keys with ``__``
            (``adapter__alpha_steps=10``) or as ``**{"dataset.templates": [...]}``.
    """
    args = [*_dataset_overrides(dataset), f"adapter={adapter}", f"backbone={backbone}", f"shots={int(shots)}",
            f"device={device}"]
    args += [f"{k.replace('__', '.')}={_hydra_value(v)}" for k, v in overrides.items()]
    _, path = fit_run(args, out)
    return load_artifact(path, device=device)
