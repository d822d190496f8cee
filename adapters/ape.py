"""APE and APE-T: adaptive prior refinement (Zhu et al., "Not All Features Matter: Enhancing Few-shot CLIP with
Adaptive Prior Refinement", ICCV 2023; yangyangyang127/APE ``main.py``, ``utils.py``, ``configs/*.yaml``).

**Channel refinement.** Of the D feature channels, APE keeps the k that best separate the classes. Each class i
contributes S_i = K_i + 1 samples: its text embedding t_i and its K_i cache keys. For channel d,

    sim_d = mean over ordered pairs of samples (a, b) from *different* classes of  a_d * b_d
    var_d = variance over the C classes of t_{c, d}            (unbiased, like ``torch.var``)
    J_d   = -w_sim * sim_d + w_var * var_d

and the k channels with the largest J are kept. ``sim`` is computed from per-class sums in O(N D):
sum_{i != j} A_i A_j = (sum_i A_i)^2 - sum_i A_i^2 with A_i the per-class sum of channel d, divided by the number of
such pairs, (sum_i S_i)^2 - sum_i S_i^2. The reference keeps 700-900 of RN50's 1024 channels depending on the
dataset; ``channel_ratio`` = 800 / 1024 (its most common choice) scales that to any D, as later ports of the
reference do.

**Training-free APE, trilateral affinities.** With ' marking refined (channel-selected, renormalised) features:

    R_fW  = 100 f t^T                                   (image-text, on all channels)
    R_fF' = exp(-beta (1 - f' K'^T))                    (image-cache)
    R_F'W' = exp(gamma * KL(L || softmax(K' t'^T)))     (cache-text: a weight per cache entry)
    logits = R_fW + alpha * R_fF' (R_F'W' * L)

L is the one-hot label matrix, so the KL divergence of key n reduces to ``log2((1 + eps) / (p_n + eps))`` with p_n
the text softmax (of the unscaled refined cosines, as the reference) at the key's own class and eps = 1e-6. Keys
the text head gets wrong weigh more. (beta, alpha, gamma) are searched on val only. The reference's grid is
beta in [0.1, 7) x 200, alpha in [0.1, 7) x 20, gamma in [0, 1) x 20 (``search_scale: [7, 7, 1]`` for most
datasets; it is tuned per dataset there), which ``protocol=reference`` uses; fewclip's own protocol searches beta and
alpha log-spaced over [0.1, 1000] instead, for the reason given in ``adapters/tip.py`` (``grid``). ``w_sim, w_var =
0.7, 0.3`` (``w_training_free``, the most common).

**Search cost.** The reference scores every grid point with its own ``exp`` of the ``[Q, N]`` affinities and a dense
``[Q, N] x [N, C]`` product. Here the affinities are computed once; each beta costs one ``exp`` of them, each
(beta, gamma) a reweighting and a per-class sum, each (beta, gamma, alpha) a fused add and two row maxima over
``[Q, C]`` (``tip.alpha_accuracies``); the same logits as ``forward``. A cache of K keys per class is held
shot-major (``tip.class_sum``) and the search runs in blocks of ``search_rows`` val queries that stay in the CPU
cache. What remains is the grid itself: at ImageNet scale (Q = 4,000 val, N = 16,000 keys, C = 1,000) the
reference's ImageNet grid of 200 x 20 x 5 points is 200 exps of 64 M values, 1,000 reweighted class sums of them
and 20,000 argmaxes over 4 M logits.

**APE-T.** A category residual R [C, k] (zero init) is added, on the selected channels, to every class's text
embedding and to every cache key of that class; a per-key value weight (init 1) replaces R_F'W'. Affinities are then
taken on all channels, as the reference's training code does: ``logits = 100 f t~^T + alpha exp(-beta (1 - f K~^T))
(w * L)``. Trained with cross-entropy, AdamW lr 1e-3, eps 1e-3, weight decay 0.1, cosine, batch 256, 30 epochs,
beta = 1, alpha = 2 while training (the reference's most common per-dataset values; ImageNet uses lr 1e-4 and 20
epochs), channels chosen with ``w_training = (0.2, 0.8)``; the epoch is chosen on val, then (beta, alpha) are
searched on val. Under fewclip's protocol (``train_at: search``) the training values of (beta, alpha) come from a
val search of the untrained model instead (``tip.fit_from_start``): beta = 1 suits CLIP's features, not every
backbone's (the configured values where the searched point's support loss is 0). In the released code the
APE-T call is commented out and its criterion call does not match its residual's size, so this follows the paper's
description and the ``APE_Training`` module. The residual's effect on
the cache affinities is computed as ``f K^T + (f_S R^T)[:, labels]`` instead of rebuilding the ``[N, D]`` keys every
step (the same value; the fixed keys then need no gradient).

**Text head.** The reference builds its text classifier from GPT-3 (CuPL) descriptions; fewclip uses the same text
head as every other adapter (the run's templates), so the numbers here are comparable to the other methods and not
to the paper's tables. Cache keys are the support store's view-averaged keys (the reference's 10 augmented passes).

**Large caches** (``lookup``, as Tip-Adapter: ``adapters/topk.py``): training-free APE can read its cache through
each query's k nearest *refined* keys, from a faiss index of the store's type (``cache.index``) built over the
refined keys; the cache-text weights of those k keys apply as in the dense formula, and (beta, k, alpha, gamma) are
searched on val. APE-T trains a residual on every key and always reads the cache densely.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from adapters.base import Adapter, AdapterContext, FeatureSplit, SupportSet
from adapters.tip import (
    TipAdapter,
    alpha_accuracies,
    beta_alpha_grid,
    check_train_at,
    class_sum,
    fit_from_start,
    label_block,
    linear_grid,
    search_block_rows,
    shot_major_order,
    start_search_seconds,
    topk_search,
)
from adapters.topk import DENSE_MAX_KEYS, KeyLookup, affinity_class_sum, affinity_kernel, choose_lookup, k_values
from adapters.training import TrainsOnFeatures

log = logging.getLogger(__name__)

KL_EPS = 1e-6  # the reference's smoothing inside the KL divergence
REFERENCE_CHANNELS = 800 / 1024  # of RN50's 1024 channels


def channel_criterion(text: torch.Tensor, keys: torch.Tensor, labels: torch.Tensor, w_sim: float, w_var: float
                      ) -> torch.Tensor:
    """APE's per-channel score ``-w_sim * sim + w_var * var``: ``text [C, D], keys [N, D], labels [N] -> [D]``.

    ``sim_d`` is the mean product of channel d over all ordered pairs of samples from different classes, the
    samples of class i being its text embedding and its keys; ``var_d`` the variance of the text embeddings.
    """
    n_cls = text.shape[0]
    x = keys.double()
    sums = text.double() + class_sum(x.t(), labels, n_cls).t()  # [C, D]: per-class sums of the samples
    sizes = 1 + torch.bincount(labels.to(x.device), minlength=n_cls).double()  # text embedding + keys
    pairs = sizes.sum() ** 2 - (sizes ** 2).sum()
    sim = (sums.sum(dim=0) ** 2 - (sums ** 2).sum(dim=0)) / pairs
    return (-w_sim * sim + w_var * text.double().var(dim=0)).float()


def select_channels(criterion: torch.Tensor, ratio: float) -> torch.Tensor:
    """Indices of the ``round(ratio * D)`` channels with the largest criterion (at least one): ``[k]`` int64."""
    k = min(criterion.numel(), max(1, round(ratio * criterion.numel())))
    return torch.topk(criterion, k=k).indices


class APE(Adapter):
    """Training-free APE.

    Args:
        alpha, beta, gamma: cache weight, affinity sharpness, cache-text weight (overwritten by the search).
        search: search (beta, alpha, gamma) on val.
        beta_max, alpha_max, gamma_max, beta_steps, alpha_steps, gamma_steps: the grid (``search_scale``,
            ``search_step``); beta and alpha start at 0.1, gamma at 0.
        grid, beta_min, alpha_min: the spacing of the beta and alpha axes, as ``TipAdapter`` (``linear``: the
            reference's; ``log``: [min, max] log-spaced); gamma stays linear on [0, gamma_max).
        channel_ratio: fraction of the channels kept (800 / 1024 in the reference).
        criterion_weights: ``(w_sim, w_var)``.
        chunk: queries per block when computing affinities.
        lookup, topk, dense_max_keys: the cache lookup, as ``TipAdapter`` (top-k over the refined keys).
    """

    # Keys held shot-major when every class has K of them (the cache's state is rebuilt by setup, so its order is
    # free); APE-T keeps the store's order for its trained per-key weights.
    keys_reorderable = True
    search_rows = 0  # val queries per block of the search (0: sized from N, tip.search_block_rows)

    def __init__(self, alpha: float = 2.0, beta: float = 1.0, gamma: float = 0.1, search: bool = True,
                 beta_max: float = 7.0, alpha_max: float = 7.0, gamma_max: float = 1.0, beta_steps: int = 200,
                 alpha_steps: int = 20, gamma_steps: int = 20, channel_ratio: float = REFERENCE_CHANNELS,
                 criterion_weights: Sequence[float] = (0.7, 0.3), chunk: int = 2048, lookup: str = "auto",
                 topk: int | Sequence[int] = (16, 32, 64, 128, 256), dense_max_keys: int = DENSE_MAX_KEYS,
                 grid: str = "linear", beta_min: float = 0.1, alpha_min: float = 0.1) -> None:
        super().__init__()
        self.grid, self.beta_min, self.alpha_min = str(grid), float(beta_min), float(alpha_min)
        choose_lookup(lookup, 0)  # validates the mode
        self.lookup, self.topk, self.dense_max_keys = str(lookup), topk, int(dense_max_keys)
        self.lookup_mode, self.lookup_reason, self.k = "dense", "", 0
        self.key_lookup: KeyLookup | None = None
        self.alpha, self.beta, self.gamma, self.search = float(alpha), float(beta), float(gamma), bool(search)
        self.beta_max, self.alpha_max, self.gamma_max = float(beta_max), float(alpha_max), float(gamma_max)
        self.beta_steps, self.alpha_steps, self.gamma_steps = int(beta_steps), int(alpha_steps), int(gamma_steps)
        beta_alpha_grid(self.beta_max, 1, self.alpha_max, 1, self.grid, self.beta_min, self.alpha_min)  # checks
        self.channel_ratio = float(channel_ratio)
        if len(criterion_weights) != 2:
            raise ValueError(f"criterion_weights must be (w_sim, w_var), got {criterion_weights}")
        self.w_sim, self.w_var = (float(w) for w in criterion_weights)
        self.chunk = int(chunk)
        self.block = 0  # K when the cache holds K keys of every class (see tip.class_sum)
        self.shot_major = False  # keys held shot-major (set by setup)
        self.register_buffer("channels", torch.empty(0, dtype=torch.int64), persistent=False)
        self.register_buffer("values", torch.empty(0, dtype=torch.int64), persistent=False)
        self.register_buffer("keys", torch.empty(0), persistent=False)
        self.register_buffer("divergence", torch.empty(0), persistent=False)

    # ------------------------------------------------------------------ construction
    def setup(self, ctx: AdapterContext) -> None:
        super().setup(ctx)
        keys = ctx.support.keys.float().to(ctx.device)
        self.values = ctx.support.labels.to(ctx.device)
        self.block = label_block(self.values, ctx.n_classes)
        self.channels = select_channels(channel_criterion(self.text_head, keys, self.values, self.w_sim, self.w_var),
                                        self.channel_ratio)
        self.shot_major = bool(self.block) and self.keys_reorderable
        if self.shot_major:  # the faster class sum (tip.class_sum); the channels were chosen in the store's order
            order = shot_major_order(ctx.n_classes, self.block, keys.device)
            keys, self.values = keys[order], self.values[order]
        log.info("%s: %d of %d channels kept", type(self).__name__, len(self.channels), keys.shape[1])
        self.build_cache(keys)
        self.lookup_mode, self.lookup_reason = choose_lookup(self.lookup, len(self.values), self.dense_max_keys)
        if self.lookup_mode == "topk":
            self.k = k_values(self.topk, len(self.values))[-1]
            # The refined keys are not the store's: an index of the store's type is built over them.
            self.key_lookup = KeyLookup(ctx.support.index, same_keys=False)

    def lookup_record(self) -> dict[str, Any] | None:
        record: dict[str, Any] = {"mode": self.lookup_mode, "reason": self.lookup_reason, "n_keys": len(self.values)}
        if self.lookup_mode == "topk" and self.key_lookup is not None:
            record.update(k=self.k, searched="refined keys", **self.key_lookup.describe(self.k))
        return record

    def build_cache(self, keys: torch.Tensor) -> None:
        """Refined keys ``[N, k]`` and each key's KL divergence from the text head ``[N]``."""
        self.keys = self.refine(keys)
        text = self.refine(self.text_head)
        probs = (self.keys @ text.t()).softmax(dim=-1)  # unscaled cosines, as the reference
        own = probs.gather(1, self.values[:, None]).squeeze(1)
        # KL(one-hot || p) in bits; the zero entries of the one-hot contribute nothing.
        self.divergence = torch.log2((1.0 + KL_EPS) / (own + KL_EPS))

    def refine(self, x: torch.Tensor) -> torch.Tensor:
        """Keep the selected channels and renormalise: ``[B, D] -> [B, k]``."""
        return F.normalize(x.float()[:, self.channels], dim=-1)

    # ------------------------------------------------------------------ the three affinities
    def text_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Image-text term ``[B, D] -> [B, C]`` (all channels)."""
        return self.zero_shot_logits(x)

    def shifted_affinity(self, x: torch.Tensor) -> torch.Tensor:
        """Image-cache cosines minus one, ``f' K'^T - 1``: ``[B, D] -> [B, N]``."""
        return self.refine(x) @ self.keys.t() - 1.0

    def value_weights(self, gamma: float) -> torch.Tensor:
        """Cache-text weight of each key, ``exp(gamma * KL)``: ``[N]``."""
        return torch.exp(gamma * self.divergence)

    def cache_logits(self, shifted: torch.Tensor, beta: float, weights: torch.Tensor) -> torch.Tensor:
        """``exp(beta (A - 1)) (w * L)``, the one-hot L as a per-class sum: ``[B, N] -> [B, C]``."""
        return self.weighted_class_sum(affinity_kernel(shifted, beta), weights)

    def weighted_class_sum(self, affinity: torch.Tensor, weights: torch.Tensor, out: torch.Tensor | None = None
                           ) -> torch.Tensor:
        """``(A * w) L``: ``[B, N] affinities, [N] weights -> [B, C]`` (``out``: a ``[B, N]`` buffer to reuse)."""
        weighted = affinity * weights if out is None else torch.mul(affinity, weights, out=out)
        return class_sum(weighted, self.values, self.text_head.shape[0], self.block, self.shot_major)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, D] -> [B, C]``."""
        weights = self.value_weights(self.gamma)
        if self.lookup_mode == "topk":
            scores, rows = self.key_lookup.neighbours(self.refine(x), self.keys, self.k)
            cache = affinity_class_sum(scores, self.values[rows], self.text_head.shape[0], self.beta, weights[rows])
            return torch.add(self.text_logits(x), cache, alpha=self.alpha)
        cache = torch.cat([self.cache_logits(self.shifted_affinity(x[i : i + self.chunk]), self.beta, weights)
                           for i in range(0, x.shape[0], self.chunk)])
        # The same fused kernel the search scores with (see tip.alpha_accuracies).
        return torch.add(self.text_logits(x), cache, alpha=self.alpha)

    # ------------------------------------------------------------------ search
    def hparam_grid(self) -> dict[str, list[float]]:
        if not self.search:
            return {}
        return {**self.beta_alpha(), "gamma": linear_grid(0.0, self.gamma_max, self.gamma_steps)}

    def beta_alpha(self) -> dict[str, list[float]]:
        """The beta and alpha axes of the search grid (``tip.beta_alpha_grid``)."""
        return beta_alpha_grid(self.beta_max, self.beta_steps, self.alpha_max, self.alpha_steps, self.grid,
                               self.beta_min, self.alpha_min)

    def hparams(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "beta": self.beta, "gamma": self.gamma,
                **({"k": self.k} if self.lookup_mode == "topk" else {})}

    @torch.no_grad()
    def tune(self, val: FeatureSplit) -> dict[str, Any]:
        """Exact search of the grid on val, in the reference's loop order (beta, then alpha, then gamma).

        The affinities do not depend on the hyperparameters and are computed once; each beta costs one exp (not one
        per gamma), each gamma a reweighting and a per-class sum, and all alphas are scored at once. Picks the first
        best point in that order, like ``tuning.grid_search``.
        """
        grid = self.hparam_grid()
        if not grid:
            return {"method": "fixed", "on": "none"}
        if self.lookup_mode == "topk":
            return self.tune_topk(val, grid)
        (self.beta, self.alpha, self.gamma), best_acc, _ = self._search(val, grid)
        log.info("%s search on val: %s -> %.2f%%", type(self).__name__, self.hparams(), best_acc)
        size = len(grid["beta"]) * len(grid["alpha"]) * len(grid.get("gamma", [self.gamma]))
        return {"method": "grid (affinities once, all alphas per beta and gamma)", "on": "val", "grid_size": size,
                "val_acc": best_acc}

    # The same cost model as Tip-Adapter's: the search's set-up plus beta_steps times one probed beta.
    estimate_tune_seconds = TipAdapter.estimate_tune_seconds

    def _search(self, val: FeatureSplit, grid: dict[str, list[float]], n_betas: int | None = None
                ) -> tuple[tuple[float, float, float], float, dict[str, float]]:
        """The first best ``(beta, alpha, gamma)`` over the grid (or its first ``n_betas`` betas), its accuracy and
        timings."""
        start = time.perf_counter()
        was_training = self.training
        self.eval()
        feats = val.features.to(self.text_head.device).float()
        labels = val.labels.to(feats.device)
        text = self.text_logits(feats)
        shifted = torch.cat([self.shifted_affinity(feats[i : i + self.chunk])
                             for i in range(0, feats.shape[0], self.chunk)])
        gammas = grid.get("gamma", [self.gamma])
        weights = [self.value_weights(g) for g in gammas]
        alphas = torch.tensor(grid["alpha"], dtype=torch.float32)
        # Query blocks whose [rows, N] affinities stay in the CPU cache while the exp and every gamma's reweighting
        # and class sum read them; reused buffers (allocating per beta costs more than the arithmetic).
        rows = search_block_rows(self.search_rows, shifted.shape[0], shifted.shape[1])
        affinity, weighted = shifted.new_empty(rows, shifted.shape[1]), shifted.new_empty(rows, shifted.shape[1])
        caches = [text.new_empty(text.shape) for _ in gammas]  # [Q, C] per gamma
        prepared = time.perf_counter()
        best_acc, best = -1.0, (self.beta, self.alpha, self.gamma)
        betas = grid["beta"][:n_betas] if n_betas else grid["beta"]
        for beta in betas:
            # The exp depends on beta only: once per beta, then one reweighting per gamma (the same elementwise
            # operations and per-row sums as cache_logits, so the logits are bit for bit the ones forward produces).
            for i in range(0, shifted.shape[0], rows):
                n = min(rows, shifted.shape[0] - i)
                a = affinity_kernel(shifted[i : i + n], beta, affinity[:n])
                for w, cache in zip(weights, caches):
                    cache[i : i + n] = self.weighted_class_sum(a, w, weighted[:n])
            # [alpha, gamma] accuracies, flattened alpha-major: the reference's innermost loop is gamma.
            accs = torch.stack([alpha_accuracies(text, cache, labels, alphas) for cache in caches],
                               dim=1).reshape(-1)
            j = int(accs.argmax())  # the first maximum
            if float(accs[j]) > best_acc:
                best_acc = float(accs[j])
                best = (beta, grid["alpha"][j // len(gammas)], gammas[j % len(gammas)])
        self.train(was_training)
        timing = {"prepare_s": prepared - start, "per_beta_s": (time.perf_counter() - prepared) / max(1, len(betas))}
        return best, best_acc, timing

    @torch.no_grad()
    def tune_topk(self, val: FeatureSplit, grid: dict[str, list[float]]) -> dict[str, Any]:
        """(beta, k, alpha, gamma) on val with the top-k cache: each query's k_max nearest refined keys, once."""
        feats = val.features.to(self.text_head.device).float()
        ks = k_values(self.topk, len(self.values))
        scores, rows = self.key_lookup.neighbours(self.refine(feats), self.keys, ks[-1])
        gammas = grid.get("gamma", [self.gamma])
        (self.beta, self.k, self.alpha, g), best_acc = topk_search(
            self.text_logits(feats), scores, self.values[rows], val.labels.to(feats.device), grid["beta"],
            grid["alpha"], ks, [self.value_weights(gamma)[rows] for gamma in gammas])
        self.gamma = gammas[g]
        log.info("%s top-k search on val: %s -> %.2f%%", type(self).__name__, self.hparams(), best_acc)
        return {"method": "grid over top-k neighbours (found once, k_max)", "on": "val", "k_values": ks,
                "grid_size": len(grid["beta"]) * len(grid["alpha"]) * len(gammas) * len(ks), "val_acc": best_acc}


class APET(TrainsOnFeatures, APE):
    """APE-T: a trained category residual on the selected channels and trained per-key value weights.

    Args:
        alpha, beta: used while training, then searched on val (``search``) over beta in [0.1, beta_max) and
            alpha in [0.1, alpha_max).
        channel_ratio, criterion_weights: as APE (the reference's ``training_feat_num`` and ``w_training``).
        train_at: ``fixed`` trains at ``alpha``/``beta``; ``search`` first searches them on val with the untrained
            residual and value weights (``tip.fit_from_start``).
        **train_kwargs: ``TrainSpec`` fields (epochs, lr, ...).
    """

    cost = "trained on cached features"
    keys_reorderable = False  # value_scale is one trained weight per key, in the store's order

    def __init__(self, alpha: float = 2.0, beta: float = 1.0, search: bool = True, beta_max: float = 7.0,
                 alpha_max: float = 7.0, beta_steps: int = 200, alpha_steps: int = 20,
                 channel_ratio: float = REFERENCE_CHANNELS, criterion_weights: Sequence[float] = (0.2, 0.8),
                 chunk: int = 2048, grid: str = "linear", beta_min: float = 0.1, alpha_min: float = 0.1,
                 train_at: str = "fixed", **train_kwargs: Any) -> None:
        APE.__init__(self, alpha=alpha, beta=beta, gamma=0.0, search=search, beta_max=beta_max, alpha_max=alpha_max,
                     beta_steps=beta_steps, alpha_steps=alpha_steps, channel_ratio=channel_ratio,
                     criterion_weights=criterion_weights, chunk=chunk, lookup="dense",  # trains every key
                     grid=grid, beta_min=beta_min, alpha_min=alpha_min)
        self.init_training(train_kwargs)
        self.train_at = check_train_at(train_at)
        self.residual: nn.Parameter | None = None
        self.value_scale: nn.Parameter | None = None

    def fit(self, train_set: SupportSet, val: FeatureSplit) -> dict[str, Any]:
        return fit_from_start(self, train_set, val, lambda: super(APET, self).fit(train_set, val))

    def estimate_fit_seconds(self, train_set: SupportSet, val: FeatureSplit, limit_s: float = math.inf) -> float:
        return super().estimate_fit_seconds(train_set, val, limit_s) + start_search_seconds(self, val)

    def build_cache(self, keys: torch.Tensor) -> None:
        self.keys = keys  # all channels: APE-T's affinities are not refined
        self.residual = nn.Parameter(keys.new_zeros(self.text_head.shape[0], len(self.channels)))
        self.value_scale = nn.Parameter(keys.new_ones(keys.shape[0]))

    def text_weights(self) -> torch.Tensor:
        """``[C, D]``: the text head plus the residual on the selected channels (not renormalised, as the reference)."""
        return self.text_head.index_add(1, self.channels, self.residual)

    def cache_keys(self) -> torch.Tensor:
        """``[N, D]``: every key plus its class's residual on the selected channels."""
        return self.keys.index_add(1, self.channels, self.residual[self.values])

    def text_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.logit_scale * x.float() @ self.text_weights().t()

    def shifted_affinity(self, x: torch.Tensor) -> torch.Tensor:
        """``f cache_keys()^T - 1`` without building the ``[N, D]`` keys: ``f K^T + (f_S R^T)[:, labels] - 1``.

        Key n is its fixed key plus its class's residual on the selected channels S, so its affinity is the fixed
        one plus ``f_S . R_{y_n}``: a ``[B, C]`` product spread to the keys. The fixed part needs no gradient, and
        the residual's gradient is a ``[C, k]`` product instead of an ``[N, D]`` one.
        """
        x = x.float()
        per_class = x[:, self.channels] @ self.residual.t() - 1.0  # [B, C], the -1 of every key included
        return torch.addmm(per_class[:, self.values], x, self.keys.t())

    def value_weights(self, gamma: float) -> torch.Tensor:
        return self.value_scale  # learned; gamma has no role in APE-T

    def hparam_grid(self) -> dict[str, list[float]]:
        return self.beta_alpha() if self.search else {}

    def hparams(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "beta": self.beta}
