"""Grown cache vs plain cache: does adding pseudo-labelled pool images to the support set help Tip-Adapter?

Three modes:

* ``--folder ROOT --pool POOL [overrides]``: the real evaluation. ``fewclip run`` twice on the same folder dataset
  (the labelled part), once with the plain cache (``pool.per_class=[0]``) and once with the pool's settings chosen on
  val (``pool.per_class`` without 0), printing val and test accuracy of each. Needs a backbone whose features mean
  something (real CLIP weights, or a trained model); the random ``tiny`` one says nothing.
* ``--write-fashion-mnist DIR``: writes an evaluation set for the folder mode from Debian's
  ``dataset-fashion-mnist`` (never seen by fewclip-mini's training): ``DIR/labelled/{train,val,test}/<class>/*.png``
  (``--shots`` training images per class, ``--val-per-class``, ``--test-per-class`` from the official test set) and
  ``DIR/pool/*.png``, ``--pool-size`` other training images with neutral names (the classes come out roughly
  balanced, as a random sample does). Their true classes go to ``DIR/pool_labels.csv``, outside the pool, read
  only by ``--pool-labels`` to score the pseudo-labels afterwards. All seeded.
* ``--synthetic``: the mechanism on synthetic features with class structure (no images, no backbone): a few labelled
  shots per class, an unlabeled pool drawn from the same classes plus distractors, a noisy text head. The pool
  settings are chosen on val, test is scored once per side.

    python scripts/eval_pool.py --synthetic
    python scripts/eval_pool.py --write-fashion-mnist /tmp/fm --shots 4
    python scripts/eval_pool.py --folder /tmp/fm/labelled --pool /tmp/fm/pool backbone=mini shots=4
    python scripts/eval_pool.py --folder data/labelled --pool data/unlabeled backbone=vit_b16 shots=2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adapters.base import AdapterContext, FeatureSplit, SupportSet, evaluate  # noqa: E402
from adapters.tip import TipAdapter  # noqa: E402
from caches.pool import PoolChoice, grow, retrieve  # noqa: E402
from caches.search import KeyIndex, build_index  # noqa: E402


def synthetic(args: argparse.Namespace) -> None:
    g = torch.Generator().manual_seed(args.seed)
    c, d, latent = args.classes, args.dim, 32
    basis = torch.linalg.qr(torch.randn(d, latent, generator=g))[0].t()
    centres = torch.randn(c, latent, generator=g)

    def draw(per: int, noise: float = 1.2) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.arange(c).repeat_interleave(per)
        x = (centres[y] + noise * torch.randn(len(y), latent, generator=g)) @ basis
        return F.normalize(x + 0.05 * torch.randn(len(y), d, generator=g), dim=-1), y

    shots, shot_y = draw(args.shots)
    val, val_y = draw(4)
    test, test_y = draw(50)
    pool, _ = draw(args.pool_per_class)  # the pool's labels are never used
    distractors = F.normalize(torch.randn(args.distractors, d, generator=g), dim=-1)
    pool = torch.cat([pool, distractors])
    text = F.normalize((centres + 1.0 * torch.randn(c, latent, generator=g)) @ basis, dim=-1)
    index = KeyIndex(build_index(pool.numpy(), "Flat"))
    val_split, test_split = FeatureSplit(val, val_y), FeatureSplit(test, test_y)

    def fit(keys: torch.Tensor, labels: torch.Tensor) -> TipAdapter:
        tip = TipAdapter(beta_steps=40, alpha_steps=20)
        tip.setup(AdapterContext(classnames=[str(i) for i in range(c)], text_head=text,
                                 support=SupportSet(keys, labels)))
        tip.tune(val_split)
        return tip

    plain = fit(shots, shot_y)
    rows = [("plain cache", len(shot_y), evaluate(plain, val_split), plain)]
    best = None
    for m in (4, 8, 16, 32):
        for by in ("text", "image", "both"):
            cands = retrieve(index, text, shots, shot_y, m, by)
            for th in (0.0, 0.5):
                grown = grow(pool, cands, text, th)
                keys, labels = torch.cat([shots, pool[grown.rows]]), torch.cat([shot_y, grown.labels])
                tip = fit(keys, labels)
                acc = evaluate(tip, val_split)
                if best is None or acc > best[2]:
                    true = grown.rows < c * args.pool_per_class  # not a distractor
                    right = (grown.labels == torch.arange(c).repeat_interleave(args.pool_per_class)[
                        grown.rows.clamp_max(c * args.pool_per_class - 1)]) & true
                    best = (PoolChoice(m, by, th), len(labels), acc, tip, float(right.float().mean()) if len(grown)
                            else float("nan"))
    choice, n, acc, tip, purity = best
    rows.append((f"grown cache ({choice.per_class}/class by {choice.by}, threshold {choice.threshold}; "
                 f"{100 * purity:.0f}% of pool labels right)", n, acc, tip))
    print(f"synthetic: {c} classes, D = {d}, {args.shots} shots, pool of {c * args.pool_per_class} + "
          f"{args.distractors} distractors; Tip-Adapter, (beta, alpha) and the pool settings chosen on val")
    print("| cache | keys | val | test |\n|---|---:|---:|---:|")
    for name, n, val_acc, model in rows:
        print(f"| {name} | {n} | {val_acc:.2f} | {evaluate(model, test_split):.2f} |")


def write_fashion_mnist(args: argparse.Namespace) -> None:
    import numpy as np
    from PIL import Image

    from caches.data.datasets import FASHION_CLASSES, read_idx

    src = Path(args.fashion_root)

    def idx(stem: str) -> np.ndarray:
        return read_idx(next(f for f in (src / f"{stem}.gz", src / stem) if f.is_file()))

    train_x, train_y = idx("train-images-idx3-ubyte"), idx("train-labels-idx1-ubyte")
    test_x, test_y = idx("t10k-images-idx3-ubyte"), idx("t10k-labels-idx1-ubyte")
    rng = np.random.default_rng(args.seed)
    out = Path(args.write_fashion_mnist)
    names = [c.replace("/", " or ").replace(" ", "_") for c in FASHION_CLASSES]  # folder names: _ reads as a space
    used = np.zeros(len(train_y), bool)
    plan = (("train", args.shots, train_x, train_y), ("val", args.val_per_class, train_x, train_y),
            ("test", args.test_per_class, test_x, test_y))
    for split, per, x, y in plan:
        for c, name in enumerate(names):
            free = np.flatnonzero((y == c) & (~used if split != "test" else True))
            rows = rng.choice(free, per, replace=False)
            if split != "test":
                used[rows] = True
            (out / "labelled" / split / name).mkdir(parents=True, exist_ok=True)
            for r in rows:
                Image.fromarray(x[r], mode="L").save(out / "labelled" / split / name / f"{split}{r:05d}.png")
    pool = rng.choice(np.flatnonzero(~used), args.pool_size, replace=False)
    (out / "pool").mkdir(parents=True, exist_ok=True)
    truth = ["id,classname"]
    for i, r in enumerate(rng.permutation(pool)):
        Image.fromarray(train_x[r], mode="L").save(out / "pool" / f"{i:05d}.png")
        truth.append(f"{i:05d}.png,{names[train_y[r]].replace('_', ' ')}")
    (out / "pool_labels.csv").write_text("\n".join(truth) + "\n")
    counts = np.bincount(train_y[pool], minlength=len(names))
    print(f"wrote {out}/labelled ({args.shots} train, {args.val_per_class} val, {args.test_per_class} test per class; "
          f"{len(names)} classes), {out}/pool ({args.pool_size} images; per class {counts.tolist()}) and "
          f"{out}/pool_labels.csv")


def pseudo_label_purity(meta_csv: Path, truth_csv: Path) -> tuple[int, int]:
    """(right, total) pseudo-labels among the pool rows of a grown store's ``meta.csv``, by the true classes."""
    import csv

    with open(truth_csv, newline="") as f:
        truth = {r["id"]: r["classname"] for r in csv.DictReader(f)}
    with open(meta_csv, newline="") as f:
        pool_rows = [r for r in csv.DictReader(f) if r["source"] == "pool"]
    return sum(truth[r["id"]] == r["classname"] for r in pool_rows), len(pool_rows)


