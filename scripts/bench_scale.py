"""Every features adapter at two scales, on synthetic features whose best achievable accuracy is known.

Scales (the support store holds K shots x A views per class; val min(K, 4) per class):

* ``b``: 100 classes, 16 shots, 10 views, D = 512 (a mid-sized dataset), 10,000 test images;
* ``a``: ImageNet-like: 1,000 classes, 16 shots, 10 views, D = 1024 (RN50), val 4 per class, 50,000 test images.

**Data with a known answer.** Class c's images are ``normalize(s u + mu_c + sigma e)``: a component ``u`` shared by
every image (as CLIP features share one), a unit class centre ``mu_c`` orthogonal to ``u``, and isotropic noise
``e ~ N(0, I)``. The norm of the unnormalised vector does not depend on the class, so the Bayes-optimal rule on the
normalised features is ``argmax_c mu_c . x``: its test accuracy (``bayes``) is the best any adapter can reach (up to
sampling noise). Views add a little noise per view; the text head is ``normalize(s u + mu_c + rho e)`` (a noisy
zero-shot classifier). ``nearest mean`` (the normalised mean of each class's shots) is the plain few-shot yardstick.

Prompt learners (coop, kgcoop, cocoop) need a text tower: a randomly initialised open_clip one of the scale's size
(ViT-B-16's for b, D = 512; RN50's for a, D = 1024). Their images sit around the class embeddings of CoOp prompts
with a hidden random context (16 vectors, another seed than the learners' initial context), for synthetic class
names, so CoOp can reach the answer exactly; the text head is ``a photo of a {}.``; ``bayes`` is the rule with the
hidden embeddings. A prompt learner row is either a full run or, with ``--steps N``
or where a full run is out of reach (scale a; CoCoOp), N measured training steps, one measured val evaluation and a
measured test prediction of a few images, extrapolated to the full schedule and labelled ``extrapolated``. For
those rows the FLOP count of a step (text transformer, forward and input gradients) and the achieved rate are
printed, with the projected time of the full schedule at an assumed GPU rate (``--gpu-tflops``; a projection, not
a measurement).

Each (scale, adapter) runs in a fresh child process, so peak RSS (``VmHWM`` after the data are built, reset
through ``/proc/self/clear_refs``; the data stay resident) is that adapter's own. Columns: fit + tune seconds
(``setup``, ``fit``, ``tune``), predict seconds per 10,000 test images, peak RSS, test accuracy, the Bayes accuracy
and the nearest-mean accuracy on the same test set. The machine load (``os.getloadavg()``) is printed before and
after every row.

    python scripts/bench_scale.py                                   # every adapter, scales b and a
    python scripts/bench_scale.py --scales b --adapters tip,gda     # a subset, to rerun cheaply
    python scripts/bench_scale.py --scales a --adapters coop --steps 3

Targets on a 2-core CPU at scale a: training-free and closed-form adapters <= 2 min each; every trained features
adapter except the prompt learners <= 10 min; ``auto`` (default budget) <= 30 min; peak RSS <= 8 GB. CoOp at scale
b <= 30 min.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# noise, text_noise: per-dimension noise of the images and of the text head (Bayes about 91% at b, 95% at a; zero-shot
# about 45%); prompt_noise: the prompt learners' image noise in units of the mean spacing of the class embeddings
# over sqrt(D).
SCALES = {
    "b": {"classes": 100, "shots": 16, "views": 10, "dim": 512, "val": 4, "test": 10_000, "noise": 0.25,
          "text_noise": 0.06, "prompt_noise": 2.0, "tower": "ViT-B-16"},
    "a": {"classes": 1000, "shots": 16, "views": 10, "dim": 1024, "val": 4, "test": 50_000, "noise": 0.2,
          "text_noise": 0.045, "prompt_noise": 2.0, "tower": "RN50"},
}
# At the ImageNet-like scale, APE searches the reference's ImageNet grid (yangyangyang127/APE configs/imagenet.yaml:
# search_scale [7, 7, 0.5], search_step [200, 20, 5]) instead of the 20 gammas most datasets use.
SCALE_OVERRIDES = {"a": {"ape": {"gamma_max": 0.5, "gamma_steps": 5}}}
FEATURE_ADAPTERS = ["zero_shot", "tip", "gda", "ape", "lp_pp", "linear_probe", "clap", "tip_f", "clip_adapter",
                    "taskres", "ape_t"]
PROMPT_ADAPTERS = ["coop", "kgcoop", "cocoop"]
ALL = FEATURE_ADAPTERS + PROMPT_ADAPTERS + ["auto"]
COMMON = 1.0  # norm of the shared component
VIEW_NOISE = 0.05  # per-view noise, relative to the image noise
HIDDEN_SEED = 12345  # the hidden context of the prompt learners' task (the learners start from seed 1)
HEAD_TEMPLATE = "a photo of a {}."
SYLLABLES = ["ka", "lo", "mi", "ren", "tu", "sa", "vor", "pel", "din", "ko", "bra", "ze", "qui", "mon", "ta", "lix",
             "gor", "na", "fe", "sul"]


# ---------------------------------------------------------------------------------------------------- data
def class_names(n: int) -> list[str]:
    """``n`` distinct pronounceable names of 2-3 syllables (tokenised into a few BPE pieces, like real names)."""
    s = len(SYLLABLES)
    names = []
    for i in range(n):
        a, b, c = i % s, (i // s) % s, (i // (s * s)) % s
        names.append(SYLLABLES[a] + SYLLABLES[b] + (SYLLABLES[c] if i >= s * s or i % 3 == 0 else ""))
    assert len(set(names)) == n, "class names collide"
    return names


def _unit(x):
    import torch.nn.functional as F

    return F.normalize(x, dim=-1)


def _draw(centres, labels, noise: float, gen, chunk: int = 8192):
    """``normalize(centres[labels] + noise * e)`` in chunks: ``[N, D]`` float32."""
    import torch

    out = torch.empty(len(labels), centres.shape[1])
    for i in range(0, len(labels), chunk):
        y = labels[i : i + chunk]
        out[i : i + chunk] = _unit(centres[y] + noise * torch.randn(len(y), centres.shape[1], generator=gen))
    return out


def make_data(scale: dict[str, Any], seed: int = 0, centres=None, noise: float | None = None) -> dict[str, Any]:
    """The synthetic task. ``centres [C, D]``: the unnormalised class centres (default: ``COMMON u + mu_c``);
    ``noise``: per-dimension image noise. Returns support, val, test, text head and the Bayes / nearest-mean accuracy.
    """
    import torch

    from adapters.base import FeatureSplit, SupportSet

    gen = torch.Generator().manual_seed(seed)
    n_cls, d, k, views = scale["classes"], scale["dim"], scale["shots"], scale["views"]
    noise = scale["noise"] if noise is None else noise
    if centres is None:
        u = _unit(torch.randn(d, generator=gen))
        mu = torch.randn(n_cls, d, generator=gen)
        mu = _unit(mu - (mu @ u)[:, None] * u)  # orthogonal to the shared direction
        centres = COMMON * u + mu
        rule = mu  # Bayes: argmax mu_c . x (the u term is the same for every class)
        text = _unit(centres + scale["text_noise"] * torch.randn(n_cls, d, generator=gen))
    else:
        rule, text = None, None
    labels = torch.arange(n_cls).repeat_interleave(k)
    base = torch.empty(len(labels), d)
    for i in range(0, len(labels), 8192):  # unnormalised images; views are drawn around them
        y = labels[i : i + 8192]
        base[i : i + 8192] = centres[y] + noise * torch.randn(len(y), d, generator=gen)
    view_feats = torch.empty(views, len(labels), d)
    for a in range(views):
        for i in range(0, len(labels), 8192):
            x = base[i : i + 8192]
            view_feats[a, i : i + 8192] = _unit(x + VIEW_NOISE * noise * torch.randn(x.shape, generator=gen))
    del base
    keys = _unit(view_feats.mean(dim=0))
    support = SupportSet(keys=keys, labels=labels, views=view_feats)
    val_y = torch.arange(n_cls).repeat_interleave(scale["val"])
    val = FeatureSplit(_draw(centres, val_y, noise, gen), val_y)
    test_y = torch.randint(n_cls, (scale["test"],), generator=gen)
    test = FeatureSplit(_draw(centres, test_y, noise, gen), test_y)
    shot_means = _unit(torch.zeros(n_cls, d).index_add_(0, labels, keys))
    out = {"support": support, "val": val, "test": test, "text": text, "centres": centres,
           "nearest_mean": _acc(test.features @ shot_means.t(), test.labels)}
    if rule is not None:
        out["bayes"] = _acc(test.features @ rule.t(), test.labels)
    return out


def hidden_context_embeddings(backbone, names: list[str], seed: int = HIDDEN_SEED) -> Any:
    """``[C, D]`` class embeddings of CoOp prompts with a hidden random context (16 vectors, N(0, 0.02), seeded):
    a target CoOp can reach exactly, from another random context."""
    import torch

    from adapters.base import AdapterContext, SupportSet
    from adapters.coop import CoOp

    dummy = SupportSet(keys=torch.zeros(len(names), backbone.dim), labels=torch.arange(len(names)))
    hidden = CoOp(n_ctx=16)
    hidden.setup(AdapterContext(classnames=names, text_head=torch.zeros(len(names), backbone.dim), support=dummy,
                                backbone=backbone, seed=seed, progress=False))
    with torch.no_grad():
        return hidden.eval().encode_text()


def prompt_data(scale: dict[str, Any], backbone, names: list[str], seed: int = 0) -> dict[str, Any]:
    """The prompt learners' task: images around the class embeddings of a hidden CoOp context."""
    import torch

    target = hidden_context_embeddings(backbone, names)  # [C, D] unit
    # The random tower's class embeddings are close together: scale the noise to their spacing.
    spacing = float(torch.cdist(target, target).sum() / (len(names) * (len(names) - 1)))
    data = make_data(scale, seed, centres=target, noise=scale["prompt_noise"] * spacing / math.sqrt(scale["dim"]))
    data["text"] = backbone.text_head(names, [HEAD_TEMPLATE])
    data["bayes"] = _acc(data["test"].features @ target.t(), data["test"].labels)
    return data


