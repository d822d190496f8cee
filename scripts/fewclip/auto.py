"""``adapter=auto``: fit several adapters, keep the one validation data prefers, evaluate only that one on test.

Every candidate (a name from ``conf/adapter/``) is set up, fitted and tuned exactly as ``adapter=<name>`` would
be, then scored. The winner is the best score; ties go to the candidate listed first, and the default list runs
from cheap to expensive (training-free, then closed-form or full-batch probes, then trained adapters), so a tie
keeps the cheaper method. Every candidate's scores go into ``result.json`` (``selection.fit.candidates``). The
test split is never seen: the runner hands the fitted adapter the test split once, after ``fit`` and ``tune``.

Scores by shots (K per class, val holds min(K, 4) images per class):

* K >= 3: accuracy on val.
* 2 <= K <= ``cv_max_shots`` (default 2): val has only 2 images per class, so the score pools val with a K-fold
  cross-validation on the support set: for fold f, each candidate is fitted on the other shots of every class
  (its own tuning still on val) and scored on shot f's cached key. The winner is then fitted on all K shots.
* K = 1: val only (one image per class): the choice is noisy, and ties, frequent at this size, keep the
  cheaper method. With one shot there is nothing to cross-validate.

Only feature-mode candidates are allowed (pixel-mode prompt learners cost 100x more per fit); ``auto`` itself
is a feature-mode adapter.

**Budget.** ``budget_s`` bounds the seconds ``auto`` spends (set-ups, cost probes and fits, cross-validation folds
included). Before fitting a candidate, ``auto`` sets it up and asks its cost model
(``Adapter.estimate_fit_seconds``: the data sizes and a short probe run on this machine: a few training steps, one
search step, one objective evaluation) how long fit + tune would take; a candidate predicted to need more than what
is left of the budget is skipped, and ``result.json`` records the prediction and the reason
(``selection.fit.candidates.<name>.skipped``, ``selection.fit.skipped``). Candidates are fitted whatever their
prediction until one has fitted (the first, unless it fails), so ``auto`` always has an answer. The same budget
admits more candidates on a faster machine or a GPU, since the probes run there; prompt learners (CoOp's text
encoder runs every step) join only when it allows them. Each fitted candidate is dropped as soon as it is scored
unless it is the best so far.

**A candidate that fails to fit** (its solver refused a degenerate result, its loss became non-finite, a matrix
could not be factorised) is dropped with a warning, and the error goes into ``result.json``
(``selection.fit.candidates.<name>.failed``, ``selection.fit.failed``); ``auto`` goes on with the others and fails
only when no candidate fitted. Any other error (a bad setting, a bug, running out of memory) still ends the run.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from adapters.base import Adapter, AdapterContext, FeatureSplit, SupportSet, predict_split
from adapters.training import DegenerateFitError

# What a candidate's fit may raise when its solver fails on these data (NonFiniteLossError is a FloatingPointError):
# auto drops that candidate and goes on.
FIT_FAILURES = (DegenerateFitError, FloatingPointError, torch.linalg.LinAlgError)

log = logging.getLogger(__name__)

CANDIDATES = ("zero_shot", "tip", "gda", "ape", "lp_pp", "linear_probe", "clap", "tip_f", "clip_adapter", "taskres",
              "coop")
BUDGET_S = 1200.0  # sensible on a 2-core CPU at ImageNet scale; a GPU fits more candidates in the same time


def make_adapter(name: str, overrides: Mapping[str, Any] | None = None) -> Adapter:
    """Instantiate ``conf/adapter/<name>.yaml`` (with field overrides), as ``adapter=<name>`` would."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from fewclip.config import conf_dir, group_options

    path = conf_dir() / "adapter" / f"{name}.yaml"
    if name == "auto" or not path.is_file():
        raise ValueError(f"auto: unknown candidate '{name}'; choose from {[o for o in group_options('adapter')]}")
    node = OmegaConf.merge(OmegaConf.load(path), OmegaConf.create(dict(overrides or {})))
    return instantiate(node)


