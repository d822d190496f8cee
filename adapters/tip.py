"""Tip-Adapter, training-free (Zhang et al., ECCV 2022; gaopengcuhk/Tip-Adapter).

    logits = 100 f W^T + alpha * exp(-beta (1 - f K^T)) V

with K the cache keys (view-averaged support features) and V their one-hot labels. Because V is one-hot,
``A V`` is a per-class sum of the affinity columns, so it is computed with ``index_add`` over the key axis
instead of a dense ``[N, C]`` matmul; a dense training-free cache of K keys per class is held shot-major, which
makes that sum K contiguous slices (``class_sum``). alpha and beta are searched on val only.

**The search grid** (``grid``). The reference searches a linear grid, beta in [0.1, beta_max) x alpha in
[0.1, alpha_max), 200 x 20 points (``utils.py search_hp``), with the ranges set by hand per dataset
(``configs/*.yaml search_scale``: [7, 3] for ImageNet, up to [50, 50] for Flowers); ``protocol=reference`` uses
exactly that (``grid: linear``, ``conf/recipe/tip.yaml``). The useful values depend on the backbone too: beta
multiplies the distance ``1 - f K^T``, so a backbone whose image features crowd into a narrow cone needs a sharper
kernel, and alpha must then grow as ``exp(-beta (1 - f K^T))`` shrinks. fewclip-mini's first weights on digits
(mean cosine 0.875 between test images, nearest-key distance ~0.015 against 0.08 to the median key) had their val
optimum near beta 100, alpha 30, far outside ImageNet's range: on that grid the search kept zero-shot. So fewclip's
own protocol, which knows neither the dataset's nor the backbone's ranges, searches both axes log-spaced over [0.1,
1000] (``grid: log`` in ``conf/adapter/tip.yaml``, as many points as the reference, 200 x 20): it holds every
per-dataset range of the reference, and the val split chooses. ``grid=linear beta_max=7 alpha_max=3`` restores
ImageNet's grid.

**Large caches** (``lookup``, ``adapters/topk.py``): above ``dense_max_keys`` keys (``lookup: auto``), or always with
``lookup: topk``, each query's affinity is taken over its k nearest keys only, found through the support store's
faiss index (``cache.index``) and rescored exactly. k is searched on val with (beta, alpha) when ``topk`` lists several
values, or set by a single value; k = N is the dense formula. This departs from the paper, which always uses every
key: for small beta the far keys' terms are not negligible, so top-k Tip is its own (val-tuned) variant of the
method. ``lookup_record`` says which path ran.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from adapters.base import Adapter, AdapterContext, FeatureSplit
from adapters.topk import DENSE_MAX_KEYS, KeyLookup, affinity_class_sum, affinity_kernel, choose_lookup, k_values

log = logging.getLogger(__name__)


GRID_SPACINGS = ("linear", "log")


def linear_grid(lo: float, hi: float, steps: int) -> list[float]:
    """The reference search grid: ``lo + i (hi - lo) / steps`` for i in [0, steps) (hi excluded)."""
    return [lo + i * (hi - lo) / steps for i in range(steps)]


def log_grid(lo: float, hi: float, steps: int) -> list[float]:
    """``steps`` values from ``lo`` to ``hi`` (both included) evenly spaced on a log scale (``0 < lo <= hi``)."""
    if not 0 < lo <= hi:
        raise ValueError(f"a log-spaced grid needs 0 < lo <= hi, got [{lo}, {hi}]")
    if steps == 1:
        return [float(lo)]
    return [float(lo * (hi / lo) ** (i / (steps - 1))) for i in range(steps)]


def search_axis(spacing: str, lo: float, hi: float, steps: int) -> list[float]:
    """One axis of a cache method's search grid: ``linear`` (the reference's, hi excluded) or ``log`` (hi included)."""
    if spacing not in GRID_SPACINGS:
        raise ValueError(f"grid spacing must be one of {GRID_SPACINGS}, got {spacing!r}")
    return linear_grid(lo, hi, steps) if spacing == "linear" else log_grid(lo, hi, steps)


def beta_alpha_grid(beta_max: float, beta_steps: int, alpha_max: float, alpha_steps: int, spacing: str = "linear",
                    beta_min: float = 0.1, alpha_min: float = 0.1) -> dict[str, list[float]]:
    """Tip-Adapter's search grid, beta then alpha (shared by APE and Tip-F).

    ``linear`` is the reference's: beta in [0.1, beta_max), alpha in [0.1, alpha_max) (``utils.py search_hp``).
    ``log`` spans [beta_min, beta_max] and [alpha_min, alpha_max] evenly on a log scale: beta and alpha are scale
    parameters, and how large they must be depends on the backbone's feature geometry (see ``TipAdapter``).
    """
    return {"beta": search_axis(spacing, beta_min, beta_max, beta_steps),
            "alpha": search_axis(spacing, alpha_min, alpha_max, alpha_steps)}


TRAIN_STARTS = ("fixed", "search")


def check_train_at(train_at: str) -> str:
    if train_at not in TRAIN_STARTS:
        raise ValueError(f"train_at must be one of {TRAIN_STARTS}, got {train_at!r}")
    return train_at


def fit_from_start(adapter: Any, train: Any, val: Any, fit: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run ``fit()`` of a trained cache method (Tip-F, APE-T) from where its ``train_at`` says.

    ``search``: first set (beta, alpha) by the adapter's own val search of its untrained cache (``adapter.tune``), so
    that training runs at the sharpness and weight that suit the backbone's feature geometry; the record gains
    ``train_at``. The references train at values set by hand per dataset (``configs/*.yaml`` init_beta,
    init_alpha); ``fixed`` keeps the configured ``beta``/``alpha``.

    A searched point can saturate: a sharp kernel with a large alpha makes the cache recall its own support set,
    so the training loss (``support_loss``: one cached view per support image) is exactly 0 in float32 and no
    gradient reaches the parameters (1,000 synthetic classes whose views sit close to their keys: every one of
    Tip-F's 1,260 steps had loss 0). Then training runs at the configured values instead, with a warning, and the
    record says so (``train_at.fallback``).
    """
    start = None
    if adapter.train_at == "search" and val is not None and len(val) > 0:
        configured = (adapter.beta, adapter.alpha)
        selection = adapter.tune(val)
        start = {"beta": adapter.beta, "alpha": adapter.alpha, "val_acc": selection.get("val_acc"), "on": "val"}
        loss = support_loss(adapter, train)
        if loss == 0.0:
            adapter.beta, adapter.alpha = configured
            start["fallback"] = {"beta": adapter.beta, "alpha": adapter.alpha,
                                 "why": f"the support loss at the searched point is {loss}: no gradient"}
            log.warning("%s: training at the searched beta=%.4g, alpha=%.4g would see a support loss of 0 (no "
                        "gradient); training at the configured beta=%.4g, alpha=%.4g instead",
                        type(adapter).__name__, start["beta"], start["alpha"], adapter.beta, adapter.alpha)
    record = fit()
    return {**record, "train_at": start} if start else record


