"""CoOp epoch time and memory: feature mode (cached augmented views) vs pixel mode (re-encode every step).

Both modes train the same CoOp (same backbone, same support images, same batch size and epochs, no val
evaluation) in separate child processes, one after the other, so each one's peak memory (max RSS) is its own.
The parent prints the per-epoch times, their ratio, the peak memory of each, and the one-time cost of building
the feature cache that feature mode trains on.

    python scripts/bench_coop_modes.py                       # RN50-like cost: random-init RN50 at 224 px
    python scripts/bench_coop_modes.py --model fewclip-tiny  # quick check with the tiny backbone

Flags: --model (open_clip architecture, random weights; default RN50-quickgelu), --shots (4), --classes (10,
digits classes), --epochs (2), --batch-size (32), --views (2, views cached for feature mode), --rounds (1).
Target: feature mode >= 20x faster per epoch at RN50-like cost per image.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def child(args: argparse.Namespace) -> None:
    """Train one mode and print a JSON line with its timings and peak memory."""
    logging.disable(logging.WARNING)
    import torch

    from adapters.base import AdapterContext, SupportSet
    from adapters.coop import CoOp, CoOpPixels
    from caches.backbone import FrozenClip
    from caches.builder import CacheBuilder
    from caches.data.augment import AugmentSpec
    from caches.data.datasets import load_digits
    from caches.data.fewshot import sample_fewshot, select
    from caches.data.pixels import PixelData

    torch.set_num_threads(2)
    backbone = FrozenClip(args.model, None, name=f"{args.model}-random", device="cpu")
    ds = load_digits(["a photo of the number: {}."])
    if args.classes < ds.n_classes:
        from caches.data.records import Sample

        ds.splits = {k: [Sample(s.id, s.label) for s in v if s.label < args.classes] for k, v in ds.splits.items()}
        ds.classnames = ds.classnames[: args.classes]
    fs = sample_fewshot(ds, args.shots, seed=1)
    support_samples = select(ds, "train", fs.train)
    with tempfile.TemporaryDirectory() as cache_dir:
        builder = CacheBuilder(backbone, cache_dir, batch_size=args.batch_size, num_workers=0, progress=False)
        text = builder.text(ds).keys()
        cache_s = 0.0
        if args.child == "features":
            t = time.perf_counter()
            store = builder.support(ds, support_samples, args.shots, 1, views=args.views)
            cache_s = time.perf_counter() - t
            support = SupportSet(store.keys(), store.labels(), store.view_features())
            adapter = CoOp(epochs=args.epochs, batch_size=args.batch_size, optimizer="sgd", lr=0.002,
                           select="last")
        else:
            support = SupportSet(torch.zeros(len(support_samples), backbone.dim),
                                 torch.tensor([s.label for s in support_samples]))
            adapter = CoOpPixels(epochs=args.epochs, batch_size=args.batch_size, optimizer="sgd", lr=0.002,
                                 select="last")
        ctx = AdapterContext(classnames=ds.classnames, text_head=text, support=support, backbone=backbone,
                             progress=False)
        if args.child == "pixels":
            ctx.pixels = PixelData(builder.pixel_split(ds, support_samples), builder.pixel_split(ds, []),
                                   AugmentSpec())
        adapter.setup(ctx)
        t = time.perf_counter()
        adapter.fit(support, None)
        train_s = time.perf_counter() - t
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"mode": args.child, "epoch_s": train_s / args.epochs, "cache_s": cache_s,
                      "peak_rss_mb": peak_mb, "n_support": len(support_samples)}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="RN50-quickgelu")
    p.add_argument("--shots", type=int, default=4)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--views", type=int, default=2)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--child", choices=["features", "pixels"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return
    base = [sys.executable, str(Path(__file__).resolve()), "--model", args.model, "--shots", str(args.shots),
            "--classes", str(args.classes), "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
            "--views", str(args.views)]
    runs: dict[str, list[dict]] = {"features": [], "pixels": []}
    for _ in range(args.rounds):
        for mode in ("features", "pixels"):
            out = subprocess.run(base + ["--child", mode], capture_output=True, text=True, check=True)
            runs[mode].append(json.loads(out.stdout.strip().splitlines()[-1]))
    med = {m: statistics.median(r["epoch_s"] for r in rs) for m, rs in runs.items()}
    mem = {m: max(r["peak_rss_mb"] for r in rs) for m, rs in runs.items()}
    n = runs["features"][0]["n_support"]
    print(f"CoOp on {args.model} (random weights), {n} support images ({args.classes} classes x {args.shots} shots), "
          f"batch {args.batch_size}, {args.epochs} epochs, {args.rounds} round(s)")
    print(f"  feature mode: {med['features']:.3f} s/epoch, peak RSS {mem['features']:.0f} MB "
          f"(+ one-time cache build {runs['features'][0]['cache_s']:.1f} s for {args.views} views)")
    print(f"  pixel mode:   {med['pixels']:.3f} s/epoch, peak RSS {mem['pixels']:.0f} MB")
    print(f"  speed-up per epoch (pixel / feature): {med['pixels'] / med['features']:.1f}x  (target >= 20x)")


if __name__ == "__main__":
    main()
