"""Fitted classifiers as self-contained artifact directories: ``fewclip fit``, ``predict`` and ``add-class``.

``fewclip fit`` runs one job exactly as ``fewclip run`` does (selection on val only, test evaluated once,
``result.json``) and then copies everything needed to classify new images into one directory: the adapter's
state and chosen hyperparameters, the text head, the support cache (so training-free adapters need neither the
dataset nor the cache), the class names, templates, backbone identity and preprocessing. ``load_artifact`` (or
``fewclip predict``) rebuilds the classifier from it with nothing but the backbone weights.

Artifact layout (``format_version`` 1); JSON, YAML, CSV, safetensors, faiss and ``.npy`` files only, no pickles::

    ARTIFACT/
      artifact.json          what the artifact is (fields below); written last, so a directory without it is
                             never an artifact
      config.yaml            the resolved run config (Hydra overrides applied): enough to refit
      result.json            the fit's record as the runner wrote it (val/test accuracy, hyperparameters chosen
                             on val, selection, timings, versions); ``restore_adapter`` reads it
      adapter.safetensors    the adapter's learned parameters; absent for adapters that learn none
                             (zero_shot, tip, gda, ape)
      text/                  a KVStore (caches/FORMAT.md): the zero-shot text head, one row per class [C, D]
      support/               a KVStore: the few-shot support cache, keys [N, D], labels [N], views [A, N, D]

``artifact.json`` fields:

* ``format`` (``fewclip-artifact``), ``format_version``, ``created_at`` (UTC), ``updated_at``;
* ``classnames`` (the model's output order), ``templates`` (prompt templates of the text head);
* ``adapter``: ``name`` (config option, e.g. ``tip``), ``target`` (class path), ``input_kind`` (``features`` or
  ``pixels``), ``config`` (its resolved YAML node), ``hparams`` (chosen on val), ``state`` (file or null);
* ``backbone``: ``name``, ``model`` (open_clip architecture), ``pretrained`` (tag or weights file name),
  ``weights_id`` (``tag:<tag>``, ``file-sha256:<16 hex>`` or ``random:<16 hex>``), ``precision``, ``image``, ``dim``,
  and ``config`` (the resolved backbone node used to load the weights again);
* ``preprocessing``: image ``size``, ``mean``, ``std``, ``interpolation`` and the ``transform``
  (resize short side, centre crop, normalise: ``caches.data.augment.eval_transform``);
* ``seed``, ``shots``, ``views`` (augmented views per support image), ``augmentation``;
* ``stores``: per store (``text``, ``support``) its directory, fingerprint and row count;
* ``fit``: ``dataset``, ``val_acc``, ``test_acc`` (percent), ``n_classes``, ``n_support``, ``n_val``, ``n_test``,
  ``n_test_skipped``, ``targets``, ``selection`` (``val``), and ``store_fingerprints`` of the run's text, support,
  val and test stores;
* ``added_classes``: classes added later by ``add-class`` (name, how, images used, unreadable ones); the ``fit``
  figures describe the fitted classes only;
* ``versions``; ``files``: sha256 of ``config.yaml``, ``result.json`` and ``adapter.safetensors`` (the stores carry
  their own checksums in their manifests); all are verified on load.

Adding a class (``Artifact.add_class``, ``fewclip add-class``) never refits and keeps the hyperparameters chosen on
val (alpha, beta, ...). It is allowed where the method is defined for a class it had no fitting data for:

* ``zero_shot``: one text-head row from the templates (images are not needed);
* ``tip``: the new images' augmented views (the support store's recipe) become cache keys with one-hot values;
* ``gda``: the closed form is recomputed on the extended support set (shared covariance, every class's weights);
* ``ape``: keys, divergences and the channel selection are recomputed on the extended support set and text head
  (the selection looks at every class, so the fitted classes' scores can move too);
* adapters whose learned state does not depend on the classes (``Adapter.new_class_state`` is not None: CoOp with a
  shared context, CoCoOp, KgCoOp, CLIP-Adapter, MaPLe, DPT, CoOp on pixels) score the new class from its name,
  as in base-to-novel evaluation; the images are not used.

The new class's support rows get the ids ``added/<name>/<index>-<file name>`` (an id seeds its views' crops); the
stores are rewritten with specs naming the new class (the text store's is the one ``CacheBuilder.text`` would give
the extended class list; the support store's gains ``added_classes``), so their fingerprints change.

The others refuse with the reason (``tip_f``, ``linear_probe``, ``lp_pp``, ``clap``, ``taskres``, ``ape_t``, CoOp with
class-specific contexts, ``auto``): they learned per-class parameters from the fitted classes' shots.
"""

from __future__ import annotations

import argparse
import csv
import importlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from adapters.base import Adapter, AdapterContext, SupportSet
from adapters.runner import RESULT_FILE, STATE_FILE, restore_adapter, save_adapter_state, versions
from caches.backbone import FrozenClip, sha256_file
from caches.data.records import IMAGE_EXTENSIONS, ImageDataset, Sample
from caches.store import KVStore, StoreError

log = logging.getLogger(__name__)

FORMAT = "fewclip-artifact"
FORMAT_VERSION = 1
ARTIFACT_FILE = "artifact.json"
CONFIG_FILE = "config.yaml"
TEXT_DIR = "text"
SUPPORT_DIR = "support"
# Loading an artifact imports the classes it names: only these, never an arbitrary path from a JSON file.
BACKBONE_TARGETS = ("caches.backbone.load_backbone",)
ADAPTER_PACKAGE = "adapters."


