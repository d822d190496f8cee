"""open_clip transformer blocks run piecewise, for the prompt learners: deep prompts set before each block (VPT,
MaPLe, DPT) and a shared prompt prefix computed once for every class (CoOp-style text prompts under causal
attention). Both reuse open_clip's own block modules; nothing of its model code is forked.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

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


def shared_prefix_block(block: Any, hp: torch.Tensor, hs: torch.Tensor, allowed: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """One open_clip ``ResidualAttentionBlock`` on a shared prefix and per-class suffixes (causal attention).

    ``hp [B, P, W]`` prefix states attend among themselves; ``hs [B or 1, C, S, W]`` suffix states attend to their
    image's prefix and to themselves (``allowed [S, P + S]``). The same operations as the block's ``forward``
    (pre-norm, fused in-projection, scaled dot-product attention, out-projection, layer scales, MLP), split so the
    prefix's keys and values are computed once and shared by the C suffixes.
    """
    attn = block.attn
    heads = attn.num_heads
    b, p, w = hp.shape
    n_cls, s = hs.shape[1], hs.shape[2]

    def split(t: torch.Tensor) -> torch.Tensor:  # [..., L, W] -> [..., heads, L, W / heads]
        return t.unflatten(-1, (heads, w // heads)).transpose(-3, -2)

    qp, kp, vp = (split(t) for t in F.linear(block.ln_1(hp), attn.in_proj_weight, attn.in_proj_bias).chunk(3, -1))
    qs, ks, vs = (split(t) for t in F.linear(block.ln_1(hs), attn.in_proj_weight, attn.in_proj_bias).chunk(3, -1))
    op = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True)  # [B, h, P, hd]
    bs = hs.shape[0]

    def with_prefix(t_prefix: torch.Tensor, t_suffix: torch.Tensor) -> torch.Tensor:  # -> [B * C, h, P + S, hd]
        t_prefix = t_prefix[:, None].expand(b, n_cls, -1, -1, -1)
        return torch.cat([t_prefix, t_suffix.expand(b, -1, -1, -1, -1)], dim=-2).flatten(0, 1)

    q = qs.expand(b, -1, -1, -1, -1).flatten(0, 1) if bs != b else qs.flatten(0, 1)
    os_ = F.scaled_dot_product_attention(q, with_prefix(kp, ks), with_prefix(vp, vs), attn_mask=allowed)
    op = op.transpose(-3, -2).flatten(-2)  # [B, P, W]
    os_ = os_.transpose(-3, -2).flatten(-2).view(b, n_cls, s, w)
    hp = hp + block.ls_1(attn.out_proj(op))
    hs = hs + block.ls_1(attn.out_proj(os_))
    hp = hp + block.ls_2(block.mlp(block.ln_2(hp)))
    hs = hs + block.ls_2(block.mlp(block.ln_2(hs)))
    return hp, hs
