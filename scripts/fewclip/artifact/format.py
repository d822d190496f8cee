"""The artifact directory on disk: writing it from a finished run, reading and verifying it.

Artifact layout (``format_version`` 2); JSON, YAML, CSV, safetensors, faiss and ``.npy`` files only, no pickles::

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
  their own checksums in their manifests);
* ``digest``: sha256 of the canonical JSON (sorted keys, no spaces) of every other field.

Everything is verified on load (``read_info``, ``load_stores``): the digest (any edit of ``artifact.json`` is
refused), the loose files' checksums, the stores (``caches/FORMAT.md``) against the fingerprints recorded here, and
the fields that repeat what a verified file says must agree with it: ``classnames`` and ``templates`` with the text
store's spec, ``backbone``, ``seed``, ``shots``, ``views`` and ``augmentation`` with the support store's spec, the
stores' row counts, ``adapter.hparams`` / ``config`` / ``state`` and the ``fit`` figures with ``result.json``. So a
hand-edited artifact (two class names swapped: predictions relabelled) is refused even with its digest
recomputed. Format 1 artifacts (no digest) are read with the same cross-checks.

Everything here is about the directory itself (its files, checksums and stores, and which classes it may name);
loading the classifier is predict.py's, adding a class add_class.py's.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from adapters.base import Adapter, AdapterContext, SupportSet
from caches.backbone import FrozenClip
from caches.store import KVStore, StoreError
from caches.weights_id import sha256_file
from fewclip.runner import RESULT_FILE, STATE_FILE, versions

log = logging.getLogger(__name__)

FORMAT = "fewclip-artifact"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # 1: written before artifact.json carried its digest
ARTIFACT_FILE = "artifact.json"
CONFIG_FILE = "config.yaml"
TEXT_DIR = "text"
SUPPORT_DIR = "support"
# Loading an artifact imports the classes it names: only these, never an arbitrary path from a JSON file.
BACKBONE_TARGETS = ("caches.backbone.load_backbone",)
ADAPTER_PREFIXES = ("adapters.", "fewclip.auto.")  # the methods, and auto (which fits several of them)
# Adapter classes that moved: artifacts written before the move name the old path.
MOVED_TARGETS = {"adapters.auto.Auto": "fewclip.auto.Auto"}


class ArtifactError(ValueError):
    """An artifact is missing, damaged, or cannot do what was asked. The message says what to do."""


class BackboneMismatchError(ArtifactError):
    """The loaded backbone is not the one the artifact was fitted with."""


class AddClassError(ArtifactError):
    """The artifact's adapter cannot take a new class without a refit (or the request is malformed)."""


