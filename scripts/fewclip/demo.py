"""``fewclip demo``: every adapter on the offline demo sets with the bundled fewclip-mini backbone, then tables and
the accuracy-vs-shots plot.

Defaults, each overridable on the command line (an override of the same key wins):

* ``backbone=mini``: fewclip-mini, a small CLIP trained on public-domain clip art, emoji and typeset characters
  (``caches/model_configs/fewclip-mini.md``); ``backbone=tiny`` gives the random unit-test model, ``backbone=vit_b16``
  real CLIP weights;
* shorter schedules for the pixel-mode adapters (``DEMO_SHORT``: they run the image encoder every step), said so
  under the table, and those adapters on the first dataset only (``demo_plan``; ``--full`` runs them everywhere);
* the curve: ``zero_shot, tip, gda, linear_probe, coop`` at 1, 2, 4, 8 and 16 shots (the table's runs are reused
  at its shot count), printed as a table and drawn with ``fewclip report``'s plot into ``<out>/curve.png``.

The work is estimated first (images to encode times the backbone's measured cost per image, :mod:`fewclip.estimate`)
and said; a plan estimated beyond ``DEMO_BUDGET_S`` (a real backbone on a CPU) keeps to the first dataset and the
feature-mode adapters unless ``--full`` is given or the datasets or adapters are named. The default plan with
fewclip-mini takes about 5 minutes on one CPU core (README, "What the demo shows").
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fewclip.console import error_line, fmt_hparams, quiet_logging

log = logging.getLogger("fewclip")

DEMO_BACKBONE = "mini"
DEMO_SHORT = {"coop_pixels": ["adapter.epochs=20"], "maple": ["adapter.epochs=2"],
              "dpt": ["adapter.epochs=10", "adapter.pretrain_epochs=5", "adapter.warmup_epochs=2"]}
CURVE_ADAPTERS = "zero_shot,tip,gda,linear_probe,coop"
CURVE_SHOTS = "1,2,4,8,16"
DEMO_BUDGET_S = 600.0
"""A demo estimated to take longer than this runs its quick plan unless ``--full`` is given."""

Job = Callable[[str, str, Path, list[str]], "dict[str, Any] | None"]


def _keys(overrides: list[str]) -> set[str]:
    return {o.lstrip("+~").split("=", 1)[0] for o in overrides}


def demo_overrides(adapter: str, overrides: list[str]) -> list[str]:
    """One demo job's overrides: the demo's defaults first, then the user's (which win key by key)."""
    given = _keys(overrides)
    extra = [] if "backbone" in given else [f"backbone={DEMO_BACKBONE}"]
    extra += [o for o in DEMO_SHORT.get(adapter, []) if o.split("=", 1)[0] not in given]
    return extra + overrides


def demo_datasets(choice: str | None) -> list[str]:
    """digits always; Fashion-MNIST too when its files are installed (Debian's dataset-fashion-mnist)."""
    if choice:
        return choice.split(",")
    from omegaconf import OmegaConf

    from fewclip.config import conf_dir

    names = ["digits"]
    fashion_root = Path(OmegaConf.load(conf_dir() / "dataset" / "fashion_mnist.yaml").root)
    if (fashion_root / "t10k-images-idx3-ubyte.gz").is_file() or (fashion_root / "t10k-images-idx3-ubyte").is_file():
        names.append("fashion_mnist")
    return names


