"""MaPLe: multi-modal prompt learning (Khattak et al., CVPR 2023; muzairkhattak/multimodal-prompt-learning).

Deep prompts in both towers, coupled: the vision prompts are projected from the text prompts.

* Text: M context vectors replace the first M words of "a photo of a" at the input (M = 2: "a photo" is
  learned, "of a" stays); before text blocks 1 .. J-1, the M context positions are replaced by new learned
  prompts ``t_j`` (``[M, W_t]``, N(0, 0.02)).
* Vision: M prompt tokens appended to the ViT's tokens. At the input they are ``ln_pre(F_0(ctx))``; before
  vision blocks 1 .. J-1 they are replaced by ``F_j(t_j)``. The coupling functions ``F_j`` are
  ``Linear(W_t, W_v)``; as in the reference, the J-1 deep ones start as copies of one initialisation. After
  block J-1 the prompt tokens flow on through the remaining blocks and are dropped before pooling.
* logits = s * normalize(image(x; prompts)) . normalize(text(class; prompts)), s the backbone's logit scale
  (``logit_scale.exp()`` in the reference: 100 for CLIP).

Defaults are the reference's ViT-B/16 config: M = 2 from "a photo of a", depth J = 9, SGD lr 0.0035, cosine,
1 warmup epoch at 1e-5, batch 4, 5 epochs. It trains in pixel mode (the image encoder sees the prompts, so
cached features cannot be used). ``depth = 0`` is not a MaPLe setting: it removes every prompt except the
input text context (CoOp with a partial context), which with the default init reproduces zero-shot CLIP with
the template "a photo of a {}.". Visual prompts need a ViT image tower; ResNet backbones are refused. A depth
beyond the backbone's layers is lowered to its layer count (with a warning) and recorded in ``result.json``.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
from torch import nn

from adapters.base import AdapterContext
from adapters.coop import CoOpPixels
from adapters.training import seeded_linear

log = logging.getLogger(__name__)


class MaPLe(CoOpPixels):
    """Coupled deep vision-language prompts. ``depth``: J, the number of layers of each tower with prompts."""

    cost = "trained on pixels (prompts inside both encoders)"

    def __init__(self, n_ctx: int = 2, ctx_init: str = "a photo of a", depth: int = 9, **kwargs: Any) -> None:
        super().__init__(n_ctx=n_ctx, ctx_init=ctx_init, **kwargs)
        if self.csc or self.position != "end":
            raise ValueError("MaPLe uses one shared context with the class token at the end")
        if depth < 0:
            raise ValueError(f"depth must be >= 0, got {depth}")
        self.depth = int(depth)
        self.deep_text: nn.Parameter | None = None
        self.proj: nn.Module | None = None
        self.deep_proj: nn.ModuleList | None = None

    def setup(self, ctx: AdapterContext) -> None:
        super().setup(ctx)
        if self.depth == 0:
            return
        bb = ctx.backbone
        vit = bb.vision_transformer("maple")
        text_layers, vision_layers = len(bb.model.transformer.resblocks), len(vit.transformer.resblocks)
        if self.depth > min(text_layers, vision_layers):
            # The default J = 9 is for 12-layer towers; smaller models (the tiny test backbone) get every layer.
            log.warning("maple depth %d exceeds the backbone's layers (text %d, vision %d): using %d", self.depth,
                        text_layers, vision_layers, min(text_layers, vision_layers))
            self.depth = min(text_layers, vision_layers)
        w_text, w_vision = self.context.shape[-1], vit.class_embedding.shape[-1]
        gen = torch.Generator().manual_seed(ctx.seed + 2)
        self.proj = seeded_linear(w_text, w_vision, gen).to(ctx.device)
        if self.depth > 1:
            self.deep_text = nn.Parameter(
                (torch.randn(self.depth - 1, self.n_ctx, w_text, generator=gen) * 0.02).to(ctx.device))
            first = seeded_linear(w_text, w_vision, gen)
            self.deep_proj = nn.ModuleList([copy.deepcopy(first) for _ in range(self.depth - 1)]).to(ctx.device)

    def fit(self, train_set: Any, val: Any) -> dict[str, Any]:
        return {**super().fit(train_set, val), "depth": self.depth}

    def encode_text(self) -> torch.Tensor:
        """``[C, D]``: the class prompts through the text tower, deep prompts replacing the context."""
        bb = self.ctx.backbone
        return bb.encode_prompt_embeddings(self.prompt_embeddings(self.context), self.meta_tokens,
                                           deep_prompts=self.deep_text)

    def vision_prompt(self, i: int, tokens: torch.Tensor) -> torch.Tensor | None:
        """Prompt tokens for vision block ``i`` (``[B, M, W_v]``), or None to keep the current ones."""
        if self.depth == 0 or i >= self.depth:
            return None
        batch = tokens.shape[0]
        if i == 0:  # input tokens go through ln_pre, like the patch tokens they join
            vit = self.ctx.backbone.model.visual
            return vit.ln_pre(self.proj(self.context)).expand(batch, -1, -1)
        return self.deep_proj[i - 1](self.deep_text[i - 1]).expand(batch, -1, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, 3, S, S]`` pixels -> ``[B, C]``."""
        bb = self.ctx.backbone
        if self.depth == 0:
            image = bb.encode_images(x)
        else:
            image = bb.encode_images_prompted(x, self.vision_prompt, method="maple")
        return self.ctx.logit_scale * image @ self.class_text_features().t()
