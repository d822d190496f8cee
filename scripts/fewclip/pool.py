"""``pool=PATH``: fit the adapter on a support set grown from unlabeled images, with the pool's settings chosen on val.

The pool (a folder or CSV of images) is encoded once into its own eval feature bank and store (``caches/pool.py``
says how images are retrieved and pseudo-labelled). Every setting of the grid ``pool.per_class x pool.by x
pool.threshold`` (``per_class = 0`` is the plain cache, a single candidate) grows a support set; the adapter is set up,
fitted and tuned on each exactly as a run without a pool would, and the best val accuracy wins (ties keep the earlier
candidate, plain first). Only the winner is kept: its grown support set becomes the run's ``support`` store
(``support-grown-*``, whose ``meta.csv`` gives every row's provenance), and only it meets the test split.

Pool rows have one feature (the eval transform, as SuS-X encodes its support images); adapters that train on the
cached augmented views see that feature as each of the A views of a pool image.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig

from adapters.base import Adapter, AdapterContext, FeatureSplit, SupportSet, evaluate
from caches.builder import CacheBuilder
from caches.data.records import ImageDataset
from caches.pool import Grown, PoolChoice, PoolError, grow, load_pool, retrieve
from caches.search import KeyIndex, build_index
from caches.store import KVStore

log = logging.getLogger(__name__)


def _values(node: Any, name: str, cast: Callable[[Any], Any]) -> list[Any]:
    values = list(node) if isinstance(node, (list, tuple, ListConfig)) else [node]
    if not values:
        raise PoolError(f"pool.{name} is empty")
    try:
        return [cast(v) for v in values]
    except (TypeError, ValueError) as e:
        raise PoolError(f"pool.{name}={node}: {e}") from None


def pool_choices(cfg: DictConfig) -> list[PoolChoice]:
    """The grid of pool settings, plain cache (``per_class = 0``) once and first when it is listed."""
    per_class = _values(cfg.per_class, "per_class", int)
    by = _values(cfg.by, "by", str)
    threshold = _values(cfg.threshold, "threshold", float)
    choices: list[PoolChoice] = []
    for m, b, t in itertools.product(per_class, by, threshold):
        choice = PoolChoice(0) if m == 0 else PoolChoice(m, b, t)
        if choice not in choices:
            choices.append(choice)
    return choices


def dataset_paths(dataset: ImageDataset) -> set[str]:
    """Resolved paths of every image of the dataset (kept out of the pool)."""
    from pathlib import Path

    return {str(Path(s.path).resolve()) for samples in dataset.splits.values() for s in samples if s.path}


def grown_set(support: SupportSet, pool_keys: torch.Tensor, grown: Grown, index_factory: str,
              search_params: str) -> SupportSet:
    """The support set with the grown pool rows appended (keys, labels, and the pool feature as every view)."""
    keys = torch.cat([support.keys, pool_keys[grown.rows]])
    views = None
    if support.views is not None:
        extra = pool_keys[grown.rows][None].expand(support.views.shape[0], -1, -1)
        views = torch.cat([support.views, extra], dim=1)
    index = KeyIndex(build_index(keys.numpy(), index_factory), index_factory, params=search_params)
    return SupportSet(keys=keys, labels=torch.cat([support.labels, grown.labels]), views=views, index=index)


def provenance(support_store: KVStore, pool_store: KVStore, grown: Grown, by: str, classnames: list[str]
               ) -> list[dict[str, Any]]:
    """``meta.csv`` rows of a grown support store: the shots, then the pool images with how they were chosen."""
    rows = [{"id": r.get("id", ""), "label": r.get("label", ""), "classname": r.get("classname", ""),
             "source": "shot", "by": "", "similarity": "", "confidence": ""} for r in support_store.meta]
    for r, y, s, c in zip(grown.rows.tolist(), grown.labels.tolist(), grown.similarity.tolist(),
                          grown.confidence.tolist()):
        rows.append({"id": pool_store.meta[r].get("id", ""), "label": y, "classname": classnames[y], "source": "pool",
                     "by": by,
                     "similarity": f"{s:.6f}", "confidence": f"{c:.6f}"})
    return rows


def fit_with_pool(cfg: DictConfig, builder: CacheBuilder, dataset: ImageDataset, stores: dict[str, KVStore],
                  support: SupportSet, val: FeatureSplit, make_ctx: Callable[[SupportSet], AdapterContext],
                  make_adapter: Callable[[], Adapter]) -> tuple[Adapter, SupportSet, dict[str, Any], dict[str, Any],
                                                                dict[str, Any]]:
    """Choose the pool setting on val and return the fitted adapter, its support set, its fit and selection
    records, and the pool record for ``result.json``. ``stores["support"]`` becomes the grown store and
    ``stores["pool"]`` the pool's."""
    t0 = time.perf_counter()
    pool_ds = load_pool(str(cfg.pool.path), exclude=dataset_paths(dataset))
    stores["pool"] = builder.features(pool_ds, "pool", pool_ds.splits["train"], index=cfg.pool.index)
    pool_keys = stores["pool"].keys()
    if len(pool_keys) == 0:
        raise PoolError(f"pool={cfg.pool.path}: none of its {len(pool_ds.splits['train'])} images could be read")
    pool_index = stores["pool"].searcher(cfg.cache.search_params)
    text = stores["text"].keys()
    encode_s = time.perf_counter() - t0
    candidates: list[dict[str, Any]] = []
    best: tuple[float, Adapter, SupportSet, PoolChoice, Grown | None, dict[str, Any], dict[str, Any]] | None = None
    retrieved: dict[tuple[int, str], list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for choice in pool_choices(cfg.pool):
        t = time.perf_counter()
        grown = None
        cand_support = support
        if choice.per_class:
            key = (choice.per_class, choice.by)
            if key not in retrieved:
                retrieved[key] = retrieve(pool_index, text, support.keys, support.labels, choice.per_class, choice.by)
            grown = grow(pool_keys, retrieved[key], text, choice.threshold, logit_scale=make_ctx(support).logit_scale)
            cand_support = grown_set(support, pool_keys, grown, cfg.cache.index, cfg.cache.search_params)
        adapter = make_adapter()
        adapter.setup(make_ctx(cand_support))
        fit_record = adapter.fit(cand_support, val)
        selection = adapter.tune(val)
        acc = evaluate(adapter, val)
        candidates.append({**choice.as_dict(), "added": len(grown) if grown is not None else 0, "val_acc": acc,
                           "hparams": adapter.hparams(), "seconds": time.perf_counter() - t})
        log.info("pool %s: %d images added, val %.2f%%", choice.as_dict(), candidates[-1]["added"], acc)
        if best is None or acc > best[0]:
            best = (acc, adapter, cand_support, choice, grown, fit_record, selection)
    assert best is not None
    acc, adapter, chosen_support, choice, grown, fit_record, selection = best
    if grown is not None:
        base, pool = stores["support"], stores["pool"]
        spec = {"kind": "support-grown", "backbone": base.manifest["spec"]["backbone"],
                "support": base.fingerprint, "pool": pool.fingerprint, "text": stores["text"].fingerprint,
                "choice": choice.as_dict(), **({"index": cfg.cache.index} if cfg.cache.index != "Flat" else {})}

        def build() -> tuple[dict[str, Any], dict[str, Any]]:
            return ({"keys": chosen_support.keys, "values": chosen_support.labels, "index": chosen_support.index.index,
                     "meta": provenance(base, pool, grown, choice.by, list(dataset.classnames))},
                    {"pool_rows": len(grown)})

        stores["support"] = builder.derived(dataset, f"support-grown-k{cfg.shots}-s{cfg.seed}", spec, build)
        chosen_support.index = stores["support"].searcher(cfg.cache.search_params)
    added_per_class = torch.bincount(grown.labels, minlength=dataset.n_classes).tolist() if grown is not None else []
    record = {"path": str(cfg.pool.path), "n_images": len(pool_keys),
              "n_skipped": len(stores["pool"].manifest.get("skipped", [])), "chosen": choice.as_dict(),
              "added": len(grown) if grown is not None else 0, "added_per_class": added_per_class,
              "val_acc": acc, "candidates": candidates, "encode_s": encode_s, "selection": "val"}
    return adapter, chosen_support, fit_record, selection, record
