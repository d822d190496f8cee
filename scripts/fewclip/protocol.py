"""The run protocol: ``fewshot`` (fewclip's, every choice on min(K, 4) val images per class) or ``reference``
(the method's published recipe, ``conf/recipe/<adapter>.yaml``, without selecting on test).

:func:`resolve_protocol` turns the run's config into what the runner needs: the adapter config to instantiate (the
recipe's values, then the user's command-line values, which win and are recorded as departures), the few-shot
sampler, the validation rule, the number of augmented views and the kind of support features.
:func:`draw_fewshot` draws (or imports) the shots and applies the validation rule.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from caches.data.coop_pickle import import_fewshot
from caches.data.fewshot import SAMPLERS, FewShotSplit, dassl_draw, sample_fewshot, val_shots
from caches.data.records import DatasetError, ImageDataset
from fewclip.recipes import PROTOCOLS, Recipe, RecipeError, compose_recipe

log = logging.getLogger(__name__)

VAL_RULES = ("fewshot", "full", "kshot")


@dataclass
class RunProtocol:
    """What a job does, resolved from its config and (``reference``) its method's recipe."""

    name: str
    sampler: str
    val: str  # fewshot (min(K, 4) per class) | full (the whole val split) | kshot (K per class)
    views: int
    support_features: str  # augmented | plain
    adapter: DictConfig  # the adapter config to instantiate
    import_path: str | None = None
    recipe: Recipe | None = None
    overridden: dict[str, Any] = field(default_factory=dict)  # recipe keys the user set on the command line

    def record(self) -> dict[str, Any] | None:
        """The ``recipe`` section of ``result.json`` (None under the fewshot protocol)."""
        if self.recipe is None:
            return None
        out = self.recipe.as_dict()
        out["overridden"] = self.overridden
        out["departures"] = list(out["departures"]) + [
            f"adapter.{k}={v!r} was set on the command line (the reference: {self.recipe.adapter[k]!r})"
            for k, v in self.overridden.items()]
        return out


