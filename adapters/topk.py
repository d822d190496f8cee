"""Cache lookups through each query's k nearest keys (faiss), for caches too large to score densely.

The cache adapters (Tip-Adapter, Tip-Adapter-F at predict time, APE, k-NN) score a query against every cache key:
``[B, N]`` affinities, then a per-class sum. For a large cache (hundreds of shots per class, a training set, a
support set grown from a pool) that is ``B x N`` work per query batch and a ``[Q, N]`` matrix per val search. The
top-k path keeps only each query's k best keys, found by a faiss index (``caches.search``), and sums their
affinities per class (a scatter over ``[B, k]``). With k = N it is the dense formula, up to float rounding (the
summation order differs); with k < N it drops the far keys, whose terms ``exp(-beta (1 - s))`` are the smallest.

Scores are recomputed from the exact keys for the k rows the index returns (``rescore``), so an approximate index
(HNSW, IVF, PQ) only decides *which* keys count, never their affinity.

``choose_lookup`` is the rule ``lookup: auto`` follows: dense up to ``dense_max_keys`` keys (16,384 by default: a
16-shot ImageNet cache, 16,000 keys, stays dense and exact), top-k above.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

from caches.search import DEFAULT_INDEX, KeyIndex, build_index

log = logging.getLogger(__name__)

LOOKUP_MODES = ("auto", "dense", "topk")
DENSE_MAX_KEYS = 16384
RESCORE_FLOATS = 1 << 22  # floats gathered per rescoring block ([block, k, D]): 16 MiB


def choose_lookup(mode: str, n_keys: int, dense_max_keys: int = DENSE_MAX_KEYS) -> tuple[str, str]:
    """``("dense" | "topk", why)`` for a cache of ``n_keys`` keys under ``lookup=mode``."""
    if mode not in LOOKUP_MODES:
        raise ValueError(f"lookup must be one of {LOOKUP_MODES}, got {mode!r}")
    if mode != "auto":
        return mode, f"lookup={mode}"
    if n_keys > dense_max_keys:
        return "topk", f"{n_keys} keys > dense_max_keys={dense_max_keys}"
    return "dense", f"{n_keys} keys <= dense_max_keys={dense_max_keys}"


def k_values(topk: int | Sequence[int], n_keys: int) -> list[int]:
    """The k to use (one value) or search (several), each capped at ``n_keys``, ascending, without repeats."""
    ks = [int(topk)] if isinstance(topk, (int, float)) else [int(k) for k in topk]
    if not ks or min(ks) < 1:
        raise ValueError(f"topk must be a positive k or a list of them, got {topk!r}")
    return sorted({min(k, max(1, n_keys)) for k in ks})


def rescore(queries: torch.Tensor, keys: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact inner products of each query with its k keys, best first: ``[B, D], [N, D], [B, k] rows ->
    ([B, k] scores, [B, k] rows)`` (rows reordered when the index ranked them otherwise)."""
    out = torch.empty(rows.shape, dtype=torch.float32, device=keys.device)
    block = max(1, RESCORE_FLOATS // max(1, rows.shape[1] * keys.shape[1]))
    for i in range(0, queries.shape[0], block):
        r = rows[i : i + block]
        out[i : i + block] = torch.bmm(keys[r].float(), queries[i : i + block, :, None].float())[..., 0]
    out, order = out.sort(dim=1, descending=True, stable=True)
    return out, rows.gather(1, order)


EXP_FLOOR = -87.0
"""Floor of the cache kernel's exponent: exp(-87) = 1.6e-38 is still a normal float32. Below it exp returns
denormals (then 0), which a CPU computes several times slower: at beta = 1000, the top of the log-spaced grid, most
affinities land there, and the (beta, alpha) searches at ImageNet scale took twice as long. A term that small
changes no float32 logit: alpha (<= 1000) x 16,000 keys x 1.6e-38 is about 1e-31, far below the rounding of the
zero-shot logits it is added to."""


def affinity_kernel(shifted: torch.Tensor, beta: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """Tip-Adapter's kernel ``exp(beta (a - 1))`` of shifted affinities ``a - 1 <= 0`` (any shape), the exponent
    floored at ``EXP_FLOOR``. ``out``: write there, in place (the searches); without it, differentiable (Tip-F).
    ``beta (a - 1)`` equals the papers' ``-beta (1 - a)`` bit for bit (IEEE negation is exact)."""
    if out is None:
        return torch.mul(shifted, beta).clamp(min=EXP_FLOOR).exp()
    return torch.mul(shifted, beta, out=out).clamp_(min=EXP_FLOOR).exp_()


def sparse_class_sum(weights: torch.Tensor, row_labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Sum each query's k weights by the class of their keys: ``[B, k], [B, k] -> [B, C]``."""
    out = weights.new_zeros(weights.shape[0], n_classes)
    return out.scatter_add_(1, row_labels, weights)


def affinity_class_sum(scores: torch.Tensor, row_labels: torch.Tensor, n_classes: int, beta: float,
                       row_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Tip-Adapter's cache term over each query's k keys: ``sum_j w_j exp(-beta (1 - s_j)) [y_j = c]``,
    ``[B, k] scores, [B, k] labels (, [B, k] weights) -> [B, C]``."""
    affinity = affinity_kernel(scores - 1.0, beta)
    if row_weights is not None:
        affinity = affinity * row_weights
    return sparse_class_sum(affinity, row_labels, n_classes)


class KeyLookup:
    """The k nearest cache keys of a batch of queries, through a faiss index over the keys.

    The index is the support store's own (``SupportSet.index``) while the keys are the store's; for keys that
    differ from the store's (trained keys, channel-refined keys) it is rebuilt in memory with the same factory string
    (and search settings), and rebuilt again whenever the keys tensor changes (training steps, a loaded state dict).

    Args:
        store_index: the support store's searchable index, or None (then a ``Flat`` index is built).
        same_keys: the keys searched are exactly the store's keys, so ``store_index`` can be used as it is.
    """

    def __init__(self, store_index: KeyIndex | None = None, same_keys: bool = True) -> None:
        self.store_index = store_index
        self.factory = store_index.factory if store_index is not None else DEFAULT_INDEX
        self.params = store_index.params if store_index is not None else ""
        self._own: tuple[tuple[int, int, int], KeyIndex] | None = None
        self._same_keys = same_keys and store_index is not None
        self._last: KeyIndex | None = None

    def index_for(self, keys: torch.Tensor) -> KeyIndex:
        """The index to search ``keys [N, D]`` with."""
        if self._same_keys and self.store_index is not None and self.store_index.ntotal == keys.shape[0]:
            self._last = self.store_index
            return self.store_index
        stamp = (keys.data_ptr(), keys._version, keys.shape[0])
        if self._own is None or self._own[0] != stamp:
            log.info("building a %s index over %d cache keys", self.factory, keys.shape[0])
            cpu = keys.detach().float().cpu().contiguous().numpy()
            self._own = (stamp, KeyIndex(build_index(cpu, self.factory), self.factory, params=self.params))
        self._last = self._own[1]
        return self._own[1]

    def neighbours(self, queries: torch.Tensor, keys: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``k`` best keys of each query, best first: ``[B, D] -> ([B, k] exact scores, [B, k] rows)``,
        on the queries' device."""
        with torch.no_grad():
            _, rows = self.index_for(keys).search(queries, k)
            scores, rows = rescore(queries.to(keys.device), keys.detach(), rows.to(keys.device))
            return scores.to(queries.device), rows.to(queries.device)

    def describe(self, k: int | None = None) -> dict[str, Any]:
        """The index used last (or the store's), for ``result.json``."""
        index = self._last or self.store_index
        if index is None:
            return {"index": self.factory, "search_params": self.params}
        return index.describe(k)
