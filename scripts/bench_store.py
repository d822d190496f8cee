"""The store layer at ImageNet scale: this fewclip's stores vs the format-1 code path, side by side.

Scale a: 1,000 classes x 16 shots x 10 augmented views, D = 1024 (RN50): a support store of 16,000 images,
655 MB of per-view features. The features are synthetic (seeded, normalised; the encoder is replaced by a lookup
on both sides, so only the store layer is timed). Three operations, each run by both sides on the same data:

* **warm load**: open the support store (verification included) and read what a run reads from it: keys
  ``[N, D]``, labels ``[N]`` and views ``[A, N, D]``;
* **cold build**: ``CacheBuilder.support`` into an empty cache directory: the feature bank is written, then the
  store (before: the views are written into the bank chunk, then copied into the store, with four full sha256
  passes; after: written once into the bank, the store records where its rows are);
* **store from bank**: ``CacheBuilder.support`` for a new seed whose images are all in a bank that also holds
  another 16,000 images' chunks (before: every chunk is verified in full, including those it takes nothing from;
  after: only the chunks it takes rows from are opened, checked by size and mtime).

"before" is the store code of git revision ``--before`` (default: the last commit with store format 1), loaded
as separate modules from ``git show``; "after" is this checkout. Rounds are interleaved (before, after, before,
...); each side's views, keys and labels must be identical, bit for bit. Prints min and median seconds per
operation and the machine's load average.

    python scripts/bench_store.py                  # scale a, 3 rounds (about 6 GB on disk in a temp dir)
    python scripts/bench_store.py --classes 100 --dim 512 --rounds 2   # scale b, quick

Flags: --classes (1000), --shots (16), --views (10), --dim (1024), --rounds (3), --before (git revision),
--tmp (temporary directory root; default the system's).
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from caches import builder as after_builder  # noqa: E402
from caches import store as after_store  # noqa: E402
from caches.backbone import ImageSpec  # noqa: E402
from caches.data.records import ImageDataset, Sample  # noqa: E402

BEFORE_REV = "477b121"  # main before store format 2


def load_before(rev: str) -> tuple[types.ModuleType, types.ModuleType]:
    """``caches/store.py``, ``caches/locks.py`` and ``caches/builder.py`` of ``rev`` as separate modules (the
    builder's imports of the other two are pointed at them)."""
    def source(path: str) -> str:
        return subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{path}"], check=True, capture_output=True,
                              text=True).stdout

    mods: dict[str, types.ModuleType] = {}
    for name, path in (("before_store", "caches/store.py"), ("before_locks", "caches/locks.py"),
                       ("before_builder", "caches/builder.py")):
        text = source(path).replace("from caches.store import", "from before_store import") \
                           .replace("from caches.locks import", "from before_locks import")
        spec = importlib.util.spec_from_loader(name, loader=None)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        exec(compile(text, f"{rev}:{path}", "exec"), mod.__dict__)
        mods[name] = mod
    return mods["before_store"], mods["before_builder"]


class FakeBackbone:
    """What the builder asks of a backbone, without a model (the encoder is replaced by a lookup)."""

    def __init__(self, dim: int) -> None:
        self.name, self.dim, self.device = "bench", dim, torch.device("cpu")
        self.image_spec = ImageSpec(224, (0.48, 0.46, 0.41), (0.27, 0.26, 0.28))

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "dim": self.dim, "weights_id": "synthetic"}


def make_dataset(classes: int, per_class: int) -> ImageDataset:
    train = [Sample(id=f"train/{c:04d}/{i:03d}", label=c) for c in range(classes) for i in range(per_class)]
    return ImageDataset(name="scale", classnames=[f"class {c}" for c in range(classes)],
                        templates=["a photo of a {}."], splits={"train": train, "val": [], "test": []},
                        source={"kind": "synthetic"}, in_memory=True)