def command_line_keys(prefix: str = "adapter.") -> dict[str, Any]:
    """``{key: value}`` of the ``PREFIX.KEY=VALUE`` overrides given on the command line (empty outside Hydra);
    the prefix is stripped (``""``: every override, keys as written)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        overrides = HydraConfig.get().overrides.task
    except ValueError:
        return {}
    out = {}
    for o in overrides:
        key, sep, value = str(o).lstrip("+~").partition("=")
        if sep and key.startswith(prefix):
            out[key[len(prefix):]] = value
    return out


def _setting(cfg: DictConfig, path: str, default: Any = None) -> Any:
    return OmegaConf.select(cfg, path, default=default)


def resolve_protocol(cfg: DictConfig, adapter_name: str, dataset_name: str,
                     explicit: dict[str, Any] | None = None) -> RunProtocol:
    """Resolve the protocol of one job.

    ``explicit``: the ``KEY=VALUE`` overrides given on the command line (default: read from Hydra); under
    ``reference`` their ``adapter.*`` keys and ``views`` win over the recipe and are listed as departures.
    """
    name = str(_setting(cfg, "protocol", "fewshot"))
    if name not in PROTOCOLS:
        raise RecipeError(f"protocol must be one of {PROTOCOLS}, got '{name}'")
    sampler = _setting(cfg, "fewshot.sampler")
    if sampler is not None and sampler not in SAMPLERS:
        raise RecipeError(f"fewshot.sampler must be one of {SAMPLERS}, got '{sampler}'")
    import_path = _setting(cfg, "fewshot.import")
    if import_path is not None and not isinstance(import_path, str):
        raise RecipeError(f"fewshot.import must be a file path, got {import_path!r}")
    if not isinstance(_setting(cfg, "fewshot.allow_fewer", False), bool):
        raise RecipeError(f"fewshot.allow_fewer must be true or false, got {_setting(cfg, 'fewshot.allow_fewer')!r}")
    adapter = OmegaConf.create(OmegaConf.to_container(cfg.adapter, resolve=True))
    if name == "fewshot":
        return RunProtocol(name=name, sampler=sampler or "fewclip", val="fewshot", views=int(cfg.views),
                           support_features="augmented", adapter=adapter,
                           import_path=str(import_path) if import_path else None)
    recipe = compose_recipe(adapter_name, dataset_name, int(cfg.shots))
    explicit = command_line_keys("") if explicit is None else explicit
    overridden = {k: adapter[k] for k in recipe.adapter if f"adapter.{k}" in explicit and k in adapter}
    with open_dict(adapter):
        for key, value in recipe.adapter.items():
            if key not in overridden:
                adapter[key] = value
    run = recipe.run
    if sampler is not None and sampler != run["sampler"]:
        recipe.departures.append(f"fewshot.sampler={sampler} set on the command line (the reference: "
                                 f"{run['sampler']})")
    views = int(run.get("views", cfg.views))
    if "views" in explicit and "views" in run and int(cfg.views) != views:
        recipe.departures.append(f"views={cfg.views} set on the command line (the reference: {views})")
        views = int(cfg.views)
    return RunProtocol(name=name, sampler=sampler or run["sampler"], val=run["val"],
                       views=views, support_features=run["support_features"],
                       adapter=adapter, import_path=str(import_path) if import_path else None, recipe=recipe,
                       overridden=overridden)


def _full_dataset(cfg: DictConfig, dataset: ImageDataset, instantiate: Callable[[Any], Any]) -> ImageDataset:
    """The dataset before its class subsample (Dassl draws, and CoOp pickles, cover every class)."""
    if dataset.source.get("subsample", "all") == "all":
        return dataset
    node = OmegaConf.to_container(cfg.dataset, resolve=True)
    return instantiate(OmegaConf.create({**node, "subsample": "all"}))


def draw_fewshot(cfg: DictConfig, dataset: ImageDataset, proto: RunProtocol,
                 instantiate: Callable[[Any], Any]) -> FewShotSplit:
    """The support and validation ids of one job: drawn by ``proto.sampler`` or imported, then ``proto.val``.

    ``val``: ``fewshot`` keeps the draw's min(K, 4) per class, ``full`` takes every val image, ``kshot`` draws K
    per class. Images used as support are never validation images (ImageNet's val is carved from train, so an
    imported CoOp draw can hold some of them).
    """
    shots, seed = int(cfg.shots), int(cfg.seed)
    allow_fewer = bool(_setting(cfg, "fewshot.allow_fewer", False))
    full = _full_dataset(cfg, dataset, instantiate) if proto.sampler == "dassl" or proto.import_path else dataset
    n_val = shots if proto.val == "kshot" else None
    if proto.import_path:
        fs = import_fewshot(proto.import_path, dataset, shots, seed, draw_from=full)
        if not fs.val and proto.val != "full":  # CoOp's ImageNet pickle has no val: draw it the protocol's way
            pool = [s for s in dataset.splits["val"] if s.id not in set(fs.train)]
            k = shots if proto.val == "kshot" else val_shots(shots)
            fs.val = [s.id for s in dassl_draw(pool, k, random.Random(seed))]
            fs.notes.append(f"the file holds no val images: {k} per class drawn from val with the Dassl sampler")
    else:
        fs = sample_fewshot(dataset, shots, seed, allow_fewer=allow_fewer, sampler=proto.sampler,
                            val_per_class=n_val, draw_from=full if proto.sampler == "dassl" else None)
    if proto.val == "full":
        train = set(fs.train)
        fs.val = [s.id for s in dataset.splits["val"] if s.id not in train]
        if not fs.val:
            raise DatasetError(f"dataset {dataset.name}: the val split is empty; hyperparameters need val data")
    overlap = set(fs.train) & set(fs.val)
    if overlap:
        fs.val = [i for i in fs.val if i not in overlap]
        fs.notes.append(f"{len(overlap)} support images left out of val")
    return fs


def val_description(proto: RunProtocol, shots: int) -> int | str:
    """Validation images per class as ``result.json`` records it: a count, or ``full``."""
    return "full" if proto.val == "full" else (int(shots) if proto.val == "kshot" else val_shots(int(shots)))
