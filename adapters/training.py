"""One training loop for every trainable adapter.

Optimiser (SGD or AdamW), a cosine schedule with an optional constant warmup, stepped per batch (reaching 0 at the
end, as Tip-Adapter-F's ``CosineAnnealingLR(epochs x batches)``) or per epoch (Dassl's ``build_lr_scheduler``,
used by CoOp, CoCoOp, KgCoOp, TaskRes, CLAP, MaPLe: lr constant within an epoch, ``cos(pi (e - W) / E)`` after W
warmup epochs of E, never reaching 0), gradient clipping, mixed precision on CUDA, a seeded data order, a progress
bar, and model selection on val only: the best epoch by val accuracy (ties keep the earlier epoch) or the last
epoch. Training stops with a clear error on a non-finite loss (step losses stay on the device and are checked once
per epoch, so a step never waits for the host). Every solver in fewclip ends with ``check_optimised`` (iterations
run, loss decreased, weights moved) and linear classifiers with ``check_classifier`` (finite, not the same for every
class).

Feature-mode adapters train on the support store's cached augmented views: each epoch, every support image
contributes one of its A views, drawn with the seeded generator. That departs from the papers (fresh
augmentation every epoch) by using a finite set of A views; it is what makes training cost seconds.
"""

from __future__ import annotations

import copy
import logging
import math
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F

from adapters.base import Adapter, FeatureSplit, SupportSet, evaluate
from caches.progress import Progress

log = logging.getLogger(__name__)

Batches = Callable[[int, torch.Generator], Iterator[tuple[torch.Tensor, torch.Tensor]]]


FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)  # torch's fused AdamW


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite."""


class DegenerateFitError(RuntimeError):
    """A solver returned without optimising: no iterations, weights that never moved, or a degenerate classifier."""


class NotOptimisedWarning(UserWarning):
    """A solver ran, but its loss did not go down (the figures are in the message and in the fit record)."""


def check_optimised(name: str, iterations: int, initial_loss: float, final_loss: float,
                    moved: float | None = None) -> dict[str, Any]:
    """Check that an iterative solver actually optimised; every solver in fewclip calls this before returning.

    Raises ``DegenerateFitError`` when it ran no iteration, ended on a non-finite loss, or its weights never moved
    (``moved``: the largest absolute change of any weight; None when the solver does not track it). Warns
    (``NotOptimisedWarning``, and the log) when the final loss is not below the initial one. Returns the figures
    for the fit record (``result.json``), with ``status`` ``ok`` or the warning.
    """
    record = {"iterations": int(iterations), "initial_loss": float(initial_loss), "final_loss": float(final_loss)}
    if moved is not None:
        record["max_weight_change"] = float(moved)
    figures = f"{iterations} iterations, loss {initial_loss:.6g} -> {final_loss:.6g}" + (
        f", largest weight change {moved:.3g}" if moved is not None else "")
    if iterations <= 0:
        raise DegenerateFitError(f"{name}: the solver ran no iteration ({figures}); its weights are the initial ones")
    if not math.isfinite(final_loss):
        raise DegenerateFitError(f"{name}: the solver ended on a non-finite loss ({figures})")
    if moved is not None and not moved > 0:
        raise DegenerateFitError(f"{name}: the weights never changed ({figures}); check the learning rate and that "
                                 "the loss reaches the trained parameters")
    if not final_loss < initial_loss:
        message = f"{name}: the training loss did not decrease ({figures})"
        warnings.warn(message, NotOptimisedWarning, stacklevel=2)
        log.warning(message)
        record["status"] = "warning: loss did not decrease"
    else:
        record["status"] = "ok"
    return record


def check_classifier(name: str, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    """Refuse a degenerate linear classifier ``weight [C, D]`` (+ ``bias [C]``): non-finite entries, or every class
    with the same weights and bias (it would predict one class for every input, e.g. all-zero weights)."""
    parts = [weight.reshape(weight.shape[0], -1)] + ([bias.reshape(-1, 1)] if bias is not None else [])
    rows = torch.cat([t.detach().float() for t in parts], dim=1)
    if not bool(torch.isfinite(rows).all()):
        bad = int((~torch.isfinite(rows)).sum())
        raise DegenerateFitError(f"{name}: {bad} of {rows.numel()} classifier weights are NaN or infinite")
    spread = float((rows - rows[:1]).abs().max()) if rows.shape[0] > 1 else 1.0
    if not spread > 0:
        raise DegenerateFitError(f"{name}: every class has the same weights (largest |w| "
                                 f"{float(rows.abs().max()):.3g}): the classifier predicts one class for every input")


@dataclass
class TrainSpec:
    """How to train. Adapters expose these as hyperparameters in their YAML (``adapter.lr=...``)."""

    epochs: int = 20
    batch_size: int = 256
    optimizer: str = "adamw"  # adamw | sgd
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9  # SGD only
    eps: float = 1e-8  # AdamW only
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW only (Dassl's OPTIM.ADAM_BETA1/2 defaults: 0.9, 0.999)
    schedule: str = "cosine"  # cosine | constant
    schedule_step: str = "batch"  # batch (cosine over every step, reaching 0) | epoch (Dassl: once per epoch)
    warmup_epochs: int = 0  # constant warmup_lr for these epochs, then the schedule (CoOp)
    warmup_lr: float = 1e-5
    grad_clip: float = 0.0  # max gradient norm; 0 disables
    select: str = "best_val"  # best_val | last (Dassl's TEST.FINAL_MODEL "last_step")
    amp: bool = True  # mixed precision when on CUDA

    @classmethod
    def from_kwargs(cls, kwargs: dict[str, Any]) -> tuple[TrainSpec, dict[str, Any]]:
        """Split an adapter's keyword arguments into a spec and the rest."""
        names = {f.name for f in fields(cls)}
        spec = cls(**{k: v for k, v in kwargs.items() if k in names})
        spec.betas = (float(spec.betas[0]), float(spec.betas[1]))  # YAML gives a list (Hydra: a ListConfig)
        if spec.optimizer not in ("adamw", "sgd") or spec.schedule not in ("cosine", "constant") or \
                spec.select not in ("best_val", "last") or spec.schedule_step not in ("batch", "epoch"):
            raise ValueError(f"bad training spec {spec}")
        return spec, {k: v for k, v in kwargs.items() if k not in names}


