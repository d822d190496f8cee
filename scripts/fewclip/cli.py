"""The ``fewclip`` command.

    fewclip run [OVERRIDES...]        one job (Hydra overrides: adapter=tip shots=4 seed=2 ...)
    fewclip run -m [OVERRIDES...]     a sweep (Hydra multirun: adapter=zero_shot,tip seed=1,2,3)
    fewclip demo [--out DIR] [--full] [--curve a,b] [OVERRIDES...]
                                      every adapter on the embedded digits set (+ Fashion-MNIST when
                                      installed) with the bundled fewclip-mini backbone, then comparison
                                      tables and the accuracy-vs-shots plot
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
import os
import sys
import time
from pathlib import Path
from typing import Any

from fewclip import completion
from fewclip.console import config_error, error_line, fmt_hparams, quiet_logging, user_error

log = logging.getLogger("fewclip")

USAGE = __doc__ or ""


def _job_function(reported: list[BaseException]) -> Any:
    """The Hydra task function of ``fewclip run``: one job; returns its val accuracy (never test), the value
    Hydra's sweepers (Optuna) optimise, or None when the job failed. A single run's bad input is logged in one line
    and appended to ``reported`` (the command then exits 2)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import DictConfig

    from fewclip import sweep
    from fewclip.runner import RESULT_FILE, run

    def job(cfg: DictConfig) -> float | None:
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
                # Reported here in one line; raising would make Hydra add its own "Error executing job" line.
                log.error("%s", err)
                reported.append(err)
                return None
            log.error("%s failed: %s (%s)", label, err or f"{type(e).__name__}: {e}", out / sweep.ERROR_FILE)
            sweep.job_progress(hc.job.num, f"{label}: FAILED after {time.perf_counter() - t:.1f} s")
            return None
        sweep.clear_failure(out)
        line = (f"{label}: val {res['val_acc']:.2f}%  test {res['test_acc']:.2f}%  "
                f"hparams {fmt_hparams(res['hparams'])}")
        if multirun:
            status = "already done, skipped" if res.get("resumed") else f"{time.perf_counter() - t:.1f} s"
            sweep.job_progress(hc.job.num, f"{line}  ({status})")
        else:
            sys.stdout.write(f"{line}\nresult: {out / RESULT_FILE}\n")
        return float(res["val_acc"])

    return job


def _run_hydra(overrides: list[str]) -> int:
    import hydra

    from fewclip import sweep
    from fewclip.config import conf_dir, expand_shorthands, register_schema

    if (done := completion.handle(overrides)) is not None:
        return done
    register_schema()
    sweep.last_summary = None
    reported: list[BaseException] = []
    task = _job_function(reported)
    started = []

    def job(cfg: Any) -> float | None:
        started.append(True)
        return task(cfg)

    main_fn = hydra.main(config_path=str(conf_dir()), config_name="config", version_base="1.3")(job)
    sys.argv = ["fewclip run", *expand_shorthands(overrides)]
    # Hydra prints its own errors and exits 1; with HYDRA_FULL_ERROR they reach us, and a config error (bad
    # override, unknown option, missing value) becomes one line and exit 2, as every other bad input.
    previous = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        main_fn()
    except Exception as e:
        # Before a job started every Hydra/OmegaConf error is the config's; after, only composition errors and
        # missing values (a sweep composes each job), not a bug inside the job.
        msg = config_error(e, any_omegaconf=not started)
        if msg is None:
            raise
        sys.stderr.write(f"fewclip run: {msg}\n")
        return 2
    finally:
        if previous is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = previous
    if reported:
        return 2
    if sweep.last_summary is not None and sweep.last_summary["failed"]:
        return 1
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
    try:
        cfg = compose(args.overrides)
        name = str(cfg.dataset.name)
    except Exception as e:
        if (err := error_line(e)) is None:
            raise
        sys.stderr.write(f"fewclip data check: {err}\n")
        return 2
    try:
        dataset = instantiate(cfg.dataset)
    except Exception as e:
        if (err := user_error(e)) is None:
            raise
        sys.stdout.write(f"dataset {name}: cannot be read\n{err}\n")
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
    if cmd in ("-sc", "--shell-completion"):  # Hydra's flag given before the command: completion is run's
        cmd, rest = "run", argv
    if cmd == "run":
        return _run_hydra(rest)
    if cmd == "demo":
        from fewclip.demo import main as demo_main

        return demo_main(rest)
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
