"""The costly steps of APE, Tip-Adapter and Tip-Adapter-F at ImageNet scale, in this tree and in a baseline revision.

What it measures, on the same synthetic data (``bench_scale.make_data`` at scale ``a``: 1,000 classes x 16 shots,
D = 1024, val 4 per class; ``--views`` cached views per shot, 2 by default: a step's cost does not depend on it):

* ``ape_beta``: one beta of APE's (beta, alpha, gamma) search on val (``APE._search`` over the first ``--betas``
  betas of the reference's ImageNet grid, 200 x 20 x 5; the figure is the time per beta; ``ape_prepare`` the
  search's set-up, the val affinities);
* ``tip_beta``: the same for Tip-Adapter's (beta, alpha) search (200 x 20);
* ``tipf_step``: one Tip-Adapter-F training step (batch 256: forward, loss, backward, AdamW), as ``train`` runs it
  (``training.probe_step_seconds``); a training epoch is 63 of them (16,000 images, one view each);
* ``tipf_val``: one val evaluation of Tip-Adapter-F (4,000 queries against the 16,000 keys), run every epoch to
  choose the epoch.

Both trees run the same code path on the same data, each in its own child process (``PYTHONPATH`` set to the tree;
the baseline is ``git archive REV`` unpacked to a temporary folder), rounds interleaved; min and median over the
rounds, and the machine load (``os.getloadavg()``) with every round. Results must agree: APE's and Tip's best
point and val accuracy over the searched betas are equal; Tip-F's keys after ``--check-steps`` real steps from
the same start agree to float rounding (the optimiser update is the same formula, its kernel may round
differently: the largest difference is printed).

    python scripts/bench_scale_hotspots.py --baseline 77e49df --rounds 3
    python scripts/bench_scale_hotspots.py --baseline HEAD~3 --only ape_beta,tip_beta --betas 4

One thread per child by default (``--threads``), as the scale benchmark runs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PARTS = ["ape_beta", "tip_beta", "tipf_step", "tipf_val"]


def child(args: argparse.Namespace) -> dict[str, Any]:
    sys.path[:0] = [os.getcwd(), os.path.join(os.getcwd(), "scripts")]
    import torch

    torch.set_num_threads(args.threads)
    from bench_scale import SCALES, make_data

    from adapters.ape import APE
    from adapters.base import AdapterContext
    from adapters.tip import TipAdapter
    from adapters.tip_f import TipAdapterF
    from adapters.training import probe_step_seconds, view_batches
    from adapters.tuning import evaluate

    scale = dict(SCALES["a"], views=args.views, test=10)
    data = make_data(scale, seed=0)
    support, val, text = data["support"], data["val"], data["text"]
    names = [f"c{i}" for i in range(text.shape[0])]

    def ctx() -> AdapterContext:
        return AdapterContext(classnames=names, text_head=text, support=support, seed=1, progress=False)

    out: dict[str, Any] = {}
    parts = args.only.split(",")
    for name, cls, kw in (("ape_beta", APE, {"gamma_max": 0.5, "gamma_steps": 5}), ("tip_beta", TipAdapter, {})):
        if name not in parts:
            continue
        adapter = cls(lookup="dense", **kw)
        adapter.setup(ctx())
        grid = adapter.hparam_grid()
        best, acc, timing = adapter._search(val, grid, n_betas=args.betas)
        out[name] = timing["per_beta_s"]
        out[name.replace("beta", "prepare")] = timing["prepare_s"]
        out[name + "_result"] = [list(best), acc]
    if "tipf_step" in parts or "tipf_val" in parts:
        tipf = TipAdapterF(lookup="dense")
        tipf.setup(ctx())
        batches = view_batches(support, tipf.spec.batch_size)
        if "tipf_step" in parts:
            out["tipf_step"] = probe_step_seconds(tipf, batches, tipf.spec, loss_fn=tipf.loss, steps=args.steps)
            # a few real steps from the same start: the keys must agree between the trees
            from adapters.training import _optimizer

            opt = _optimizer([{"params": [tipf.keys]}], tipf.spec)
            tipf.train()
            for i, (x, y) in enumerate(batches(1, torch.Generator().manual_seed(0))):
                if i >= args.check_steps:
                    break
                loss = tipf.loss(tipf(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            np.save(args.keys_out, tipf.keys.detach().numpy(), allow_pickle=False)  # for the parent's comparison
            out["tipf_keys"] = args.keys_out
        if "tipf_val" in parts:
            tipf.eval()
            evaluate(tipf, val)  # warm-up
            start = time.perf_counter()
            out["tipf_val_acc"] = evaluate(tipf, val)
            out["tipf_val"] = time.perf_counter() - start
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--baseline", default="77e49df",
                    help="git revision to compare with (default: the tree before the shot-major cache and fused AdamW)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--betas", type=int, default=3, help="betas of each search timed per round")
    ap.add_argument("--steps", type=int, default=3, help="Tip-F steps timed per round")
    ap.add_argument("--check-steps", type=int, default=3, help="Tip-F steps whose keys are compared")
    ap.add_argument("--views", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", default=",".join(PARTS), help=f"comma-separated subset of {PARTS}")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--keys-out", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "baseline"
        base.mkdir()
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.baseline], check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(base)], input=archive, check=True)
        trees = {"baseline": base, "this tree": ROOT}
        runs: dict[str, list[dict[str, Any]]] = {k: [] for k in trees}
        print(f"baseline {args.baseline}; {args.rounds} rounds, {args.threads} thread(s) per child", flush=True)
        for r in range(args.rounds):
            for label, tree in (trees.items() if r % 2 == 0 else reversed(trees.items())):
                keys_out = Path(tmp) / f"keys_{label.replace(' ', '_')}_{r}.npy"
                cmd = [sys.executable, str(ROOT / "scripts" / "bench_scale_hotspots.py"), "--child",
                       "--betas", str(args.betas), "--steps", str(args.steps), "--check-steps",
                       str(args.check_steps), "--views", str(args.views), "--threads", str(args.threads),
                       "--only", args.only, "--keys-out", str(keys_out)]
                env = dict(os.environ, PYTHONPATH=str(tree))
                before = os.getloadavg()[0]
                proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
                if proc.returncode:
                    sys.exit(f"{label} failed:\n{proc.stderr[-3000:]}")
                res = json.loads(proc.stdout.split("RESULT ", 1)[1])
                res["load"] = (before, os.getloadavg()[0])
                runs[label].append(res)
                shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in res.items()
                         if k in PARTS or k.endswith("prepare")}
                print(f"round {r} {label:9s} load {before:.1f}->{res['load'][1]:.1f} {shown}", flush=True)
        print(f"\n{'part':12s} {'baseline min/med s':>20s} {'this tree min/med s':>21s} {'speed-up (min)':>15s}")
        for part in PARTS + ["ape_prepare", "tip_prepare"]:
            if part not in runs["baseline"][0]:
                continue
            b = sorted(x[part] for x in runs["baseline"])
            t = sorted(x[part] for x in runs["this tree"])
            print(f"{part:12s} {b[0]:9.4f} / {b[len(b) // 2]:8.4f} {t[0]:10.4f} / {t[len(t) // 2]:8.4f} "
                  f"{b[0] / t[0]:14.2f}x")
        same = True
        for part in ("ape_beta_result", "tip_beta_result", "tipf_val_acc"):
            if part in runs["baseline"][0]:
                vals = {json.dumps(x[part]) for label in runs for x in runs[label]}
                print(f"{part}: {'equal' if len(vals) == 1 else 'DIFFERENT'} {sorted(vals)}")
                same &= len(vals) == 1
        if "tipf_keys" in runs["baseline"][0]:
            kb = np.load(runs["baseline"][0]["tipf_keys"])
            kt = np.load(runs["this tree"][0]["tipf_keys"])
            diff = float(np.abs(kb - kt).max())
            print(f"tipf keys after {args.check_steps} steps: largest difference {diff:.3g} "
                  f"({'bit for bit' if diff == 0 else 'float rounding' if diff < 1e-5 else 'DIFFERENT'})")
            same &= diff < 1e-5
        loads = [x["load"][0] for label in runs for x in runs[label]]
        print(f"load average (1 min) over the rounds: {min(loads):.1f} - {max(loads):.1f} on {os.cpu_count()} CPUs")
        if not same:
            sys.exit("results differ between the trees")


if __name__ == "__main__":
    main()
