"""One job: (backbone, dataset, adapter, shots, seed) -> ``result.json``. Orchestration only, no method math.

Order of work, which is also the protocol:

0. check what is cheap to check first: the settings, the dataset (readable, two classes or more, K shots per
   class available): bad input is reported before the backbone loads;
1. build the dataset; resolve the protocol (``fewshot``, or ``reference``: the method's recipe,
   ``fewclip.protocol``); draw K shots per class from train and the validation images (min(K, 4) per class, or
   what the recipe's official code used); load the backbone;
2. build or load the text head, support and val stores;
3. ``adapter.setup`` -> ``fit(support, val)`` -> ``tune(val)``: every choice is made on val;
4. build or load the test store and evaluate on it, once;
5. write ``result.json`` atomically (a run that dies leaves none).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from adapters.base import Adapter, AdapterContext, FeatureSplit, SupportSet, accuracy, evaluate, predict_split
from caches.builder import CacheBuilder, describe_stores, text_raw_norms
from caches.data.augment import AugmentSpec
from caches.data.fewshot import persist_fewshot, select
from caches.data.pixels import PixelData
from caches.data.records import DatasetError, check_trainable
from caches.search import check_single_faiss
from caches.store import KVStore
from fewclip.config import SettingsError, check_settings
from fewclip.protocol import RunProtocol, draw_fewshot, resolve_protocol, val_description
from fewclip.threads import configure_job_threads

log = logging.getLogger(__name__)

RESULT_FILE = "result.json"
STATE_FILE = "adapter.safetensors"


def save_adapter_state(adapter: Adapter, out: Path) -> str | None:
    """The adapter's learned parameters only (never the backbone) as safetensors; None when it learns none."""
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in adapter.state_dict().items()}
    if not state:
        return None
    tmp = out / f".{STATE_FILE}.tmp{os.getpid()}"
    save_file(state, str(tmp))
    os.replace(tmp, out / STATE_FILE)
    return STATE_FILE


def restore_adapter(adapter: Adapter, run_dir: str | os.PathLike) -> Adapter:
    """Load a fitted adapter's learned state and chosen hyperparameters from a run directory.

    ``adapter`` must be freshly instantiated from the run's ``adapter_config`` (its YAML with, under
    ``protocol=reference``, the recipe's values) and ``setup`` with the same context.
    """
    from safetensors.torch import load_file

    run_dir = Path(run_dir)
    result = json.loads((run_dir / RESULT_FILE).read_text())
    for k, v in result["hparams"].items():
        setattr(adapter, k, v)
    if result.get("adapter_state"):
        adapter.load_state_dict(load_file(str(run_dir / result["adapter_state"])))
    return adapter.eval()