class ArtifactError(ValueError):
    """An artifact is missing, damaged, or cannot do what was asked. The message says what to do."""


class BackboneMismatchError(ArtifactError):
    """The loaded backbone is not the one the artifact was fitted with."""


class AddClassError(ArtifactError):
    """The artifact's adapter cannot take a new class without a refit (or the request is malformed)."""


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# ---------------------------------------------------------------------------------------------------- writing
def _check_destination(out: Path) -> None:
    """Refuse to replace anything but an earlier artifact or an empty folder (never a user's folder)."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ArtifactError(f"{out} exists and is a file; choose another artifact directory")
    if not (out / ARTIFACT_FILE).is_file() and any(out.iterdir()):
        raise ArtifactError(f"{out} exists and is not a fewclip artifact; choose another directory or remove it")


def _tmp_sibling(out: Path, what: str) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.{what}-", dir=out.parent))


def _install(tmp: Path, out: Path) -> None:
    """Move a complete artifact into place. A directory cannot be renamed over a non-empty one, so an existing
    artifact is first renamed aside and removed after; readers never see a half-written artifact."""
    old = None
    if out.exists():
        if any(out.iterdir()):
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.rename(out, old)
        else:
            out.rmdir()
    os.rename(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _write_info(tmp: Path, info: dict[str, Any]) -> None:
    """Checksums of the loose files, then ``artifact.json`` last."""
    names = [n for n in (CONFIG_FILE, RESULT_FILE, STATE_FILE) if (tmp / n).is_file()]
    info["files"] = {n: sha256_file(tmp / n) for n in names}
    (tmp / ARTIFACT_FILE).write_text(json.dumps(info, indent=2))


def _describe(result: dict[str, Any], text: KVStore, support: KVStore) -> dict[str, Any]:
    """``artifact.json`` of a run (without ``files``)."""
    cfg = result["config"]
    spec = support.manifest["spec"]
    backbone = dict(spec["backbone"])  # FrozenClip.describe() at fit time: what the features were encoded with
    adapter_node = result.get("adapter_config") or cfg["adapter"]  # protocol=reference: the recipe's values
    cls = _adapter_class(adapter_node.get("_target_", ""))
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created_at": _now(),
        "updated_at": _now(),
        "classnames": list(text.manifest["spec"]["classnames"]),
        "templates": list(text.manifest["spec"]["templates"]),
        "adapter": {"name": result["adapter"], "target": adapter_node["_target_"], "input_kind": cls.input_kind,
                    "config": adapter_node, "hparams": result["hparams"], "state": result.get("adapter_state")},
        "backbone": {**backbone, "config": cfg["backbone"]},
        "preprocessing": {**backbone["image"], "transform": "resize short side, centre crop, normalise "
                                                            "(caches.data.augment.eval_transform)"},
        "seed": int(cfg["seed"]),
        "shots": int(cfg["shots"]),
        "views": int(spec.get("views", support.manifest.get("views", 0))),
        "augmentation": spec.get("augmentation"),
        "stores": _store_records(text, support),
        "fit": {"dataset": result["dataset"], "val_acc": result["val_acc"], "test_acc": result["test_acc"],
                "n_classes": result["n_classes"], "n_support": result["n_support"], "n_val": result["n_val"],
                "n_test": result["n_test"], "n_test_skipped": result.get("n_test_skipped", 0),
                "targets": result.get("targets", {}), "selection": result.get("protocol", {}).get("selection", "val"),
                "store_fingerprints": {k: v["fingerprint"] for k, v in result.get("cache", {}).items()}},
        "added_classes": [],
        "versions": versions(),
    }


def _store_records(text: KVStore, support: KVStore) -> dict[str, dict[str, Any]]:
    return {name: {"dir": name, "fingerprint": s.fingerprint, "n": len(s)}
            for name, s in ((TEXT_DIR, text), (SUPPORT_DIR, support))}


def export_artifact(run: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Copy a finished run into a self-contained artifact directory (layout in the module docstring).

    Args:
        run: the run's output directory (holding ``result.json`` and ``adapter.safetensors``), or its
            ``result.json``. The run's text and support stores are read from the paths recorded there (relative
            paths resolve against the current directory) and verified against their fingerprints.
        out_dir: the artifact directory; written in a temporary sibling and renamed into place. An existing
            artifact there is replaced; any other non-empty folder is refused.
    Returns:
        the artifact directory.
    """
    from omegaconf import OmegaConf

    run_path = Path(run)
    run_dir = run_path.parent if run_path.is_file() else run_path
    if not (run_dir / RESULT_FILE).is_file():
        raise ArtifactError(f"{run_dir}: no {RESULT_FILE}; not a finished fewclip run")
    result = json.loads((run_dir / RESULT_FILE).read_text())
    stores: dict[str, KVStore] = {}
    for kind in ("text", "support"):
        record = result.get("cache", {}).get(kind)
        if record is None:
            raise ArtifactError(f"{run_dir / RESULT_FILE} lists no {kind} store")
        try:
            stores[kind] = KVStore.load(record["path"], record["fingerprint"])
        except StoreError as e:
            raise ArtifactError(f"the run's {kind} store is missing or changed ({e}); run the job again") from e
    out = Path(out_dir)
    _check_destination(out)
    tmp = _tmp_sibling(out, "tmp")
    try:
        # The store directories are copied verbatim: their manifests' fingerprints and checksums still hold.
        shutil.copytree(stores["text"].path, tmp / TEXT_DIR)
        shutil.copytree(stores["support"].path, tmp / SUPPORT_DIR)
        if result.get("adapter_state"):
            shutil.copyfile(run_dir / result["adapter_state"], tmp / STATE_FILE)
            result["adapter_state"] = STATE_FILE
        (tmp / RESULT_FILE).write_text(json.dumps(result, indent=2))
        (tmp / CONFIG_FILE).write_text(OmegaConf.to_yaml(OmegaConf.create(result["config"])))
        _write_info(tmp, _describe(result, stores["text"], stores["support"]))
        _install(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("artifact written to %s", out)
    return out


# ---------------------------------------------------------------------------------------------------- loading
def _adapter_class(target: str) -> type[Adapter]:
    """The adapter class an artifact names, imported only from the ``adapters`` package."""
    module, _, name = target.rpartition(".")
    if not target.startswith(ADAPTER_PACKAGE) or not module:
        raise ArtifactError(f"artifact names adapter class '{target}', which is not one of fewclip's adapters")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ArtifactError(f"adapter class {target} is not available in this fewclip version ({e})") from e
    if not (isinstance(cls, type) and issubclass(cls, Adapter)):
        raise ArtifactError(f"{target} is not an Adapter")
    return cls


def _instantiate_adapter(node: dict[str, Any]) -> Adapter:
    """A fresh adapter from its resolved YAML node (the scalars ``__init__`` takes, as Hydra would pass them)."""
    cls = _adapter_class(str(node.get("_target_", "")))
    special = [k for k in node if k.startswith("_") and k != "_target_"]
    if special:
        raise ArtifactError(f"adapter config uses unsupported Hydra keys {special}")
    return cls(**{k: v for k, v in node.items() if k != "_target_"})


def _load_backbone(record: dict[str, Any], device: str, pretrained: str | None) -> FrozenClip:
    from caches.backbone import load_backbone

    node = dict(record.get("config") or {})
    if node.get("_target_") not in BACKBONE_TARGETS:
        raise ArtifactError(f"artifact backbone loader {node.get('_target_')!r} is not one of {BACKBONE_TARGETS}")
    kwargs = {k: node[k] for k in ("model", "pretrained", "name", "seed", "weights_cache_dir") if k in node}
    if pretrained is not None:
        kwargs["pretrained"] = pretrained
    try:
        return load_backbone(**kwargs, device=device)
    except FileNotFoundError as e:
        raise ArtifactError(f"{e} The artifact was fitted with backbone.pretrained={kwargs.get('pretrained')}; "
                            "pass the weights file's path here (--pretrained PATH, or pretrained=PATH)") from e


def check_backbone(record: dict[str, Any], backbone: FrozenClip) -> None:
    """Refuse a backbone whose features differ from the artifact's: model name, weights id, preprocessing, dim.

    Raises:
        BackboneMismatchError: naming every field that differs, with the artifact's and the loaded values.
    """
    loaded = backbone.describe()
    diffs = [f"{key}: artifact {record.get(key)!r}, loaded {loaded[key]!r}"
             for key in ("model", "weights_id", "image", "dim") if record.get(key) != loaded[key]]
    if diffs:
        raise BackboneMismatchError(
            "the backbone does not match the artifact's (" + "; ".join(diffs) + "). Features of other weights "
            "are meaningless to this classifier: load the weights it was fitted with")


def _read_info(path: Path) -> dict[str, Any]:
    if not path.is_dir():
        raise ArtifactError(f"artifact {path} does not exist (or is not a directory)")
    info_file = path / ARTIFACT_FILE
    if not info_file.is_file():
        raise ArtifactError(f"{path} is not a fewclip artifact (no {ARTIFACT_FILE}); create one with fewclip fit")
    try:
        info = json.loads(info_file.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{info_file} is not valid JSON ({e})") from e
    if info.get("format") != FORMAT or info.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{path}: format {info.get('format')} v{info.get('format_version')}, expected {FORMAT} "
                            f"v{FORMAT_VERSION}")
    for name, digest in info.get("files", {}).items():
        f = path / name
        if not f.is_file() or sha256_file(f) != digest:
            raise ArtifactError(f"{path}: {name} is missing or modified (checksum mismatch)")
    return info


def _load_stores(path: Path, info: dict[str, Any]) -> tuple[KVStore, KVStore]:
    try:
        return tuple(KVStore.load(path / info["stores"][k]["dir"], info["stores"][k]["fingerprint"])  # type: ignore
                     for k in (TEXT_DIR, SUPPORT_DIR))
    except StoreError as e:
        raise ArtifactError(f"{path}: damaged store ({e})") from e


def _context(classnames: list[str], text: torch.Tensor, support: SupportSet, backbone: FrozenClip,
             seed: int) -> AdapterContext:
    return AdapterContext(classnames=list(classnames), text_head=text, support=support,
                          logit_scale=backbone.logit_scale, backbone=backbone, device=backbone.device, seed=seed,
                          progress=False)


def _support_set(store: KVStore) -> SupportSet:
    return SupportSet(keys=store.keys(), labels=store.labels(), views=store.view_features())


def load_artifact(path: str | os.PathLike, device: str = "auto", backbone: FrozenClip | None = None,
                  pretrained: str | None = None) -> Artifact:
    """Open an artifact: verify it, load (or check) the backbone, rebuild the fitted adapter.

    Args:
        path: the artifact directory.
        device: ``auto`` (CUDA when present), ``cpu`` or ``cuda``; ignored when ``backbone`` is given.
        backbone: an already loaded ``FrozenClip`` to use instead of loading the recorded one (checked all the same).
        pretrained: weights to load instead of the recorded ones (a tag or a file; e.g. the same file in another
            place). They must be the weights the artifact was fitted with.
    Raises:
        ArtifactError: missing or damaged artifact; BackboneMismatchError: other model or weights.
    """
    path = Path(path)
    info = _read_info(path)
    text, support = _load_stores(path, info)
    bb = backbone if backbone is not None else _load_backbone(info["backbone"], device, pretrained)
    check_backbone(info["backbone"], bb)
    adapter = _instantiate_adapter(info["adapter"]["config"])
    adapter.setup(_context(info["classnames"], text.keys(), _support_set(support), bb, int(info["seed"])))
    restore_adapter(adapter, path)
    return Artifact(path, info, bb, adapter, text, support)


# ---------------------------------------------------------------------------------------------------- images
def _open_rgb(item: str | os.PathLike | Image.Image) -> Image.Image:
    if isinstance(item, Image.Image):
        return item.convert("RGB")
    with Image.open(item) as img:
        img.load()
        return img.convert("RGB")


class _Images(Dataset):
    """Paths or PIL images -> ``([3, S, S] pixels, "")``, or ``(zeros, error text)`` for an unreadable image."""

    def __init__(self, items: Sequence[Any], transform: Any, size: int) -> None:
        self.items, self.transform, self.size = list(items), transform, size

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        try:
            return self.transform(_open_rgb(self.items[i])), ""
        except Exception as e:  # PIL raises many types for corrupt, truncated or non-image files: report, go on
            return torch.zeros(3, self.size, self.size), f"{type(e).__name__}: {e}"


@dataclass
class FilePredictions:
    """Predictions for a list of images.

    ``probs [N, C]`` float32 softmax probabilities, a NaN row for an image that could not be read;
    ``errors[i]`` is None, or why image ``i`` was not read.
    """

    items: list[Any]
    probs: torch.Tensor
    errors: list[str | None]

    @property
    def unreadable(self) -> list[tuple[Any, str]]:
        return [(item, e) for item, e in zip(self.items, self.errors) if e is not None]


@dataclass(frozen=True)
class AddClassRule:
    """How an adapter takes a class it was not fitted on: ``how`` (said to the user), whether the new class's
    images are used, and whether the class-independent learned state moves over (``Adapter.new_class_state``)."""

    how: str
    uses_images: bool
    carries_state: bool


# Adapters that learned something per class from the fitted classes' shots, and why that blocks a new class.
_REFUSALS = {
    "TipAdapterF": "its cache keys were trained on the fitted classes' shots; a new class's keys would be untrained",
    "LinearProbe": "its weight row per class was fitted by logistic regression on the fitted classes' shots",
    "LPPlusPlus": "its per-class weights, biases and text blending were optimised on the fitted classes' shots",
    "CLAP": "its per-class prototypes were trained on the fitted classes' shots",
    "TaskRes": "its per-class text residuals were trained on the fitted classes' shots",
    "APET": "its per-class residuals and per-key value weights were trained on the fitted classes' shots",
    "CoOp": "its class-specific contexts (csc=true) were trained one per fitted class",
    "Auto": "its choice of method was made on val for the fitted classes",
}


def add_class_rule(adapter: Adapter, option: str | None = None) -> AddClassRule:
    """Whether (and how) a fitted adapter can take a new class without refitting (module docstring).

    ``option``: the adapter's config name (``tip_f``), used in the refusal message.

    Raises:
        AddClassError: for adapters with per-class learned parameters, saying why.
    """
    from adapters.ape import APE
    from adapters.gda import GDA
    from adapters.tip import TipAdapter
    from adapters.zero_shot import ZeroShot

    # Exact types: subclasses that learn more (Tip-Adapter-F, APE-T) are not let in by inheritance.
    training_free = {
        ZeroShot: AddClassRule("a text-head row from the templates", False, False),
        TipAdapter: AddClassRule("cache keys from the images' augmented views, with one-hot values", True, False),
        GDA: AddClassRule("class mean added, closed form (shared covariance, all weights) recomputed", True, False),
        APE: AddClassRule("keys, divergences and channel selection recomputed", True, False),
    }
    if type(adapter) in training_free:
        return training_free[type(adapter)]
    if adapter.new_class_state() is not None:
        return AddClassRule("the class-independent learned state applied to the new class name (as in "
                            "base-to-novel evaluation)", False, True)
    name = f"adapter={option} ({type(adapter).__name__})" if option else type(adapter).__name__
    # The nearest class in the hierarchy with a stated reason (KgCoOp with csc=true has CoOp's).
    known = [c.__name__ for c in type(adapter).__mro__ if c.__name__ in _REFUSALS]
    reason = _REFUSALS[known[0]] if known else "it learned per-class parameters from the fitted classes' shots"
    raise AddClassError(f"{name} cannot take a new class without refitting: {reason}. Fit again with the new "
                        "class's images in the dataset (fewclip fit ...)")


@dataclass
class _ShotImages(ImageDataset):
    """The new class's images (paths or PIL images) as a one-class dataset for ``CacheBuilder.support``."""

    items: dict[str, Any] | None = None  # sample id -> path or PIL image

    def load_image(self, sample: Sample) -> Image.Image:
        return _open_rgb(self.items[sample.id])


# ---------------------------------------------------------------------------------------------------- the model
class Artifact:
    """A fitted classifier loaded from an artifact directory (use ``load_artifact``).

    Attributes:
        path: the directory. info: ``artifact.json``. backbone: the ``FrozenClip``. adapter: the fitted adapter.
    """

    def __init__(self, path: Path, info: dict[str, Any], backbone: FrozenClip, adapter: Adapter, text: KVStore,
                 support: KVStore) -> None:
        from caches.data.augment import eval_transform

        self.path, self.info, self.backbone, self.adapter = path, info, backbone, adapter
        self._text, self._support = text, support
        self.transform = eval_transform(backbone.image_spec)

    def __repr__(self) -> str:
        return (f"Artifact({str(self.path)!r}, adapter={self.info['adapter']['name']}, "
                f"backbone={self.info['backbone']['model']}, classes={len(self.classnames)})")

    @property
    def classnames(self) -> list[str]:
        """Class names in the order of the probability columns."""
        return list(self.info["classnames"])

    @property
    def templates(self) -> list[str]:
        return list(self.info["templates"])

    def _workers(self, num_workers: int | None, items: Sequence[Any]) -> int:
        if num_workers is not None:
            return num_workers
        # Decoding workers only pay off when the encoder runs elsewhere: on CPU they take the cores it uses.
        if self.backbone.device.type != "cuda" or any(isinstance(i, Image.Image) for i in items):
            return 0
        return min(4, os.cpu_count() or 1)

    @torch.no_grad()
    def logits(self, pixels: torch.Tensor) -> torch.Tensor:
        """The adapter's logits for preprocessed images: ``[B, 3, S, S] -> [B, C]`` float32 on CPU.

        Feature-mode adapters get the encoded features; pixel-mode ones (MaPLe, DPT, CoOp on pixels) the pixels.
        """
        if self.adapter.input_kind == "pixels":
            return self.adapter.predict(pixels, batch_size=max(1, len(pixels)))
        return self.adapter.predict(self.backbone.encode_images(pixels))

    def predict_files(self, images: Sequence[str | os.PathLike | Image.Image], batch_size: int = 64,
                      num_workers: int | None = None, progress: bool = False) -> FilePredictions:
        """Probabilities for image files (or PIL images), batched; unreadable images are reported, not fatal.

        Returns:
            ``FilePredictions`` with ``probs [N, C]`` (NaN rows for unreadable images) and the errors.
        """
        from tqdm.auto import tqdm

        items = list(images)
        n, size = len(items), self.backbone.image_spec.size
        probs = torch.full((n, len(self.classnames)), float("nan"))
        errors: list[str | None] = [None] * n
        loader = DataLoader(_Images(items, self.transform, size), batch_size=batch_size, shuffle=False,
                            num_workers=self._workers(num_workers, items),
                            pin_memory=self.backbone.device.type == "cuda")
        start = 0
        with tqdm(total=n, desc="predict", unit="img", disable=not progress) as bar:
            for pixels, errs in loader:
                ok = torch.tensor([not e for e in errs])
                rows = torch.arange(start, start + len(errs))
                for r in rows[~ok].tolist():
                    errors[r] = errs[r - start]
                    log.warning("unreadable image %s (%s): not predicted", items[r], errors[r])
                if bool(ok.any()):
                    probs[rows[ok]] = self.logits(pixels[ok]).softmax(dim=-1)
                start += len(errs)
                bar.update(len(errs))
        return FilePredictions(items=items, probs=probs, errors=errors)

    def predict(self, images: Sequence[str | os.PathLike | Image.Image] | torch.Tensor, batch_size: int = 64,
                progress: bool = False) -> torch.Tensor:
        """Class probabilities (softmax over the adapter's logits): ``[B, C]`` float32, columns in ``classnames``.

        Args:
            images: paths, PIL images, or a ``[B, 3, S, S]`` tensor already preprocessed as
                ``info["preprocessing"]`` says (``eval_transform``).
        Raises:
            ArtifactError: an image cannot be read (use ``predict_files`` to get the others anyway), or a tensor
                of the wrong shape.
        """
        if isinstance(images, torch.Tensor):
            size = self.backbone.image_spec.size
            if images.dim() != 4 or tuple(images.shape[1:]) != (3, size, size):
                raise ArtifactError(f"expected preprocessed pixels [B, 3, {size}, {size}], got {tuple(images.shape)}")
            return torch.cat([self.logits(images[i : i + batch_size]).softmax(dim=-1)
                              for i in range(0, len(images), batch_size)]) if len(images) else \
                torch.empty(0, len(self.classnames))
        result = self.predict_files(images, batch_size=batch_size, progress=progress)
        if result.unreadable:
            listed = "; ".join(f"{item}: {e}" for item, e in result.unreadable[:5])
            raise ArtifactError(f"{len(result.unreadable)} images could not be read ({listed}); "
                                "Artifact.predict_files predicts the others")
        return result.probs

    # ------------------------------------------------------------------ adding a class
    def add_class(self, name: str, images: Sequence[str | os.PathLike | Image.Image] = (), batch_size: int = 64,
                  progress: bool = False) -> dict[str, Any]:
        """Add a class without refitting, and save the artifact (atomically). See the module docstring for which
        adapters allow it; the hyperparameters chosen on val stay as they are.

        Args:
            name: the class name (the text head row is built from it with the artifact's templates).
            images: the class's shots (paths or PIL images); needed by tip, gda and ape, unused by the others.
        Returns:
            what was done: ``{"classname", "how", "n_images", "unreadable": [[image, error], ...]}``.
        Raises:
            AddClassError: the adapter refuses, the name exists, or no image could be read.
        """
        name = str(name).strip()
        if not name:
            raise AddClassError("the new class needs a name")
        if name in self.classnames:
            raise AddClassError(f"'{name}' is already a class of this artifact")
        rule = add_class_rule(self.adapter, self.info["adapter"]["name"])
        items = list(images)
        if rule.uses_images and not items:
            raise AddClassError(f"{self.info['adapter']['name']} builds a class from its images: give at least one")
        if items and not rule.uses_images:
            log.info("%s scores a new class from its name: the %d images are not used",
                     self.info["adapter"]["name"], len(items))
            items = []
        n_old = len(self.classnames)
        classnames = [*self.classnames, name]
        text_keys = torch.cat([self._text.keys(), self.backbone.text_head([name], self.templates).cpu()])
        support = _support_set(self._support)
        unreadable: list[tuple[Any, str]] = []
        added: tuple[list[dict[str, Any]], dict[str, Any]] | None = None
        if items:
            keys, views, meta, digest, unreadable = self._encode_shots(name, n_old, items, batch_size, progress)
            support = SupportSet(keys=torch.cat([support.keys, keys]),
                                 labels=torch.cat([support.labels, torch.full((len(keys),), n_old)]),
                                 views=torch.cat([support.views, views], dim=1) if support.views is not None else None)
            added = (meta, digest)

        fresh = _instantiate_adapter(self.info["adapter"]["config"])
        fresh.setup(_context(classnames, text_keys, support, self.backbone, int(self.info["seed"])))
        if rule.carries_state:
            fresh.load_state_dict(self.adapter.new_class_state(), strict=False)
        for k, v in self.adapter.hparams().items():  # chosen on val for the fitted classes; kept (no data to redo it)
            setattr(fresh, k, v)
        fresh.eval()

        record = {"classname": name, "how": rule.how, "n_images": len(items) - len(unreadable),
                  "unreadable": [[str(i), e] for i, e in unreadable], "added_at": _now()}
        self._save_with_class(classnames, text_keys, support, added, fresh, record)
        self.adapter = fresh
        return record

    def _encode_shots(self, name: str, label: int, items: list[Any], batch_size: int, progress: bool
                      ) -> tuple[torch.Tensor, torch.Tensor, list[dict[str, Any]], dict[str, Any], list]:
        """The new class's support entries, encoded by ``CacheBuilder.support`` with the support store's views and
        augmentation: ``([n, D] keys, [A, n, D] views, meta rows, provenance, unreadable [(item, error)])``."""
        from caches.builder import CacheBuilder, ids_digest
        from caches.data.augment import AugmentSpec

        spec = self._support.manifest["spec"]
        aug = AugmentSpec(scale=tuple(spec["augmentation"]["scale"]), ratio=tuple(spec["augmentation"]["ratio"]),
                          flip_p=float(spec["augmentation"]["flip_p"]))
        # The sample id seeds each view's crop (caches.data.augment.view_generator); the index keeps ids unique.
        ids = [f"added/{name}/{i:05d}" + ("" if isinstance(it, Image.Image) else f"-{Path(it).name}")
               for i, it in enumerate(items)]
        ds = _ShotImages(name="added", classnames=[name], templates=self.templates,
                         splits={"train": [Sample(id=i, label=0) for i in ids], "val": [], "test": []},
                         source={"kind": "add-class"}, in_memory=True, items=dict(zip(ids, items)))
        kept, unreadable = [], []
        for s, item in zip(ds.splits["train"], items):
            try:
                ds.load_image(s)
                kept.append(s)
            except Exception as e:  # reported in the record and the CLI output; the readable ones are used
                log.warning("unreadable image %s (%s): not added", item, e)
                unreadable.append((item, f"{type(e).__name__}: {e}"))
        if not kept:
            raise AddClassError(f"none of the {len(items)} images of '{name}' could be read")
        views = int(spec.get("views", 1)) or 1
        with tempfile.TemporaryDirectory(prefix="fewclip-add-class-") as cache:
            store = CacheBuilder(self.backbone, cache, batch_size=batch_size, num_workers=0, progress=progress
                                 ).support(ds, kept, shots=len(kept), seed=int(self.info["seed"]), views=views,
                                           aug=aug)
            keys, view_feats = store.keys(), store.view_features()
        if view_feats is None:  # a one-view store keeps no separate views
            view_feats = keys[None]
        meta = [{"id": s.id, "label": label, "classname": name} for s in kept]
        digest = {"classname": name, "ids": ids_digest([s.id for s in kept]), "data": ds.sample_digest(kept)}
        return keys, view_feats, meta, digest, unreadable

    def _save_with_class(self, classnames: list[str], text_keys: torch.Tensor, support: SupportSet,
                         added: tuple[list[dict[str, Any]], dict[str, Any]] | None, adapter: Adapter,
                         record: dict[str, Any]) -> None:
        """Write the artifact with the new class into a temporary sibling and swap it in."""
        tmp = _tmp_sibling(self.path, "tmp")
        try:
            text_spec = {**self._text.manifest["spec"], "classnames": classnames}
            # Same spec as CacheBuilder.text would give these classes: the fingerprint says what the head is.
            text = KVStore.write(tmp / TEXT_DIR, text_spec, keys=text_keys, values=torch.arange(len(classnames)),
                                 meta=[{"classname": c} for c in classnames])
            if added is None:
                shutil.copytree(self._support.path, tmp / SUPPORT_DIR)
                sup = KVStore.load(tmp / SUPPORT_DIR, self._support.fingerprint)
            else:
                meta, digest = added
                spec = dict(self._support.manifest["spec"])
                spec["added_classes"] = [*spec.get("added_classes", []), digest]
                old_meta = [{k: v for k, v in r.items() if k != "row"} for r in self._support.meta]
                has_views = self._support.views is not None
                sup = KVStore.write(tmp / SUPPORT_DIR, spec, keys=support.keys, values=support.labels,
                                    views=support.views if has_views else None, meta=old_meta + meta)
            for name in (RESULT_FILE, CONFIG_FILE):
                shutil.copyfile(self.path / name, tmp / name)
            if self.info["adapter"].get("state"):
                if save_adapter_state(adapter, tmp) is None:
                    raise AddClassError("the adapter lost its learned state while adding the class")
            info = json.loads(json.dumps(self.info))
            info.update(classnames=classnames, stores=_store_records(text, sup), updated_at=_now(),
                        added_classes=[*info.get("added_classes", []), record])
            _write_info(tmp, info)
            _install(tmp, self.path)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        self.info = info
        self._text, self._support = _load_stores(self.path, info)


# ---------------------------------------------------------------------------------------------------- fitting
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
    from adapters.runner import _choice

    adapter = _choice(cfg, "adapter")
    return Path("artifacts") / f"{cfg.dataset.name}-{adapter}-{cfg.backbone.name}-k{cfg.shots}-s{cfg.seed}"


def fit_run(overrides: Sequence[str], out: str | os.PathLike | None = None) -> tuple[dict[str, Any], Path]:
    """Run one job with ``fewclip run``'s overrides and export it as an artifact.

    The job runs in a temporary directory beside the artifact (removed afterwards: the artifact keeps its
    ``result.json``). Returns ``(result, artifact directory)``.
    """
    from adapters.cli import compose
    from adapters.runner import run

    cfg = compose(list(overrides))
    out_dir = Path(out) if out is not None else default_out(cfg)
    _check_destination(out_dir)  # before the work, not after it
    run_dir = _tmp_sibling(out_dir, "run")
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


# ---------------------------------------------------------------------------------------------------- CLI
def collect_images(inputs: Sequence[str | os.PathLike]) -> list[str]:
    """Image paths from files, folders (recursive, known image extensions) and CSV files (a ``path`` column,
    relative to the CSV). An explicitly named file is taken whatever its extension.

    Raises:
        ArtifactError: a named path does not exist, a CSV has no ``path`` column, or nothing was found.
    """
    found: list[str] = []
    for raw in inputs:
        p = Path(raw)
        if p.is_dir():
            found += [str(f) for f in sorted(p.rglob("*")) if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS]
        elif p.is_file() and p.suffix.lower() == ".csv":
            with open(p, newline="") as f:
                reader = csv.DictReader(f)
                if "path" not in (reader.fieldnames or []):
                    raise ArtifactError(f"{p} has columns {reader.fieldnames}; a list of images needs a 'path' column")
                found += [str(p.parent / r["path"].strip()) for r in reader if (r.get("path") or "").strip()]
        elif p.is_file():
            found.append(str(p))
        else:
            raise ArtifactError(f"{p}: no such file or folder")
    if not found:
        raise ArtifactError(f"no images found in {', '.join(map(str, inputs))} (extensions: "
                            f"{', '.join(IMAGE_EXTENSIONS)})")
    return found


def write_predictions(preds: FilePredictions, classnames: Sequence[str], out: Any, topk: int = 5) -> None:
    """CSV: ``path, status, prediction, probability, top1_class, top1_prob, ..., top<k>_class, top<k>_prob``.

    ``status`` is ``ok`` or ``unreadable: <error>`` (then the other columns are empty).
    """
    k = max(1, min(topk, len(classnames)))
    w = csv.writer(out)
    w.writerow(["path", "status", "prediction", "probability",
                *[f"top{j}_{col}" for j in range(1, k + 1) for col in ("class", "prob")]])
    values, indices = preds.probs.nan_to_num(-1.0).topk(k, dim=-1)
    for i, item in enumerate(preds.items):
        if preds.errors[i] is not None:
            w.writerow([item, f"unreadable: {preds.errors[i]}", "", "", *[""] * (2 * k)])
            continue
        top = [(classnames[j], f"{p:.6f}") for p, j in zip(values[i].tolist(), indices[i].tolist())]
        w.writerow([item, "ok", top[0][0], top[0][1], *[x for pair in top for x in pair]])


def _bad_input(e: BaseException) -> BaseException | None:
    from hydra.errors import ConfigCompositionException, OverrideParseException

    from adapters.cli import user_error

    # Config errors (unknown option, bad override) are the user's; an error inside instantiation is not.
    if isinstance(e, (ArtifactError, ConfigCompositionException, OverrideParseException)):
        return e
    return user_error(e)


def _fail(prog: str, e: BaseException) -> int:
    err = _bad_input(e)
    if err is None:
        raise e
    sys.stderr.write(f"{prog}: {str(err).strip()}\n")
    return 2


def _split_out(overrides: list[str], out: str | None) -> tuple[list[str], str | None]:
    """``out=DIR`` among the Hydra overrides is fewclip fit's own option, not a config key."""
    rest = [o for o in overrides if not o.startswith("out=")]
    given = [o.split("=", 1)[1] for o in overrides if o.startswith("out=")]
    return rest, (given[-1] if given else out)


def fit_main(argv: list[str]) -> int:
    """``fewclip fit [OVERRIDES...] out=DIR``: run one job like ``fewclip run`` and write an artifact."""
    from adapters.cli import _fmt_hparams, _quiet_logging

    p = argparse.ArgumentParser(prog="fewclip fit", description=fit_main.__doc__)
    p.add_argument("--out", default=None, help="artifact directory (same as out=DIR; default "
                                               "artifacts/<dataset>-<adapter>-<backbone>-k<K>-s<seed>)")
    p.add_argument("overrides", nargs="*", help="Hydra overrides as for fewclip run (dataset=folder "
                                                "dataset.root=PATH adapter=tip backbone=rn50 shots=16 ...)")
    args = p.parse_args(argv)
    overrides, out = _split_out(args.overrides, args.out)
    _quiet_logging()
    try:
        res, path = fit_run(overrides, out)
    except Exception as e:
        return _fail("fewclip fit", e)
    sys.stdout.write(f"{res['dataset']} {res['adapter']} {res['backbone']} k={res['shots']} seed={res['seed']}: "
                     f"val {res['val_acc']:.2f}%  test {res['test_acc']:.2f}%  hparams {_fmt_hparams(res['hparams'])}"
                     f"\nartifact: {path}\n")
    return 0


def _backbone_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    p.add_argument("--pretrained", default=None,
                   help="weights to load instead of the recorded ones (a file or tag); must be the fitted weights")
    p.add_argument("--batch-size", type=int, default=64, help="images per encoder forward")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def predict_main(argv: list[str]) -> int:
    """``fewclip predict ARTIFACT IMAGES...``: class probabilities for images, as CSV."""
    from adapters.cli import _quiet_logging

    p = argparse.ArgumentParser(prog="fewclip predict", description=predict_main.__doc__)
    p.add_argument("artifact", help="artifact directory written by fewclip fit")
    p.add_argument("images", nargs="+", help="image files, folders (recursive) or CSV files with a 'path' column")
    p.add_argument("--out", default="-", help="CSV file to write ('-', the default: standard output)")
    p.add_argument("--topk", type=int, default=5, help="classes listed per image, most probable first")
    p.add_argument("--num-workers", type=int, default=None,
                   help="image decoding workers (default: 0 on CPU, where the encoder uses every core; 4 on CUDA)")
    _backbone_options(p)
    args = p.parse_args(argv)
    _quiet_logging()
    try:
        if args.topk < 1:
            raise ArtifactError(f"--topk must be >= 1, got {args.topk}")
        paths = collect_images(args.images)
        art = load_artifact(args.artifact, device=args.device, pretrained=args.pretrained)
        preds = art.predict_files(paths, batch_size=args.batch_size, num_workers=args.num_workers,
                                  progress=not args.no_progress)
    except Exception as e:
        return _fail("fewclip predict", e)
    if args.out == "-":
        write_predictions(preds, art.classnames, sys.stdout, args.topk)
        sys.stdout.flush()
    else:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "w", newline="") as f:
            write_predictions(preds, art.classnames, f, args.topk)
    bad = preds.unreadable
    n_ok = len(paths) - len(bad)
    lines = [f"fewclip predict: {n_ok} of {len(paths)} images predicted"
             + ("" if args.out == "-" else f" -> {args.out}")]
    if bad:
        lines.append(f"{len(bad)} unreadable (status column of the CSV):")
        lines += [f"  {item}: {err}" for item, err in bad]
    sys.stderr.write("\n".join(lines) + "\n")
    return 0 if n_ok else 1


