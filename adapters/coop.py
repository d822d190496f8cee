"""CoOp: context optimisation (Zhou et al., IJCV 2022; KaiyangZhou/CoOp ``trainers/coop.py``).

M learnable context vectors replace the hand-written words of the prompt; the class name's tokens stay fixed:

    [SOS] [V]_1 ... [V]_M [CLASS] . [EOS]        (class token at the end; or in the middle, or in front)

The text transformer runs on the spliced token embeddings through ``FrozenClip.encode_prompt_embeddings``
(open_clip's own modules, nothing forked); gradients reach only the context. Defaults are CoOp's: M = 16,
unified context, random init N(0, 0.02) (or from words such as "a photo of a"), SGD lr 0.002 (momentum 0.9, weight
decay 5e-4: Dassl's defaults), cosine, one warmup epoch at lr 1e-5, batch 32, and the epochs of ``COOP.md``: 50 for
1 shot (``rn50_ep50``), 100 for 2 and 4 (``rn50_ep100``), 200 for 8 and 16 (``rn50``); ImageNet 50 for every shot
count (``*_ep50``; ``protocol=reference`` applies that, ``conf/recipe/coop.yaml``).

What differs by protocol: CoOp keeps the last epoch (Dassl's ``TEST.FINAL_MODEL = last_step``) and steps the cosine
once per epoch; fewclip's ``fewshot`` protocol keeps the epoch with the best val accuracy and steps per batch
(``select``, ``schedule_step``); ``protocol=reference`` follows CoOp.

fewclip trains CoOp on the cached augmented views (feature mode), since the image encoder is frozen; with
``input_kind=pixels`` (adapter ``coop_pixels``) it re-encodes freshly augmented images every step, as the
reference does.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from adapters.base import Adapter, AdapterContext
from adapters.training import TrainsOnFeatures, TrainSpec, train, view_batches

EPOCHS_BY_SHOTS = {1: 50, 2: 100, 4: 100, 8: 200, 16: 200}  # KaiyangZhou/CoOp COOP.md
# Learning-rate factor for an image batch k times the paper's (feature mode): linear scaling (Goyal et al. 2017) or
# square-root scaling (Krizhevsky 2014), the gentler of the two usual rules.
LR_RULES = {"linear": lambda k: k, "sqrt": math.sqrt}


class CoOp(TrainsOnFeatures, Adapter):
    """Learned prompt context.

    Args:
        n_ctx: number of learned context vectors M. With ``ctx_init``, the first M of its tokens are learned and
            the rest stay fixed words of the prompt (MaPLe's convention; only with the class token at the end);
            M = 0 or M >= its token count learns them all.
        ctx_init: words to initialise the context from ("a photo of a"), or "" for random N(0, 0.02).
        class_token_position: ``end``, ``middle`` or ``front``.
        csc: class-specific context (one context per class) instead of one shared context.
        epochs: 0 picks CoOp's schedule from the number of shots (``epochs_by_shots``).
        share_prefix: run the prompt positions shared by every class once per step (exact; see
            ``FrozenClip.encode_prompts_shared_prefix``); off only to check it against the full prompts.
        feature_batch_size: feature mode: images per step, with the learning rates scaled by ``feature_lr_rule``
            (``effective_spec``); 0 keeps ``batch_size``.
        feature_lr_rule: how the learning rates follow a batch k times larger: ``linear`` (x k) or ``sqrt``
            (x sqrt(k)).
    """

    def __init__(self, n_ctx: int = 16, ctx_init: str = "", class_token_position: str = "end", csc: bool = False,
                 epochs_by_shots: Mapping[int, int] | None = None, share_prefix: bool = True,
                 feature_batch_size: int = 0, feature_lr_rule: str = "linear", **train_kwargs: Any) -> None:
        super().__init__()
        if feature_lr_rule not in LR_RULES:
            raise ValueError(f"feature_lr_rule must be one of {sorted(LR_RULES)}, got {feature_lr_rule!r}")
        self.feature_lr_rule = feature_lr_rule
        if class_token_position not in ("end", "middle", "front"):
            raise ValueError(f"class_token_position must be end, middle or front, got {class_token_position}")
        self.n_ctx, self.ctx_init, self.position, self.csc = int(n_ctx), str(ctx_init), class_token_position, bool(csc)
        self.share_prefix = bool(share_prefix)
        self.feature_batch_size = int(feature_batch_size)
        self.prefix_len = 0  # prompt positions shared by every class (set by setup; 0: encode the full prompts)
        self.epochs_by_shots = {int(k): int(v) for k, v in (epochs_by_shots or EPOCHS_BY_SHOTS).items()}
        self.init_training(train_kwargs)
        self.context: nn.Parameter | None = None
        self._text_cache: torch.Tensor | None = None

    # ------------------------------------------------------------------ construction
    def setup(self, ctx: AdapterContext) -> None:
        super().setup(ctx)
        if ctx.backbone is None:
            raise ValueError("CoOp needs the backbone's text encoder (AdapterContext.backbone)")
        bb = ctx.backbone
        self.epochs_by_shots_budget(ctx, self.epochs_by_shots)
        gen = torch.Generator().manual_seed(ctx.seed)
        if self.ctx_init:
            init_tokens, init_embeds = bb.token_embeddings([self.ctx_init])
            n_init = int(init_tokens[0].argmax()) - 1  # tokens between SOS and EOS
            m = n_init if self.n_ctx <= 0 else min(self.n_ctx, n_init)
            if m < n_init and self.position != "end":
                raise ValueError("learning only part of ctx_init needs class_token_position=end")
            vectors = init_embeds[0, 1 : 1 + m].clone()
            if self.csc:
                vectors = vectors[None].repeat(ctx.n_classes, 1, 1)
            # The init words themselves mark where the context goes (the first m are replaced, the rest stay).
            prefix = self.ctx_init
        else:
            m = self.n_ctx
            width = bb.token_embeddings(["x"])[1].shape[-1]
            shape = (ctx.n_classes, m, width) if self.csc else (m, width)
            vectors = torch.randn(shape, generator=gen) * 0.02
            # Placeholder words mark where the context goes; their embeddings are replaced in `prompt_embeddings`.
            prefix = " ".join(["X"] * m)
        self.n_ctx = m
        self.context = nn.Parameter(vectors.to(ctx.device))
        names = [c.replace("_", " ") for c in ctx.classnames]
        tokens, embeds = bb.token_embeddings([f"{prefix} {n}." for n in names])
        # Tokens per class name (between SOS and EOS), from one batched tokenizer call.
        name_lens = (bb.tokenizer(names).argmax(dim=-1) - 1).tolist()
        self.register_buffer("token_sos", embeds[:, :1], persistent=False)  # [C, 1, W]
        self.register_buffer("token_suffix", embeds[:, 1 + m :], persistent=False)  # class, '.', EOS, pad
        self.name_lens = name_lens
        self.register_buffer("meta_tokens", self._reorder_tokens(tokens, m), persistent=False)
        self.prefix_len = self._shared_prefix_len(bb) if self.share_prefix else 0

    def _shared_prefix_len(self, bb: Any) -> int:
        """Leading prompt positions identical for every class (start-of-text, a shared context, fixed words).

        With the class token at the end and one shared context, ``[SOS] [V]_1..[V]_M`` (and any fixed words
        after it) is the same sequence for every class, so under causal attention its hidden states are computed
        once per step (``FrozenClip.encode_prompts_shared_prefix``). 0 when nothing is shared or the text tower
        cannot split its work.
        """
        if self.position != "end" or self.csc or not bb.shared_prefix_supported():
            return 0
        tokens = self.meta_tokens
        fixed = self.token_suffix  # [C, L - 1 - M, W]: the positions after the context
        n = 0
        eot = int(tokens.argmax(dim=-1).min())  # the end-of-text token is pooled: it must stay per class
        while 1 + self.n_ctx + n < eot:
            column = tokens[:, 1 + self.n_ctx + n]
            if not bool((column == column[0]).all()) or not bool((fixed[:, n] == fixed[0, n]).all()):
                break
            n += 1
        return 1 + self.n_ctx + n

    def _reorder_tokens(self, tokens: torch.Tensor, m: int) -> torch.Tensor:
        """Token ids in the spliced order (only the EOS position matters for pooling)."""
        if self.position == "end":
            return tokens
        out = tokens.clone()
        for i, n in enumerate(self.name_lens):
            suffix = tokens[i, 1 + m :]
            cls, rest = suffix[:n], suffix[n:]
            if self.position == "front":
                out[i, 1:] = torch.cat([cls, tokens[i, 1 : 1 + m], rest])
            else:
                half = m // 2
                out[i, 1:] = torch.cat([tokens[i, 1 : 1 + half], cls, tokens[i, 1 + half : 1 + m], rest])
        return out

    # ------------------------------------------------------------------ prompts
    def prompt_embeddings(self, ctx_vectors: torch.Tensor) -> torch.Tensor:
        """Splice context into every class prompt: ``[M, W]`` or ``[C, M, W]`` -> ``[C, L, W]``."""
        n_cls = self.token_sos.shape[0]
        c = ctx_vectors if ctx_vectors.dim() == 3 else ctx_vectors[None].expand(n_cls, -1, -1)
        if self.position == "end":
            return torch.cat([self.token_sos, c, self.token_suffix], dim=1)
        rows = []
        half = self.n_ctx // 2
        for i, n in enumerate(self.name_lens):
            cls, rest = self.token_suffix[i : i + 1, :n], self.token_suffix[i : i + 1, n:]
            if self.position == "front":
                parts = [self.token_sos[i : i + 1], cls, c[i : i + 1], rest]
            else:
                parts = [self.token_sos[i : i + 1], c[i : i + 1, :half], cls, c[i : i + 1, half:], rest]
            rows.append(torch.cat(parts, dim=1))
        return torch.cat(rows)

    def class_text_features(self) -> torch.Tensor:
        """``[C, D]`` normalised class embeddings from the learned prompts (cached while not training)."""
        if not self.training and self._text_cache is not None:
            return self._text_cache
        feats = self.encode_text()
        if not self.training:
            self._text_cache = feats.detach()
        return feats

    def encode_text(self) -> torch.Tensor:
        """``[C, D]`` normalised features of the current prompts (prompt learners with deep prompts extend it)."""
        if self.prefix_len:
            return self.encode_shared(self.context[None])[0]
        return self.ctx.backbone.encode_prompt_embeddings(self.prompt_embeddings(self.context), self.meta_tokens)

    def encode_shared(self, ctx_vectors: torch.Tensor) -> torch.Tensor:
        """``[B, M, W]`` contexts (one per image for CoCoOp) -> ``[B, C, D]`` class features, the shared prefix run
        once per context (needs ``prefix_len > 0``)."""
        b, fixed = ctx_vectors.shape[0], self.prefix_len - 1 - self.n_ctx
        prefix = torch.cat([self.token_sos[:1].expand(b, -1, -1), ctx_vectors,
                            self.token_suffix[:1, :fixed].expand(b, -1, -1)], dim=1)
        return self.ctx.backbone.encode_prompts_shared_prefix(prefix, self.token_suffix[:, fixed:], self.meta_tokens)

    def effective_spec(self, n_images: int | None = None) -> TrainSpec:
        """The schedule feature mode trains with: ``feature_batch_size`` images per text-encoder pass.

        Each step encodes the C class prompts once, whatever the number of images, so larger image batches make an
        epoch cheaper in proportion. Batch x k, learning rates (``lr`` and ``warmup_lr``) x k (``feature_lr_rule``
        linear) or x sqrt(k) (sqrt), the same epochs and warmup epochs (so the same number of passes over the data,
        with k times fewer, k times larger steps). k counts the images a step really
        gets: a support set of ``n_images`` (default: the set-up one) smaller than the batch caps it. 0, or a value
        not above ``batch_size``, keeps the paper's recipe.
        """
        b = self.feature_batch_size
        if n_images is None and self.ctx is not None:
            n_images = len(self.ctx.support)
        if n_images:
            b = min(b, max(int(n_images), self.spec.batch_size))
        if b <= self.spec.batch_size or self.input_kind != "features":
            return self.spec
        f = LR_RULES[self.feature_lr_rule](b / self.spec.batch_size)
        return dataclasses.replace(self.spec, batch_size=b, lr=self.spec.lr * f, warmup_lr=self.spec.warmup_lr * f)

    def training_spec(self) -> TrainSpec:
        return self.effective_spec()

    def fit(self, train_set: Any, val: Any) -> dict[str, Any]:
        """Feature mode: train on the cached views with ``effective_spec``."""
        spec = self.effective_spec(len(train_set))
        record = train(self, view_batches(train_set, spec.batch_size, self.text_head.device), val, spec,
                       seed=self.ctx.seed, loss_fn=self.loss, progress=self.ctx.progress, desc=type(self).__name__)
        if spec is not self.spec:
            record["batch_rule"] = {"paper_batch_size": self.spec.batch_size, "paper_lr": self.spec.lr,
                                    "rule": f"{self.feature_lr_rule} scaling: batch x k, learning rates x "
                                            f"{'k' if self.feature_lr_rule == 'linear' else 'sqrt(k)'}, same epochs"}
        return record

    def new_class_state(self) -> dict[str, torch.Tensor] | None:
        # A shared context transfers to any class name (CoOp's base-to-novel setting); one per class cannot.
        return None if self.csc else dict(self.state_dict())

    def train(self, mode: bool = True) -> CoOp:
        self._text_cache = None  # parameters may change: recompute the class embeddings
        return super().train(mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, D]`` image features -> ``[B, C]``: scaled cosine with the learned class embeddings."""
        return self.ctx.logit_scale * x.float() @ self.class_text_features().t()


class CoOpPixels(CoOp):
    """CoOp trained on pixels: every step re-encodes freshly augmented support images (exact reproduction)."""

    input_kind = "pixels"
    cost = "trained on pixels (frozen image encoder run every step)"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, 3, S, S]`` pixels -> ``[B, C]``."""
        return super().forward(self.ctx.backbone.encode_images(x))

    def fit(self, train_set: Any, val: Any) -> dict[str, Any]:
        px = self.ctx.pixels
        if px is None:
            raise ValueError("CoOpPixels needs AdapterContext.pixels (the runner provides it)")
        batches = px.train.augmented_batches(px.aug, self.ctx.seed, self.spec.batch_size)
        return train(self, batches, val, self.spec, seed=self.ctx.seed, loss_fn=self.loss,
                     progress=self.ctx.progress, desc=f"{type(self).__name__} (pixels)",
                     mode="pixels (fresh augmentation)",
                     steps_per_epoch=math.ceil(len(px.train) / self.spec.batch_size))