@torch.no_grad()
def support_loss(adapter: Any, support: Any, block: int = 4096) -> float:
    """Mean cross-entropy of ``adapter`` on one cached view per support image (the first; the keys without views),
    what its training starts from: float."""
    x = support.views[0] if support.views is not None else support.keys
    total = 0.0
    for i in range(0, x.shape[0], block):
        logits = adapter(x[i : i + block].to(adapter.text_head.device)).float()
        labels = support.labels[i : i + block].to(logits.device)
        total += float(F.cross_entropy(logits, labels, reduction="sum"))
    return total / max(x.shape[0], 1)


def start_search_seconds(adapter: Any, val: Any) -> float:
    """The predicted cost of ``train_at: search`` (0 for ``fixed``)."""
    return adapter.estimate_tune_seconds(val) if adapter.train_at == "search" else 0.0


def class_sum(values: torch.Tensor, labels: torch.Tensor, n_classes: int, block: int = 0,
              shot_major: bool = False) -> torch.Tensor:
    """Sum columns by class: ``[B, N] x labels [N] -> [B, C]``, i.e. ``values @ one_hot(labels)``.

    ``block = K > 0`` declares that the labels are ``0,..,0, 1,..,1, ...`` with K of each (a few-shot cache
    in class order): the sum is then a reshape, several times faster than the scatter of ``index_add``.
    With ``shot_major`` the labels are ``0,1,..,C-1, 0,1,..`` (K rounds, see ``shot_major_order``): the sum of K
    contiguous ``[B, C]`` slices, about 4x faster again on a CPU than K-element sums within each class.
    """
    if block and shot_major:
        return values.view(values.shape[0], block, n_classes).sum(dim=1)
    if block:
        return values.view(values.shape[0], n_classes, block).sum(dim=-1)
    out = values.new_zeros(values.shape[0], n_classes)
    return out.index_add_(1, labels.to(values.device), values)