def view_batches(support: SupportSet, batch_size: int, device: torch.device | None = None) -> Batches:
    """Feature-mode data: per epoch, one seeded random view per support image, in seeded random order.

    Yields ``([B, D] features, [B] labels)``. Without per-view features, the keys are used. On a CUDA ``device`` the
    views move there once, so a step gathers its batch on the device instead of copying it from host memory.
    """
    views = support.views if support.views is not None else support.keys[None]
    labels = support.labels
    if device is not None and device.type != "cpu":
        views, labels = views.float().to(device), labels.to(device)

    def batches(epoch: int, gen: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = labels.shape[0]
        # drawn on the CPU with the seeded generator (the same draws on every device)
        pick = torch.randint(views.shape[0], (n,), generator=gen).to(views.device)
        order = torch.randperm(n, generator=gen).to(views.device)
        for i in range(0, n, batch_size):
            idx = order[i : i + batch_size]
            yield views[pick[idx], idx].float(), labels[idx]

    return batches


def _lr_lambda(spec: TrainSpec, steps_per_epoch: int, base_lr: float | None = None,
               warmup_epochs: int | None = None) -> Callable[[int], float]:
    warm_epochs = spec.warmup_epochs if warmup_epochs is None else warmup_epochs
    warm = warm_epochs * steps_per_epoch
    total = max(1, spec.epochs * steps_per_epoch - warm)
    base_lr = spec.lr if base_lr is None else base_lr

    def factor(step: int) -> float:
        if step < warm:  # a constant warmup learning rate, the same for every parameter group (Dassl)
            return spec.warmup_lr / base_lr
        if spec.schedule == "constant":
            return 1.0
        if spec.schedule_step == "epoch":
            # Dassl: CosineAnnealingLR(T_max=max_epoch) stepped after each epoch, recounted from 0 when the
            # ConstantWarmupScheduler hands over (WARMUP_RECOUNT), so epoch e >= W runs at cos(pi (e - W) / E).
            epoch = step // steps_per_epoch
            return 0.5 * (1.0 + math.cos(math.pi * (epoch - warm_epochs) / max(1, spec.epochs)))
        return 0.5 * (1.0 + math.cos(math.pi * min(step - warm, total) / total))

    return factor


def epochs_for_shots(table: dict[int, int], shots: int) -> int:
    """A method's epoch budget for ``shots`` from its table by shot count (the nearest listed count)."""
    return table.get(shots) or table[min(table, key=lambda k: abs(k - shots))]


def train(
    adapter: Adapter,
    batches: Batches,
    val: Any,
    spec: TrainSpec,
    seed: int,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    progress: bool | None = None,
    desc: str = "train",
    mode: str = "features (cached views)",
    steps_per_epoch: int | None = None,
) -> dict[str, Any]:
    """Train ``adapter``'s parameters that require grad; keep the best epoch on ``val`` (or the last).

    Args:
        batches: ``(epoch, generator) -> iterator of (inputs, labels)``; the generator is seeded by ``seed``.
        val: validation split for model selection (``FeatureSplit`` or pixel split; never the test split).
        steps_per_epoch: batches per epoch (counted by iterating once when not given: cheap for features).
        loss_fn: ``(logits [B, C], labels [B]) -> scalar``; cross-entropy by default.
    Returns:
        a record for ``result.json``: epochs, best epoch, per-epoch train loss and val accuracy.
    """
    params = [p for p in adapter.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"{type(adapter).__name__} has no trainable parameters")
    loss_fn = loss_fn or F.cross_entropy
    # Adapters may train parts at different learning rates (DPT: text prompts 0.002, visual prompts 0.01).
    groups_fn = getattr(adapter, "param_groups", None)
    groups = groups_fn() if groups_fn is not None else [{"params": params}]
    for g in groups:
        g.setdefault("lr", spec.lr)
    opt = _optimizer(groups, spec)
    gen = torch.Generator().manual_seed(seed)
    steps = max(1, steps_per_epoch or sum(1 for _ in batches(0, torch.Generator().manual_seed(seed))))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, [_lr_lambda(spec, steps, g["lr"], g.get("warmup_epochs")) for g in opt.param_groups])
    start_epoch = getattr(adapter, "start_epoch", None)
    device = next(iter(params)).device
    use_amp = spec.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    select_on_val = spec.select == "best_val" and val is not None and len(val) > 0
    best_acc, best_epoch, best_state = -1.0, spec.epochs, None
    losses: list[float] = []
    val_accs: list[float] = []
    first_loss, n_steps = float("nan"), 0
    start = [p.detach().clone() for p in params]
    bar = Progress(range(1, spec.epochs + 1), desc=desc, unit="epoch", enabled=progress, leave=False)
    for epoch in bar:
        adapter.train()
        if start_epoch is not None:  # methods whose loss changes with the epoch (DPT's warm-up losses)
            start_epoch(epoch)
        # Step losses stay on the device and are read once per epoch: no host synchronisation per step.
        step_losses, sizes = [], []
        for x, y in batches(epoch, gen):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
                loss = loss_fn(adapter(x).float(), y)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if spec.grad_clip > 0:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(params, spec.grad_clip)
            scaler.step(opt)
            scaler.update()
            sched.step()
            step_losses.append(loss.detach())
            sizes.append(len(y))
        if not step_losses:
            break
        per_step = torch.stack(step_losses).double().cpu()
        if not bool(torch.isfinite(per_step).all()):
            step = int((~torch.isfinite(per_step)).nonzero()[0])
            raise NonFiniteLossError(
                f"{type(adapter).__name__}: non-finite loss ({float(per_step[step])}) at epoch {epoch}, step {step}; "
                f"lower the learning rate (adapter.lr={spec.lr}) or enable gradient clipping (adapter.grad_clip=1.0)"
            )
        if epoch == 1:
            first_loss = float(per_step[0])  # before any update
        n_steps += len(sizes)
        losses.append(float((per_step * torch.tensor(sizes, dtype=torch.float64)).sum()) / sum(sizes))
        if select_on_val:
            acc = evaluate(adapter, val)
            val_accs.append(acc)
            if acc > best_acc:  # strict: ties keep the earlier epoch
                best_acc, best_epoch = acc, epoch
                best_state = copy.deepcopy({k: v.detach().clone() for k, v in adapter.state_dict().items()})
            bar.set_postfix(loss=f"{losses[-1]:.3f}", val=f"{acc:.1f}")
        else:
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    name = type(adapter).__name__
    moved = max((float((p.detach() - p0).abs().max()) for p, p0 in zip(params, start) if p.numel()), default=0.0)
    optimisation = check_optimised(name, n_steps, first_loss, losses[-1] if losses else float("nan"), moved=moved)
    if select_on_val and best_state is not None:
        adapter.load_state_dict(best_state)
    adapter.eval()
    log.info("%s: %d epochs, kept epoch %d (%s)", name, spec.epochs, best_epoch,
             "best val accuracy" if select_on_val else "last")
    return {"spec": asdict(spec), "best_epoch": best_epoch, "selected_by": "val" if select_on_val else "last",
            "train_loss": losses, "val_acc": val_accs, "mode": mode, "optimisation": optimisation}


