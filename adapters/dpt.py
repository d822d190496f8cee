"""DPT: dual-modality prompt tuning (Xing et al., IEEE TMM 2023; fanrena/DPT ``trainers/DPT.py``).

Three kinds of prompts, learned together:

* text prompts: CoOp's learned context (16 vectors, random init, class token at the end);
* visual prompts (VPT-deep): before each of the lower ViT blocks, ``n_vpt`` learned tokens are appended to the
  image tokens and dropped after the block;
* class-aware visual prompts (CAVPT) in the top ``cavpt_layers`` blocks: for each image, the K classes that
  zero-shot CLIP ranks highest are taken; their *learned* class text features go through a linear meta-net
  (``D -> W``) to form K queries, which cross-attend (q, k projected to 32 dims, v by a ``W x W`` map) over the
  block's image tokens (detached, as in the reference) plus 10 learned key tokens. The K results,
  ``LN(attention + query)``, are the prompts of that block; an auxiliary linear classifier on
  ``LN(attention)`` is trained to recognise the class each query stands for (when it is the true label).

Loss, as in the reference: during the first ``pretrain_epochs`` ("general knowledge guidance")
``CE(zs_image . text) + CE(image . zs_text) + 0.1 CE(image . text)``, then ``CE(image . text)``; plus
``alpha *`` the auxiliary CAVPT loss throughout. Two learning rates: text prompts 0.002 with 1 warmup epoch,
visual prompts and CAVPT 0.01 with 10 warmup epochs (constant 1e-5), SGD, cosine, batch 32, 60 epochs,
``n_vpt = 10``, K = 10, CAVPT in the last block (the repo's ``BOTTOMLIMIT 12`` on a 12-block ViT), alpha 0.3,
30 guidance epochs (``train_single.sh``; its configs use ViT-B/32).

Departure: the meta-net reads L2-normalised class text features (the reference feeds unnormalised ones, whose
scale depends on the backbone). ``vpt_tokens = 0`` with ``cavpt_layers = 0`` leaves text prompts only, which with
``ctx_init = "a photo of a"`` reproduces zero-shot CLIP (the reduction tested). Pixel mode; needs a ViT.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from adapters.base import AdapterContext
from adapters.coop import CoOpPixels
from adapters.training import seeded_linear

KEY_TOKENS = 10  # learned key/value tokens added to each CAVPT attention (fixed at 10 in the reference)
ATTN_DIM = 32  # query/key projection width of the CAVPT attention (reference)


class _ClassAwarePrompts(nn.Module):
    """One CAVPT block: K class queries ``[B, K, D]`` attend over image tokens ``[B, T, W]`` -> ``[B, K, W]``."""

    def __init__(self, text_dim: int, width: int, n_classes: int, gen: torch.Generator) -> None:
        super().__init__()
        self.meta_net = seeded_linear(text_dim, width, gen)
        self.q = seeded_linear(width, ATTN_DIM, gen, bias=False)
        self.k = seeded_linear(width, ATTN_DIM, gen, bias=False)
        self.v = seeded_linear(width, width, gen, bias=False)
        self.keys = nn.Parameter(torch.randn(KEY_TOKENS, width, generator=gen) * 0.02)
        self.ln_logits, self.ln_out = nn.LayerNorm(width), nn.LayerNorm(width)
        self.classifier = seeded_linear(width, n_classes, gen, bias=False)

    def forward(self, class_text: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(prompts [B, K, W], auxiliary logits [B, K, C])``."""
        query = self.meta_net(class_text)  # [B, K, W]
        kv = torch.cat([tokens.detach(), self.keys.expand(tokens.shape[0], -1, -1).to(tokens.dtype)], dim=1)
        scores = self.q(query) @ self.k(kv).transpose(1, 2) / ATTN_DIM ** 0.5  # [B, K, T + 10]
        attended = scores.softmax(dim=-1) @ self.v(kv)  # = v(softmax @ kv): v is linear without bias
        return self.ln_out(attended + query), self.classifier(self.ln_logits(attended))


