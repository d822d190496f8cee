"""The frozen CLIP backbone: an open_clip model, its preprocessing and tokenizer.

``FrozenClip`` is the only object in fewclip that runs the CLIP encoders on images or text for caching.
Everything it returns is float32, L2-normalised and computed without gradients.

Weights come from one of four places:

* an open_clip architecture name with a pretrained tag (``model=ViT-B-16 pretrained=openai``), fetched
  through open_clip for users with internet, or read from the local Hugging Face cache when present;
* a local weights file (``pretrained=/path/to/weights.bin``);
* an open_clip ``local-dir:`` folder holding ``open_clip_config.json`` and a checkpoint;
* ``model=fewclip-tiny`` with ``pretrained=null``: a tiny randomly initialised model built from a fixed
  seed, so it is the same model on every machine and needs no download (unit tests).

``backbone=mini`` (``model=fewclip-mini``) is a small CLIP trained on public-domain clip art, emoji and rendered
characters (``caches/model_configs/fewclip-mini.md``). Its weights ship in ``caches/model_configs/`` and load
as a local weights file: ``pretrained=fewclip-mini.safetensors``, a bare file name that is not a file in the
working directory, is looked up there (``bundled_weights``). Resolving and checking the weights is
``caches.weights``' job; the piecewise transformer runs of the prompt learners are ``caches.prompted``'.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from caches.prompted import PromptFn, run_prompted_blocks, shared_prefix_block
from caches.weights import (
    bundled_weights,
    check_model_name,
    create_clip,
    expected_random_init,
    is_torchscript,
    match_activation,
    register_fewclip_configs,
    resolve_weights,
    short_model_name,
    state_dict_hash,
)
from caches.weights_id import file_identity

log = logging.getLogger(__name__)


class UnsupportedBackboneError(ValueError):
    """The chosen method cannot work with this backbone's architecture (e.g. visual prompts on a ResNet)."""


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


CLIP_LOGIT_SCALE = 100.0
"""CLIP's logit scale: its learned temperature, clamped at 100 during training (OpenAI and LAION weights sit there)."""


