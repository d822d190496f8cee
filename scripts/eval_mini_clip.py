"""Zero-shot and linear-probe accuracy of a CLIP backbone on digits and Fashion-MNIST (the model card's figures).

* zero-shot: every test image against the dataset's prompt templates (``conf/dataset/<name>.yaml``), top-1 %;
* linear probe: logistic regression on the frozen image features of the train split (Fashion-MNIST: a seeded
  stratified sample of ``--probe-train`` images), C chosen on the val split from 1e-3 ... 1e3, scored on test once.

Images go through the backbone's own evaluation transform (``caches.data.augment.eval_transform``), as in
fewclip's stores. Fashion-MNIST is skipped when its files are not installed.

    python scripts/eval_mini_clip.py                                     # the shipped fewclip-mini
    python scripts/eval_mini_clip.py --weights /tmp/mini.safetensors --out /tmp/mini_eval.json
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger("eval_mini_clip")


def load_dataset(name: str):
    from hydra.utils import instantiate

    from fewclip.config import compose

    # composed as a run would (a dataset's YAML may select other config groups in its defaults list)
    return instantiate(compose([f"dataset={name}"]).dataset)


@torch.no_grad()
def encode_split(backbone, dataset, samples, batch: int = 256) -> torch.Tensor:
    """``[N, D]`` normalised image features with the backbone's eval transform."""
    from caches.data.augment import eval_transform

    tf = eval_transform(backbone.image_spec)
    out = []
    for i in range(0, len(samples), batch):
        x = torch.stack([tf(dataset.load_image(s)) for s in samples[i:i + batch]])
        out.append(backbone.encode_images(x).cpu())
    return torch.cat(out)


def probe(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray, test_x: np.ndarray,
          test_y: np.ndarray) -> dict:
    from sklearn.linear_model import LogisticRegression

    best = (-1.0, None)
    for c in [1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1000.0]:
        clf = LogisticRegression(C=c, max_iter=2000).fit(train_x, train_y)
        acc = float((clf.predict(val_x) == val_y).mean()) * 100
        if acc > best[0]:
            best = (acc, c)
    clf = LogisticRegression(C=best[1], max_iter=2000).fit(train_x, train_y)
    return {"C": best[1], "val_acc": best[0], "test_acc": float((clf.predict(test_x) == test_y).mean()) * 100,
            "n_train": int(len(train_y))}


def evaluate(backbone, name: str, probe_train: int, seed: int) -> dict:
    from caches.data.records import stratified_split

    ds = load_dataset(name)
    t = time.perf_counter()
    splits = {k: list(v) for k, v in ds.splits.items()}
    if len(splits["train"]) > probe_train:
        labels = np.array([s.label for s in splits["train"]])
        keep = stratified_split(labels, [probe_train / len(labels), 1 - probe_train / len(labels)], seed)[0]
        splits["train"] = [splits["train"][i] for i in sorted(keep)]
    feats = {k: encode_split(backbone, ds, v) for k, v in splits.items()}
    labels = {k: np.array([s.label for s in v]) for k, v in splits.items()}
    head = backbone.text_head(ds.classnames, ds.templates)
    zs = {k: float(((feats[k] @ head.T).argmax(1).numpy() == labels[k]).mean()) * 100 for k in ("val", "test")}
    lp = probe(feats["train"].numpy(), labels["train"], feats["val"].numpy(), labels["val"], feats["test"].numpy(),
               labels["test"])
    return {"classes": len(ds.classnames), "chance": 100.0 / len(ds.classnames), "templates": list(ds.templates),
            "n_test": int(len(labels["test"])), "zero_shot_val": zs["val"], "zero_shot_test": zs["test"],
            "linear_probe": lp, "seconds": round(time.perf_counter() - t, 1)}


def main(argv: list[str] | None = None) -> int:
    from caches.backbone import FrozenClip

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="fewclip-mini")
    p.add_argument("--weights", default="fewclip-mini.safetensors",
                   help="weights file (a bare name is looked up in caches/model_configs/)")
    p.add_argument("--datasets", default="digits,fashion_mnist")
    p.add_argument("--probe-train", type=int, default=10000, help="at most this many train images for the probe")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="write the figures as JSON")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    backbone = FrozenClip(args.model, args.weights, device="cpu")
    results = {"model": args.model, "weights_id": backbone.weights_id}
    for name in args.datasets.split(","):
        try:
            results[name] = evaluate(backbone, name, args.probe_train, args.seed)
        except Exception as e:  # Fashion-MNIST not installed: say so and go on
            from caches.data.records import DatasetError

            if not isinstance(e, DatasetError):
                raise
            log.warning("%s skipped: %s", name, e)
            continue
        r = results[name]
        log.info("%s: zero-shot %.2f%% (chance %.1f%%), linear probe %.2f%% (C=%g, %d train images)", name,
                 r["zero_shot_test"], r["chance"], r["linear_probe"]["test_acc"], r["linear_probe"]["C"],
                 r["linear_probe"]["n_train"])
    text = json.dumps(results, indent=1)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
