"""The artifact commands: ``fewclip fit``, ``fewclip predict`` (CSV of class probabilities) and
``fewclip add-class``. Argument parsing, exit codes (2 with one line for bad input) and what is printed."""

from __future__ import annotations

import argparse
import csv
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fewclip.artifact.fitting import fit_run
from fewclip.artifact.format import ArtifactError
from fewclip.artifact.images import collect_images
from fewclip.artifact.predict import FilePredictions, load_artifact
from fewclip.console import fmt_hparams, quiet_logging, user_error


def write_predictions(preds: FilePredictions, classnames: Sequence[str], out: Any, topk: int = 5) -> None:
    """CSV: ``path, status, prediction, probability, top1_class, top1_prob, ..., top<k>_class, top<k>_prob``.

    ``status`` is ``ok`` or ``unreadable: <error>`` (then the other columns are empty).
    """
    k = max(1, min(topk, len(classnames)))
    w = csv.writer(out)
    w.writerow(["path", "status", "prediction", "probability",
                *[f"top{j}_{col}" for j in range(1, k + 1) for col in ("class", "prob")]])
    values, indices = preds.probs.nan_to_num(-1.0).topk(k, dim=-1)
    for i, item in enumerate(preds.items):
        if preds.errors[i] is not None:
            w.writerow([item, f"unreadable: {preds.errors[i]}", "", "", *[""] * (2 * k)])
            continue
        top = [(classnames[j], f"{p:.6f}") for p, j in zip(values[i].tolist(), indices[i].tolist())]
        w.writerow([item, "ok", top[0][0], top[0][1], *[x for pair in top for x in pair]])


def _bad_input(e: BaseException) -> BaseException | None:
    from hydra.errors import ConfigCompositionException, OverrideParseException

    # Config errors (unknown option, bad override) are the user's; an error inside instantiation is not.
    if isinstance(e, (ArtifactError, ConfigCompositionException, OverrideParseException)):
        return e
    return user_error(e)


def _fail(prog: str, e: BaseException) -> int:
    err = _bad_input(e)
    if err is None:
        raise e
    sys.stderr.write(f"{prog}: {str(err).strip()}\n")
    return 2


def _split_out(overrides: list[str], out: str | None) -> tuple[list[str], str | None]:
    """``out=DIR`` among the Hydra overrides is fewclip fit's own option, not a config key."""
    rest = [o for o in overrides if not o.startswith("out=")]
    given = [o.split("=", 1)[1] for o in overrides if o.startswith("out=")]
    return rest, (given[-1] if given else out)


def fit_main(argv: list[str]) -> int:
    """``fewclip fit [OVERRIDES...] out=DIR``: run one job like ``fewclip run`` and write an artifact."""
    p = argparse.ArgumentParser(prog="fewclip fit", description=fit_main.__doc__)
    p.add_argument("--out", default=None, help="artifact directory (same as out=DIR; default "
                                               "artifacts/<dataset>-<adapter>-<backbone>-k<K>-s<seed>)")
    p.add_argument("overrides", nargs="*", help="Hydra overrides as for fewclip run (dataset=folder "
                                                "dataset.root=PATH adapter=tip backbone=rn50 shots=16 ...)")
    args = p.parse_args(argv)
    overrides, out = _split_out(args.overrides, args.out)
    quiet_logging()
    try:
        res, path = fit_run(overrides, out)
    except Exception as e:
        return _fail("fewclip fit", e)
    sys.stdout.write(f"{res['dataset']} {res['adapter']} {res['backbone']} k={res['shots']} seed={res['seed']}: "
                     f"val {res['val_acc']:.2f}%  test {res['test_acc']:.2f}%  hparams {fmt_hparams(res['hparams'])}"
                     f"\nartifact: {path}\n")
    return 0


def _backbone_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    p.add_argument("--pretrained", default=None,
                   help="weights to load instead of the recorded ones (a file or tag); must be the fitted weights")
    p.add_argument("--batch-size", type=int, default=64, help="images per encoder forward")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def predict_main(argv: list[str]) -> int:
    """``fewclip predict ARTIFACT IMAGES...``: class probabilities for images, as CSV."""
    p = argparse.ArgumentParser(prog="fewclip predict", description=predict_main.__doc__)
    p.add_argument("artifact", help="artifact directory written by fewclip fit")
    p.add_argument("images", nargs="+", help="image files, folders (recursive) or CSV files with a 'path' column")
    p.add_argument("--out", default="-", help="CSV file to write ('-', the default: standard output)")
    p.add_argument("--topk", type=int, default=5, help="classes listed per image, most probable first")
    p.add_argument("--num-workers", type=int, default=None,
                   help="image decoding workers (default: 0 on CPU, where the encoder uses every core; 4 on CUDA)")
    _backbone_options(p)
    args = p.parse_args(argv)
    quiet_logging()
    try:
        if args.topk < 1:
            raise ArtifactError(f"--topk must be >= 1, got {args.topk}")
        paths = collect_images(args.images)
        art = load_artifact(args.artifact, device=args.device, pretrained=args.pretrained)
        preds = art.predict_files(paths, batch_size=args.batch_size, num_workers=args.num_workers,
                                  progress=not args.no_progress)
    except Exception as e:
        return _fail("fewclip predict", e)
    if args.out == "-":
        write_predictions(preds, art.classnames, sys.stdout, args.topk)
        sys.stdout.flush()
    else:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "w", newline="") as f:
            write_predictions(preds, art.classnames, f, args.topk)
    bad = preds.unreadable
    n_ok = len(paths) - len(bad)
    lines = [f"fewclip predict: {n_ok} of {len(paths)} images predicted"
             + ("" if args.out == "-" else f" -> {args.out}")]
    if bad:
        lines.append(f"{len(bad)} unreadable (status column of the CSV):")
        lines += [f"  {item}: {err}" for item, err in bad]
    sys.stderr.write("\n".join(lines) + "\n")
    return 0 if n_ok else 1


def add_class_main(argv: list[str]) -> int:
    """``fewclip add-class ARTIFACT NAME [IMAGES...]``: add a class to an artifact without refitting."""
    p = argparse.ArgumentParser(prog="fewclip add-class", description=add_class_main.__doc__)
    p.add_argument("artifact", help="artifact directory written by fewclip fit (updated in place, atomically)")
    p.add_argument("name", help="the new class's name (used in the prompt templates)")
    p.add_argument("images", nargs="*", help="its images: files, folders (recursive) or CSV files with a 'path' "
                                             "column (needed by tip, gda, ape; unused by zero_shot and prompt "
                                             "learners)")
    _backbone_options(p)
    args = p.parse_args(argv)
    quiet_logging()
    try:
        paths = collect_images(args.images) if args.images else []
        art = load_artifact(args.artifact, device=args.device, pretrained=args.pretrained)
        record = art.add_class(args.name, paths, batch_size=args.batch_size, progress=not args.no_progress)
    except Exception as e:
        return _fail("fewclip add-class", e)
    lines = [f"added class '{record['classname']}' to {args.artifact} ({len(art.classnames)} classes): "
             f"{record['how']}; {record['n_images']} images used; hyperparameters kept as chosen on val"]
    lines += [f"  unreadable, not added: {item}: {err}" for item, err in record["unreadable"]]
    sys.stdout.write("\n".join(lines) + "\n")
    return 0