def now_utc() -> str:
    """The current UTC time, ISO 8601 to the second."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())



# -------------------------------------------------------------------------------------------- writing
def check_destination(out: Path) -> None:
    """Refuse to replace anything but an earlier artifact or an empty folder (never a user's folder)."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ArtifactError(f"{out} exists and is a file; choose another artifact directory")
    if not (out / ARTIFACT_FILE).is_file() and any(out.iterdir()):
        raise ArtifactError(f"{out} exists and is not a fewclip artifact; choose another directory or remove it")


def tmp_sibling(out: Path, what: str) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.{what}-", dir=out.parent))


def install(tmp: Path, out: Path) -> None:
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


def info_digest(info: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of ``artifact.json`` without its ``digest`` field."""
    body = {k: v for k, v in info.items() if k != "digest"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def write_info(tmp: Path, info: dict[str, Any]) -> None:
    """Checksums of the loose files, the digest, then ``artifact.json`` last."""
    names = [n for n in (CONFIG_FILE, RESULT_FILE, STATE_FILE) if (tmp / n).is_file()]
    info["files"] = {n: sha256_file(tmp / n) for n in names}
    info["format_version"] = FORMAT_VERSION
    info["digest"] = info_digest(info)
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
        "created_at": now_utc(),
        "updated_at": now_utc(),
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
        "stores": store_records(text, support),
        "fit": {"dataset": result["dataset"], "val_acc": result["val_acc"], "test_acc": result["test_acc"],
                "n_classes": result["n_classes"], "n_support": result["n_support"], "n_val": result["n_val"],
                "n_test": result["n_test"], "n_test_skipped": result.get("n_test_skipped", 0),
                "targets": result.get("targets", {}), "selection": result.get("protocol", {}).get("selection", "val"),
                "store_fingerprints": {k: v["fingerprint"] for k, v in result.get("cache", {}).items()}},
        "added_classes": [],
        "versions": versions(),
    }


def store_records(text: KVStore, support: KVStore) -> dict[str, dict[str, Any]]:
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
    check_destination(out)
    tmp = tmp_sibling(out, "tmp")
    try:
        # Self-contained copies (same specs and fingerprints): a cached support store's views live in the
        # cache's feature bank, and an artifact carries its own.
        stores["text"].copy_to(tmp / TEXT_DIR)
        stores["support"].copy_to(tmp / SUPPORT_DIR)
        if result.get("adapter_state"):
            shutil.copyfile(run_dir / result["adapter_state"], tmp / STATE_FILE)
            result["adapter_state"] = STATE_FILE
        (tmp / RESULT_FILE).write_text(json.dumps(result, indent=2))
        (tmp / CONFIG_FILE).write_text(OmegaConf.to_yaml(OmegaConf.create(result["config"])))
        write_info(tmp, _describe(result, stores["text"], stores["support"]))
        install(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("artifact written to %s", out)
    return out


# -------------------------------------------------------------------------------------------- reading
def _adapter_class(target: str) -> type[Adapter]:
    """The adapter class an artifact names, imported only from the ``adapters`` package (or ``fewclip.auto``)."""
    target = MOVED_TARGETS.get(target, target)
    module, _, name = target.rpartition(".")
    if not target.startswith(ADAPTER_PREFIXES) or not module:
        raise ArtifactError(f"artifact names adapter class '{target}', which is not one of fewclip's adapters")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ArtifactError(f"adapter class {target} is not available in this fewclip version ({e})") from e
    if not (isinstance(cls, type) and issubclass(cls, Adapter)):
        raise ArtifactError(f"{target} is not an Adapter")
    return cls


def instantiate_adapter(node: dict[str, Any]) -> Adapter:
    """A fresh adapter from its resolved YAML node (the scalars ``__init__`` takes, as Hydra would pass them)."""
    cls = _adapter_class(str(node.get("_target_", "")))
    special = [k for k in node if k.startswith("_") and k != "_target_"]
    if special:
        raise ArtifactError(f"adapter config uses unsupported Hydra keys {special}")
    return cls(**{k: v for k, v in node.items() if k != "_target_"})


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


def read_info(path: Path) -> dict[str, Any]:
    """``artifact.json`` of the artifact at ``path``, after checking its format and the loose files' checksums."""
    if not path.is_dir():
        raise ArtifactError(f"artifact {path} does not exist (or is not a directory)")
    info_file = path / ARTIFACT_FILE
    if not info_file.is_file():
        raise ArtifactError(f"{path} is not a fewclip artifact (no {ARTIFACT_FILE}); create one with fewclip fit")
    try:
        info = json.loads(info_file.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{info_file} is not valid JSON ({e})") from e
    if not isinstance(info, dict) or info.get("format") != FORMAT \
            or info.get("format_version") not in READABLE_VERSIONS:
        found = f"{info.get('format')} v{info.get('format_version')}" if isinstance(info, dict) else "not an object"
        raise ArtifactError(f"{path}: format {found}, expected {FORMAT} v{FORMAT_VERSION}")
    if info["format_version"] >= 2 and info.get("digest") != info_digest(info):
        raise ArtifactError(f"{info_file} was edited or is corrupt (its digest does not match its content); "
                            "fit the artifact again (fewclip fit)")
    for name, digest in info.get("files", {}).items():
        f = path / name
        if not f.is_file() or sha256_file(f) != digest:
            raise ArtifactError(f"{path}: {name} is missing or modified (checksum mismatch)")
    return info


def load_stores(path: Path, info: dict[str, Any]) -> tuple[KVStore, KVStore]:
    """The text and support stores, verified against the fingerprints ``artifact.json`` records, and
    ``artifact.json`` checked against them and ``result.json`` (``check_info``)."""
    try:
        text, support = (KVStore.load(path / info["stores"][k]["dir"], info["stores"][k]["fingerprint"])
                         for k in (TEXT_DIR, SUPPORT_DIR))
    except (StoreError, KeyError, TypeError) as e:
        raise ArtifactError(f"{path}: damaged store ({e})") from e
    check_info(path, info, text, support)
    return text, support


def _first_difference(a: Any, b: Any) -> str:
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        i = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
        return f"at position {i}: {a[i]!r} here, {b[i]!r} there"
    return f"{a!r} here, {b!r} there"


def check_info(path: Path, info: dict[str, Any], text: KVStore, support: KVStore) -> None:
    """Every ``artifact.json`` field that repeats what a verified file says must agree with it.

    Raises:
        ArtifactError: naming the field, the file it disagrees with, and the first difference.
    """
    try:
        result = json.loads((path / RESULT_FILE).read_text())
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{path}: {RESULT_FILE} is missing or unreadable ({e})") from e
    tspec, sspec = text.manifest["spec"], support.manifest["spec"]
    fit = info.get("fit") or {}
    adapter = info.get("adapter") or {}
    backbone = {k: v for k, v in (info.get("backbone") or {}).items() if k != "config"}
    checks = [
        ("classnames", info.get("classnames"), tspec.get("classnames"), "the text store"),
        ("templates", info.get("templates"), tspec.get("templates"), "the text store"),
        ("backbone", backbone, sspec.get("backbone"), "the support store"),
        ("seed", info.get("seed"), sspec.get("seed"), "the support store"),
        ("shots", info.get("shots"), sspec.get("shots"), "the support store"),
        ("views", info.get("views"), sspec.get("views"), "the support store"),
        ("augmentation", info.get("augmentation"), sspec.get("augmentation"), "the support store"),
        ("stores.text.n", (info.get("stores") or {}).get(TEXT_DIR, {}).get("n"), len(text), "the text store"),
        ("stores.support.n", (info.get("stores") or {}).get(SUPPORT_DIR, {}).get("n"), len(support),
         "the support store"),
        ("adapter.hparams", adapter.get("hparams"), result.get("hparams"), RESULT_FILE),
        ("adapter.config", adapter.get("config"), (result.get("config") or {}).get("adapter"), RESULT_FILE),
        ("adapter.state", adapter.get("state"), result.get("adapter_state"), RESULT_FILE),
        *((f"fit.{k}", fit.get(k), result.get(k), RESULT_FILE)
          for k in ("dataset", "val_acc", "test_acc", "n_classes", "n_support", "n_val", "n_test")),
    ]
    for name, here, there, where in checks:
        if here != there:
            raise ArtifactError(f"{path}: {ARTIFACT_FILE}'s {name} does not match {where} "
                                f"({_first_difference(here, there)}); the artifact was edited or is corrupt: "
                                "fit it again (fewclip fit)")


def adapter_context(classnames: list[str], text: torch.Tensor, support: SupportSet, backbone: FrozenClip,
                    seed: int) -> AdapterContext:
    """What ``Adapter.setup`` receives for an artifact's classes: ``text [C, D]`` head, the support set."""
    return AdapterContext(classnames=list(classnames), text_head=text, support=support,
                          logit_scale=backbone.logit_scale, backbone=backbone, device=backbone.device, seed=seed,
                          progress=False)


def support_set(store: KVStore, search_params: str = "") -> SupportSet:
    """A support store as the adapters take it: ``keys [N, D]``, ``labels [N]``, ``views [A, N, D]`` or None, and
    its faiss index (searched with ``search_params``: the fit's ``cache.search_params``)."""
    return SupportSet(keys=store.keys(), labels=store.labels(), views=store.view_features(),
                      index=store.searcher(search_params))


def search_params(path: Path) -> str:
    """The ``cache.search_params`` the artifact's run used (``""``: the defaults), from its ``result.json``."""
    try:
        config = json.loads((path / RESULT_FILE).read_text()).get("config", {})
    except (OSError, ValueError):
        return ""
    return str((config.get("cache") or {}).get("search_params") or "")