def folder(args: argparse.Namespace, overrides: list[str]) -> None:
    out = Path(tempfile.mkdtemp(prefix="eval_pool-"))
    results = {}
    for name, pool_args in (("plain", ["pool.per_class=[0]"]), ("grown", ["pool.per_class=[4,8,16,32]"])):
        run_dir = out / name
        subprocess.run([sys.executable, "-m", "fewclip", "run", "dataset=folder", f"dataset.root={args.folder}",
                        "adapter=tip", f"pool={args.pool}", *pool_args, *overrides, f"hydra.run.dir={run_dir}"],
                       check=True)
        results[name] = json.loads((run_dir / "result.json").read_text())
    print(f"val {results['plain']['n_val']} images, test {results['plain']['n_test']} images")
    print("| cache | keys | val | test | pool setting | pool labels right |\n|---|---:|---:|---:|---|---:|")
    for name, r in results.items():
        right = "-"
        if args.pool_labels and r.get("pool", {}).get("added"):
            ok, n = pseudo_label_purity(Path(r["cache"]["support"]["path"]) / "meta.csv", Path(args.pool_labels))
            right = f"{ok}/{n}"
        print(f"| {name} | {r['n_support']} | {r['val_acc']:.2f} | {r['test_acc']:.2f} | "
              f"{r.get('pool', {}).get('chosen')} | {right} |")
    print(f"load average {os.getloadavg()}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--synthetic", action="store_true")
    p.add_argument("--folder")
    p.add_argument("--pool")
    p.add_argument("--classes", type=int, default=50)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--shots", type=int, default=2)
    p.add_argument("--pool-per-class", type=int, default=40)
    p.add_argument("--distractors", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--write-fashion-mnist", metavar="DIR")
    p.add_argument("--fashion-root", default="/usr/share/datasets/fashion-mnist")
    p.add_argument("--val-per-class", type=int, default=20)
    p.add_argument("--test-per-class", type=int, default=100)
    p.add_argument("--pool-size", type=int, default=2000)
    p.add_argument("--pool-labels", help="CSV (id, classname) of the pool's true classes, to score pseudo-labels")
    args, overrides = p.parse_known_args()
    if args.write_fashion_mnist:
        write_fashion_mnist(args)
    elif args.synthetic:
        synthetic(args)
    elif args.folder and args.pool:
        folder(args, overrides)
    else:
        p.error("give --synthetic, --write-fashion-mnist DIR, or --folder ROOT --pool POOL")


if __name__ == "__main__":
    main()