def demo_plan(datasets: list[str], adapters: list[str], overrides: list[str], full: bool, quick_ok: bool,
              budget_s: float | None = None) -> tuple[dict[str, list[str]], list[str]]:
    """The adapters the demo will run on each dataset, and the lines that say so.

    The work is counted in encoder passes (stores per dataset; every epoch of a pixel-mode adapter, at the demo's
    schedules) and timed with the backbone's measured cost per image. Unless ``full``, and when ``quick_ok`` (the
    user named neither the datasets nor the adapters): over ``budget_s`` (default ``DEMO_BUDGET_S``) the plan keeps
    the first dataset and the feature-mode adapters; within it, the pixel-mode adapters run on the first dataset
    only (on the others each would run the prompted image encoder over the whole test split: Fashion-MNIST's 10,000
    images cost more than the rest of its adapters together with fewclip-mini on one core).
    """
    from hydra.utils import get_class, instantiate

    from fewclip.config import check_settings, compose
    from fewclip.estimate import fmt_duration, pixel_adapter_passes, seconds_per_image, store_passes
    from fewclip.runner import instantiate_node

    budget_s = DEMO_BUDGET_S if budget_s is None else budget_s
    cfg = compose([f"dataset={datasets[0]}", *demo_overrides("", overrides)])
    check_settings(cfg)
    backbone = instantiate_node(cfg.backbone)
    # Loaded once: load_backbone keeps the last backbone, so the first job reuses this one.
    per_image, device = seconds_per_image(backbone), backbone.device.type

    def adapter_cfg(name: str, dataset: str) -> Any:
        return compose([f"dataset={dataset}", f"adapter={name}", *demo_overrides(name, overrides)])

    pixel = [a for a in adapters
             if getattr(get_class(adapter_cfg(a, datasets[0]).adapter._target_), "input_kind", "features") == "pixels"]
    cost: dict[tuple[str, str | None], float] = {}
    for name in datasets:
        dcfg = compose([f"dataset={name}", *demo_overrides("", overrides)])
        ds = instantiate_node(dcfg.dataset)
        cost[name, None] = store_passes(ds, int(dcfg.shots), int(dcfg.views)) * per_image
        for a in pixel:
            acfg = adapter_cfg(a, name)
            cost[name, a] = pixel_adapter_passes(instantiate(acfg.adapter), ds, int(acfg.shots)) * per_image

    def total(ds: list[str], ad: list[str]) -> float:
        return sum(v for (d, a), v in cost.items() if d in ds and (a is None or a in ad))

    full_s = total(datasets, adapters)
    lines = [f"demo: backbone {cfg.backbone.name} on {device}, {per_image * 1000:.1f} ms per image; "
             f"estimated encoder time {fmt_duration(full_s)} for {', '.join(datasets)} x {len(adapters)} adapters "
             f"({len(pixel)} on pixels: {', '.join(pixel) or 'none'})"]
    features = [a for a in adapters if a not in pixel]
    if full or not quick_ok or not pixel:
        return {d: adapters for d in datasets}, lines
    if full_s > budget_s:
        lines.append(f"demo: running the quick plan ({datasets[0]}, the {len(features)} feature-mode adapters: "
                     f"about {fmt_duration(total(datasets[:1], features))}); --full runs everything (about "
                     f"{fmt_duration(full_s)})")
        return {datasets[0]: features}, lines
    if len(datasets) > 1:
        saved = full_s - total(datasets[:1], adapters) - total(datasets[1:], features)
        lines.append(f"demo: the pixel-mode adapters run on {datasets[0]} only (on {', '.join(datasets[1:])} they "
                     f"would add about {fmt_duration(saved)} of encoder time); --full runs them there too")
    return {d: adapters if i == 0 else features for i, d in enumerate(datasets)}, lines


def _int_list(text: str) -> list[int]:
    try:
        return [int(k) for k in text.split(",") if k]
    except ValueError:
        raise SystemExit(f"fewclip demo: expected comma-separated integers, got {text!r}") from None