def group_choice(cfg: DictConfig, group: str) -> str:
    """The config-group option a job used (``tip`` for ``adapter=tip``): the file is the name."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return str(HydraConfig.get().runtime.choices[group])
    except (ValueError, KeyError):
        node = cfg.get(group)
        if isinstance(node, DictConfig) and node.get("name"):
            return str(node.name)
        return str(node.get("_target_", "?")).rsplit(".", 1)[-1] if node is not None else "?"


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    import faiss
    import hydra
    import open_clip
    import sklearn

    try:
        fewclip = version("fewclip")
    except PackageNotFoundError:
        fewclip = "source"
    from caches.search import faiss_distributions

    return {"fewclip": fewclip, "python": platform.python_version(), "torch": torch.__version__,
            "open_clip": open_clip.__version__, "faiss": getattr(faiss, "__version__", "?"),
            "faiss_package": ",".join(faiss_distributions()) or "?",
            "sklearn": sklearn.__version__, "hydra": hydra.__version__}


def instantiate_node(node: Any) -> Any:
    """``hydra.utils.instantiate``, but a bad-input error raised by the target surfaces as itself (Hydra
    wraps it in an ``InstantiationException`` whose text buries the message)."""
    from hydra.errors import InstantiationException

    try:
        return instantiate(node)
    except InstantiationException as e:
        if isinstance(e.__cause__, (DatasetError, FileNotFoundError, ValueError, RuntimeError)):
            raise e.__cause__ from None
        raise


def instantiate_adapter(node: Any) -> Adapter:
    """The adapter ``node`` describes. Its constructor only checks and stores settings, so a ``ValueError`` or
    ``TypeError`` raised there is a bad setting (``adapter.lookup=foo``, an unknown key): a ``SettingsError`` that
    the command prints as one line (exit 2), naming the adapter."""
    from hydra.errors import InstantiationException

    try:
        return instantiate(node)
    except InstantiationException as e:
        if isinstance(e.__cause__, (ValueError, TypeError)):
            target = str(node.get("_target_", "adapter")).rsplit(".", 1)[-1]
            raise SettingsError(f"{target}: {e.__cause__}") from None
        raise


def _features(store: KVStore) -> FeatureSplit:
    return FeatureSplit(features=store.keys(), labels=store.labels())


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False))
    os.replace(tmp, path)


def load_dataset_option(cfg: DictConfig, name: str) -> Any:
    """Instantiate ``conf/dataset/<name>.yaml`` outside the defaults list (evaluation targets)."""
    from fewclip.config import conf_dir

    path = conf_dir() / "dataset" / f"{name}.yaml"
    if not path.is_file():
        from fewclip.config import group_options

        raise FileNotFoundError(f"unknown target dataset '{name}'; available: {group_options('dataset')}")
    node = OmegaConf.load(path)
    if "defaults" in node:
        raise ValueError(f"target '{name}' uses a defaults list; name the dataset it extends instead")
    # Interpolations such as ${data_root} resolve against the run's config.
    root = OmegaConf.create({"data_root": cfg.data_root, "device": cfg.device, "target": node})
    return instantiate_node(root.target)


def evaluate_target(cfg: DictConfig, name: str, source: Any, adapter: Adapter, builder: CacheBuilder) -> dict:
    """Score the fitted adapter on an evaluation-only dataset, once.

    Classes map through the target's ``parent_labels`` (ImageNet-A/R: 200 of ImageNet's 1000 classes), so
    only those logits compete; without them the class names must equal the fitted dataset's.
    """
    target = load_dataset_option(cfg, name)
    if target.parent_labels is not None:
        if source.source.get("subsample", "all") != "all" or max(target.parent_labels) >= source.n_classes:
            raise ValueError(f"target {name} is labelled in its parent dataset's full label space; fit on the "
                             "whole parent dataset (subsample=all)")
        columns = torch.tensor(target.parent_labels)
    elif target.classnames == source.classnames:
        columns = torch.arange(source.n_classes)
    else:
        raise ValueError(f"target {name} has other classes than {source.name} and no label mapping")
    stores: dict[str, KVStore] = {}
    split, _ = eval_split(builder, target, target.splits["test"], adapter.input_kind == "pixels", stores, "test")
    logits, labels = predict_split(adapter, split)
    acc = accuracy(logits[:, columns], labels)
    return {"test_acc": acc, "n_test": len(labels),
            "cache": describe_stores(stores)["test"] if stores else None}


# Settings that change how a job runs, not what it computes: a finished job is not re-run when only these differ.
RESUME_IGNORES = ("progress", "num_workers", "resume", "threads")


def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k not in RESUME_IGNORES}


def finished_result(out: Path, cfg: DictConfig) -> dict[str, Any] | None:
    """The ``result.json`` in ``out`` when it was written for the same resolved config, else None."""
    path = out / RESULT_FILE
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    current = OmegaConf.to_container(cfg, resolve=True)
    if _comparable(saved.get("config", {})) != _comparable(current):
        log.info("%s holds a result of another config: running again", path)
        return None
    return saved


def evaluate_novel(cfg: DictConfig, adapter: Adapter, builder: CacheBuilder, base_ctx: AdapterContext,
                   adapter_node: Any = None) -> dict[str, Any]:
    """Base-to-novel: score the adapter fitted on the base classes on the new classes' test images, once.

    The new classes get their own text head; what the adapter learned moves over through
    ``Adapter.new_class_state`` (methods that need shots of every class report ``None``).
    """
    state = adapter.new_class_state()
    if state is None:
        return {"test_acc": None, "reason": f"{type(adapter).__name__} needs shots of every class it scores"}
    node = OmegaConf.to_container(cfg.dataset, resolve=True)
    novel_ds = instantiate_node(OmegaConf.create({**node, "subsample": "new"}))
    stores = {"text": builder.text(novel_ds)}
    empty = SupportSet(keys=torch.empty(0, base_ctx.support.keys.shape[1]), labels=torch.empty(0, dtype=torch.long))
    ctx = AdapterContext(classnames=list(novel_ds.classnames), text_head=stores["text"].keys(), support=empty,
                         logit_scale=base_ctx.logit_scale, backbone=base_ctx.backbone, device=base_ctx.device,
                         seed=base_ctx.seed, progress=base_ctx.progress, text_norms=text_raw_norms(stores["text"]))
    novel: Adapter = instantiate_adapter(cfg.adapter if adapter_node is None else adapter_node)
    novel.setup(ctx)
    novel.load_state_dict(state, strict=False)
    for k, v in adapter.hparams().items():
        setattr(novel, k, v)
    split, _ = eval_split(builder, novel_ds, novel_ds.splits["test"], adapter.input_kind == "pixels", stores,
                          "test")
    logits, labels = predict_split(novel, split)
    return {"test_acc": accuracy(logits, labels), "n_test": len(labels), "n_classes": novel_ds.n_classes,
            "cache": describe_stores(stores)}


def eval_split(builder: CacheBuilder, dataset: Any, samples: list, pixel_mode: bool, stores: dict[str, KVStore],
               key: str) -> tuple[Any, int]:
    """An evaluation split as cached features (stored in ``stores[key]``) or, for pixel adapters, as pixels.

    Returns the split and the number of unreadable images skipped (known up front only for cached features).
    """
    if pixel_mode:
        return builder.pixel_split(dataset, samples), 0
    stores[key] = builder.features(dataset, "test", samples)
    return _features(stores[key]), len(stores[key].manifest.get("skipped", []))


def support_store(builder: CacheBuilder, dataset: Any, samples: list, cfg: DictConfig, proto: RunProtocol,
                  aug: AugmentSpec) -> KVStore:
    """The support store: ``proto.views`` augmented views per image, or un-augmented features (``plain``: the
    eval transform, one per image, for methods fitted on them such as lpclip's linear probe)."""
    if proto.support_features == "plain":
        return builder.features(dataset, "train", samples, index=cfg.cache.index)
    return builder.support(dataset, samples, cfg.shots, cfg.seed, views=proto.views, aug=aug, index=cfg.cache.index)


def run(cfg: DictConfig, out_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Run one job and write ``result.json`` into ``out_dir`` (default: the Hydra output directory)."""
    t_start = time.perf_counter()
    check_settings(cfg)
    if out_dir is None:
        from hydra.core.hydra_config import HydraConfig

        out_dir = HydraConfig.get().runtime.output_dir
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.get("resume", True) and (done := finished_result(out, cfg)) is not None:
        log.info("skipping %s: result.json of the same config exists (resume=false runs it again)", out)
        return {**done, "resumed": True}
    threads = configure_job_threads(cfg.get("threads"))
    check_single_faiss()
    # The adapter by its option; the dataset and backbone by name (the option's, or a folder's or model's: two
    # folder datasets must not share the name "folder" in reports).
    names = {"adapter": group_choice(cfg, "adapter"), "dataset": str(cfg.dataset.name),
             "backbone": str(cfg.backbone.name)}
    timings: dict[str, float] = {}

    # Cheap checks first: a missing folder, an empty class or too few shots must not wait for the backbone.
    t = time.perf_counter()
    dataset = instantiate_node(cfg.dataset)
    check_trainable(dataset)
    timings["dataset"] = time.perf_counter() - t
    proto = resolve_protocol(cfg, names["adapter"], names["dataset"])
    adapter: Adapter = instantiate_adapter(proto.adapter)  # a bad adapter setting fails before any encoding
    fewshot = draw_fewshot(cfg, dataset, proto, instantiate_node)
    fewshot_path = persist_fewshot(fewshot, Path(cfg.cache_dir) / "fewshot" / dataset.name)
    # An imported CoOp draw may take ImageNet support images from the val split fewclip carved from train.
    support_samples = select(dataset, ("train", "val"), fewshot.train)
    t = time.perf_counter()
    backbone = instantiate_node(cfg.backbone)
    timings["backbone"] = time.perf_counter() - t

    builder = CacheBuilder(backbone, cfg.cache_dir, batch_size=cfg.batch_size, num_workers=cfg.num_workers,
                           progress=cfg.progress)
    aug = AugmentSpec(scale=tuple(cfg.augment.scale), ratio=tuple(cfg.augment.ratio), flip_p=cfg.augment.flip_p)
    stores = {"text": builder.text(dataset), "support": support_store(builder, dataset, support_samples, cfg, proto,
                                                                     aug)}
    stores["val"] = builder.features(dataset, "val", select(dataset, "val", fewshot.val))
    support = SupportSet(keys=stores["support"].keys(), labels=stores["support"].labels(),
                         views=stores["support"].view_features(),
                         index=stores["support"].searcher(cfg.cache.search_params))
    val = _features(stores["val"])

    def make_ctx(support_set: SupportSet) -> AdapterContext:
        return AdapterContext(classnames=list(dataset.classnames), text_head=stores["text"].keys(),
                              support=support_set, logit_scale=backbone.logit_scale, backbone=backbone,
                              device=backbone.device, seed=cfg.seed, progress=cfg.progress,
                              text_norms=text_raw_norms(stores["text"]))

    pixel_mode = adapter.input_kind == "pixels"
    pool_record = None
    if cfg.pool.path:
        from fewclip.pool import fit_with_pool

        if pixel_mode:
            raise DatasetError("pool= grows the cached support features; pixel-mode adapters train on pixels and "
                               "cannot use it")
        t = time.perf_counter()
        adapter, support, fit_record, selection, pool_record = fit_with_pool(
            cfg, builder, dataset, stores, support, val, make_ctx, lambda: instantiate_adapter(proto.adapter))
        ctx = adapter.ctx
        timings["fit"] = time.perf_counter() - t  # every candidate's fit and search
        timings["search"] = 0.0
    else:
        ctx = make_ctx(support)
        if pixel_mode:
            ctx.pixels = PixelData(train=builder.pixel_split(dataset, support_samples),
                                   val=builder.pixel_split(dataset, select(dataset, "val", fewshot.val)), aug=aug)
            val = ctx.pixels.val
        adapter.setup(ctx)
        t = time.perf_counter()
        fit_record = adapter.fit(support, val)
        timings["fit"] = time.perf_counter() - t
        t = time.perf_counter()
        selection = adapter.tune(val)
        timings["search"] = time.perf_counter() - t
    val_acc = evaluate(adapter, val)
    state_file = save_adapter_state(adapter, out)

    # The only place the test split is read: encoded (or loaded) here, evaluated once.
    t = time.perf_counter()
    test, n_skipped = eval_split(builder, dataset, dataset.splits["test"], pixel_mode, stores, "test")
    logits, test_labels = predict_split(adapter, test)
    test_acc = accuracy(logits, test_labels)
    timings["eval"] = time.perf_counter() - t
    targets = {name: evaluate_target(cfg, name, dataset, adapter, builder) for name in cfg.get("targets", [])}
    novel = evaluate_novel(cfg, adapter, builder, ctx, proto.adapter) \
        if dataset.source.get("subsample") == "base" and cfg.get("novel", True) else None
    timings["encode"] = builder.encode_seconds
    timings["total"] = time.perf_counter() - t_start

    result = {
        "dataset": names["dataset"],
        "adapter": names["adapter"],
        "backbone": names["backbone"],
        "shots": int(cfg.shots),
        "seed": int(cfg.seed),
        "n_classes": dataset.n_classes,
        "n_support": len(support),
        "n_val": len(val),
        "n_test": len(test_labels),
        "n_test_skipped": n_skipped,
        "val_acc": val_acc,
        "test_acc": test_acc,
        "targets": targets,
        **({"novel": novel} if novel is not None else {}),
        "hparams": adapter.hparams(),
        "lookup": adapter.lookup_record(),
        **({"pool": pool_record} if pool_record is not None else {}),
        "adapter_config": OmegaConf.to_container(proto.adapter, resolve=True),
        "adapter_state": state_file,
        "selection": {**selection, "fit": fit_record, "val_images_per_class": val_description(proto, cfg.shots)},
        "protocol": {"name": proto.name, "templates": dataset.templates,
                     "split_source": dataset.source.get("split_source"),
                     "val_shots": val_description(proto, cfg.shots), "views": proto.views,
                     "support_features": proto.support_features, "sampler": fewshot.source,
                     "backbone_weights": backbone.weights_id, "selection": "val",
                     "logit_scale": backbone.logit_scale, "logit_scale_source": backbone.logit_scale_source,
                     "subsample": dataset.source.get("subsample", "all")},
        "recipe": proto.record(),
        "backbone_weights": {"id": backbone.weights_id, **backbone.weights_info},
        "cache": describe_stores(stores),
        "cache_activity": {"built": builder.built, "loaded": builder.loaded,
                           "encoded_images": builder.encoded_images},
        "fewshot_ids": str(fewshot_path),
        "fewshot_notes": fewshot.notes,
        "timings_s": timings,
        "threads": threads,
        "versions": versions(),
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    write_json_atomic(out / RESULT_FILE, result)
    log.info("%s %s %s k=%d seed=%d: val %.2f%% test %.2f%% (%s)", result["dataset"], result["adapter"],
             result["backbone"], cfg.shots, cfg.seed, val_acc, test_acc, out / RESULT_FILE)
    return result
