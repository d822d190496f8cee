"""Benchmark of cache-building throughput against the bare image-encoder forward on the same batch.

What it measures
    Images per second of two ways of running the same pre-decoded pixels through a frozen open_clip image
    encoder, and their ratio (b) / (a) (target: at least 0.9, i.e. building a cache costs at most about
    10% more than the forward passes it needs):

    (a) bare forward: ``with torch.no_grad(): backbone.model.encode_image(x)`` in batches of
        ``--batch-size``, outputs discarded;
    (b) the cache path: the same batches through ``CacheBuilder.encode_pixels`` (the encoder call every
        build goes through: no-grad, autocast policy, float32, L2 normalisation), followed by the work a
        ``features`` build does per batch after encoding (moving to the CPU, collecting, concatenating into
        ``[N, D]`` keys, labels and per-row metadata), and by writing the result as a store with
        ``KVStore.write`` (faiss index, ``values.npy``, ``meta.csv``, checksummed manifest, atomic rename,
        then the verifying load it returns). The write is included in (b) and also reported on its own.

    The images are decoded once, before any timing: a ``[N, 3, S, S]`` tensor of normal pixels (already
    "normalised") from a seeded ``torch.Generator``, so neither path pays for image decoding or
    augmentation. The two paths are timed interleaved over ``--rounds`` rounds (their order alternates
    from round to round) and the median of each is reported. Both are warmed up once before timing. Each
    round writes its store to a fresh directory inside a temporary directory, which is deleted at the end.
    torch keeps its default number of threads.

Run
    python scripts/bench_cache_throughput.py                                    # fewclip-tiny, 512 images
    python scripts/bench_cache_throughput.py --model RN50-quickgelu --n-images 64   # RN50-like cost, 224 px

    With the tiny model a round lasts about 50 ms, so a busy machine shows in the numbers: use more rounds
    (``--rounds 15``) for a steadier median. On 2 CPU cores the RN50 run takes about 3 minutes.

Flags
    --model (fewclip-tiny): open_clip architecture, built with random weights (no download); e.g.
        ``RN50-quickgelu`` for the cost of CLIP RN50 at 224 px. The image side is the model's own.
    --n-images (512): images per round (a multiple of --batch-size keeps every batch full).
    --batch-size (64): images per encoder forward.
    --rounds (5): interleaved timing rounds; the median of each path is reported.
    --seed (0): seed of the random pixels.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from caches.backbone import FrozenClip
from caches.builder import CacheBuilder
from caches.store import KVStore
from caches.weights import TINY_MODEL


def load_average() -> str:
    """The 1, 5 and 15 minute load averages of the machine (other processes compete when it is high)."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def bare_forward(model: torch.nn.Module, pixels: torch.Tensor, batch_size: int) -> float:
    """Seconds to run ``model.encode_image`` over ``pixels`` in batches, without gradients."""
    t0 = time.perf_counter()
    with torch.no_grad():
        for i in range(0, pixels.shape[0], batch_size):
            model.encode_image(pixels[i : i + batch_size])
    return time.perf_counter() - t0


def cache_path(builder: CacheBuilder, pixels: torch.Tensor, batch_size: int, store_dir: Path,
               spec: dict[str, Any], classnames: list[str]) -> tuple[float, float, KVStore]:
    """Encode ``pixels`` the way a ``features`` build does and write the store.

    Returns:
        total seconds (encoding + collecting + writing), seconds of ``KVStore.write`` alone, the store.
    """
    n_views = 1  # eval features: one view per image, as in ``CacheBuilder.features``
    t0 = time.perf_counter()
    feats = []
    for i in range(0, pixels.shape[0], batch_size):
        batch = pixels[i : i + batch_size]
        f = builder.encode_pixels(batch)
        feats.append(f.view(batch.shape[0], n_views, -1).transpose(0, 1).cpu())
    keys = torch.cat(feats, dim=1)[0]
    labels = torch.arange(keys.shape[0], dtype=torch.int64) % len(classnames)
    meta = [{"id": f"img{i:06d}", "label": int(c), "classname": classnames[c]}
            for i, c in enumerate(labels.tolist())]
    t1 = time.perf_counter()
    store = KVStore.write(store_dir, spec, keys=keys, values=labels, meta=meta)
    t2 = time.perf_counter()
    return t2 - t0, t2 - t1, store