def main(argv: list[str]) -> int:
    """Every adapter on digits (and Fashion-MNIST when installed) with fewclip-mini, tables, accuracy-vs-shots plot."""
    import pandas as pd

    from fewclip.config import compose, group_options
    from fewclip.runner import run

    p = argparse.ArgumentParser(prog="fewclip demo", description=main.__doc__)
    p.add_argument("--out", default="outputs/demo", help="where each job's result.json goes")
    p.add_argument("--adapters", default=None, help="comma-separated subset (default: every adapter)")
    p.add_argument("--datasets", default=None,
                   help="comma-separated datasets (default: digits, plus fashion_mnist when installed)")
    p.add_argument("--full", action="store_true",
                   help="every dataset and adapter even when the estimate is long (pixel-mode adapters with a real "
                        "backbone on a CPU take hours)")
    p.add_argument("--curve", default=CURVE_ADAPTERS, help="adapters of the accuracy-vs-shots curve ('' skips it)")
    p.add_argument("--curve-shots", default=CURVE_SHOTS, help="shot counts of the curve")
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. shots=4 backbone=rn50")
    args = p.parse_args(argv)
    quiet_logging()
    t0 = time.perf_counter()
    adapters = args.adapters.split(",") if args.adapters else group_options("adapter")
    curve = [a for a in args.curve.split(",") if a]
    curve_shots = _int_list(args.curve_shots)
    out = Path(args.out)

    def job(dataset: str, name: str, where: Path, extra: list[str]) -> dict[str, Any] | None:
        cfg = compose([f"dataset={dataset}", f"adapter={name}", *demo_overrides(name, [*extra, *args.overrides])])
        try:
            return run(cfg, out_dir=where)
        except Exception as e:
            if (err := error_line(e)) is None:
                raise
            sys.stderr.write(f"fewclip demo: {err}\n")
            return None

    asked = adapters
    try:
        plan, said = demo_plan(demo_datasets(args.datasets), adapters, args.overrides, args.full,
                               quick_ok=args.datasets is None and args.adapters is None)
    except Exception as e:
        if (err := error_line(e)) is None:
            raise
        sys.stderr.write(f"fewclip demo: {err}\n")
        return 2
    sys.stdout.write("\n".join(said) + "\n")
    sys.stdout.flush()
    datasets, adapters = list(plan), [a for a in asked if any(a in ads for ads in plan.values())]
    if adapters != asked:  # the quick plan's curve keeps to the adapters it runs
        curve = [a for a in curve if a in adapters]
    lines: list[str] = []
    res: dict[str, Any] = {}
    for dataset in datasets:
        rows = []
        for name in plan[dataset]:
            if (res := job(dataset, name, out / dataset / name, [])) is None:
                return 2
            rows.append({"adapter": name, "val acc": res["val_acc"], "test acc": res["test_acc"],
                         "hparams": fmt_hparams(res["hparams"]),
                         "fit+search s": res["timings_s"]["fit"] + res["timings_s"]["search"],
                         "total s": res["timings_s"]["total"]})
        lines += [
            "",
            f"dataset={res['dataset']} backbone={res['backbone']} shots={res['shots']} seed={res['seed']} "
            f"({res['n_classes']} classes, chance {100 / res['n_classes']:.1f}%; {res['n_support']} support "
            f"images x {res['config']['views']} views, {res['n_val']} val, {res['n_test']} test)",
            pd.DataFrame(rows).to_string(index=False, float_format=lambda v: f"{v:.2f}"),
        ]
    given = _keys(args.overrides)
    short = {a: [o for o in DEMO_SHORT[a] if o.split("=", 1)[0] not in given] for a in adapters if a in DEMO_SHORT}
    short = {a: o for a, o in short.items() if o}
    if short:
        lines += ["", "Shortened for the demo (pixel mode runs the image encoder every step): "
                  + "; ".join(f"{a} {' '.join(o)}" for a, o in short.items())
                  + ". `fewclip run` uses the published schedules (conf/adapter/*.yaml)."]
    skipped = {d: [a for a in adapters if a not in plan[d]] for d in datasets}
    if any(skipped.values()):
        lines += ["", "Not run (see the plan above): " + "; ".join(f"{', '.join(a)} on {d}" for d, a in skipped.items()
                                                               if a) + "."]
    if curve and curve_shots:
        table = {(d, a): out / d / a for d in datasets for a in plan[d]}
        lines += _curve(datasets, curve, curve_shots, int(res["shots"]), table, out, job)
    lines += ["", *_backbone_note(res)]
    lines.append(f"result.json files: {out.resolve()}/<dataset>/<adapter>/result.json (demo: "
                 f"{time.perf_counter() - t0:.0f} s)")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


def _curve(datasets: list[str], curve: list[str], shots: list[int], table_shots: int, table: dict[tuple, Path],
           out: Path, job: Job) -> list[str]:
    """Run ``curve`` at each shot count (reusing the table's runs at its shot count), then a table and the plot."""
    from fewclip.report import load_results, plot

    dirs: list[Path] = []
    for dataset in datasets:
        for name in curve:
            for k in shots:
                if k == table_shots and (dataset, name) in table:
                    dirs.append(table[(dataset, name)])
                    continue
                where = out / "curve" / dataset / name / f"k{k}"
                if job(dataset, name, where, [f"shots={k}"]) is None:
                    return ["", f"curve stopped: {dataset} {name} at {k} shots failed (see above)"]
                dirs.append(where)
    df = load_results(dirs)
    lines = []
    for dataset in datasets:
        sub = df[df["dataset"] == dataset].pivot_table(index="adapter", columns="shots", values="test_acc")
        sub = sub.reindex([a for a in curve if a in sub.index])
        lines += ["", f"{dataset}: test accuracy (%) vs shots per class, seed 1",
                  sub.to_string(float_format=lambda v: f"{v:.2f}")]
    try:
        written = plot(df, out / "curve.png", shots=shots)
        lines.append("plot: " + ", ".join(str(p.resolve()) for p in written))
    except ImportError as e:
        lines.append(f"no plot: {e}")
    return lines


def _backbone_note(res: dict[str, Any]) -> list[str]:
    weights = str(res.get("protocol", {}).get("backbone_weights", ""))
    real = [
        "With real CLIP weights (internet once, or a local file):",
        "  fewclip demo backbone=vit_b16",
        "  fewclip run backbone=rn50 backbone.pretrained=/path/to/RN50.bin dataset=folder "
        "dataset.root=/path/to/images adapter=tip",
        "",
    ]
    if weights.startswith("random:"):
        return ["The tiny backbone is RANDOMLY INITIALISED: these accuracies only show that the pipeline works,",
                "they say nothing about the methods.", *real]
    if res.get("backbone") == DEMO_BACKBONE:
        return ["fewclip-mini is a small CLIP trained on public-domain clip art, emoji and typeset characters",
                "(caches/model_configs/fewclip-mini.md): real features, so the methods differ as they should, but",
                "it is not CLIP, and these figures say nothing about the methods' accuracy with CLIP's weights.", *real]
    return []