def shot_major_order(n_classes: int, block: int, device: torch.device | None = None) -> torch.Tensor:
    """``[C K]`` indices that reorder a class-ordered cache (K keys per class) shot-major: shot 0 of every class,
    then shot 1, ... (``class_sum(..., shot_major=True)``)."""
    return torch.arange(n_classes * block, device=device).view(n_classes, block).t().reshape(-1)


def search_block_rows(rows: int, n_queries: int, n_keys: int) -> int:
    """Queries per block of a cache search: ``rows``, or (0) as many as fill 2 MB of float32 affinities."""
    return max(1, min(rows or max(8, 2**19 // max(1, n_keys)), n_queries))


def label_block(labels: torch.Tensor, n_classes: int) -> int:
    """K when ``labels == [0]*K + [1]*K + ... + [C-1]*K``, else 0 (see ``class_sum``)."""
    n = labels.numel()
    if n == 0 or n % n_classes:
        return 0
    k = n // n_classes
    return k if torch.equal(labels.cpu(), torch.arange(n_classes).repeat_interleave(k)) else 0


def alpha_accuracies(zs: torch.Tensor, cache: torch.Tensor, labels: torch.Tensor,
                     alphas: torch.Tensor, block: int = 512) -> torch.Tensor:
    """Accuracy (percent) of ``argmax(zs + alpha * cache)`` for every alpha.

    Blocks of queries small enough to stay in the CPU cache are scored for all alphas before moving on, with
    one fused ``torch.add(zs, cache, alpha=a)`` into a reused buffer: the same kernel as ``TipAdapter.forward``,
    so the logits are bit for bit the ones the adapter will produce.

    ``argmax`` is replaced by its exact equivalent through two row maxima (``amax``, several times faster than
    ``argmax`` on a CPU): a query is right when its label's logit equals the row maximum, and that maximum is not
    also reached by another class (found by masking the label's logit and taking the maximum again); rows with such
    a tie, rare, are decided by ``argmax`` itself, which picks the lowest class index.

    Args:
        zs, cache: ``[Q, C]``; labels: ``[Q]``; alphas: ``[S]``.
    Returns:
        ``[S]`` accuracies in percent. Ties go to the lowest class index, as with ``argmax``.
    """
    alpha_list = alphas.tolist()
    labels = labels.to(zs.device)
    correct = torch.zeros(len(alpha_list), dtype=torch.int64, device=zs.device)
    buf = torch.empty(min(block, zs.shape[0]), zs.shape[1], dtype=zs.dtype, device=zs.device)
    for i in range(0, zs.shape[0], block):
        z, c, y = zs[i : i + block], cache[i : i + block], labels[i : i + block, None]
        out = buf[: z.shape[0]]
        for j, a in enumerate(alpha_list):
            torch.add(z, c, alpha=a, out=out)
            top = out.amax(dim=1, keepdim=True)
            hit = out.gather(1, y) == top  # [b, 1]
            out.scatter_(1, y, float("-inf"))
            tie = hit & (out.amax(dim=1, keepdim=True) == top)  # another class reaches the maximum too
            if bool(tie.any()):
                rows = tie[:, 0].nonzero()[:, 0]
                hit[rows, 0] = torch.add(z[rows], c[rows], alpha=a).argmax(dim=1) == y[rows, 0]
            correct[j] += hit.sum()
    return correct.cpu().double() * 100.0 / labels.numel()


def topk_search(zs: torch.Tensor, scores: torch.Tensor, row_labels: torch.Tensor, labels: torch.Tensor,
                betas: Sequence[float], alphas: Sequence[float], ks: Sequence[int],
                row_weights: Sequence[torch.Tensor | None] = (None,)) -> tuple[tuple[float, int, float, int], float]:
    """The first best ``(beta, k, alpha, weights index)`` of the top-k cache logits on val, and its accuracy.

    ``zs [Q, C]`` are the other logits; ``scores``/``row_labels`` ``[Q, k_max]`` each query's best keys (best first);
    ``row_weights``: candidate per-neighbour weights ``[Q, k_max]`` (APE's gammas), None for none. Order: beta, then k
    (ascending), then alpha, then the weights, the first best winning ties.
    """
    n_cls = zs.shape[1]
    alpha_t = torch.tensor(list(alphas), dtype=torch.float32)
    best_acc, best = -1.0, (float(betas[0]), int(ks[0]), float(alphas[0]), 0)
    for beta in betas:
        for k in ks:
            accs = torch.stack([alpha_accuracies(zs, affinity_class_sum(
                scores[:, :k], row_labels[:, :k], n_cls, beta, None if w is None else w[:, :k]), labels, alpha_t)
                for w in row_weights], dim=1).reshape(-1)  # alpha-major, weights innermost
            j = int(accs.argmax())
            if float(accs[j]) > best_acc:
                best_acc = float(accs[j])
                best = (float(beta), int(k), float(alphas[j // len(row_weights)]), j % len(row_weights))
    return best, best_acc


class TipAdapter(Adapter):
    """Training-free Tip-Adapter.

    Args:
        alpha: residual ratio of the cache logits (overwritten by the search when ``search``).
        beta: sharpness of the affinity (idem).
        search: search (beta, alpha) on val.
        beta_max, alpha_max: upper ends of the search ranges (Tip-Adapter's ``search_scale``).
        beta_steps, alpha_steps: grid sizes (Tip-Adapter's ``search_step``).
        grid: ``linear`` (the reference's: [0.1, max), ``beta_min``/``alpha_min`` unused) or ``log`` (log-spaced
            over [min, max]; ``conf/adapter/tip.yaml``'s default, see the module docstring).
        beta_min, alpha_min: lower ends of a ``log`` grid.
        chunk: queries per block when computing affinities (bounds memory at ``chunk x N`` floats).
        memory_budget_gb: keep the val affinities ``[Q, N]`` in memory during the search when they fit.
        lookup: ``dense`` (every key), ``topk`` (each query's k nearest keys, through faiss) or ``auto`` (top-k above
            ``dense_max_keys`` keys).
        topk: k, or several k to search on val (each capped at N).
    """

    # val queries per block of the search: a block's [rows, N] float32 affinities (2 MB) stay in the CPU cache;
    # 0 sizes the blocks from N
    search_rows = 0

    def __init__(self, alpha: float = 1.0, beta: float = 1.0, search: bool = True, beta_max: float = 7.0,
                 alpha_max: float = 3.0, beta_steps: int = 200, alpha_steps: int = 20,
                 chunk: int = 2048, memory_budget_gb: float = 4.0, lookup: str = "auto",
                 topk: int | Sequence[int] = (16, 32, 64, 128, 256), dense_max_keys: int = DENSE_MAX_KEYS,
                 grid: str = "linear", beta_min: float = 0.1, alpha_min: float = 0.1) -> None:
        super().__init__()
        self.grid, self.beta_min, self.alpha_min = str(grid), float(beta_min), float(alpha_min)
        choose_lookup(lookup, 0)  # validates the mode
        self.lookup, self.topk, self.dense_max_keys = str(lookup), topk, int(dense_max_keys)
        self.lookup_mode, self.lookup_reason, self.k = "dense", "", 0
        self.key_lookup: KeyLookup | None = None
        self.memory_budget_gb = float(memory_budget_gb)
        self.block = 0  # K when the cache holds K keys of every class (set by setup)
        self.shot_major = False  # keys held shot-major (set by setup; see class_sum)
        self.alpha, self.beta, self.search = float(alpha), float(beta), bool(search)
        self.beta_max, self.alpha_max = float(beta_max), float(alpha_max)
        self.beta_steps, self.alpha_steps, self.chunk = int(beta_steps), int(alpha_steps), int(chunk)
        # Checks the grid's settings now, not after the support set is encoded.
        beta_alpha_grid(self.beta_max, 1, self.alpha_max, 1, self.grid, self.beta_min, self.alpha_min)
        self.register_buffer("keys", torch.empty(0), persistent=False)
        self.register_buffer("values", torch.empty(0, dtype=torch.int64), persistent=False)

    def setup(self, ctx: AdapterContext) -> None:
        super().setup(ctx)
        self.keys = ctx.support.keys.float().to(ctx.device)
        self.values = ctx.support.labels.to(ctx.device)
        self.block = label_block(self.values, ctx.n_classes)
        self.lookup_mode, self.lookup_reason = choose_lookup(self.lookup, len(self.values), self.dense_max_keys)
        # A dense training-free cache is rebuilt by every setup, so its order is free: shot-major for the faster
        # class sum. Tip-F's keys are its trained state and the top-k lookup reads the store's index: store order.
        self.shot_major = bool(self.block) and self.lookup_mode == "dense" and not self.trainable
        if self.shot_major:
            order = shot_major_order(ctx.n_classes, self.block, self.keys.device)
            self.keys, self.values = self.keys[order], self.values[order]
        if self.lookup_mode == "topk":
            self.k = k_values(self.topk, len(self.values))[-1]
            # Tip-F trains its keys: they stop being the store's, and the index is rebuilt over them.
            self.key_lookup = KeyLookup(ctx.support.index, same_keys=not self.trainable)

    @property
    def uses_topk(self) -> bool:
        """The cache is read through each query's k nearest keys (see ``lookup``)."""
        return self.lookup_mode == "topk"

    def lookup_record(self) -> dict[str, Any] | None:
        record: dict[str, Any] = {"mode": self.lookup_mode, "reason": self.lookup_reason, "n_keys": len(self.values)}
        if self.uses_topk and self.key_lookup is not None:
            record.update(k=self.k, **self.key_lookup.describe(self.k))
        return record

    def topk_cache_logits(self, features: torch.Tensor, beta: float) -> torch.Tensor:
        """The cache term over each query's ``self.k`` nearest keys: ``[B, D] -> [B, C]``."""
        scores, rows = self.key_lookup.neighbours(features.float(), self.keys, self.k)
        return affinity_class_sum(scores, self.values[rows], self.text_head.shape[0], beta)

    def hparam_grid(self) -> dict[str, list[float]]:
        if not self.search:
            return {}
        return beta_alpha_grid(self.beta_max, self.beta_steps, self.alpha_max, self.alpha_steps, self.grid,
                               self.beta_min, self.alpha_min)

    def hparams(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "beta": self.beta, **({"k": self.k} if self.uses_topk else {})}

    def cache_logits(self, features: torch.Tensor, beta: float) -> torch.Tensor:
        """``exp(-beta (1 - f K^T)) V``: ``[B, D] -> [B, C]`` (one-hot V as a per-class sum)."""
        if self.uses_topk:
            return self.topk_cache_logits(features, beta)
        n_cls = self.text_head.shape[0]
        out = []
        for i in range(0, features.shape[0], self.chunk):
            affinity = features[i : i + self.chunk].float() @ self.keys.t()
            out.append(class_sum(affinity_kernel(affinity - 1.0, beta), self.values, n_cls, self.block,
                                 self.shot_major))
        return torch.cat(out) if out else features.new_zeros(0, n_cls)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, D] -> [B, C]``."""
        # One fused kernel, the same one the search scores with (see alpha_accuracies).
        return torch.add(self.zero_shot_logits(x), self.cache_logits(x, self.beta), alpha=self.alpha)

    @torch.no_grad()
    def tune(self, val: FeatureSplit) -> dict[str, Any]:
        """Exact search of the (beta, alpha) grid on val.

        The affinities ``f K^T - 1`` do not depend on beta, so they are computed once (when they fit in
        ``memory_budget_gb``); each beta then costs one in-place exp and a per-class sum, and all alphas are
        scored at once. Picks the first best point in beta-major order, like ``tuning.grid_search``.
        """
        grid = self.hparam_grid()
        if not grid:
            return {"method": "fixed", "on": "none"}
        if self.uses_topk:
            return self.tune_topk(val, grid)
        (self.beta, self.alpha), best_acc, _ = self._search(val, grid)
        log.info("Tip-Adapter search on val: beta=%.3f alpha=%.3f -> %.2f%%", self.beta, self.alpha, best_acc)
        return {"method": "grid (affinities once, all alphas per beta)", "on": "val",
                "grid_size": len(grid["beta"]) * len(grid["alpha"]), "val_acc": best_acc}

    @torch.no_grad()
    def estimate_tune_seconds(self, val: FeatureSplit) -> float:
        """The search's set-up plus ``beta_steps`` times one beta, timed on the first two betas."""
        grid = self.hparam_grid()
        if not grid:
            return 0.0
        _, _, timing = self._search(val, grid, n_betas=2)
        return timing["prepare_s"] + len(grid["beta"]) * timing["per_beta_s"]

    def _search(self, val: FeatureSplit, grid: dict[str, list[float]], n_betas: int | None = None
                ) -> tuple[tuple[float, float], float, dict[str, float]]:
        """The first best ``(beta, alpha)`` over the grid (or its first ``n_betas`` betas), its accuracy, timings."""
        start = time.perf_counter()
        feats = val.features.to(self.text_head.device).float()
        labels = val.labels.to(feats.device)
        n_cls = self.text_head.shape[0]
        zs = self.zero_shot_logits(feats)
        alphas = torch.tensor(grid["alpha"], dtype=torch.float32)
        keep = 0 < feats.shape[0] * self.keys.shape[0] * 4 <= self.memory_budget_gb * 2**30
        starts = range(0, feats.shape[0], self.chunk)
        shifted = feats.new_empty(feats.shape[0], self.keys.shape[0]) if keep else None  # [Q, N], filled in chunks
        for i in starts if keep else ():
            torch.matmul(feats[i : i + self.chunk], self.keys.t(), out=shifted[i : i + self.chunk]).sub_(1.0)
        # Query blocks whose [rows, N] affinities stay in the CPU cache through the exp and the class sum, into
        # reused buffers (allocating per beta costs more than the arithmetic).
        rows = search_block_rows(self.search_rows, feats.shape[0], self.keys.shape[0])
        buf = shifted.new_empty(rows, shifted.shape[1]) if keep else None
        cache = zs.new_empty(zs.shape) if keep else None
        prepared = time.perf_counter()
        best_acc, best = -1.0, (self.beta, self.alpha)
        betas = grid["beta"][:n_betas] if n_betas else grid["beta"]
        for beta in betas:
            if shifted is None:
                cache = self.cache_logits(feats, beta)
            else:
                # The kernel forward uses, in place (affinity_kernel), and the class sums are per row: the logits
                # are those forward produces.
                for i in range(0, shifted.shape[0], rows):
                    n = min(rows, shifted.shape[0] - i)
                    cache[i : i + n] = class_sum(affinity_kernel(shifted[i : i + n], beta, buf[:n]),
                                                 self.values, n_cls, self.block, self.shot_major)
            accs = alpha_accuracies(zs, cache, labels, alphas)
            j = int(accs.argmax())  # first maximum: lowest alpha among ties
            if float(accs[j]) > best_acc:
                best_acc, best = float(accs[j]), (beta, grid["alpha"][j])
        timing = {"prepare_s": prepared - start, "per_beta_s": (time.perf_counter() - prepared) / max(1, len(betas))}
        return best, best_acc, timing

    @torch.no_grad()
    def tune_topk(self, val: FeatureSplit, grid: dict[str, list[float]]) -> dict[str, Any]:
        """(beta, k, alpha) on val with the top-k cache: each val query's k_max nearest keys are found once."""
        feats = val.features.to(self.text_head.device).float()
        ks = k_values(self.topk, len(self.values))
        scores, rows = self.key_lookup.neighbours(feats, self.keys, ks[-1])
        (self.beta, self.k, self.alpha, _), best_acc = topk_search(
            self.zero_shot_logits(feats), scores, self.values[rows], val.labels.to(feats.device), grid["beta"],
            grid["alpha"], ks)
        log.info("Tip-Adapter top-k search on val: beta=%.3f k=%d alpha=%.3f -> %.2f%%", self.beta, self.k,
                 self.alpha, best_acc)
        return {"method": "grid over top-k neighbours (found once, k_max)", "on": "val",
                "grid_size": len(grid["beta"]) * len(grid["alpha"]) * len(ks), "val_acc": best_acc,
                "k_values": ks}