def main() -> None:
    """Parse flags, build the backbone and the pixels, time both paths interleaved and print the result."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=TINY_MODEL, help="open_clip architecture (random weights)")
    p.add_argument("--n-images", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.n_images < 1 or args.batch_size < 1 or args.rounds < 1:
        p.error("--n-images, --batch-size and --rounds must be >= 1")

    name = "tiny" if args.model == TINY_MODEL else args.model.lower() + "-random"
    backbone = FrozenClip(model=args.model, pretrained=None, name=name, device="cpu")
    size = backbone.image_spec.size
    n_params = sum(t.numel() for t in backbone.model.visual.parameters())
    gen = torch.Generator().manual_seed(args.seed)
    pixels = torch.randn(args.n_images, 3, size, size, generator=gen)  # decoded once, before any timing
    classnames = [f"class{c}" for c in range(10)]
    spec = {"kind": "features", "split": "bench", "backbone": backbone.describe(), "n": args.n_images,
            "seed": args.seed, "transform": "pre-decoded random pixels"}

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs; "
          f"load average {load_average()}")
    print(f"model {args.model} (random init, image tower {n_params / 1e6:.1f} M parameters), "
          f"{size} x {size} px, D = {backbone.dim}")
    print(f"{args.n_images} images per round in batches of {args.batch_size}, {args.rounds} rounds "
          "(interleaved, order alternating), median reported")

    tmp = Path(tempfile.mkdtemp(prefix="fewclip-bench-"))
    try:
        builder = CacheBuilder(backbone, tmp, batch_size=args.batch_size, num_workers=0, progress=False)
        # Warm-up: first calls of the kernels, the allocator and faiss are not part of the timing.
        warm = pixels[: args.batch_size]
        bare_forward(backbone.model, warm, args.batch_size)
        cache_path(builder, warm, args.batch_size, tmp / "warmup", spec, classnames)
        shutil.rmtree(tmp / "warmup")

        bare_s, cache_s, write_s = [], [], []
        for r in range(args.rounds):
            store_dir = tmp / f"features-bench-round{r}"
            for path in (("bare", "cache") if r % 2 == 0 else ("cache", "bare")):
                if path == "bare":
                    bare_s.append(bare_forward(backbone.model, pixels, args.batch_size))
                else:
                    total, write, store = cache_path(builder, pixels, args.batch_size, store_dir, spec,
                                                     classnames)
                    cache_s.append(total)
                    write_s.append(write)
            if len(store) != args.n_images:
                raise RuntimeError(f"store holds {len(store)} rows, expected {args.n_images}")
            shutil.rmtree(store_dir)  # outside the timed region; every round writes a fresh store
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    encode_s = [t - w for t, w in zip(cache_s, write_s)]
    t_bare, t_cache, t_write, t_encode = (statistics.median(x) for x in (bare_s, cache_s, write_s, encode_s))
    n = args.n_images
    print("\nper-round seconds: bare " + " ".join(f"{x:.4f}" for x in bare_s)
          + " | cache " + " ".join(f"{x:.4f}" for x in cache_s)
          + " | write " + " ".join(f"{x:.4f}" for x in write_s))
    print(f"(a) bare encode_image forward:    {n / t_bare:10.1f} images/s  (median {t_bare:.4f} s)")
    print(f"(b) cache path (encode + write):  {n / t_cache:10.1f} images/s  (median {t_cache:.4f} s)")
    print(f"    of which KVStore.write:                         (median {t_write:.4f} s, "
          f"{100 * t_write / t_cache:.2f}% of (b))")
    print(f"    (b) without the write:        {n / t_encode:10.1f} images/s  (median {t_encode:.4f} s)")
    ratio = t_bare / t_cache
    print(f"ratio (b) / (a): {ratio:.3f}  (target >= 0.9: {'met' if ratio >= 0.9 else 'MISSED'}); "
          f"without the write: {t_bare / t_encode:.3f}")
    print(f"load average {load_average()}")


if __name__ == "__main__":
    main()
