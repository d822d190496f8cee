"""Where a backbone's weights come from, and whether they fit: pretrained tags (the local Hugging Face cache, then
the hub), local files (state dicts, safetensors, OpenAI's TorchScript archives), ``local-dir:`` folders and the
weights bundled in ``caches/model_configs/``; the activation a tag was trained with; and fail-fast errors naming the
fix when weights are missing or made for another architecture. ``caches.backbone.FrozenClip`` builds its model
through :func:`create_clip`.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

TINY_MODEL = "fewclip-tiny"
CONFIG_DIR = Path(__file__).parent / "model_configs"
_HF_HOST = ("huggingface.co", 443)


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights cannot be fetched or found locally."""


class BackboneConfigError(ValueError):
    """The backbone settings name something that does not exist or does not fit: an unknown architecture or tag,
    an incomplete ``local-dir:`` folder, a weights file made for another architecture."""


def register_fewclip_configs() -> None:
    import open_clip

    if TINY_MODEL not in open_clip.list_models():
        open_clip.add_model_config(CONFIG_DIR)


def bundled_weights(pretrained: str | None) -> str | None:
    """``pretrained`` as given, or the path of the weights file of that bare name in ``caches/model_configs/``."""
    if (pretrained and os.sep not in pretrained and not os.path.isfile(pretrained)
            and (CONFIG_DIR / pretrained).is_file()):
        return str(CONFIG_DIR / pretrained)
    return pretrained


def short_model_name(model: str) -> str:
    """A short, path-safe name for a model (the default ``backbone.name``): the architecture name, a ``local-dir:``
    folder's name, or a ``hf-hub:`` repository's name."""
    if model.startswith(("local-dir:", "hf-hub:")):
        model = Path(model.split(":", 1)[1].rstrip("/\\")).name or model.split(":", 1)[0]
    return "".join(c if c.isalnum() or c in "._-" else "-" for c in model) or "backbone"


def check_model_name(model: str) -> None:
    """Refuse an architecture open_clip does not know, naming the close matches (open_clip's own error lists every
    model it has)."""
    import difflib

    import open_clip

    if model.startswith(("local-dir:", "hf-hub:")) or model in open_clip.list_models():
        return
    close = difflib.get_close_matches(model, open_clip.list_models(), n=5, cutoff=0.6)
    hint = f"; close matches: {', '.join(close)}" if close else ""
    raise BackboneConfigError(f"unknown open_clip model backbone.model={model}{hint} (open_clip.list_models() lists "
                              "them all, or use local-dir:/path/to/folder)")


def match_activation(model: str, pretrained: str | None) -> tuple[str, bool]:
    """The architecture to build for a pretrained tag, following open_clip's rule that a tag's ``quick_gelu`` flag
    must match the model's activation.

    OpenAI's weights (tag ``openai``) were trained with QuickGELU; open_clip lists them under ``<model>-quickgelu``
    too and warns when they are loaded into a GELU model (``factory.create_model``). Such a model computes other
    features from the same weights, without any error. Here a GELU architecture asked for a QuickGELU tag is
    switched to its ``-quickgelu`` twin (or built with ``force_quick_gelu`` when there is none), with a warning;
    a QuickGELU architecture asked for a GELU tag is refused.

    Returns:
        ``(model name to build, force_quick_gelu)``.
    """
    import open_clip

    if pretrained is None or model.startswith(("local-dir:", "hf-hub:")) or os.path.isfile(pretrained):
        return model, False
    tag_cfg = open_clip.get_pretrained_cfg(model, pretrained)
    if not tag_cfg:
        return model, False  # an unknown tag: resolve_weights says so
    tag_quick = bool(tag_cfg.get("quick_gelu", False))
    model_quick = bool((open_clip.get_model_config(model) or {}).get("quick_gelu", False))
    if tag_quick == model_quick:
        return model, False
    if model_quick:
        raise BackboneConfigError(f"pretrained={pretrained} was trained with GELU but backbone.model={model} uses "
                                  "QuickGELU: use the model name without -quickgelu")
    twin = f"{model}-quickgelu"
    if twin in open_clip.list_models():
        log.warning("pretrained=%s was trained with QuickGELU activations: building %s instead of %s (the weights "
                    "in a GELU model give other features)", pretrained, twin, model)
        return twin, False
    log.warning("pretrained=%s was trained with QuickGELU activations: building %s with QuickGELU", pretrained, model)
    return model, True


