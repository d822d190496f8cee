"""k-nearest-neighbour vote over the cache: each query takes its k nearest support keys (cosine similarity) and
every neighbour votes for its label with a weight that falls with its distance.

    votes_c = sum over the k nearest keys j with label c of w(s_j),   logits = log(votes / sum(votes))

so that the softmax of the logits is the weighted vote share (a class without votes gets ``log(1e-12)``).
Weightings (``weighting``):

* ``uniform``: w = 1 (plain majority vote);
* ``inverse``: w = 1 / (1 - s + 1e-6), the inverse cosine distance;
* ``exp:T``: w = exp(s / T), a softmax over the neighbours' similarities at temperature T (the weighted k-NN
  classifier of Wu et al., CVPR 2018, "Unsupervised Feature Learning via Non-Parametric Instance Discrimination",
  used by DINO's k-NN evaluation with T = 0.07); computed as exp((s - s_max) / T), which has the same vote shares.

k and the weighting are searched on val (k ascending, then the weightings in the order given; the first best wins),
from the neighbours of each val image found once at the largest k. The text head is not used: this is the
image-only baseline every cache method should beat. Neighbours come from a dense scan (``q K^T`` and a top-k) up to
``dense_max_keys`` keys, and from the support store's faiss index (``cache.index``) above, rescored exactly
(``adapters/topk.py``). Ties between classes go to the lowest class index.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

from adapters.base import Adapter, AdapterContext, FeatureSplit, accuracy
from adapters.topk import DENSE_MAX_KEYS, KeyLookup, choose_lookup, k_values, sparse_class_sum

log = logging.getLogger(__name__)

DENSE_BLOCK = 1024  # queries per block of the dense scan


def vote_weights(scores: torch.Tensor, weighting: str) -> torch.Tensor:
    """Each neighbour's vote: ``[B, k]`` similarities (best first) -> ``[B, k]`` weights."""
    if weighting == "uniform":
        return torch.ones_like(scores)
    if weighting == "inverse":
        return 1.0 / (1.0 - scores + 1e-6)
    if weighting.startswith("exp:"):
        t = float(weighting[4:])
        return torch.exp((scores - scores[:, :1]) / t)  # the best neighbour weighs 1: no overflow at small T
    raise ValueError(f"weighting must be uniform, inverse or exp:T, got {weighting!r}")


def check_weighting(weighting: str) -> str:
    vote_weights(torch.zeros(1, 1), weighting)
    if weighting.startswith("exp:") and not float(weighting[4:]) > 0:
        raise ValueError(f"the temperature of {weighting} must be > 0")
    return weighting


class KNN(Adapter):
    """k-NN vote over the cache keys.

    Args:
        k, weighting: used as they are when ``search`` is false; otherwise the starting point.
        search: choose k from ``k_values`` and the weighting from ``weightings`` on val.
        lookup, dense_max_keys: ``dense`` (exact scan), ``topk`` (the store's faiss index) or ``auto`` (faiss above
            ``dense_max_keys`` keys).
    """

    def __init__(self, k: int = 10, weighting: str = "exp:0.07", search: bool = True,
                 k_values: Sequence[int] = (1, 3, 5, 10, 20, 50, 100),
                 weightings: Sequence[str] = ("uniform", "inverse", "exp:0.01", "exp:0.03", "exp:0.07", "exp:0.1"),
                 lookup: str = "auto", dense_max_keys: int = DENSE_MAX_KEYS) -> None:
        super().__init__()
        choose_lookup(lookup, 0)
        self.k, self.weighting, self.search = int(k), check_weighting(str(weighting)), bool(search)
        self.k_values = [int(v) for v in k_values]
        self.weightings = [check_weighting(str(w)) for w in weightings]
        self.lookup, self.dense_max_keys = str(lookup), int(dense_max_keys)
        self.lookup_mode, self.lookup_reason = "dense", ""
        self.key_lookup: KeyLookup | None = None
        self.register_buffer("keys", torch.empty(0), persistent=False)
        self.register_buffer("values", torch.empty(0, dtype=torch.int64), persistent=False)

    def setup(self, ctx: AdapterContext) -> None:
        super().setup(ctx)
        if len(ctx.support) == 0:
            raise ValueError("knn needs a support set (it votes with the cache's labels)")
        self.keys = ctx.support.keys.float().to(ctx.device)
        self.values = ctx.support.labels.to(ctx.device)
        self.lookup_mode, self.lookup_reason = choose_lookup(self.lookup, len(self.values), self.dense_max_keys)
        if self.lookup_mode == "topk":
            self.key_lookup = KeyLookup(ctx.support.index, same_keys=True)
        self.k = min(self.k, len(self.values))

    def lookup_record(self) -> dict[str, Any] | None:
        record: dict[str, Any] = {"mode": self.lookup_mode, "reason": self.lookup_reason, "n_keys": len(self.values),
                                  "k": self.k}
        if self.key_lookup is not None:
            record.update(self.key_lookup.describe(self.k))
        return record

    def neighbours(self, x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The k nearest keys, best first: ``[B, D] -> ([B, k] similarities, [B, k] rows)``."""
        x = x.float()
        k = min(k, len(self.values))
        if self.key_lookup is not None:
            return self.key_lookup.neighbours(x, self.keys, k)
        parts = [torch.topk(x[i : i + DENSE_BLOCK] @ self.keys.t(), k, dim=1) for i in range(0, len(x), DENSE_BLOCK)]
        if not parts:
            return x.new_zeros(0, k), torch.zeros(0, k, dtype=torch.int64, device=x.device)
        return torch.cat([p.values for p in parts]), torch.cat([p.indices for p in parts])

    def vote_logits(self, scores: torch.Tensor, rows: torch.Tensor, k: int, weighting: str) -> torch.Tensor:
        """``log`` of the weighted vote shares from the first k neighbours: ``[B, k_max] -> [B, C]``."""
        votes = sparse_class_sum(vote_weights(scores[:, :k], weighting), self.values[rows[:, :k]],
                                 self.text_head.shape[0])
        return (votes / votes.sum(dim=1, keepdim=True)).clamp_min(1e-12).log()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, D] -> [B, C]``."""
        scores, rows = self.neighbours(x, self.k)
        return self.vote_logits(scores, rows, self.k, self.weighting)

    def hparam_grid(self) -> dict[str, list[Any]]:
        if not self.search:
            return {}
        return {"k": k_values(self.k_values, len(self.values) or max(self.k_values)), "weighting": self.weightings}

    def hparams(self) -> dict[str, Any]:
        return {"k": self.k, "weighting": self.weighting}

    @torch.no_grad()
    def tune(self, val: FeatureSplit) -> dict[str, Any]:
        """k and the weighting on val; each val image's neighbours are found once, at the largest k."""
        grid = self.hparam_grid()
        if not grid:
            return {"method": "fixed", "on": "none"}
        feats = val.features.to(self.text_head.device)
        scores, rows = self.neighbours(feats, grid["k"][-1])
        best_acc, best = -1.0, (self.k, self.weighting)
        for k in grid["k"]:
            for w in grid["weighting"]:
                acc = accuracy(self.vote_logits(scores, rows, k, w), val.labels)
                if acc > best_acc:
                    best_acc, best = acc, (k, w)
        self.k, self.weighting = best
        log.info("k-NN search on val: k=%d weighting=%s -> %.2f%%", self.k, self.weighting, best_acc)
        return {"method": "grid over neighbours found once (largest k)", "on": "val",
                "grid_size": len(grid["k"]) * len(grid["weighting"]), "val_acc": best_acc}