class DPT(CoOpPixels):
    """Text prompts + deep visual prompts + class-aware visual prompts.

    Args:
        vpt_tokens: visual prompt tokens per lower block.
        cavpt_layers: number of top ViT blocks with class-aware prompts (the others get VPT prompts).
        class_prompts: K, classes per image turned into class-aware prompts (capped at the class count).
        alpha: weight of the auxiliary CAVPT classification loss.
        pretrain_epochs: epochs of general-knowledge guidance at the start.
        text_lr, text_warmup_epochs: optimiser settings of the text prompts (the rest use ``lr``).
    """

    cost = "trained on pixels (prompts inside both encoders)"

    def __init__(self, n_ctx: int = 16, ctx_init: str = "", vpt_tokens: int = 10, cavpt_layers: int = 1,
                 class_prompts: int = 10, alpha: float = 0.3, pretrain_epochs: int = 30, text_lr: float = 0.002,
                 text_warmup_epochs: int = 1, **kwargs: Any) -> None:
        super().__init__(n_ctx=n_ctx, ctx_init=ctx_init, **kwargs)
        if self.csc or self.position != "end":
            raise ValueError("DPT uses one shared text context with the class token at the end")
        if min(vpt_tokens, cavpt_layers, class_prompts) < 0:
            raise ValueError("vpt_tokens, cavpt_layers and class_prompts must be >= 0")
        self.vpt_tokens, self.cavpt_layers, self.class_prompts = int(vpt_tokens), int(cavpt_layers), int(class_prompts)
        self.alpha, self.pretrain_epochs = float(alpha), int(pretrain_epochs)
        self.text_lr, self.text_warmup_epochs = float(text_lr), int(text_warmup_epochs)
        self.vpt: nn.Parameter | None = None
        self.cavpt: nn.ModuleList | None = None
        self._epoch = 1
        self._aux: dict[str, torch.Tensor] | None = None

    def setup(self, ctx: AdapterContext) -> None:
        super().setup(ctx)
        vit = ctx.backbone.vision_transformer("dpt")
        n_layers, width = len(vit.transformer.resblocks), vit.class_embedding.shape[-1]
        if self.cavpt_layers > n_layers:
            raise ValueError(f"dpt cavpt_layers={self.cavpt_layers} exceeds the ViT's {n_layers} blocks")
        self.n_vpt_layers = n_layers - self.cavpt_layers
        self.k = min(self.class_prompts, ctx.n_classes) if self.cavpt_layers else 0
        gen = torch.Generator().manual_seed(ctx.seed + 3)
        if self.vpt_tokens:
            self.vpt = nn.Parameter(
                (torch.randn(self.n_vpt_layers, self.vpt_tokens, width, generator=gen) * 0.02).to(ctx.device))
        if self.k:
            d = self.text_head.shape[1]
            self.cavpt = nn.ModuleList([_ClassAwarePrompts(d, width, ctx.n_classes, gen)
                                        for _ in range(self.cavpt_layers)]).to(ctx.device)

    def new_class_state(self) -> dict[str, torch.Tensor]:
        # The auxiliary CAVPT classifiers score the training classes only; they play no part in prediction.
        return {k: v for k, v in self.state_dict().items() if ".classifier." not in k}

    # ------------------------------------------------------------------ training hooks
    def param_groups(self) -> list[dict[str, Any]]:
        visual = [p for n, p in self.named_parameters() if p.requires_grad and n != "context"]
        groups = [{"params": [self.context], "lr": self.text_lr, "warmup_epochs": self.text_warmup_epochs}]
        return groups + ([{"params": visual}] if visual else [])

    def start_epoch(self, epoch: int) -> None:
        self._epoch = epoch

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, 3, S, S]`` pixels -> ``[B, C]``; in training mode also keeps what ``loss`` needs."""
        bb, scale = self.ctx.backbone, self.ctx.logit_scale
        zs_image = bb.encode_images(x)  # frozen features: pick the classes for CAVPT, and the guidance loss
        text = self.class_text_features()  # [C, D] learned
        batch = zs_image.shape[0]
        chosen = (zs_image @ self.text_head.t()).topk(self.k, dim=-1).indices if self.k else None  # [B, K]
        aux_logits: list[torch.Tensor] = []
        empty = zs_image.new_zeros(batch, 0, 1)

        def prompt(i: int, tokens: torch.Tensor) -> torch.Tensor:
            # Every block gets its own prompts; the previous block's are dropped (an empty tensor drops them).
            if i < self.n_vpt_layers:
                return self.vpt[i].expand(batch, -1, -1) if self.vpt is not None else empty.expand(
                    -1, -1, tokens.shape[-1])
            if chosen is None:
                return empty.expand(-1, -1, tokens.shape[-1])
            prompts, logits = self.cavpt[i - self.n_vpt_layers](text[chosen], tokens)
            aux_logits.append(logits)
            return prompts

        image = bb.encode_images_prompted(x, prompt, method="dpt")
        logits = scale * image @ text.t()
        if self.training:
            self._aux = {"zs_image_logits": scale * zs_image @ text.t(),
                         "zs_text_logits": scale * image @ self.text_head.t(), "chosen": chosen,
                         "layers": torch.stack(aux_logits, dim=1) if aux_logits else None}  # [B, L, K, C]
        return logits

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The reference's objective (module docstring). ``logits [B, C]``, ``labels [B]``."""
        aux, self._aux = self._aux, None
        if self._epoch <= self.pretrain_epochs:
            loss = (F.cross_entropy(aux["zs_image_logits"].float(), labels)
                    + F.cross_entropy(aux["zs_text_logits"].float(), labels) + 0.1 * F.cross_entropy(logits, labels))
        else:
            loss = F.cross_entropy(logits, labels)
        if aux["layers"] is not None:
            # Only the class prompts that stand for the true class are trained to recognise it.
            hit = aux["chosen"] == labels[:, None]  # [B, K]
            if bool(hit.any()):
                layer_logits = aux["layers"].permute(0, 2, 1, 3)[hit]  # [hits, L, C]
                target = labels[:, None].expand_as(hit)[hit]
                n_layers = layer_logits.shape[1]
                loss = loss + self.alpha * F.cross_entropy(
                    layer_logits.reshape(-1, layer_logits.shape[-1]).float(), target.repeat_interleave(n_layers))
        return loss