def logit_scale_of(model: Any, trained: bool, given: float | None = None) -> tuple[float, str]:
    """The scale of the zero-shot logits ``s x cosine`` and where it came from (``set``, ``learned`` or ``fixed``).

    CLIP's zero-shot classifier multiplies the cosines by the model's learned temperature ``exp(logit_scale)``; CoOp
    and its successors read it from the model (``trainers/coop.py``: ``logit_scale.exp()``), Tip-Adapter writes
    the 100 that CLIP learned. For weights trained like CLIP the two agree: the learned value, clamped at 100 as CLIP
    clamps it in training (so OpenAI's 4.6052 gives exactly 100). A model trained to another temperature keeps its
    own (fewclip-mini: 17.92; its first weights 14.16): its cosines were calibrated at that scale, and at 100 the
    prompt learners' first steps see logits several times too confident, collapse every class prompt onto one
    embedding and stop (CoOp on digits with fewclip-mini's first weights: loss ln 10 after one epoch). A randomly
    initialised model (``trained`` False) has no learned temperature and gets CLIP's 100. ``given``
    (``backbone.logit_scale``) overrides both.
    """
    if given is not None:
        if not float(given) > 0:
            raise ValueError(f"logit_scale must be > 0, got {given}")
        return float(given), "set"
    param = getattr(model, "logit_scale", None)
    if not trained or not isinstance(param, torch.Tensor):
        return CLIP_LOGIT_SCALE, "fixed"
    return min(float(param.detach().double().exp()), CLIP_LOGIT_SCALE), "learned"


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
        logit_scale: the scale of the zero-shot logits (``logit_scale x cosine``) every adapter uses; None takes
            it from the weights (``logit_scale_of``).
    """

    def __init__(
        self,
        model: str,
        pretrained: str | None = None,
        name: str | None = None,
        seed: int = 0,
        device: str = "auto",
        weights_cache_dir: str | None = None,
        logit_scale: float | None = None,
    ) -> None:
        import open_clip

        register_fewclip_configs()
        pretrained = bundled_weights(pretrained)
        check_model_name(model)
        name = name or short_model_name(model)
        model, force_quick_gelu = match_activation(model, pretrained)
        weights, tag_preprocess = resolve_weights(model, pretrained, weights_cache_dir)
        if weights is not None and is_torchscript(weights) and open_clip.get_pretrained_cfg(model, "openai"):
            # OpenAI released its CLIP weights only as TorchScript archives, all trained with QuickGELU.
            model, force_quick_gelu = match_activation(model, "openai")
        self.model_name = model
        self.pretrained = pretrained
        self.name = name
        self.force_quick_gelu = force_quick_gelu
        self.device = default_device() if device == "auto" else torch.device(device)
        kwargs: dict[str, Any] = {"device": self.device}
        if tag_preprocess:
            kwargs["force_preprocess_cfg"] = tag_preprocess
        if force_quick_gelu:
            kwargs["force_quick_gelu"] = True
        # Random initialisation draws from the global torch RNG; fork it so that building the model neither
        # depends on nor disturbs the caller's random state, and the tiny model is identical everywhere.
        with torch.random.fork_rng(devices=[]), expected_random_init(weights is None and pretrained is None
                                                                        and not model.startswith("local-dir:")):
            torch.manual_seed(seed)
            self.model = create_clip(model, weights, **kwargs)
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
        self.logit_scale, self.logit_scale_source = logit_scale_of(
            self.model, trained=pretrained is not None or model.startswith("local-dir:"), given=logit_scale)
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
            # Only when set, so that every other backbone keeps its fingerprint.
            **({"force_quick_gelu": True} if self.force_quick_gelu else {}),
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

    def shared_prefix_supported(self) -> bool:
        """Whether ``encode_prompts_shared_prefix`` can split the text tower's work (else it runs the full prompts).

        It needs causal attention (a later token never changes an earlier one) and open_clip's standard blocks
        (``ResidualAttentionBlock`` with a plain ``nn.MultiheadAttention``, batch first) and argmax pooling.
        """
        from open_clip.transformer import ResidualAttentionBlock

        m = self._text_tower()
        mask = m.attn_mask
        if mask is None or getattr(m, "text_pool_type", "argmax") != "argmax" or not m.transformer.batch_first:
            return False
        causal = torch.ones(mask.shape, dtype=torch.bool, device=mask.device).triu(1)
        if not torch.equal(torch.isinf(mask) & (mask < 0), causal) or not bool((mask[~causal] == 0).all()):
            return False
        for block in m.transformer.resblocks:
            a = getattr(block, "attn", None)
            if type(block) is not ResidualAttentionBlock or hasattr(block, "ln_1_kv") or \
                    not isinstance(a, torch.nn.MultiheadAttention) or not a._qkv_same_embed_dim or \
                    a.bias_k is not None or a.add_zero_attn or (a.dropout and a.training):
                return False
        return True

    def encode_prompts_shared_prefix(self, prefix: torch.Tensor, suffix: torch.Tensor, tokens: torch.Tensor
                                     ) -> torch.Tensor:
        """Text features of every (prefix, suffix) pair, running the shared prefix once: ``[B, C, D]``.

        Prompt ``(b, c)`` is ``prefix[b]`` followed by ``suffix[c]`` (CoOp: start-of-text and the learned context,
        then a class name, '.', end-of-text). Under causal attention the hidden states of the P prefix positions
        never see what follows them, so they are the same for every class: they are computed once per prefix, and
        only the suffix positions run per class, attending to the prefix's keys and values. The result equals
        ``encode_prompt_embeddings`` on the spliced prompts (up to float rounding), gradients included; towers
        where that does not hold (``shared_prefix_supported``) run the full prompts instead.

        Args:
            prefix: ``[B, P, W]`` token embeddings shared by every class (one row per image for CoCoOp).
            suffix: ``[C, S, W]`` per-class token embeddings.
            tokens: ``[C, P + S]`` token ids of the spliced prompts (the end-of-text position, the highest id, is
                pooled; it must lie in the suffix).
        Returns:
            ``[B, C, D]`` float32 L2-normalised text features.
        """
        b, p, w = prefix.shape
        n_cls = suffix.shape[0]
        eot = tokens.argmax(dim=-1).to(prefix.device)
        if int(eot.min()) < p:
            raise ValueError(f"the end-of-text token must follow the shared prefix ({p} tokens)")
        if not self.shared_prefix_supported():
            full = torch.cat([prefix[:, None].expand(b, n_cls, p, w), suffix[None].expand(b, n_cls, -1, w)], dim=2)
            feats = self.encode_prompt_embeddings(full.reshape(b * n_cls, -1, w), tokens.repeat(b, 1))
            return feats.view(b, n_cls, -1)
        m = self._text_tower()
        s = int(eot.max()) + 1 - p  # positions after the last end-of-text token are never pooled nor attended to
        pos = m.positional_embedding.float()
        hp = prefix + pos[:p]  # [B, P, W]
        hs = (suffix[:, :s] + pos[p : p + s])[None]  # [1, C, S, W]: becomes [B, C, S, W] after the first block
        # suffix position i attends to every prefix position and to suffix positions <= i
        allowed = torch.ones(s, p + s, dtype=torch.bool, device=prefix.device)
        allowed[:, p:] = torch.ones(s, s, dtype=torch.bool, device=prefix.device).tril()
        for block in m.transformer.resblocks:
            hp, hs = shared_prefix_block(block, hp, hs, allowed)
        pooled = hs[:, torch.arange(n_cls, device=hs.device), eot - p]  # [B, C, W]
        x = m.ln_final(pooled)
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
    logit_scale: float | None = None,
) -> FrozenClip:
    """Hydra entry point for ``conf/backbone/*.yaml``.

    The last backbone loaded is kept for the next call with the same arguments: the jobs of a sequential sweep
    run in one process and would otherwise reload the weights (seconds for ViT-B/16) for every job. Sharing is
    safe because a ``FrozenClip`` never changes (no gradients, always in eval mode; prompt learners keep their
    prompts outside it). A local weights file is keyed by its size and modification time too.
    """
    stamp = None
    pretrained = bundled_weights(pretrained)
    if pretrained is not None and os.path.isfile(pretrained):
        st = os.stat(pretrained)
        stamp = (st.st_size, st.st_mtime_ns)
    key = (model, pretrained, stamp, name, seed, device, weights_cache_dir, logit_scale)
    if key in _LOADED:
        log.info("reusing the loaded backbone model=%s pretrained=%s", model, pretrained)
        return _LOADED[key]
    log.info("loading backbone model=%s pretrained=%s", model, pretrained)
    backbone = FrozenClip(model, pretrained, name=name, seed=seed, device=device,
                          weights_cache_dir=weights_cache_dir, logit_scale=logit_scale)
    _LOADED.clear()  # one model at a time: a sweep over backbones must not keep them all in memory
    _LOADED[key] = backbone
    return backbone
