"""The frozen CLIP backbone: an open_clip model, its preprocessing and tokenizer.

``FrozenClip`` is the only object in fewclip that runs the CLIP encoders on images or text for caching.
Everything it returns is float32, L2-normalised and computed without gradients.

Weights come from one of four places:

* an open_clip architecture name with a pretrained tag (``model=ViT-B-16 pretrained=openai``), fetched
  through open_clip for users with internet, or read from the local Hugging Face cache when present;
* a local weights file (``pretrained=/path/to/weights.bin``);
* an open_clip ``local-dir:`` folder holding ``open_clip_config.json`` and a checkpoint;
* ``model=fewclip-tiny`` with ``pretrained=null``: a tiny randomly initialised model built from a fixed
  seed, so it is the same model on every machine and needs no download (tests and demos).
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from caches.weights_id import file_identity, sha256_file  # noqa: F401  (sha256_file: imported from here too)

log = logging.getLogger(__name__)

TINY_MODEL = "fewclip-tiny"
_CONFIG_DIR = Path(__file__).parent / "model_configs"
_HF_HOST = ("huggingface.co", 443)


class UnsupportedBackboneError(ValueError):
    """The chosen method cannot work with this backbone's architecture (e.g. visual prompts on a ResNet)."""


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights cannot be fetched or found locally."""


@dataclass(frozen=True)
class ImageSpec:
    """What the backbone expects of an image: square side, normalisation and resize interpolation."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"

    def as_dict(self) -> dict[str, Any]:
        return {"size": self.size, "mean": list(self.mean), "std": list(self.std),
                "interpolation": self.interpolation}