def add_class_main(argv: list[str]) -> int:
    """``fewclip add-class ARTIFACT NAME [IMAGES...]``: add a class to an artifact without refitting."""
    from adapters.cli import _quiet_logging

    p = argparse.ArgumentParser(prog="fewclip add-class", description=add_class_main.__doc__)
    p.add_argument("artifact", help="artifact directory written by fewclip fit (updated in place, atomically)")
    p.add_argument("name", help="the new class's name (used in the prompt templates)")
    p.add_argument("images", nargs="*", help="its images: files, folders (recursive) or CSV files with a 'path' "
                                             "column (needed by tip, gda, ape; unused by zero_shot and prompt "
                                             "learners)")
    _backbone_options(p)
    args = p.parse_args(argv)
    _quiet_logging()
    try:
        paths = collect_images(args.images) if args.images else []
        art = load_artifact(args.artifact, device=args.device, pretrained=args.pretrained)
        record = art.add_class(args.name, paths, batch_size=args.batch_size, progress=not args.no_progress)
    except Exception as e:
        return _fail("fewclip add-class", e)
    lines = [f"added class '{record['classname']}' to {args.artifact} ({len(art.classnames)} classes): "
             f"{record['how']}; {record['n_images']} images used; hyperparameters kept as chosen on val"]
    lines += [f"  unreadable, not added: {item}: {err}" for item, err in record["unreadable"]]
    sys.stdout.write("\n".join(lines) + "\n")
    return 0