def is_torchscript(path: str) -> bool:
    """True for a TorchScript archive (OpenAI's original ``.pt`` releases): a zip with a ``code/`` folder, which
    ``torch.load(weights_only=True)`` refuses."""
    import zipfile

    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.split("/", 1)[-1].startswith("code/") for n in z.namelist())


def _load_torchscript_state(model: torch.nn.Module, path: str) -> None:
    """Load the weights of a TorchScript checkpoint into ``model``, as open_clip's ``load_openai_model`` reads
    OpenAI's releases: ``torch.jit.load`` on the CPU, its state dict without the three scalar entries OpenAI
    stores (``input_resolution``, ``context_length``, ``vocab_size``).

    Raises:
        BackboneConfigError: the checkpoint's parameters do not match the model's names and shapes.
    """
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch marks torch.jit as deprecated
        state = torch.jit.load(path, map_location="cpu").state_dict()
    for key in ("input_resolution", "context_length", "vocab_size"):
        state.pop(key, None)
    own = model.state_dict()
    # Buffers the model keeps out of its state dict (the text tower's causal mask) are rebuilt, not loaded.
    transient = {n for n, _ in model.named_buffers()} - set(own)
    state = {k: v for k, v in state.items() if k not in transient}
    _check_fits(own, state, path, model)
    model.load_state_dict(state, strict=True)


def _check_fits(own: dict[str, torch.Tensor], state: dict[str, torch.Tensor], path: str, model: Any) -> None:
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or shapes:
        parts = [f"{len(v)} {what} (e.g. {v[0]})" for what, v in
                 (("missing", missing), ("unexpected", unexpected), ("of another shape", shapes)) if v]
        raise BackboneConfigError(f"weights file {path} does not fit this architecture ({type(model).__name__}): "
                                  f"parameters {'; '.join(parts)}. Is backbone.model the architecture it was saved "
                                  "from?")


_CHECKPOINT_SUFFIXES = (".safetensors", ".bin", ".pth")  # what open_clip looks for in a local-dir folder


def check_local_dir(model: str) -> None:
    """A ``local-dir:`` folder must hold ``open_clip_config.json`` and a checkpoint: without one, open_clip logs a
    warning and returns a randomly initialised model.

    Raises:
        BackboneConfigError: the folder or its config is missing.
        WeightsUnavailableError: no checkpoint file in it.
    """
    folder = Path(model.split(":", 1)[1]).expanduser()
    if not folder.is_dir():
        raise BackboneConfigError(f"backbone.model={model}: no such folder")
    if not (folder / "open_clip_config.json").is_file():
        raise BackboneConfigError(f"backbone.model={model}: the folder has no open_clip_config.json")
    if not any(p.suffix in _CHECKPOINT_SUFFIXES for p in folder.iterdir() if p.is_file()):
        found = sorted(p.name for p in folder.iterdir() if p.is_file())
        hint = ("; a TorchScript .pt file loads with backbone.model=ARCH backbone.pretrained=FILE"
                if any(n.endswith(".pt") for n in found) else "")
        raise WeightsUnavailableError(
            f"backbone.model={model}: the folder has a config but no weights (open_clip reads "
            f"{', '.join('*' + x for x in _CHECKPOINT_SUFFIXES)}; found {found}){hint}. Refusing to run on randomly "
            "initialised weights.")


class _DropRandomInitWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()


@contextlib.contextmanager
def expected_random_init(expected: bool) -> Iterator[None]:
    """Silence open_clip's "initialized randomly" warning (logged on the root logger) where random weights were
    asked for (``pretrained=None``, the tiny test model): ``weights_id`` records them as ``random:<hash>``."""
    if not expected:
        yield
        return
    root, drop = logging.getLogger(), _DropRandomInitWarning()
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)


