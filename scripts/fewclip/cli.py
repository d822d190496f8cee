"""The ``fewclip`` command.

    fewclip run [OVERRIDES...]        one job (Hydra overrides: adapter=tip shots=4 seed=2 ...)
    fewclip run -m [OVERRIDES...]     a sweep (Hydra multirun: adapter=zero_shot,tip seed=1,2,3)
    fewclip demo [--out DIR] [OVERRIDES...]
                                      every adapter on the embedded digits set with the tiny backbone,
                                      then a comparison table
    fewclip fit [OVERRIDES...] [out=DIR]
                                      fit one adapter on your data and write a self-contained artifact
                                      (state, text head, support store, backbone identity, val/test figures)
    fewclip predict ARTIFACT IMAGES... [--out preds.csv] [--topk 5]
                                      classify image files, folders or a CSV of paths with an artifact
    fewclip add-class ARTIFACT NAME [IMAGES...]
                                      add a class to an artifact without refitting (where the method allows)
    fewclip report DIR... [--out DIR] [--format md,csv,latex] [--plot FILE] [--compare published]
                                      tables (mean +- std over seeds) and plots from result.json files
    fewclip data check dataset=NAME [--no-open] [OVERRIDES...]
                                      validate a local copy of a dataset (files, split file, counts,
                                      unreadable images); exit code 1 when something is wrong
    fewclip cache verify [DIR]        sha256 of every file of every store under DIR (default: the cache
                                      directory); exit code 1 and the figures when something mismatches
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from fewclip.console import fmt_hparams, quiet_logging, user_error

log = logging.getLogger("fewclip")

USAGE = __doc__ or ""


def _run_hydra(overrides: list[str]) -> int:
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import DictConfig

    from fewclip import sweep
    from fewclip.config import conf_dir, register_schema
    from fewclip.runner import run

    register_schema()
    sweep.last_summary = None

    @hydra.main(config_path=str(conf_dir()), config_name="config", version_base="1.3")
    def job(cfg: DictConfig) -> None:
        hc = HydraConfig.get()
        multirun = hc.mode == RunMode.MULTIRUN
        out = Path(hc.runtime.output_dir)
        label = f"{cfg.dataset.name} {hc.runtime.choices.adapter} {cfg.backbone.name} k={cfg.shots} seed={cfg.seed}"
        t = time.perf_counter()
        try:
            res = run(cfg)
        except Exception as e:
            err = user_error(e)
            log_file = out / f"{hc.job.name}.log"
            # The whole traceback goes to the job's log file and error.json; the console gets one line.
            try:
                path = sweep.record_failure(out, e, log_file)
                with open(log_file, "a") as f:
                    f.write(json.loads(path.read_text())["traceback"])
            except OSError as record_error:  # the output folder cannot be written either (disk full, read-only)
                log.warning("could not record the failure in %s (%s)", out, record_error)
            if not multirun:
                if err is None:
                    raise
                log.error("%s", err)
                raise SystemExit(2) from None
            log.error("%s failed: %s (%s)", label, err or f"{type(e).__name__}: {e}", out / sweep.ERROR_FILE)
            sweep.job_progress(hc.job.num, f"{label}: FAILED after {time.perf_counter() - t:.1f} s")
            return
        sweep.clear_failure(out)
        line = (f"{label}: val {res['val_acc']:.2f}%  test {res['test_acc']:.2f}%  "
                f"hparams {fmt_hparams(res['hparams'])}")
        if multirun:
            status = "already done, skipped" if res.get("resumed") else f"{time.perf_counter() - t:.1f} s"
            sweep.job_progress(hc.job.num, f"{line}  ({status})")
        else:
            sys.stdout.write(line + "\n")

    from fewclip.config import expand_shorthands

    sys.argv = ["fewclip run", *expand_shorthands(overrides)]
    job()
    if sweep.last_summary is not None and sweep.last_summary["failed"]:
        return 1
    return 0


def _demo_datasets(choice: str | None) -> list[str]:
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


def demo(argv: list[str]) -> int:
    """Every adapter on digits (and Fashion-MNIST when installed) with the tiny backbone, then tables."""
    import pandas as pd

    from fewclip.config import compose, group_options
    from fewclip.runner import run

    p = argparse.ArgumentParser(prog="fewclip demo", description=demo.__doc__)
    p.add_argument("--out", default="outputs/demo", help="where each job's result.json goes")
    p.add_argument("--adapters", default=None, help="comma-separated subset (default: every adapter)")
    p.add_argument("--datasets", default=None,
                   help="comma-separated datasets (default: digits, plus fashion_mnist when installed)")
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. shots=4 backbone=rn50")
    args = p.parse_args(argv)
    quiet_logging()
    adapters = args.adapters.split(",") if args.adapters else group_options("adapter")
    lines: list[str] = []
    weights = ""
    for dataset in _demo_datasets(args.datasets):
        rows = []
        for name in adapters:
            cfg = compose([f"dataset={dataset}", f"adapter={name}", *args.overrides])
            try:
                res = run(cfg, out_dir=Path(args.out) / dataset / name)
            except Exception as e:
                if (err := user_error(e)) is None:
                    raise
                log.error("%s", err)
                return 2
            rows.append({"adapter": name, "val acc": res["val_acc"], "test acc": res["test_acc"],
                         "hparams": fmt_hparams(res["hparams"]),
                         "fit+search s": res["timings_s"]["fit"] + res["timings_s"]["search"],
                         "total s": res["timings_s"]["total"]})
        weights = res["protocol"]["backbone_weights"]
        lines += [
            "",
            f"dataset={res['dataset']} backbone={res['backbone']} shots={res['shots']} seed={res['seed']} "
            f"({res['n_classes']} classes, {res['n_support']} support images x {cfg.views} views, "
            f"{res['n_val']} val, {res['n_test']} test)",
            pd.DataFrame(rows).to_string(index=False, float_format=lambda v: f"{v:.2f}"),
        ]
    lines.append("")
    if weights.startswith("random:"):
        lines += [
            "The tiny backbone is RANDOMLY INITIALISED: these accuracies only show that the pipeline works,",
            "they say nothing about the methods. With real CLIP weights (internet once, or a local file):",
            "  fewclip demo backbone=vit_b16",
            "  fewclip run backbone=rn50 backbone.pretrained=/path/to/RN50.bin dataset=folder "
            "dataset.root=/path/to/images adapter=tip",
            "",
        ]
    lines.append(f"result.json files: {Path(args.out).resolve()}/<dataset>/<adapter>/result.json")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


def data_check(argv: list[str]) -> int:
    """Validate a dataset's local copy and print what is missing with the expected layout."""
    from hydra.utils import instantiate

    from caches.data.check import check_dataset, format_report
    from fewclip.config import compose

    p = argparse.ArgumentParser(prog="fewclip data check", description=data_check.__doc__)
    p.add_argument("--no-open", action="store_true", help="do not open every image (faster)")
    p.add_argument("overrides", nargs="*", help="dataset=NAME and other overrides (dataset.root=...)")
    args = p.parse_args(argv)
    quiet_logging()
    cfg = compose(args.overrides)
    try:
        dataset = instantiate(cfg.dataset)
    except Exception as e:
        if (err := user_error(e)) is None:
            raise
        sys.stdout.write(f"dataset {cfg.dataset.name}: cannot be read\n{err}\n")
        return 1
    report = check_dataset(dataset, open_images=not args.no_open, progress=cfg.progress)
    sys.stdout.write(format_report(report) + "\n")
    return 1 if report.problems else 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        sys.stdout.write(USAGE)
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd == "run":
        return _run_hydra(rest)
    if cmd == "demo":
        return demo(rest)
    if cmd in ("fit", "predict", "add-class"):
        from fewclip import artifact

        entry = {"fit": artifact.fit_main, "predict": artifact.predict_main, "add-class": artifact.add_class_main}
        return entry[cmd](rest)
    if cmd == "report":
        from fewclip.report.cli import main as report_main

        return report_main(rest)
    if cmd == "data" and rest[:1] == ["check"]:
        return data_check(rest[1:])
    if cmd == "cache":
        from fewclip.cache import main as cache_main

        return cache_main(rest)
    sys.stderr.write(f"fewclip: unknown command '{cmd}'\n{USAGE}")
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