def _shot_folds(labels: torch.Tensor) -> torch.Tensor:
    """``[N]`` fold index of each support item: its rank among the items of its class."""
    folds = torch.empty_like(labels)
    for c in labels.unique():
        idx = (labels == c).nonzero().flatten()
        folds[idx] = torch.arange(len(idx))
    return folds


def _subset(support: SupportSet, keep: torch.Tensor) -> SupportSet:
    return SupportSet(keys=support.keys[keep], labels=support.labels[keep],
                      views=support.views[:, keep] if support.views is not None else None)


class Auto(Adapter):
    """Validation-selected adapter.

    Args:
        candidates: adapter names, cheapest first (ties keep the earlier one).
        cv_max_shots: largest K at which val is pooled with a K-fold cross-validation on the support set.
        overrides: per-candidate YAML field overrides, e.g. ``{coop: {epochs: 50}}``.
        budget_s: seconds ``auto`` may spend; candidates predicted not to fit in what is left are skipped
            (0 or less: no budget, every candidate is fitted).
    """

    def __init__(self, candidates: Sequence[str] = CANDIDATES, cv_max_shots: int = 2,
                 overrides: Mapping[str, Mapping[str, Any]] | None = None, budget_s: float = BUDGET_S) -> None:
        super().__init__()
        if not candidates:
            raise ValueError("auto needs at least one candidate adapter")
        self.candidates = [str(c) for c in candidates]
        self.cv_max_shots = int(cv_max_shots)
        self.budget_s = float(budget_s)
        self.overrides = {str(k): dict(v) for k, v in (overrides or {}).items()}
        self.chosen: nn.Module | None = None
        self._choice: str | None = None

    # ------------------------------------------------------------------ candidates
    def _candidate(self, name: str, ctx: AdapterContext) -> Adapter:
        adapter = make_adapter(name, self.overrides.get(name))
        if adapter.input_kind != "features":
            raise ValueError(f"auto: candidate '{name}' trains on pixels; auto chooses among feature-mode adapters")
        adapter.setup(ctx)
        return adapter

    def _fit(self, name: str, ctx: AdapterContext, support: SupportSet, val: FeatureSplit) -> Adapter:
        adapter = self._candidate(name, ctx)
        adapter.fit(support, val)
        adapter.tune(val)
        return adapter

    @property
    def choice(self) -> str | None:
        """The selected candidate's name. Setting it (when restoring a run) rebuilds that candidate."""
        return self._choice

    @choice.setter
    def choice(self, name: str) -> None:
        self._choice = name
        if self.ctx is not None:
            self.chosen = self._candidate(name, self.ctx)

    @property
    def chosen_hparams(self) -> dict[str, Any]:
        return self.chosen.hparams() if self.chosen is not None else {}

    @chosen_hparams.setter
    def chosen_hparams(self, values: Mapping[str, Any]) -> None:
        for k, v in values.items():
            setattr(self.chosen, k, v)

    def hparams(self) -> dict[str, Any]:
        return {"choice": self.choice, "chosen_hparams": self.chosen_hparams}

    # ------------------------------------------------------------------ selection
    def fit(self, train: SupportSet, val: FeatureSplit) -> dict[str, Any]:
        ctx = self.ctx
        shots = len(train) // max(1, ctx.n_classes)
        use_cv = 2 <= shots <= self.cv_max_shots
        folds = _shot_folds(train.labels) if use_cv else None
        budget = self.budget_s if self.budget_s > 0 else math.inf
        start = time.perf_counter()
        records: dict[str, dict[str, Any]] = {}
        skipped: dict[str, str] = {}
        failed: dict[str, str] = {}
        best: tuple[float, str, Adapter] | None = None
        for name in self.candidates:
            t = time.perf_counter()
            adapter = self._candidate(name, ctx)
            left = budget - (time.perf_counter() - start)
            # the fit on the whole support plus, with cross-validation, one per fold (on fewer shots)
            n_fits = 1 + (shots if use_cv else 0)
            predicted = adapter.estimate_fit_seconds(train, val, limit_s=left / n_fits) * n_fits
            rec: dict[str, Any] = {"cost": type(adapter).cost, "predicted_s": round(predicted, 3),
                                   "setup_and_probe_s": round(time.perf_counter() - t, 3)}
            if best is not None and predicted > left:  # fit until one candidate has fitted
                rec["skipped"] = skipped[name] = (f"predicted {predicted:.0f} s for fit + tune, more than the "
                                                  f"{max(left, 0.0):.0f} s left of budget_s={self.budget_s:g}")
                records[name] = rec
                log.info("auto: skipping %s: %s", name, rec["skipped"])
                del adapter
                continue
            try:
                adapter.fit(train, val)
                adapter.tune(val)
                logits, labels = predict_split(adapter, val)
                correct, total = int((logits.argmax(-1) == labels).sum()), len(labels)
                rec["val_acc"] = 100.0 * correct / total
                if use_cv:
                    cv_correct, cv_total = 0, 0
                    for f in range(shots):
                        held = folds == f
                        rest = _subset(train, ~held)
                        # The context carries the support too (Tip-Adapter builds its cache from it): the held-out
                        # shot must be absent from both.
                        part = self._fit(name, dataclasses.replace(ctx, support=rest), rest, val)
                        cv_logits = part.predict(train.keys[held])
                        del part
                        cv_correct += int((cv_logits.argmax(-1) == train.labels[held]).sum())
                        cv_total += int(held.sum())
                    rec["cv_acc"] = 100.0 * cv_correct / cv_total
                    correct, total = correct + cv_correct, total + cv_total
            except FIT_FAILURES as err:
                rec["failed"] = failed[name] = f"{type(err).__name__}: {err}"
                rec["seconds"] = time.perf_counter() - t
                records[name] = rec
                log.warning("auto: dropping %s, its fit failed: %s", name, rec["failed"])
                del adapter
                continue
            rec["score"] = 100.0 * correct / total
            rec["seconds"] = time.perf_counter() - t
            records[name] = rec
            log.info("auto: %s score %.2f%% (val %.2f%%), %.1f s (predicted %.1f s)", name, rec["score"],
                     rec["val_acc"], rec["seconds"], predicted)
            if best is None or rec["score"] > best[0]:  # strict: ties keep the candidate listed first
                best = (rec["score"], name, adapter)  # the previous best is dropped here
            del adapter
        if best is None:
            reasons = "; ".join(f"{n}: {r}" for n, r in {**failed, **skipped}.items())
            raise DegenerateFitError(f"auto: no candidate could be fitted ({reasons})")
        _, self._choice, self.chosen = best
        rule = "val accuracy pooled with a support-set cross-validation" if use_cv else "val accuracy"
        log.info("auto: chose %s (%s %.2f%%)", self._choice, rule, records[self._choice]["score"])
        return {"chosen": self._choice, "rule": rule + "; ties keep the candidate listed first (cheaper)",
                "candidates": records, "budget_s": self.budget_s, "skipped": skipped, "failed": failed,
                "seconds": round(time.perf_counter() - start, 3)}

    def tune(self, val: FeatureSplit) -> dict[str, Any]:
        # Each candidate was tuned on val inside ``fit``; nothing is left to search.
        return {"method": "auto", "on": "val", "chosen": self.choice}

    def new_class_state(self) -> dict[str, torch.Tensor] | None:
        return None  # the choice depends on the classes it was made for

    def lookup_record(self) -> dict[str, Any] | None:
        return self.chosen.lookup_record() if self.chosen is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, D]`` -> ``[B, C]``: the chosen candidate's logits."""
        if self.chosen is None:
            raise RuntimeError("auto: fit() has not chosen an adapter yet")
        return self.chosen(x)
