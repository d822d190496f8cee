"""Adding a class to a fitted artifact without refitting: which methods allow it, and how it is done.

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

import json
import logging
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image

from adapters.base import Adapter, SupportSet
from caches.data.records import ImageDataset, Sample
from caches.store import KVStore
from fewclip.artifact.format import (
    CONFIG_FILE,
    SUPPORT_DIR,
    TEXT_DIR,
    AddClassError,
    adapter_context,
    install,
    instantiate_adapter,
    now_utc,
    search_params,
    store_records,
    support_set,
    tmp_sibling,
    write_info,
)
from fewclip.artifact.images import open_rgb
from fewclip.runner import RESULT_FILE, save_adapter_state

if TYPE_CHECKING:
    from fewclip.artifact.predict import Artifact

log = logging.getLogger(__name__)


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
        return open_rgb(self.items[sample.id])



def add_class_to(art: Artifact, name: str, images: Sequence[Any] = (), batch_size: int = 64, progress: bool = False
                 ) -> tuple[dict[str, Any], Adapter, dict[str, Any]]:
    """Add class ``name`` to ``art`` and save the artifact in place, atomically (``Artifact.add_class``).

    Returns:
        ``(record, adapter, info)``: what was done (``{"classname", "how", "n_images", "unreadable", "added_at"}``),
        the adapter set up for the extended classes, and the new ``artifact.json``.
    Raises:
        AddClassError: the adapter refuses, the name exists, or no image could be read.
    """
    name = str(name).strip()
    if not name:
        raise AddClassError("the new class needs a name")
    if name in art.classnames:
        raise AddClassError(f"'{name}' is already a class of this artifact")
    rule = add_class_rule(art.adapter, art.info["adapter"]["name"])
    items = list(images)
    if rule.uses_images and not items:
        raise AddClassError(f"{art.info['adapter']['name']} builds a class from its images: give at least one")
    if items and not rule.uses_images:
        log.info("%s scores a new class from its name: the %d images are not used",
                 art.info["adapter"]["name"], len(items))
        items = []
    n_old = len(art.classnames)
    classnames = [*art.classnames, name]
    text_keys = torch.cat([art.text_store.keys(), art.backbone.text_head([name], art.templates).cpu()])
    support = support_set(art.support_store, search_params(art.path))
    unreadable: list[tuple[Any, str]] = []
    added: tuple[list[dict[str, Any]], dict[str, Any]] | None = None
    if items:
        keys, views, meta, digest, unreadable = _encode_shots(art, name, n_old, items, batch_size, progress)
        support = SupportSet(keys=torch.cat([support.keys, keys]),
                             labels=torch.cat([support.labels, torch.full((len(keys),), n_old)]),
                             views=torch.cat([support.views, views], dim=1) if support.views is not None else None)
        added = (meta, digest)

    fresh = instantiate_adapter(art.info["adapter"]["config"])
    fresh.setup(adapter_context(classnames, text_keys, support, art.backbone, int(art.info["seed"])))
    if rule.carries_state:
        fresh.load_state_dict(art.adapter.new_class_state(), strict=False)
    for k, v in art.adapter.hparams().items():  # chosen on val for the fitted classes; kept (no data to redo it)
        setattr(fresh, k, v)
    fresh.eval()

    record = {"classname": name, "how": rule.how, "n_images": len(items) - len(unreadable),
              "unreadable": [[str(i), e] for i, e in unreadable], "added_at": now_utc()}
    info = _save_with_class(art, classnames, text_keys, support, added, fresh, record)
    return record, fresh, info
    info = _save_with_class(art, classnames, text_keys, support, added, fresh, record)
    return record, fresh, info


def _encode_shots(art: Artifact, name: str, label: int, items: list[Any], batch_size: int, progress: bool
                  ) -> tuple[torch.Tensor, torch.Tensor, list[dict[str, Any]], dict[str, Any], list]:
    """The new class's support entries, encoded by ``CacheBuilder.support`` with the support store's views and
    augmentation: ``([n, D] keys, [A, n, D] views, meta rows, provenance, unreadable [(item, error)])``."""
    from caches.builder import CacheBuilder, ids_digest
    from caches.data.augment import AugmentSpec

    spec = art.support_store.manifest["spec"]
    aug = AugmentSpec(scale=tuple(spec["augmentation"]["scale"]), ratio=tuple(spec["augmentation"]["ratio"]),
                      flip_p=float(spec["augmentation"]["flip_p"]))
    # The sample id seeds each view's crop (caches.data.augment.view_generator); the index keeps ids unique.
    ids = [f"added/{name}/{i:05d}" + ("" if isinstance(it, Image.Image) else f"-{Path(it).name}")
           for i, it in enumerate(items)]
    ds = _ShotImages(name="added", classnames=[name], templates=art.templates,
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
        store = CacheBuilder(art.backbone, cache, batch_size=batch_size, num_workers=0, progress=progress
                             ).support(ds, kept, shots=len(kept), seed=int(art.info["seed"]), views=views,
                                       aug=aug)
        keys, view_feats = store.keys(), store.view_features()
    if view_feats is None:  # a one-view store keeps no separate views
        view_feats = keys[None]
    meta = [{"id": s.id, "label": label, "classname": name} for s in kept]
    digest = {"classname": name, "ids": ids_digest([s.id for s in kept]), "data": ds.sample_digest(kept)}
    return keys, view_feats, meta, digest, unreadable


def _save_with_class(art: Artifact, classnames: list[str], text_keys: torch.Tensor, support: SupportSet,
                     added: tuple[list[dict[str, Any]], dict[str, Any]] | None, adapter: Adapter,
                     record: dict[str, Any]) -> dict[str, Any]:
    """Write the artifact with the new class into a temporary sibling and swap it in; returns the new
    ``artifact.json``."""
    tmp = tmp_sibling(art.path, "tmp")
    try:
        text_spec = {**art.text_store.manifest["spec"], "classnames": classnames}
        # Same spec as CacheBuilder.text would give these classes: the fingerprint says what the head is.
        text = KVStore.write(tmp / TEXT_DIR, text_spec, keys=text_keys, values=torch.arange(len(classnames)),
                             meta=[{"classname": c} for c in classnames])
        if added is None:
            shutil.copytree(art.support_store.path, tmp / SUPPORT_DIR)
            sup = KVStore.load(tmp / SUPPORT_DIR, art.support_store.fingerprint)
        else:
            meta, digest = added
            spec = dict(art.support_store.manifest["spec"])
            spec["added_classes"] = [*spec.get("added_classes", []), digest]
            old_meta = [{k: v for k, v in r.items() if k != "row"} for r in art.support_store.meta]
            has_views = art.support_store.views is not None
            sup = KVStore.write(tmp / SUPPORT_DIR, spec, keys=support.keys, values=support.labels,
                                views=support.views if has_views else None, meta=old_meta + meta)
        for name in (RESULT_FILE, CONFIG_FILE):
            shutil.copyfile(art.path / name, tmp / name)
        if art.info["adapter"].get("state"):
            if save_adapter_state(adapter, tmp) is None:
                raise AddClassError("the adapter lost its learned state while adding the class")
        info = json.loads(json.dumps(art.info))
        info.update(classnames=classnames, stores=store_records(text, sup), updated_at=now_utc(),
                    added_classes=[*info.get("added_classes", []), record])
        write_info(tmp, info)
        install(tmp, art.path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return info