def synthetic_views(n: int, views: int, dim: int, seed: int = 0) -> torch.Tensor:
    """``[A, n, D]`` float32, each row L2-normalised."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(views, n, dim, generator=g)
    return torch.nn.functional.normalize(x, dim=-1)


def patch_encoder(b: Any, table: torch.Tensor, index: dict[str, int]) -> None:
    """Both sides' encoders become a lookup of ``table`` ``[A, M, D]`` by sample id."""
    def lookup(samples):
        rows = torch.tensor([index[s.id] for s in samples])
        return table[:, rows].clone(), torch.ones(len(samples), dtype=torch.bool)

    if hasattr(b, "encode_chunks"):  # after: a chunk at a time, as the real encoder yields them
        per = max(1, b.chunk_images // table.shape[0])

        def encode_chunks(dataset, samples, to_views, n_views, desc):
            for start in range(0, len(samples), per):
                part = list(samples[start:start + per])
                feats, ok = lookup(part)
                b.encoded_images += len(part) * n_views
                yield feats, ok, part
        b.encode_chunks = encode_chunks
    else:
        def encode(dataset, samples, to_views, n_views, desc):
            b.encoded_images += len(samples) * n_views
            return lookup(samples)
        b.encode = encode


def timed(fn: Callable[..., Any], *args: Any) -> tuple[float, Any]:
    t = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t, out


def warm_load(store_mod: types.ModuleType, path: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What a run reads from its support store: keys, labels, views (verification included)."""
    s = store_mod.KVStore.load(path)
    return s.keys(), s.labels(), s.view_features()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--shots", type=int, default=16)
    p.add_argument("--views", type=int, default=10)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--before", default=BEFORE_REV)
    p.add_argument("--tmp", default=None)
    args = p.parse_args()
    logging.disable(logging.WARNING)
    torch.set_num_threads(1)

    before_store, before_builder = load_before(args.before)
    sides = {"before": (before_store, before_builder), "after": (after_store, after_builder)}
    ds = make_dataset(args.classes, 2 * args.shots)
    train = ds.splits["train"]
    # Two disjoint draws of K per class: the run's support set, and another run's (the bank holds both).
    run_set = [s for s in train if int(s.id.rsplit("/", 1)[1]) < args.shots]
    other_set = [s for s in train if int(s.id.rsplit("/", 1)[1]) >= args.shots]
    table = synthetic_views(len(train), args.views, args.dim)
    index = {s.id: i for i, s in enumerate(train)}
    backbone = FakeBackbone(args.dim)
    n = len(run_set)
    gb = args.views * n * args.dim * 4 / 1e9
    print(f"scale: {args.classes} classes x {args.shots} shots x {args.views} views, D={args.dim}: "
          f"{n} support images, views {gb:.2f} GB; before = {args.before}, after = this checkout")

    def builder(side: str, cache: Path) -> Any:
        b = sides[side][1].CacheBuilder(backbone, cache, progress=False)
        patch_encoder(b, table, index)
        return b

    times: dict[tuple[str, str], list[float]] = {}
    loads: list[tuple[float, float, float]] = []
    reference: dict[str, tuple[torch.Tensor, ...]] = {}
    with tempfile.TemporaryDirectory(prefix="fewclip-bench-store-", dir=args.tmp) as tmp:
        tmp = Path(tmp)
        banks: dict[str, Path] = {}
        for side in sides:  # a bank holding both draws, for the store-from-bank builds
            banks[side] = tmp / f"bank-{side}"
            b = builder(side, banks[side])
            b.support(ds, other_set, args.shots, 99, views=args.views)
            b.support(ds, run_set, args.shots, 98, views=args.views)
        for r in range(args.rounds):
            for side in (("before", "after") if r % 2 == 0 else ("after", "before")):
                cold = tmp / f"cold-{side}-{r}"
                b = builder(side, cold)
                t, store = timed(b.support, ds, run_set, args.shots, 1, args.views)
                times.setdefault(("cold build", side), []).append(t)
                path = store.path
                del store
                t, arrays = timed(warm_load, sides[side][0], path)
                times.setdefault(("warm load", side), []).append(t)
                if side in reference:
                    assert all(torch.equal(x, y) for x, y in zip(arrays, reference[side]))
                reference[side] = arrays
                del arrays
                shutil.rmtree(cold)

                b = builder(side, banks[side])
                t, store = timed(b.support, ds, run_set, args.shots, 1000 + r, args.views)
                assert b.encoded_images == 0
                times.setdefault(("store from bank", side), []).append(t)
                assert torch.equal(store.view_features(), reference[side][2])
                shutil.rmtree(store.path)
                del store
            loads.append(os.getloadavg())
        same = all(torch.equal(a, b) for a, b in zip(reference["before"], reference["after"]))
        assert same, "before and after give different arrays"
        assert torch.equal(reference["after"][2], table[:, [index[s.id] for s in run_set]])

    print(f"identical keys, labels and views on both sides: {same}")
    print(f"{'operation':<18} {'before min / median s':>24} {'after min / median s':>24} {'speed-up (median)':>18}")
    for op in ("warm load", "cold build", "store from bank"):
        b, a = times[(op, "before")], times[(op, "after")]
        print(f"{op:<18} {min(b):>11.2f} / {statistics.median(b):<10.2f} {min(a):>11.2f} / "
              f"{statistics.median(a):<10.2f} {statistics.median(b) / statistics.median(a):>14.1f}x")
    print("load average (1, 5, 15 min) after each round: " +
          "; ".join(f"{a:.2f} {b:.2f} {c:.2f}" for a, b, c in loads))


if __name__ == "__main__":
    main()