def _optimizer(groups: list[dict[str, Any]], spec: TrainSpec) -> torch.optim.Optimizer:
    if spec.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay)
    # The fused kernel (one pass over each parameter) computes the same AdamW update as the default per-op
    # implementation, up to float rounding; on a CPU it is ~10x faster for a large parameter such as Tip-Adapter-F's
    # [N, D] keys, where the per-op update cost as much as the step's matmuls.
    params = [p for g in groups for p in g["params"]]
    fused = bool(params) and all(p.device.type in ("cpu", "cuda") and p.dtype in FUSED_DTYPES for p in params)
    return torch.optim.AdamW(groups, lr=spec.lr, eps=spec.eps, betas=tuple(spec.betas),
                             weight_decay=spec.weight_decay, fused=fused or None)


def probe_step_seconds(adapter: Adapter, batches: Batches, spec: TrainSpec,
                       loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                       steps: int = 2, stop_above: float = math.inf) -> float:
    """Seconds per training step of ``train``, measured on a few real steps, then undone.

    One untimed step (first-call allocations), then ``steps`` timed ones, each the same work as a step of ``train``
    (forward, loss, backward, optimiser step); the adapter's state and train/eval mode are restored afterwards.
    When the first step alone takes more than ``stop_above`` seconds, its time is returned at once.
    """
    params = [p for p in adapter.parameters() if p.requires_grad]
    saved = {k: v.detach().clone() for k, v in adapter.state_dict().items()}
    was_training = adapter.training
    loss_fn = loss_fn or F.cross_entropy
    opt = _optimizer([{"params": params}], spec)
    device = params[0].device
    it = batches(1, torch.Generator().manual_seed(0))
    elapsed, timed = 0.0, 0
    adapter.train()
    try:
        for i, (x, y) in enumerate(it):
            if i > steps:
                break
            start = time.perf_counter()
            x, y = x.to(device), y.to(device)
            loss = loss_fn(adapter(x).float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            float(loss.detach())  # wait for the device
            if i > 0:
                elapsed, timed = elapsed + time.perf_counter() - start, timed + 1
            elif time.perf_counter() - start > stop_above:
                return time.perf_counter() - start
    finally:
        adapter.load_state_dict(saved)
        for p in params:
            p.grad = None
        adapter.train(was_training)
    return elapsed / timed if timed else 0.0


def seeded_linear(in_features: int, out_features: int, gen: torch.Generator, bias: bool = True
                  ) -> torch.nn.Linear:
    """``nn.Linear`` with PyTorch's default bounds, U(-1/sqrt(in), 1/sqrt(in)), drawn from a local generator."""
    layer = torch.nn.Linear(in_features, out_features, bias=bias)
    bound = 1.0 / in_features ** 0.5
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.rand(p.shape, generator=gen) * 2 * bound - bound)
    return layer


