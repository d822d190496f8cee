"""The typed spine of the configuration (Hydra structured config) and where the YAML files live.

Groups (``backbone``, ``dataset``, ``adapter``) stay free-form: each YAML names its ``_target_``. The
top-level run settings are typed, so ``shots=abc`` fails when the config is composed.
"""

from __future__ import annotations

import os
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
    progress: bool = True
    resume: bool = True  # skip the job when its output directory holds a result.json of the same config
    novel: bool = True  # with dataset.subsample=base, also score the fitted adapter on the new classes
    sweep_name: str = "default"  # sweeps write to outputs/sweeps/<sweep_name>/ (set by conf/sweep/*.yaml)
    protocol: str = "fewshot"  # fewshot | reference (each method's published recipe: conf/recipe/<adapter>.yaml)
    fewshot: Any = field(default_factory=fewshot_defaults)
    cache: CacheConfig = field(default_factory=CacheConfig)
    pool: PoolConfig = field(default_factory=PoolConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)


def register_schema() -> None:
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
