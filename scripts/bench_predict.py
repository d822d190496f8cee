"""Artifact prediction from image files vs the bare encoder forward on the same images, pre-decoded; load time.

(a) bare: the images decoded and preprocessed once up front, then ``model.encode_image`` in batches;
(b) predict: ``Artifact.predict`` on the file paths: opening, decoding, resize + centre crop, encoding, the
    adapter's logits and the softmax; everything ``fewclip predict`` does except writing the CSV.

The ratio (b)/(a) shows what the prediction path costs on top of the encoder (target >= 0.9 with a paper-sized
backbone). The artifact is fitted first on a small generated folder (2 classes x 5 images, 1 shot, 1 view: a few
encoder passes) with randomly initialised weights of ``--model`` (open_clip ``create_model``, ``pretrained=None``),
which cost what the trained weights cost. Load time is reported twice: building the backbone from the artifact's
record (random initialisation here, reading a weights file in real use) plus the artifact, and the artifact alone
(stores verified and read, adapter rebuilt) with the backbone already in memory.

    python scripts/bench_predict.py                                          # tiny backbone, 256 JPEGs
    python scripts/bench_predict.py --model RN50-quickgelu --n-images 48     # RN50 cost (~2-6 images/s on 2 cores)

Flags: --model (fewclip-tiny), --adapter (tip), --n-images (256), --size (500x375), --batch-size (32),
--workers (default: the artifact's choice, 0 on CPU), --rounds (3, interleaved, median reported).
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


def make_images(root: Path, n: int, size: tuple[int, int], classes: int = 4, seed: int = 0) -> list[Path]:
    """``n`` JPEG photographs of ``size`` under ``root/class<i>/``: smooth random colour fields (they compress like
    photographs, unlike white noise)."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        path = root / f"class{i % classes}" / f"{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(small).resize(size, Image.BICUBIC).save(path, quality=90)
        paths.append(path)
    return paths


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="fewclip-tiny")
    p.add_argument("--adapter", default="tip")
    p.add_argument("--n-images", type=int, default=256)
    p.add_argument("--size", default="500x375")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    logging.disable(logging.WARNING)

    from caches import backbone as backbone_module
    from fewclip.artifact import fit, load_artifact

    w, h = (int(v) for v in args.size.split("x"))
    name = f"{args.model}-random"
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        make_images(tmp_path / "fit", 10, (w, h), classes=2, seed=1)
        t = time.perf_counter()
        fit(dataset=tmp_path / "fit", adapter=args.adapter, backbone="open_clip", shots=1, out=tmp_path / "artifact",
            device="cpu", views=1, cache_dir=str(tmp_path / "cache"), progress=False,
            **{"backbone.model": args.model, "backbone.pretrained": None, "backbone.name": name})
        fit_s = time.perf_counter() - t

        backbone_module._LOADED.clear()  # load from the artifact's record, as a fresh process would
        t = time.perf_counter()
        art = load_artifact(tmp_path / "artifact", device="cpu")
        load_full_s = time.perf_counter() - t
        t = time.perf_counter()
        load_artifact(tmp_path / "artifact", backbone=art.backbone)
        load_s = time.perf_counter() - t

        paths = [str(x) for x in make_images(tmp_path / "images", args.n_images, (w, h))]
        t = time.perf_counter()
        pixels = torch.stack([art.transform(Image.open(x).convert("RGB")) for x in paths])
        decode_s = time.perf_counter() - t
        model = art.backbone.model
        bare, predict = [], []
        for r in range(args.rounds):
            for mode in (("bare", "predict") if r % 2 == 0 else ("predict", "bare")):
                t = time.perf_counter()
                if mode == "bare":
                    with torch.no_grad():
                        for i in range(0, len(pixels), args.batch_size):
                            model.encode_image(pixels[i : i + args.batch_size])
                    bare.append(time.perf_counter() - t)
                else:
                    art.predict_files(paths, batch_size=args.batch_size, num_workers=args.workers)
                    predict.append(time.perf_counter() - t)
        workers = art._workers(args.workers, paths)
    a, b = statistics.median(bare), statistics.median(predict)
    n = len(paths)
    print(f"{args.model} (random weights), adapter {args.adapter}, {n} generated JPEGs {args.size}, batch "
          f"{args.batch_size}, {workers} DataLoader workers, {args.rounds} rounds (median), "
          f"{torch.get_num_threads()} torch threads")
    print(f"  fit of the artifact (2 classes x 5 images, 1 shot, 1 view): {fit_s:.2f} s")
    print(f"  artifact load, backbone built from its record: {load_full_s:.2f} s; with the backbone in memory: "
          f"{load_s * 1000:.0f} ms")
    print(f"  decoding + preprocessing alone (one process): {n / decode_s:.1f} images/s")
    print(f"  (a) bare forward on pre-decoded pixels: {n / a:.2f} images/s")
    print(f"  (b) Artifact.predict from the files:    {n / b:.2f} images/s")
    print(f"  ratio (b) / (a): {a / b:.3f}  (target >= 0.9 with a paper-sized backbone)")


if __name__ == "__main__":
    main()