class TrainsOnFeatures:
    """Mixin for adapters trained by ``train`` on the support set's cached views (feature mode).

    Use as ``class MyAdapter(TrainsOnFeatures, Adapter)``; call ``self.init_training(kwargs)`` in
    ``__init__`` with the ``TrainSpec`` fields the YAML passes, build modules in ``setup``, and override
    ``loss`` when the method adds terms to cross-entropy. Optional hooks read by ``train``:
    ``param_groups()`` (optimiser groups, each may set ``lr`` and ``warmup_epochs``) and ``start_epoch(epoch)``.
    """

    trainable = True
    cost = "trained on cached features"
    spec: TrainSpec

    def init_training(self, train_kwargs: dict[str, Any]) -> None:
        self.spec, rest = TrainSpec.from_kwargs(train_kwargs)
        if rest:
            raise TypeError(f"{type(self).__name__}: unknown hyperparameters {sorted(rest)}")

    def epochs_by_shots_budget(self, ctx: Any, table: dict[int, int]) -> None:
        """``epochs: 0`` in the YAML: take the method's budget for the number of shots (nearest listed count)."""
        if self.spec.epochs == 0:
            self.spec.epochs = epochs_for_shots(table, max(1, len(ctx.support) // max(1, ctx.n_classes)))

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``[B, C], [B] -> scalar``: cross-entropy unless a method adds terms."""
        return F.cross_entropy(logits, labels)

    def training_spec(self) -> TrainSpec:
        """The spec ``fit`` trains with (prompt learners may scale their batch in feature mode)."""
        return self.spec

    def fit(self, train_set: SupportSet, val: FeatureSplit) -> dict[str, Any]:
        ctx = self.ctx
        return train(self, view_batches(train_set, self.spec.batch_size, self.text_head.device), val, self.spec,
                     seed=ctx.seed, loss_fn=self.loss, progress=ctx.progress, desc=type(self).__name__)

    def estimate_fit_seconds(self, train_set: SupportSet, val: FeatureSplit, limit_s: float = math.inf) -> float:
        """epochs x (steps per epoch x a probed step + one val evaluation when selecting on val) + the search."""
        spec = self.training_spec()
        steps = math.ceil(len(train_set) / spec.batch_size) * spec.epochs
        step_s = probe_step_seconds(self, view_batches(train_set, spec.batch_size, self.text_head.device), spec,
                                    loss_fn=self.loss, stop_above=limit_s / max(1, steps))
        on_val = spec.select == "best_val" and val is not None and len(val) > 0
        return steps * step_s + (spec.epochs * self.estimate_eval_seconds(val) if on_val else 0.0) + \
            self.estimate_tune_seconds(val)