def _acc(logits, labels) -> float:
    return float((logits.argmax(dim=1) == labels).float().mean()) * 100.0


# ---------------------------------------------------------------------------------------------------- child
def _peak_rss_reset() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_rss_gb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def make_adapter(name: str, overrides: dict[str, Any] | None = None):
    """``conf/adapter/<name>.yaml`` instantiated, as ``adapter=<name>`` would."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    node = OmegaConf.merge(OmegaConf.load(ROOT / "conf" / "adapter" / f"{name}.yaml"),
                           OmegaConf.create(overrides or {}))
    return instantiate(node)


def text_step_flops(backbone, n_prefix: int, n_suffix_tokens: int, batch_prompts: int = 1) -> float:
    """FLOPs of one prompt-learner step in the text transformer: forward plus input gradients (~2x forward).

    Per token and layer: QKV and output projections 8 W^2, MLP 16 W^2 (ratio 4) multiply-adds x 2 FLOPs; attention
    4 W L per query over L keys. ``n_suffix_tokens``: per-class positions summed over classes.
    """
    m = backbone.model
    width = m.transformer.width
    layers = len(m.transformer.resblocks)
    tokens = batch_prompts * n_prefix + n_suffix_tokens
    per_token = 24 * width * width + 4 * width * (n_prefix + 8)
    return 2.0 * layers * tokens * per_token


def run_child(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    scale = SCALES[args.scale]
    name = args.adapter
    t0 = time.perf_counter()
    from adapters.base import AdapterContext, accuracy

    backbone = None
    names = class_names(scale["classes"])
    if name in PROMPT_ADAPTERS or name == "auto":
        from caches.backbone import FrozenClip

        # auto's candidates include CoOp, whose cost probe runs the text encoder (as in a real run, where the
        # backbone is always there); auto itself is scored on the features task.
        backbone = FrozenClip(scale["tower"], None, name=f"{scale['tower']}-random", device="cpu")
    data = prompt_data(scale, backbone, names) if name in PROMPT_ADAPTERS else make_data(scale)
    support, val, test = data["support"], data["val"], data["test"]
    ctx = AdapterContext(classnames=names, text_head=data["text"], support=support, backbone=backbone,
                         device=torch.device("cpu"), seed=1, progress=False)
    row: dict[str, Any] = {"scale": args.scale, "adapter": name, "bayes": data["bayes"],
                           "nearest_mean": data["nearest_mean"], "data_s": time.perf_counter() - t0,
                           "threads": torch.get_num_threads()}
    overrides = {**SCALE_OVERRIDES.get(args.scale, {}).get(name, {}),
                 **(json.loads(args.overrides).get(name, {}) if args.overrides else {})}
    row["overrides"] = overrides
    adapter = make_adapter(name, overrides)
    import gc

    gc.collect()
    row["rss_reset"] = _peak_rss_reset()
    row["load_before"] = os.getloadavg()
    extrapolate = name in PROMPT_ADAPTERS and (args.steps > 0 or args.scale == "a" or name == "cocoop")
    t = time.perf_counter()
    adapter.setup(ctx)
    if extrapolate:
        row.update(extrapolated_fit(adapter, backbone, support, val, test, args, time.perf_counter() - t))
    else:
        record = adapter.fit(support, val)
        adapter.tune(val)
        row["fit_s"] = time.perf_counter() - t
        row["optimisation"] = record.get("optimisation") if isinstance(record, dict) else None
        if name == "auto":
            row["auto"] = {k: record.get(k) for k in ("chosen", "skipped", "budget_s")}
            row["auto"]["candidates"] = {n: {k: r.get(k) for k in ("score", "seconds", "predicted_s")}
                                         for n, r in record.get("candidates", {}).items()}
        t = time.perf_counter()
        logits = adapter.predict(test.features)
        row["predict_s_per_10k"] = (time.perf_counter() - t) * 10_000 / len(test)
        row["acc"] = accuracy(logits, test.labels)
    row["peak_rss_gb"] = _peak_rss_gb()
    row["load_after"] = os.getloadavg()
    return row


def extrapolated_fit(adapter, backbone, support, val, test, args, setup_s: float) -> dict[str, Any]:
    """Measured steps, one val evaluation and a few test predictions of a prompt learner, extrapolated."""
    import torch

    from adapters.base import evaluate
    from adapters.training import train, view_batches

    spec = adapter.effective_spec() if hasattr(adapter, "effective_spec") else adapter.spec
    n = len(support)
    steps_per_epoch = math.ceil(n / spec.batch_size)
    n_steps = max(1, min(args.steps or 2, steps_per_epoch))
    full = view_batches(support, spec.batch_size)

    def few(epoch, gen):
        for i, batch in enumerate(full(epoch, gen)):
            if i >= n_steps:
                return
            yield batch

    measured = {**vars(spec)}
    measured.update(epochs=1, select="last", warmup_epochs=0)
    from adapters.training import TrainSpec

    t = time.perf_counter()
    train(adapter, few, None, TrainSpec(**measured), seed=1, loss_fn=adapter.loss, progress=False,
          steps_per_epoch=n_steps)
    step_s = (time.perf_counter() - t) / n_steps
    t = time.perf_counter()
    evaluate(adapter, val) if type(adapter).__name__ != "CoCoOp" else adapter.predict(val.features[:16])
    val_s = time.perf_counter() - t
    if type(adapter).__name__ == "CoCoOp":
        val_s *= len(val) / 16  # per image: the prompts depend on the image
    t = time.perf_counter()
    n_test = 16 if type(adapter).__name__ == "CoCoOp" else len(test)
    with torch.no_grad():
        adapter.predict(test.features[:n_test])
    predict_s = (time.perf_counter() - t) * 10_000 / n_test
    total_steps = steps_per_epoch * spec.epochs
    fit_s = setup_s + total_steps * step_s + (spec.epochs * val_s if spec.select == "best_val" else 0.0)
    tokens = adapter.meta_tokens
    eot = tokens.argmax(dim=-1)
    p = adapter.prefix_len
    per_prompt_suffix = int((eot + 1 - p).sum()) if p else int((eot.max() + 1) * len(eot))
    images = spec.batch_size if type(adapter).__name__ == "CoCoOp" else 1
    flops = text_step_flops(backbone, p, per_prompt_suffix * images, batch_prompts=images)
    return {"fit_s": fit_s, "extrapolated": True, "measured_steps": n_steps, "step_s": step_s, "val_eval_s": val_s,
            "total_steps": total_steps, "predict_s_per_10k": predict_s, "acc": None, "step_gflop": flops / 1e9,
            "achieved_gflops": flops / step_s / 1e9,
            "gpu_projection_s": total_steps * flops / (args.gpu_tflops * 1e12),
            "spec": {"epochs": spec.epochs, "batch_size": spec.batch_size, "lr": spec.lr}}


# ---------------------------------------------------------------------------------------------------- parent
def matmul_peak_gflops(threads: int, n: int = 2048, rounds: int = 5) -> float:
    """This machine's float32 matmul rate (best of ``rounds`` [n, n] x [n, n] products) at ``threads`` threads.

    The text transformer of a prompt-learner step is matmuls, so a step's FLOP count over this rate is a lower bound
    on its time here, whatever the implementation.
    """
    import torch

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(0)
        a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
        a @ b  # first-call allocations
        best = math.inf
        for _ in range(rounds):
            t = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t)
        return 2 * n ** 3 / best / 1e9
    finally:
        torch.set_num_threads(before)


def fmt(row: dict[str, Any]) -> str:
    def num(v, f="{:.1f}"):
        return "-" if v is None else f.format(v)

    label = " (extrapolated)" if row.get("extrapolated") else ""
    if "error" in row:
        return f"| {row['scale']} | {row['adapter']} | failed: {row['error']} | | | | | | |"
    return (f"| {row['scale']} | {row['adapter']}{label} | {num(row.get('fit_s'))} | "
            f"{num(row.get('predict_s_per_10k'), '{:.2f}')} | {num(row.get('peak_rss_gb'), '{:.2f}')} | "
            f"{num(row.get('acc'))} | {num(row.get('bayes'))} | {num(row.get('nearest_mean'))} | "
            f"{row['load_before'][0]:.1f} / {row['load_after'][0]:.1f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scales", default="b,a")
    ap.add_argument("--adapters", default=",".join(ALL))
    ap.add_argument("--steps", type=int, default=0, help="prompt learners: measure N steps and extrapolate")
    ap.add_argument("--threads", type=int, default=0, help="torch threads in each child (0: torch's default)")
    ap.add_argument("--gpu-tflops", type=float, default=50.0,
                    help="assumed sustained GPU rate for the prompt learners' projection (float32/TF32)")
    ap.add_argument("--timeout", type=float, default=7200.0, help="seconds per child")
    ap.add_argument("--json", default="", help="also write the rows to this JSON file")
    ap.add_argument("--overrides", default="", help='YAML field overrides per adapter, JSON: {"coop": {"epochs": 50}}')
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--scale", help=argparse.SUPPRESS)
    ap.add_argument("--adapter", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        Path(args.out).write_text(json.dumps(run_child(args)))
        return
    scales = [s for s in args.scales.split(",") if s]
    adapters = [a for a in args.adapters.split(",") if a]
    bad = [s for s in scales if s not in SCALES] + [a for a in adapters if a not in ALL]
    if bad:
        sys.exit(f"unknown scale or adapter: {bad}; scales {list(SCALES)}, adapters {ALL}")
    import torch

    print(f"# bench_scale: {os.cpu_count()} CPUs, torch {torch.__version__}, load {os.getloadavg()}", flush=True)
    peak = None
    if any(a in PROMPT_ADAPTERS for a in adapters):
        peak = matmul_peak_gflops(args.threads)
        print(f"# float32 matmul peak here: {peak:.1f} GFLOP/s at {args.threads or torch.get_num_threads()} "
              f"thread(s) (best of 5 [2048, 2048] products)", flush=True)
    print("| scale | adapter | fit + tune s | predict s / 10k | peak RSS GB | test acc | bayes | nearest mean | "
          "load 1-min before / after |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|", flush=True)
    rows = []
    for scale in scales:
        for name in adapters:
            with tempfile.NamedTemporaryFile(suffix=".json") as f:
                cmd = [sys.executable, __file__, "--child", "--scale", scale, "--adapter", name, "--out", f.name,
                       "--steps", str(args.steps), "--threads", str(args.threads), "--gpu-tflops",
                       str(args.gpu_tflops), "--overrides", args.overrides]
                try:
                    proc = subprocess.run(cmd, cwd=ROOT, timeout=args.timeout, capture_output=True, text=True)
                    if proc.returncode:
                        raise RuntimeError(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "?")
                    row = json.loads(Path(f.name).read_text())
                except (subprocess.TimeoutExpired, RuntimeError) as e:
                    row = {"scale": scale, "adapter": name, "error": str(e)[:200]}
            rows.append(row)
            print(fmt(row), flush=True)
    for row in rows:
        if row.get("extrapolated"):
            print(f"{row['scale']} {row['adapter']}: {row['measured_steps']} measured steps of {row['total_steps']} "
                  f"({row['step_s']:.2f} s/step, {row['step_gflop']:.1f} GFLOP/step, "
                  f"{row['achieved_gflops']:.1f} GFLOP/s achieved), val evaluation {row['val_eval_s']:.1f} s; "
                  f"projected GPU fit at {args.gpu_tflops:g} TFLOP/s: {row['gpu_projection_s'] / 60:.1f} min")
            if peak:
                floor = row["total_steps"] * row["step_gflop"] / peak
                print(f"{row['scale']} {row['adapter']}: the schedule's text-transformer FLOPs at this machine's "
                      f"matmul peak take at least {floor:.0f} s ({floor / 60:.1f} min), whatever the implementation")
        if row.get("optimisation"):
            print(f"{row['scale']} {row['adapter']}: optimisation {row['optimisation']}")
        if row.get("auto"):
            print(f"{row['scale']} auto: {row['auto']}")
    print(f"# load at the end {os.getloadavg()}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
