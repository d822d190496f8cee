"""CoOp in feature mode: the paper's batch of 32 against larger image batches under the linear scaling rule.

Each step of a prompt learner encodes every class prompt once, whatever the number of images in the batch, so a
batch k times larger makes an epoch about k times cheaper. ``CoOp(feature_batch_size=B)`` trains with batch B and
learning rates x B / 32 (same epochs and warmup epochs). This script checks, on a seeded synthetic task, whether
that changes what CoOp learns: the same data, the same initial context, the same seeds, each batch size in turn
(interleaved by seed), printing test accuracy, the val accuracy of the kept epoch, steps and fit seconds, with the
machine load.

The task is ``bench_scale.py``'s prompt task (images around a random-weight text tower's class embeddings from a
hidden CoOp context; the text head is a template), at a reduced size by default: 50 classes, 8 shots (CoOp's
schedule: 100 epochs), 10 views, the text tower of open_clip's ViT-S-16-alt (width 256, 10 layers: a ViT-B-shaped
tower at a fifth of the cost).

    python scripts/bench_coop_batch.py                         # batch 32 vs 256, seed 1
    python scripts/bench_coop_batch.py --batches 32,128,256 --seeds 1,2 --shots 8 --classes 50
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--classes", type=int, default=50)
    ap.add_argument("--shots", type=int, default=8)
    ap.add_argument("--views", type=int, default=10)
    ap.add_argument("--tower", default="ViT-S-16-alt")
    ap.add_argument("--batches", default="32,256")
    ap.add_argument("--lr-rule", default="linear", choices=["linear", "sqrt"],
                    help="learning rates x k (linear) or x sqrt(k) for a batch k times the paper's")
    ap.add_argument("--seeds", default="1")
    ap.add_argument("--epochs", type=int, default=0, help="0: CoOp's schedule by shots")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    import bench_scale
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    from adapters.base import AdapterContext, accuracy
    from caches.backbone import FrozenClip

    backbone = FrozenClip(args.tower, None, name=f"{args.tower}-random", device="cpu")
    names = bench_scale.class_names(args.classes)
    scale = dict(bench_scale.SCALES["b"], classes=args.classes, shots=args.shots, views=args.views,
                 dim=backbone.dim, test=20 * args.classes)
    data = bench_scale.prompt_data(scale, backbone, names)
    zs = accuracy(data["test"].features @ data["text"].t(), data["test"].labels)
    print(f"# {args.classes} classes x {args.shots} shots x {args.views} views, {args.tower} text tower (random), "
          f"test {len(data['test'])}: bayes {data['bayes']:.1f}%, zero-shot {zs:.1f}%, nearest mean of the shots "
          f"{data['nearest_mean']:.1f}%; threads {torch.get_num_threads()}, load {os.getloadavg()}", flush=True)
    print(f"# learning-rate rule for larger batches: {args.lr_rule}")
    print("| seed | batch | lr | epochs | steps | val acc (kept epoch) | test acc | fit s | load before / after |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---|", flush=True)
    for seed in [int(s) for s in args.seeds.split(",")]:
        for batch in [int(b) for b in args.batches.split(",")]:
            adapter = bench_scale.make_adapter("coop", {"feature_batch_size": batch, "epochs": args.epochs,
                                                           "feature_lr_rule": args.lr_rule})
            ctx = AdapterContext(classnames=names, text_head=data["text"], support=data["support"],
                                 backbone=backbone, seed=seed, progress=False)
            load = os.getloadavg()[0]
            t = time.perf_counter()
            adapter.setup(ctx)
            record = adapter.fit(data["support"], data["val"])
            fit_s = time.perf_counter() - t
            spec = adapter.effective_spec()
            acc = accuracy(adapter.predict(data["test"].features), data["test"].labels)
            steps = record["optimisation"]["iterations"]
            val = record["val_acc"][record["best_epoch"] - 1]
            print(f"| {seed} | {spec.batch_size} | {spec.lr:g} | {spec.epochs} | {steps} | {val:.1f} | {acc:.1f} | "
                  f"{fit_s:.0f} | {load:.1f} / {os.getloadavg()[0]:.1f} |", flush=True)


if __name__ == "__main__":
    main()
