"""CoCoOp: conditional context optimisation (Zhou et al., CVPR 2022; KaiyangZhou/CoOp ``trainers/cocoop.py``).

CoOp plus a light meta-net, ``Linear(D, D/16) -> ReLU -> Linear(D/16, W)``, that turns each image's features
into a bias added to every context vector, so every image gets its own prompts:

    ctx_i = ctx + meta_net(f_i),   logits_i = s f_i . normalize(text(ctx_i, class))

with s the backbone's logit scale (``logit_scale.exp()`` in the reference: 100 for CLIP).

Defaults are CoCoOp's: M = 4 initialised from "a photo of a", SGD lr 0.002, cosine, 1 warmup epoch, batch 1,
10 epochs. Each step encodes B x C prompts, which is why the reference trains with batch 1 and why CoCoOp is
far slower than CoOp.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from adapters.base import AdapterContext, FeatureSplit
from adapters.coop import CoOp
from adapters.training import seeded_linear


class CoCoOp(CoOp):
    """CoOp with an image-conditioned context bias. ``chunk``: images per text-encoder call at inference."""

    def __init__(self, n_ctx: int = 4, ctx_init: str = "a photo of a", chunk: int = 8, **kwargs: Any) -> None:
        super().__init__(n_ctx=n_ctx, ctx_init=ctx_init, **kwargs)
        if self.csc or self.position != "end":
            raise ValueError("CoCoOp uses one shared context with the class token at the end")
        self.chunk = int(chunk)
        self.meta_net: nn.Module | None = None

    def setup(self, ctx: AdapterContext) -> None:
        super().setup(ctx)
        d, width = self.text_head.shape[1], self.context.shape[-1]
        gen = torch.Generator().manual_seed(ctx.seed + 1)
        hidden = max(1, d // 16)
        first, second = seeded_linear(d, hidden, gen), seeded_linear(hidden, width, gen)
        self.meta_net = nn.Sequential(first, nn.ReLU(), second).to(ctx.device)

    def estimate_eval_seconds(self, val: FeatureSplit, sample: int = 8) -> float:
        """Every image has its own prompts, so an evaluation costs ``len(val)`` times one image's: timed on a few."""
        start = time.perf_counter()
        self.predict(val.features[:sample])
        return (time.perf_counter() - start) * len(val) / max(1, min(sample, len(val)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, D]`` -> ``[B, C]``; the text encoder runs on B x C prompts, ``chunk`` images per call."""
        x = x.float()
        shift = self.meta_net(x)  # [B, W]
        out = []
        for i in range(0, x.shape[0], self.chunk):
            f, ctx_vectors = x[i : i + self.chunk], self.context + shift[i : i + self.chunk, None]  # [b, M, W]
            if self.prefix_len:  # each image's prefix once, its C class suffixes in one batch
                text = self.encode_shared(ctx_vectors)  # [b, C, D]
            else:
                prompts = torch.cat([self.prompt_embeddings(c) for c in ctx_vectors])  # [b * C, L, W]
                tokens = self.meta_tokens.repeat(len(f), 1)
                text = self.ctx.backbone.encode_prompt_embeddings(prompts, tokens).view(len(f), -1, x.shape[1])
            out.append(torch.einsum("bd,bcd->bc", f, text))
        return self.ctx.logit_scale * torch.cat(out)