def default_device() -> torch.device:
    """CUDA when present, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _register_fewclip_configs() -> None:
    import open_clip

    if TINY_MODEL not in open_clip.list_models():
        open_clip.add_model_config(_CONFIG_DIR)


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
        "or run the offline demo with 'backbone=tiny'."
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
        raise ValueError(
            f"Unknown pretrained tag '{pretrained}' for open_clip model '{model}'. Known tags: {tags}. "
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


PromptFn = Callable[[int, torch.Tensor], "torch.Tensor | None"]


def run_prompted_blocks(transformer: Any, x: torch.Tensor, prompts: PromptFn, start: int, n_prompts: int = 0,
                        attn_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """Run an open_clip ``Transformer``'s ``resblocks`` one by one, setting prompt tokens before each block.

    This is how deep prompts (VPT, MaPLe, DPT) are wrapped around open_clip's own blocks without forking its
    model code. The prompt tokens sit at ``x[:, start : start + n]``.

    Args:
        transformer: an open_clip ``Transformer`` (anything with ``resblocks`` and ``batch_first``).
        x: ``[B, T, W]`` token states, batch first.
        prompts: ``(i, others) -> [B, n_i, W] | None`` called before block ``i`` with ``others``, the
            ``[B, T - n, W]`` non-prompt tokens. A tensor replaces the current prompt tokens (``n`` may change;
            the previous ones and what the earlier blocks made of them are dropped); None keeps them, so they flow
            through the block like any token.
        start: index of the first prompt token.
        n_prompts: prompt tokens already in ``x`` on entry (text context spliced into the input).
        attn_mask: passed to every block (the text tower's causal mask); the caller keeps its size consistent.
    Returns:
        ``([B, T', W] token states, number of prompt tokens at the end)``.
    """
    n = n_prompts
    for i, block in enumerate(transformer.resblocks):
        p = prompts(i, torch.cat([x[:, :start], x[:, start + n :]], dim=1))
        if p is not None:
            x = torch.cat([x[:, :start], p.to(x.dtype), x[:, start + n :]], dim=1)
            n = p.shape[1]
        if transformer.batch_first:
            x = block(x, attn_mask=attn_mask)
        else:  # open_clip < 2.24 ran its blocks sequence first
            x = block(x.transpose(0, 1), attn_mask=attn_mask).transpose(0, 1)
    return x, n


class FrozenClip:
    """A frozen open_clip model with batched, no-grad, L2-normalised encoders.

    Args:
        model: open_clip architecture name (``ViT-B-16``, ``RN50-quickgelu``, ``fewclip-tiny``) or
            ``local-dir:/path``.
        pretrained: a pretrained tag, a local weights file, or None (random init; only sensible for the
            tiny model).
        name: short name used in cache paths and results (defaults to the model name).
        seed: seed for random initialisation when ``pretrained`` is None.
        device: ``auto`` (CUDA when present), ``cpu`` or ``cuda``.
        weights_cache_dir: where open_clip keeps downloaded weights (None: the hub default).
    """

    def __init__(
        self,
        model: str,
        pretrained: str | None = None,
        name: str | None = None,
        seed: int = 0,
        device: str = "auto",
        weights_cache_dir: str | None = None,
    ) -> None:
        import open_clip

        _register_fewclip_configs()
        self.model_name = model
        self.pretrained = pretrained
        self.name = name or model.replace("/", "-").replace(":", "_")
        self.device = default_device() if device == "auto" else torch.device(device)
        weights, tag_preprocess = resolve_weights(model, pretrained, weights_cache_dir)
        kwargs: dict[str, Any] = {"device": self.device}
        if tag_preprocess:
            kwargs["force_preprocess_cfg"] = tag_preprocess
        # Random initialisation draws from the global torch RNG; fork it so that building the model neither
        # depends on nor disturbs the caller's random state, and the tiny model is identical everywhere.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if model.startswith("local-dir:"):
                self.model = open_clip.create_model(model, device=self.device)
            else:
                self.model = open_clip.create_model(model, pretrained=weights, **kwargs)
        self.model.eval().requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer(model)
        pcfg = open_clip.model.get_model_preprocess_cfg(self.model)
        size = pcfg.get("size", 224)
        size = size[0] if isinstance(size, (tuple, list)) else int(size)
        self.image_spec = ImageSpec(
            size=int(size),
            mean=tuple(float(v) for v in pcfg.get("mean", (0.48145466, 0.4578275, 0.40821073))),
            std=tuple(float(v) for v in pcfg.get("std", (0.26862954, 0.26130258, 0.27577711))),
            interpolation=str(pcfg.get("interpolation", "bicubic")),
        )
        self.logit_scale = 100.0  # CLIP's learned scale is ~100; the few-shot literature fixes it at 100.
        # Where the weights came from (caches.weights_id): file, sha256, Hugging Face revision, OpenAI release.
        self.weights_info: dict[str, Any] = {}
        self.weights_id = self._weights_id(weights)
        self.dim = int(self._probe_dim())

    def _weights_id(self, weights: str | None) -> str:
        if self.pretrained is None and not self.model_name.startswith("local-dir:"):
            return "random:" + state_dict_hash(self.model)[:16]
        if self.model_name.startswith("local-dir:"):
            return "local-dir-sha256:" + state_dict_hash(self.model)[:16]
        if weights is not None and os.path.isfile(weights):
            tag = None if os.path.isfile(str(self.pretrained)) else self.pretrained
            weights_id, self.weights_info = file_identity(weights, tag, self.model_name)
            return weights_id
        return f"tag:{self.pretrained}"

    def _probe_dim(self) -> int:
        with torch.no_grad():
            return self.encode_texts(["a"]).shape[-1]

    def describe(self) -> dict[str, Any]:
        """Everything that identifies the encoder's outputs (goes into cache fingerprints)."""
        return {
            "name": self.name,
            "model": self.model_name,
            "pretrained": self.pretrained if self.pretrained is None or not os.path.isfile(self.pretrained)
            else os.path.basename(self.pretrained),
            "weights_id": self.weights_id,
            "precision": "fp32",
            "image": self.image_spec.as_dict(),
            "dim": self.dim,
        }

    def _autocast(self):
        # AMP on CUDA only; CPU stays float32 so cached features are reproducible bit for bit.
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.float16)
        return torch.autocast("cpu", enabled=False)

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Encode a preprocessed batch.

        Args:
            pixels: ``[B, 3, S, S]`` normalised images (any device).
        Returns:
            ``[B, D]`` float32 L2-normalised features on the backbone's device.
        """
        pixels = pixels.to(self.device, non_blocking=True)
        with self._autocast():
            feats = self.model.encode_image(pixels)
        return F.normalize(feats.float(), dim=-1)

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str], batch_size: int = 256, normalize: bool = True) -> torch.Tensor:
        """Encode strings. Returns ``[T, D]`` float32 features, L2-normalised unless ``normalize`` is False."""
        out = []
        for i in range(0, len(texts), batch_size):
            tokens = self.tokenizer(list(texts[i : i + batch_size])).to(self.device)
            with self._autocast():
                feats = self.model.encode_text(tokens)
            out.append(F.normalize(feats.float(), dim=-1) if normalize else feats.float())
        return torch.cat(out) if out else torch.empty(0, 0)

    def _text_tower(self) -> Any:
        m = self.model
        if not all(hasattr(m, a) for a in ("token_embedding", "positional_embedding", "transformer", "ln_final")):
            raise UnsupportedBackboneError(
                f"prompt learning needs open_clip's built-in CLIP text tower; {self.model_name} uses a custom text "
                "encoder (e.g. a Hugging Face model), which is not supported"
            )
        return m

    def vision_transformer(self, method: str) -> Any:
        """The image tower when it is an open_clip ``VisionTransformer`` (visual prompts need one).

        Raises ``UnsupportedBackboneError`` naming ``method`` for ResNet towers (RN50, RN101, ...), timm towers
        and attention-pooled towers (CoCa), where prompt tokens have no place to go.
        """
        from open_clip.transformer import VisionTransformer

        v = self.model.visual
        if not isinstance(v, VisionTransformer) or getattr(v, "attn_pool", None) is not None:
            raise UnsupportedBackboneError(
                f"{method} inserts prompt tokens into a ViT image encoder; {self.model_name} has a "
                f"{type(v).__name__} image tower. Use a ViT backbone (backbone=vit_b16, vit_b32, tiny) or a "
                "text-only prompt learner (adapter=coop, cocoop)"
            )
        return v

    @torch.no_grad()
    def token_embeddings(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokenise and embed prompts: ``([P, L] token ids, [P, L, W] float32 token embeddings)``."""
        m = self._text_tower()
        tokens = self.tokenizer(list(texts)).to(self.device)
        return tokens, m.token_embedding(tokens).float()

    def encode_prompt_embeddings(self, embeds: torch.Tensor, tokens: torch.Tensor,
                                 deep_prompts: torch.Tensor | Sequence[torch.Tensor] | None = None,
                                 prompt_start: int = 1) -> torch.Tensor:
        """Run the frozen text transformer on given token embeddings, with gradients to ``embeds``.

        Args:
            embeds: ``[P, L, W]`` token embeddings (learned context vectors spliced in by prompt learners).
            tokens: ``[P, L]`` the token ids the embeddings stand for; the end-of-text position (highest id,
                CLIP's convention) is pooled.
            deep_prompts: ``[J - 1, M, W]`` (or a sequence of ``[M, W]``): deep text prompts. Entry ``j`` replaces
                the M context positions ``prompt_start : prompt_start + M`` at the input of block ``j + 1``
                (MaPLe); later blocks carry what the last replacement became.
            prompt_start: position of the first context token (1: right after start-of-text).
        Returns:
            ``[P, D]`` float32 text features, L2-normalised.
        """
        m = self._text_tower()
        eot = tokens.argmax(dim=-1)
        mask = m.attn_mask
        if mask is not None:
            # Causal attention: positions up to the last end-of-text token never see the padding after it,
            # so dropping that padding gives the same features for a fraction of the cost (77 -> ~20 tokens).
            length = int(eot.max()) + 1
            embeds, mask = embeds[:, :length], mask[:length, :length]
        x = embeds + m.positional_embedding[: embeds.shape[1]].float()
        if deep_prompts is None or len(deep_prompts) == 0:
            x = m.transformer(x, attn_mask=mask)
        else:
            deep = list(deep_prompts)
            if len(deep) >= len(m.transformer.resblocks):
                raise UnsupportedBackboneError(
                    f"{len(deep) + 1} layers of text prompts requested; {self.model_name}'s text transformer has "
                    f"{len(m.transformer.resblocks)}")
            n_ctx, batch = deep[0].shape[-2], x.shape[0]

            def layer_prompt(i: int, _: torch.Tensor) -> torch.Tensor | None:
                if 1 <= i <= len(deep):
                    return deep[i - 1].expand(batch, -1, -1) if deep[i - 1].dim() == 2 else deep[i - 1]
                return None

            x, _ = run_prompted_blocks(m.transformer, x, layer_prompt, prompt_start, n_ctx, attn_mask=mask)
        x = m.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), eot]
        proj = m.text_projection
        x = proj(x) if isinstance(proj, torch.nn.Linear) else x @ proj
        return F.normalize(x.float(), dim=-1)

    def encode_images_prompted(self, pixels: torch.Tensor, prompts: PromptFn, method: str = "visual prompts"
                               ) -> torch.Tensor:
        """Encode images through the frozen ViT with prompt tokens, gradients flowing to the prompts.

        The patch embedding, class token, positional embedding and ``ln_pre`` are open_clip's own
        (``VisionTransformer._embeds``); prompt tokens are appended after the T image tokens by ``prompts``
        (see ``run_prompted_blocks``; returned for block 0 they are input tokens, which MaPLe passes through
        ``ln_pre`` itself); before pooling they are dropped, so ``ln_post``, pooling and projection
        (``_pool``, ``proj``) see exactly the T image tokens, as in VPT, MaPLe and DPT.

        Args:
            pixels: ``[B, 3, S, S]`` normalised images.
            prompts: ``(i, image_tokens [B, T, W]) -> [B, n_i, W] | None`` per block.
        Returns:
            ``[B, D]`` float32 L2-normalised features.
        """
        v = self.vision_transformer(method)
        pixels = pixels.to(self.device, non_blocking=True)
        x = v._embeds(pixels)  # [B, T, W]
        n_tokens = x.shape[1]
        x, _ = run_prompted_blocks(v.transformer, x, prompts, n_tokens)
        pooled, _ = v._pool(x[:, :n_tokens])
        if v.proj is not None:
            pooled = pooled @ v.proj
        return F.normalize(pooled.float(), dim=-1)

    @torch.no_grad()
    def text_head(self, classnames: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
        """Zero-shot classifier: per class, the renormalised mean of the normalised template embeddings.

        Returns:
            ``[C, D]`` float32, rows L2-normalised, in the order of ``classnames``.
        """
        return self.text_head_and_norms(classnames, templates)[0]

    @torch.no_grad()
    def text_head_and_norms(self, classnames: Sequence[str], templates: Sequence[str]
                            ) -> tuple[torch.Tensor, torch.Tensor]:
        """The zero-shot classifier ``[C, D]`` and the norm ``[C]`` of each class's raw mean template embedding.

        TaskRes and CLAP start from the raw (unnormalised) mean of the template embeddings; with one template,
        ``head * norms[:, None]`` is exactly that vector.
        """
        if not templates or any("{}" not in t for t in templates):
            raise ValueError(f"Every prompt template must contain '{{}}'; got {list(templates)}")
        prompts = [t.format(c) for c in classnames for t in templates]
        raw = self.encode_texts(prompts, normalize=False).view(len(classnames), len(templates), -1)
        head = F.normalize(F.normalize(raw, dim=-1).mean(dim=1), dim=-1)
        return head, raw.mean(dim=1).norm(dim=-1)


_LOADED: dict[tuple, FrozenClip] = {}


def load_backbone(
    model: str,
    pretrained: str | None = None,
    name: str | None = None,
    seed: int = 0,
    device: str = "auto",
    weights_cache_dir: str | None = None,
) -> FrozenClip:
    """Hydra entry point for ``conf/backbone/*.yaml``.

    The last backbone loaded is kept for the next call with the same arguments: the jobs of a sequential sweep
    run in one process and would otherwise reload the weights (seconds for ViT-B/16) for every job. Sharing is
    safe because a ``FrozenClip`` never changes (no gradients, always in eval mode; prompt learners keep their
    prompts outside it). A local weights file is keyed by its size and modification time too.
    """
    stamp = None
    if pretrained is not None and os.path.isfile(pretrained):
        st = os.stat(pretrained)
        stamp = (st.st_size, st.st_mtime_ns)
    key = (model, pretrained, stamp, name, seed, device, weights_cache_dir)
    if key in _LOADED:
        log.info("reusing the loaded backbone model=%s pretrained=%s", model, pretrained)
        return _LOADED[key]
    log.info("loading backbone model=%s pretrained=%s", model, pretrained)
    backbone = FrozenClip(model, pretrained, name=name, seed=seed, device=device,
                          weights_cache_dir=weights_cache_dir)
    _LOADED.clear()  # one model at a time: a sweep over backbones must not keep them all in memory
    _LOADED[key] = backbone
    return backbone
