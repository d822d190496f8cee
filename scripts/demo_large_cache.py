"""A 100,000-key cache end to end on CPU with an approximate faiss index: ``fewclip run``, ``fewclip fit`` and
``fewclip predict`` on a generated folder dataset, as a user would type them.

The dataset: ``--classes`` class folders (default 1,000) of small PNG images (a class-specific colour pattern plus
noise), split 90/5/5 by fewclip's folder reader, so ``shots=100`` gives a 100,000-key support cache. The backbone is
the randomly initialised tiny model (``backbone=tiny``): the accuracies say nothing about the methods; what is shown
is that a cache of this size is built (each image encoded once), indexed (``cache.index``), read through top-k
search (``lookup`` in result.json), exported and used by ``fewclip predict``. Two more runs on the same cache
(the encoded features are shared; only the index differs) give the reference: ``cache.index=Flat`` with
``adapter.lookup=dense`` (Tip-Adapter's formula over every key) and with ``adapter.lookup=topk`` (the exact top-k);
``--no-compare`` skips them.

    python scripts/demo_large_cache.py --out /tmp/large_cache_demo            # ~30 min on 2 busy cores
    python scripts/demo_large_cache.py --classes 100 --shots 100 --out /tmp/d  # 10,000 keys, a minute or two
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image


def make_folder(root: Path, n_classes: int, per_class: int, size: int = 16, seed: int = 0) -> None:
    """``root/class_XXXX/NNN.png``; written once (an existing complete folder is kept)."""
    done = root / ".complete"
    if done.is_file() and done.read_text() == f"{n_classes} {per_class} {size} {seed}":
        return
    rng = np.random.default_rng(seed)
    for c in range(n_classes):
        pattern = rng.integers(0, 256, (4, 4, 3)).repeat(size // 4, 0).repeat(size // 4, 1).astype(np.float64)
        folder = root / f"class_{c:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = np.clip(pattern + rng.normal(0, 40, pattern.shape), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(folder / f"{i:03d}.png")
    done.write_text(f"{n_classes} {per_class} {size} {seed}")


def fewclip(*args: str) -> str:
    """Run the fewclip command; echo and return its stdout."""
    cmd = [sys.executable, "-m", "fewclip", *args]
    print("$ fewclip " + " ".join(args), flush=True)
    t = time.perf_counter()
    out = subprocess.run(cmd, check=True, text=True, stdout=subprocess.PIPE).stdout
    print(out.rstrip() + f"\n  ({time.perf_counter() - t:.0f} s)", flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--shots", type=int, default=100)
    p.add_argument("--index", default="IVF256,Flat")
    p.add_argument("--no-compare", action="store_true", help="skip the Flat dense and Flat top-k reference runs")
    args = p.parse_args()
    per_class = int(np.ceil(args.shots / 0.9)) + 2
    data, cache = args.out / "images", args.out / "cache"
    t = time.perf_counter()
    make_folder(data, args.classes, per_class)
    print(f"{args.classes} classes x {per_class} images in {data} ({time.perf_counter() - t:.0f} s); "
          f"load average {os.getloadavg()}", flush=True)
    common = ["dataset=folder", f"dataset.root={data}", "dataset.fractions=[0.9,0.05,0.05]", "backbone=tiny",
              f"shots={args.shots}", "views=1", f"cache_dir={cache}", "progress=false", "device=cpu",
              f"cache.index='{args.index}'", "adapter=tip", "adapter.beta_steps=20", "adapter.alpha_steps=10",
              "adapter.topk=[16,64]"]
    fewclip("run", *common, f"hydra.run.dir={args.out / 'run'}")
    result = json.loads((args.out / "run" / "result.json").read_text())
    print("result.json: n_support", result["n_support"], "| lookup", json.dumps(result["lookup"]),
          "| support store", result["cache"]["support"]["path"], "| timings", json.dumps(result["timings_s"]))
    runs = {f"{args.index}, lookup auto": result}
    if not args.no_compare:
        for lookup in ("dense", "topk"):
            name = f"run-flat-{lookup}"
            fewclip("run", *[c for c in common if not c.startswith("cache.index=")], "cache.index=Flat",
                    f"adapter.lookup={lookup}", f"hydra.run.dir={args.out / name}")
            runs[f"Flat, lookup {lookup}"] = json.loads((args.out / name / "result.json").read_text())
    print(f"\n{result['n_support']:,} keys, {result['n_val']:,} val and {result['n_test']:,} test images "
          f"(backbone=tiny: the accuracies say nothing about Tip-Adapter, only whether the lookups agree)")
    print("| index, lookup | ran | k | val | test | fit + search s | run total s |\n|---|---|---:|---:|---:|---:|---:|")
    for name, r in runs.items():
        look, t = r["lookup"] or {}, r["timings_s"]
        print(f"| {name} | {look.get('mode')} ({look.get('class', '-')}, {look.get('search_params') or '-'}) | "
              f"{r['hparams'].get('k', look.get('k', '-'))} | {r['val_acc']:.2f} | {r['test_acc']:.2f} | "
              f"{t.get('fit', 0) + t.get('search', 0):.1f} | {t['total']:.1f} |")
    artifact = args.out / "artifact"
    fewclip("fit", *common, f"out={artifact}")
    some = [str(p) for p in sorted((data / "class_0000").glob("*.png"))[:3]] + \
           [str(p) for p in sorted((data / f"class_{args.classes - 1:04d}").glob("*.png"))[:3]]
    fewclip("predict", str(artifact), *some, "--out", str(args.out / "predictions.csv"), "--topk", "3",
            "--device", "cpu")
    print((args.out / "predictions.csv").read_text())
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from fewclip.artifact import load_artifact

    art = load_artifact(artifact, device="cpu")
    art.predict(some)
    print("the artifact predicts through:", json.dumps(art.adapter.lookup_record()))
    print(f"load average {os.getloadavg()}")


if __name__ == "__main__":
    main()
