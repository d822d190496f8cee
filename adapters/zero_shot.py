"""Zero-shot CLIP: cosine similarity with the template-ensemble text head, times logit scale 100."""

from __future__ import annotations

import torch

from adapters.base import Adapter


class ZeroShot(Adapter):
    """``logits = 100 * f @ W_text^T`` (Radford et al., 2021). No support data, nothing to tune."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, D] -> [B, C]``."""
        return self.zero_shot_logits(x)

    def new_class_state(self) -> dict[str, torch.Tensor]:
        return {}  # nothing learned: zero-shot CLIP scores any class
