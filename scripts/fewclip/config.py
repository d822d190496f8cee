"""The typed spine of the configuration (Hydra structured config), the checks of its values, the resolvers that
name output folders, and where the YAML files live.

Groups (``backbone``, ``dataset``, ``adapter``) stay free-form: each YAML names its ``_target_``. The
top-level run settings are typed, so ``shots=abc`` fails when the config is composed; ``check_settings`` refuses
values of the right type that make no sense (``views=0``) before any work starts.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


def fewshot_defaults() -> dict[str, Any]:
    """``fewshot.*``: a plain node rather than a dataclass because ``import`` is a Python keyword.

    allow_fewer: a class with < K train images is an error (False) or takes all it has, with a warning.
    sampler: ``fewclip`` | ``dassl`` (CoOp's draw) | null (the protocol's: fewclip, or dassl under reference).
    import: a CoOp ``split_fewshot/shot_K-seed_S.pkl`` whose draw replaces the sampler's.
    The values are checked when a job starts (``fewclip.protocol.resolve_protocol``).
    """
    return {"allow_fewer": False, "sampler": None, "import": None}


@dataclass
class AugmentConfig:
    scale: list[float] = field(default_factory=lambda: [0.5, 1.0])
    ratio: list[float] = field(default_factory=lambda: [3 / 4, 4 / 3])
    flip_p: float = 0.5


@dataclass
class CacheConfig:
    index: str = "Flat"  # faiss index factory string of the support cache's keys (HNSW32, IVF1024,Flat, ...)
    search_params: str = ""  # faiss search settings (nprobe=64, efSearch=256); "" for caches.search.default_params


@dataclass
class PoolConfig:
    path: Any = None  # a folder or CSV (path column) of unlabeled images; pool=PATH is short for pool.path=PATH
    per_class: Any = field(default_factory=lambda: [0, 4, 8, 16, 32])  # images added per class, chosen on val
    by: Any = field(default_factory=lambda: ["text", "image", "both"])  # retrieval query, chosen on val
    threshold: Any = field(default_factory=lambda: [0.0, 0.5])  # min zero-shot probability of the pseudo-label
    index: str = "Flat"  # faiss index factory string of the pool's features


@dataclass
class RunConfig:
    backbone: Any = MISSING
    dataset: Any = MISSING
    adapter: Any = MISSING
    shots: int = 16
    seed: int = 1
    cache_dir: str = ".fewclip_cache"
    data_root: str = "data"
    targets: list[str] = field(default_factory=list)
    views: int = 10
    batch_size: int = 64
    num_workers: int | None = None
    threads: int | None = None  # torch / BLAS / faiss threads per job; None: the launcher's cores per job
    device: str = "auto"
    progress: bool | None = None  # null: progress bars on a terminal, a log line per stage otherwise
    resume: bool = True  # skip the job when its output directory holds a result.json of the same config
    novel: bool = True  # with dataset.subsample=base, also score the fitted adapter on the new classes
    sweep_name: str = "default"  # sweeps write to outputs/sweeps/<sweep_name>/ (set by conf/sweep/*.yaml)
    protocol: str = "fewshot"  # fewshot | reference (each method's published recipe: conf/recipe/<adapter>.yaml)
    fewshot: Any = field(default_factory=fewshot_defaults)
    cache: CacheConfig = field(default_factory=CacheConfig)
    pool: PoolConfig = field(default_factory=PoolConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)


class SettingsError(ValueError):
    """A run setting has a value of the right type that cannot work (``views=0``, ``device=cuda`` without CUDA)."""


def check_settings(cfg: Any) -> None:
    """Refuse settings that cannot work, before any dataset, backbone or store is touched.

    Raises:
        SettingsError: naming the setting, its value and what it accepts.
    """
    def need(ok: bool, key: str, value: Any, what: str) -> None:
        if not ok:
            raise SettingsError(f"{key}={value}: {what}")

    for key, what in (("shots", "training images per class"), ("views", "augmented views per support image"),
                      ("batch_size", "images per encoder forward")):
        need(int(cfg[key]) >= 1, key, cfg[key], f"must be >= 1 ({what})")
    need(int(cfg.seed) >= 0, "seed", cfg.seed, "must be >= 0")
    need(cfg.num_workers is None or int(cfg.num_workers) >= 0, "num_workers", cfg.num_workers,
         "must be >= 0, or null for the default")
    aug = cfg.augment
    scale, ratio = list(aug.scale), list(aug.ratio)
    need(len(scale) == 2 and 0 < scale[0] <= scale[1] <= 1, "augment.scale", scale,
         "needs [min, max] with 0 < min <= max <= 1 (area fraction of the crop)")
    need(len(ratio) == 2 and 0 < ratio[0] <= ratio[1], "augment.ratio", ratio,
         "needs [min, max] with 0 < min <= max (aspect ratio of the crop)")
    need(0 <= float(aug.flip_p) <= 1, "augment.flip_p", aug.flip_p, "must be in [0, 1]")
    device = str(cfg.device)
    if device != "auto":
        import torch

        try:
            kind = torch.device(device).type
        except (RuntimeError, ValueError):
            raise SettingsError(f"device={device}: use auto, cpu, cuda or cuda:N") from None
        need(kind != "cuda" or torch.cuda.is_available(), "device", device,
             "CUDA is not available here (device=auto picks CUDA when present)")
    known = set(group_options("dataset"))
    unknown = [t for t in cfg.get("targets", []) if t not in known]
    need(not unknown, "targets", list(cfg.get("targets", [])), f"unknown datasets {unknown}; available: "
         f"{', '.join(sorted(known))}")


def dataset_name(path: str | None, default: str) -> str:
    """The default name of a folder or CSV dataset: the folder's (the CSV file's) name, path-safe; ``default``
    when no path is set. Resolver ``fewclip.dataset_name`` in ``conf/dataset/{folder,csv}.yaml``."""
    if not path:
        return default
    p = Path(os.path.expanduser(str(path))).resolve()
    name = p.stem if p.suffix.lower() == ".csv" else p.name
    return re.sub(r"[^\w.-]+", "-", name).strip("-.") or default


def model_name(model: str) -> str:
    """The default ``backbone.name`` of ``backbone=open_clip``: the architecture, or the ``local-dir:`` folder's name.
    Resolver ``fewclip.model_name``."""
    from caches.weights import short_model_name

    return short_model_name(str(model))


def override_dir(overrides: Any, exclude: Any) -> str:
    """The sweep job's folder for its other overrides: Hydra's ``override_dirname`` (sorted ``key=value`` joined by
    commas, ``exclude`` keys left out), except that a value holding a path becomes its last part plus a short hash
    (``dataset.root=pets-3f2a1c``), so that a path neither nests folders mirroring it nor collides with another path
    of the same name. Resolver ``fewclip.override_dir`` in ``conf/config.yaml``."""
    items = []
    for line in overrides or []:
        key, sep, value = str(line).partition("=")
        if not sep or key.lstrip("+~") in set(exclude or []):
            continue
        if "/" in value or os.sep in value:
            plain = re.sub(r"\\(\s)", r"\1", value)  # Hydra keeps a quoted space as "\ "
            tail = re.split(rf"[/{re.escape(os.sep)}]", plain.rstrip("/" + os.sep))[-1]
            tail = re.sub(r"[^\w.-]+", "-", tail).strip("-")
            value = f"{tail[:40]}-{hashlib.sha256(plain.encode()).hexdigest()[:6]}"
        items.append(f"{key}={value}")
    return ",".join(sorted(items))


def register_resolvers() -> None:
    """The ``fewclip.*`` OmegaConf resolvers; registered when this module is imported, which every process that
    composes or runs a config does (launcher workers too: the job function imports it)."""
    from omegaconf import OmegaConf

    for name, fn in (("fewclip.dataset_name", dataset_name), ("fewclip.model_name", model_name),
                     ("fewclip.override_dir", override_dir)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


def register_schema() -> None:
    register_resolvers()
    ConfigStore.instance().store(name="fewclip_schema", node=RunConfig)


def conf_dir() -> Path:
    """The config folder: ``$FEWCLIP_CONF`` when set, else the one installed with fewclip (package ``fewclip.conf``:
    the repository's ``conf/`` in an editable install, ``site-packages/fewclip/conf`` from a wheel)."""
    env = os.environ.get("FEWCLIP_CONF")
    if env:
        path = Path(env)
        hint = "FEWCLIP_CONF points at it; point it at a folder holding config.yaml, or unset it."
    else:
        path = Path(str(resources.files("fewclip.conf")))
        hint = "The fewclip installation is incomplete: reinstall it (pip install fewclip, or pip install -e .)."
    if not (path / "config.yaml").is_file():
        raise FileNotFoundError(f"fewclip's config folder was not found at {path}. {hint}")
    return path


def group_options(group: str) -> list[str]:
    """Names in a config group: the YAML file stems (the file is the name)."""
    return sorted(p.stem for p in (conf_dir() / group).glob("*.yaml"))


def expand_shorthands(overrides: list[str]) -> list[str]:
    """``pool=PATH`` -> ``pool.path=PATH`` (the pool's other settings live under ``pool.``)."""
    return [f"pool.path={o[5:]}" if o.startswith("pool=") else o for o in overrides]


def compose(overrides: list[str]) -> Any:
    """Compose the run config outside ``@hydra.main`` (``fewclip fit``, ``demo``, tests, notebooks)."""
    overrides = expand_shorthands(list(overrides))
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    register_schema()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = hydra_compose("config", overrides=overrides, return_hydra_config=True)
    # Expose the group choices (adapter=tip -> "tip") the way @hydra.main does.
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


register_resolvers()