def create_clip(model: str, weights: str | None, **kwargs: Any) -> torch.nn.Module:
    """``open_clip.create_model`` for a tag's or file's weights (``weights``: a local path or None), a ``local-dir:``
    folder, or a TorchScript checkpoint; weights that do not fit the architecture are a ``BackboneConfigError``
    instead of open_clip's page of missing keys."""
    import open_clip

    if model.startswith("local-dir:"):
        check_local_dir(model)
        # require_pretrained: open_clip raises instead of returning random weights, should a checkpoint not load.
        return open_clip.create_model(model, device=kwargs["device"], require_pretrained=True)
    if weights is not None and is_torchscript(weights):
        net = open_clip.create_model(model, pretrained=None, **kwargs)
        _load_torchscript_state(net, weights)
        return net.to(kwargs["device"])
    try:
        return open_clip.create_model(model, pretrained=weights, **kwargs)
    except RuntimeError as e:
        if weights is None or "Error(s) in loading state_dict" not in str(e):
            raise
        net = open_clip.create_model(model, pretrained=None, **kwargs)
        from open_clip.factory import load_state_dict

        _check_fits(net.state_dict(), load_state_dict(weights), weights, net)
        raise


def state_dict_hash(module: torch.nn.Module) -> str:
    """Hex sha256 over parameter names, shapes and bytes: identifies randomly initialised weights."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _cached_hub_file(hf_hub: str, cache_dir: str | None) -> str | None:
    """Path of the tag's weights in the local Hugging Face cache, or None (no network access)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - open_clip depends on huggingface_hub
        return None
    # open_clip's convention: "org/repo/file.bin", or "org/repo/" for its default file name.
    model_id, filename = os.path.split(hf_hub)
    names = [filename] if filename else []
    # open_clip prefers safetensors twins of the .bin it names; look for both.
    names += ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
    for name in names:
        hit = try_to_load_from_cache(repo_id=model_id, filename=name, cache_dir=cache_dir)
        if isinstance(hit, str) and os.path.isfile(hit):
            return hit
    return None


def _network_reachable(timeout_s: float = 3.0) -> bool:
    try:
        with socket.create_connection(_HF_HOST, timeout=timeout_s):
            return True
    except OSError:
        return False


def _offline_message(model: str, tag: str) -> str:
    return (
        f"Cannot fetch pretrained weights for backbone model={model} pretrained={tag}: no network access "
        f"to {_HF_HOST[0]} (or HF_HUB_OFFLINE is set) and the weights are not in the local Hugging Face "
        "cache.\nFixes: download the weights on a machine with internet and pass the file with "
        f"'backbone.model={model} backbone.pretrained=/path/to/open_clip_pytorch_model.bin' (or an open_clip "
        "folder with 'backbone.model=local-dir:/path/to/folder'), copy a Hugging Face cache into HF_HOME, "
        "or run offline with the bundled small model 'backbone=mini'."
    )


def resolve_weights(model: str, pretrained: str | None, cache_dir: str | None = None) -> tuple[str | None, dict]:
    """Turn (model, pretrained) into a local weights path (or None) and the tag's preprocessing.

    Fails within seconds with ``WeightsUnavailableError`` when a tag's weights are neither cached nor
    reachable, instead of letting the hub client retry for a minute.
    """
    import open_clip

    if pretrained is None or model.startswith(("local-dir:", "hf-hub:")):
        return None, {}
    if os.path.isfile(pretrained):
        return pretrained, {}
    tag_cfg = open_clip.get_pretrained_cfg(model, pretrained)
    if not tag_cfg:
        if os.sep in pretrained or pretrained.endswith((".bin", ".pt", ".pth", ".safetensors")):
            raise FileNotFoundError(f"backbone.pretrained={pretrained}: no such weights file.")
        tags = open_clip.list_pretrained_tags_by_model(model)
        known = f"Known tags: {', '.join(tags)}" if tags else "It has no pretrained tags"
        base = model.removesuffix("-quickgelu")
        if base != model and open_clip.get_pretrained_cfg(base, pretrained):
            known += f"; {base} (GELU) has the tag {pretrained}"
        raise BackboneConfigError(
            f"Unknown pretrained tag '{pretrained}' for open_clip model '{model}'. {known}. "
            "Pass a weights file path instead of a tag to use local weights."
        )
    preprocess = {k: tag_cfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in tag_cfg}
    hub = tag_cfg.get("hf_hub", "")
    if hub:
        hit = _cached_hub_file(hub, cache_dir)
        if hit:
            return hit, preprocess
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    if offline or not _network_reachable():
        raise WeightsUnavailableError(_offline_message(model, pretrained))
    from open_clip.pretrained import download_pretrained

    try:
        path = download_pretrained(tag_cfg, cache_dir=cache_dir)
    except Exception as e:  # the hub client raises many types; name the fix either way
        raise WeightsUnavailableError(_offline_message(model, pretrained) + f"\nCause: {e}") from e
    return path, preprocess
