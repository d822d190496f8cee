"""Cache building from an image folder vs the bare encoder forward on the same images, pre-decoded.

(a) bare: the images decoded and preprocessed once up front, then ``model.encode_image`` in batches;
(b) build: ``CacheBuilder.features`` from the files: lazy opening, decoding, resize + centre crop, DataLoader
    workers, encoding, normalisation and the store write; everything a real build does.

The ratio (b)/(a) shows whether decoding starves the encoder (target >= 0.9 with enough workers). Images come
from ``--root`` (a folder with ``<class>/<image>`` files, e.g. your data) or, by default, are generated: JPEG
photographs of ``--size`` pixels (500x375, ImageNet's typical size) written to a temporary folder.

    python scripts/bench_folder_throughput.py                               # tiny backbone, 256 JPEGs
    python scripts/bench_folder_throughput.py --model RN50-quickgelu --n-images 64 --workers 2
    python scripts/bench_folder_throughput.py --root /path/to/images

Flags: --model (fewclip-tiny), --root, --n-images (256), --size (500x375), --batch-size (64),
--workers (default: the builder's choice, up to 4), --rounds (3, interleaved, median reported).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def make_images(root: Path, n: int, size: tuple[int, int]) -> None:
    rng = np.random.default_rng(0)
    for i in range(n):
        # Smooth random colour fields: JPEG-compressible like photographs, unlike white noise.
        small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize(size, Image.BICUBIC)
        path = root / f"class{i % 4}" / f"{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path, quality=90)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="fewclip-tiny")
    p.add_argument("--root", default=None)
    p.add_argument("--n-images", type=int, default=256)
    p.add_argument("--size", default="500x375")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    logging.disable(logging.WARNING)

    from caches.backbone import FrozenClip
    from caches.builder import CacheBuilder
    from caches.data.augment import eval_transform
    from caches.data.datasets import load_folder

    backbone = FrozenClip(args.model, None, name=f"{args.model}-random", device="cpu")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.root) if args.root else Path(tmp) / "images"
        if not args.root:
            w, h = (int(v) for v in args.size.split("x"))
            make_images(root, args.n_images, (w, h))
        ds = load_folder(str(root), ["a photo of a {}."], fractions=[0.0, 0.0, 1.0])
        samples = ds.splits["test"][: args.n_images]
        tf = eval_transform(backbone.image_spec)
        t = time.perf_counter()
        pixels = torch.stack([tf(ds.load_image(s)) for s in samples])
        decode_s = time.perf_counter() - t
        bare, build = [], []
        for r in range(args.rounds):
            for mode in (("bare", "build") if r % 2 == 0 else ("build", "bare")):
                t = time.perf_counter()
                if mode == "bare":
                    with torch.no_grad():
                        for i in range(0, len(pixels), args.batch_size):
                            backbone.model.encode_image(pixels[i : i + args.batch_size])
                    bare.append(time.perf_counter() - t)
                else:
                    builder = CacheBuilder(backbone, Path(tmp) / f"cache{r}", batch_size=args.batch_size,
                                           num_workers=args.workers, progress=False)
                    builder.features(ds, "test", samples)
                    build.append(time.perf_counter() - t)
        workers = CacheBuilder(backbone, tmp, num_workers=args.workers)._workers(ds)
    a, b = statistics.median(bare), statistics.median(build)
    n = len(samples)
    print(f"{args.model} (random weights), {n} images from {'--root' if args.root else 'generated JPEGs ' + args.size}"
          f", batch {args.batch_size}, {workers} DataLoader workers, {args.rounds} rounds (median)")
    print(f"  decoding + preprocessing alone (one process): {n / decode_s:.1f} images/s")
    print(f"  (a) bare forward on pre-decoded pixels: {n / a:.1f} images/s")
    print(f"  (b) cache build from the files:         {n / b:.1f} images/s")
    print(f"  ratio (b) / (a): {a / b:.3f}  (target >= 0.9)")


if __name__ == "__main__":
    main()
