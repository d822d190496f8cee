"""Cache lookups at ImageNet-train size: exact dense Tip-Adapter vs faiss top-k (Flat, IVF, HNSW).

A synthetic cache with class structure (default: 1,000 classes x 1,280 keys = 1.28M keys, D = 1024, and 50
queries per class): class centres in a 64-d latent space, each with 10 sub-clusters (modes), samples around the
modes, mapped to D dimensions by a random orthonormal map, plus isotropic noise, L2-normalised (real CLIP features
also have a low intrinsic dimension and local structure; isotropic noise alone would make every neighbour
equidistant). The zero-shot text head is each class centre plus noise, so the cache matters.

Sides, all on the same queries, with the same (beta, alpha):

* **dense**: Tip-Adapter's formula over every key, by blocks of ``--block`` queries: ``S = q K^T`` (one BLAS
  matmul per block), then ``exp(beta (S - 1))`` in place and summed per class. The block size is the best
  straightforward choice measured on this machine (256 queries: about 2.3x the throughput of 32, since a larger
  block reads the keys fewer times). The exact top-k (for recall) is taken from the same S, outside the timing.
* **Flat**: faiss's exact inner-product search (``faiss.knn``, what ``IndexFlatIP`` runs) top-k, rescored and
  summed over the k keys (``adapters.topk``).
* **each approximate index** (``--index``, ``FACTORY[:SETTINGS]``): the same, through the index. The defaults
  store the keys as 8-bit codes (``SQ8``, a quarter of the memory): the index only picks the k candidates, which
  are rescored from the exact keys, as the adapters do. ``SETTINGS`` is a faiss ParameterSpace string
  (``nprobe=16``, ``efSearch=128``) or ``tune``: the cheapest setting of a grid (IVF ``nprobe`` 1..256, HNSW
  ``efSearch`` 16..1024) whose recall@16 reaches ``--target-recall`` on **held-out tuning queries** (drawn apart
  from the reported ones, with their own exact neighbours), so no setting is chosen on the queries reported.

The exact sides (dense, Flat) cost ~2.6 GFLOP per query at full size; ``--exact-queries`` times them (and measures
recall and Tip agreement) on the first queries of each round only, while the approximate sides run every query:
their throughput is per query, so the speed-ups compare like with like; recall and Tip accuracy are always measured
on the queries both sides ran. Queries are split into ``--rounds`` blocks; every round runs every side on its
block, interleaved, and the queries-per-second figures are printed as min / median over rounds, with the machine
load. Memory: the bytes of what each side searches (the float32 keys for dense and Flat, the serialised index for
the others; the exact keys the rescoring reads are counted apart).

    python scripts/bench_faiss.py --exact-queries 1000 --index 'IVF1024,SQ8:tune' --index 'IVF1024,SQ8:nprobe=8'
                                                    # full size, IVF only (~35 min, 10 GB, on 2 busy cores)
    python scripts/bench_faiss.py --n-keys 128000 --classes 100 --queries 5000 --exact-queries 1000 \
        --index HNSW32,SQ8:tune --index IVF256,SQ8:tune              # HNSW too, at a size its build allows
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adapters.topk import affinity_class_sum, rescore  # noqa: E402
from caches.search import KeyIndex, build_index  # noqa: E402

MODES, MODE_SPREAD, POINT_SPREAD = 10, 1.5, 0.5


def rss_gb() -> float:
    """Peak resident memory of this process so far (GB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def synthetic(n_classes: int, per_class: int, queries_per_class: int, dim: int, latent: int, seed: int,
              tune_per_class: int = 1) -> tuple[np.ndarray, ...]:
    """Keys ``[C*K, D]`` in class order, labels, queries ``[C*Q, D]``, their labels, text head ``[C, D]``, and
    held-out tuning queries ``[C*T, D]`` (an independent draw from the same distribution)."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.standard_normal((dim, latent)))[0].T.astype(np.float32)  # [L, D] orthonormal rows
    centres = rng.standard_normal((n_classes, latent)).astype(np.float32)

    # Each class is a mixture of MODES sub-clusters (poses, backgrounds, ...): neighbours are local, as in real
    # embeddings, while the modes of different classes overlap enough that the cache does not decide every query.
    modes = centres[:, None] + MODE_SPREAD * rng.standard_normal((n_classes, MODES, latent)).astype(np.float32)

    def draw(per: int) -> np.ndarray:
        out = np.empty((n_classes * per, dim), dtype=np.float32)
        for c0 in range(0, n_classes, 50):
            cs = np.arange(c0, min(c0 + 50, n_classes))
            which = rng.integers(0, MODES, (len(cs), per))
            z = modes[cs[:, None], which].reshape(len(cs) * per, latent) + POINT_SPREAD * rng.standard_normal(
                (len(cs) * per, latent), np.float32)
            x = z @ basis + 0.04 * rng.standard_normal((len(cs) * per, dim), np.float32)
            out[c0 * per : (c0 + len(cs)) * per] = x / np.linalg.norm(x, axis=1, keepdims=True)
        return out

    keys = draw(per_class)
    queries = draw(queries_per_class)
    text = centres @ basis + 0.8 * rng.standard_normal((n_classes, latent), np.float32) @ basis
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    tune = draw(tune_per_class)
    return (keys, np.repeat(np.arange(n_classes), per_class), queries,
            np.repeat(np.arange(n_classes), queries_per_class), text.astype(np.float32), tune)


def dense_tip(q: torch.Tensor, keys: torch.Tensor, text: torch.Tensor, per_class: int, beta: float, alpha: float,
              k: int, block: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Dense Tip logits ``[B, C]`` (timed) and the exact top-k rows ``[B, k]`` (from the same S, untimed)."""
    if beta <= 0:
        raise ValueError(f"beta must be positive, got {beta}")
    n_cls = text.shape[0]
    logits, rows, seconds = [], [], 0.0
    for i in range(0, len(q), block):
        t = time.perf_counter()
        s = q[i : i + block] @ keys.t()
        cache = s.sub_(1.0).mul_(beta).exp_().view(len(s), n_cls, per_class).sum(-1)  # in place: S is [B, N]
        logits.append(100.0 * q[i : i + block] @ text.t() + alpha * cache)
        seconds += time.perf_counter() - t
        rows.append(torch.topk(s, k, dim=1).indices)  # exp(beta (s - 1)) keeps the order of s (beta > 0)
    return torch.cat(logits), torch.cat(rows), seconds


def topk_tip(q: torch.Tensor, index: KeyIndex | FlatKnn, keys: torch.Tensor, labels: torch.Tensor, text: torch.Tensor,
             beta: float, alpha: float, k: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Top-k Tip logits through ``index`` (search + exact rescoring + per-class sum), rows, seconds."""
    t = time.perf_counter()
    _, rows = index.search(q, k)
    scores, rows = rescore(q, keys, rows)
    logits = 100.0 * q @ text.t() + alpha * affinity_class_sum(scores, labels[rows], text.shape[0], beta)
    return logits, rows, time.perf_counter() - t


class FlatKnn:
    """faiss's exact inner-product search over an array it does not copy (``faiss.knn``, what IndexFlatIP runs)."""

    def __init__(self, keys: np.ndarray) -> None:
        self.keys = keys

    def settings(self, k: int) -> str:
        return ""

    def search(self, q: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        import faiss

        scores, rows = faiss.knn(np.ascontiguousarray(q.numpy()), self.keys, k, faiss.METRIC_INNER_PRODUCT)
        return torch.from_numpy(scores), torch.from_numpy(rows)


IVF_GRID = (1, 2, 4, 8, 16, 32, 64, 128, 256)
HNSW_GRID = (16, 32, 64, 128, 256, 512, 1024)


def tune_settings(index: KeyIndex, q: torch.Tensor, exact_rows: torch.Tensor, keys: torch.Tensor, k: int,
                  target: float) -> tuple[str, list[tuple[str, float]]]:
    """The cheapest grid setting of ``index`` whose recall@16 (after rescoring its k candidates) reaches ``target``
    on the tuning queries ``q [T, D]`` (exact rows ``[T, >=16]``); the most thorough one when none does. A setting
    that finds fewer than k candidates for some query counts as recall 0. Returns it and every (setting, recall)
    tried."""
    import faiss

    ivf = faiss.try_extract_index_ivf(index.index)
    if ivf is not None:
        grid = [f"nprobe={n}" for n in IVF_GRID if n <= ivf.nlist]
    elif "HNSW" in type(faiss.downcast_index(index.index)).__name__:
        grid = [f"efSearch={e}" for e in HNSW_GRID]
    else:
        return "", []
    tried = []
    for setting in grid:
        try:
            _, rows = KeyIndex(index.index, index.factory, params=setting).search(q, k)
        except RuntimeError:  # fewer than k candidates in the lists probed: too little search, recall 0 for us
            tried.append((setting, 0.0))
            continue
        r = recall(rescore(q, keys, rows)[1], exact_rows, 16)
        tried.append((setting, r))
        if r >= target:
            break
    return tried[-1][0], tried


def index_bytes(index: object) -> int:
    """Bytes of a faiss index as written out (codes, lists, graph, quantiser, ids)."""
    import faiss

    return int(faiss.serialize_index(index).nbytes)


def recall(found: torch.Tensor, exact: torch.Tensor, k: int) -> float:
    """Mean fraction of the exact top-k found in the first k results."""
    f, e = found[:, :k].numpy(), exact[:, :k].numpy()
    return float(np.mean([len(np.intersect1d(a, b)) / k for a, b in zip(f, e)]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-keys", type=int, default=1_280_000)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--queries", type=int, default=50_000)
    p.add_argument("--exact-queries", type=int, default=None, help="queries the exact sides run (default: all)")
    p.add_argument("--tune-queries", type=int, default=500,
                   help="held-out queries the ':tune' settings are chosen on (default 500)")
    p.add_argument("--target-recall", type=float, default=0.99, help="recall@16 a tuned setting must reach")
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--latent", type=int, default=64)
    p.add_argument("--k", type=int, default=64, help="neighbours per query for top-k Tip (recall is also at 16)")
    p.add_argument("--index", action="append", default=None,
                   help="approximate index as FACTORY[:SETTINGS|:tune], repeatable (default: IVF1024,SQ8 tuned on "
                        "held-out queries, and at nprobe 8)")
    p.add_argument("--train-per-list", type=int, default=50, help="IVF training keys per list (seeded sample)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--block", type=int, default=256, help="queries per dense block")
    p.add_argument("--beta", type=float, default=1.0)
    p.add_argument("--alpha", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    indexes = args.index or ["IVF1024,SQ8:tune", "IVF1024,SQ8:nprobe=8"]
    per_class = args.n_keys // args.classes
    qpc = max(1, args.queries // args.classes)
    tpc = max(1, -(-args.tune_queries // args.classes))
    print(f"load average {os.getloadavg()} on {os.cpu_count()} cores; torch threads {torch.get_num_threads()}; "
          f"no GPU used (CUDA {'present' if torch.cuda.is_available() else 'absent'})", flush=True)

    t = time.perf_counter()
    keys_np, labels_np, q_np, ql_np, text_np, tune_np = synthetic(args.classes, per_class, qpc, args.dim,
                                                                  args.latent, args.seed, tpc)
    tune_np = tune_np[np.sort(np.random.default_rng(2).choice(len(tune_np), min(len(tune_np), args.tune_queries),
                                                              replace=False))]
    print(f"data: {len(keys_np):,} keys x {args.dim}, {len(q_np):,} queries, {len(tune_np):,} held-out tuning "
          f"queries, {args.classes} classes ({time.perf_counter() - t:.0f} s)", flush=True)
    # One copy of the keys in memory (5.2 GB at full size): the dense side and faiss's exact search (faiss.knn, the
    # brute-force search an IndexFlatIP runs, without copying the keys into an index) both read it.
    keys = torch.from_numpy(keys_np)
    labels, queries, q_labels = torch.from_numpy(labels_np), torch.from_numpy(q_np), torch.from_numpy(ql_np)
    text, tune_q = torch.from_numpy(text_np), torch.from_numpy(tune_np)
    flat = FlatKnn(keys_np)
    tune_exact: torch.Tensor | None = None

    sides: dict[str, KeyIndex | FlatKnn] = {"Flat": flat}
    build_s: dict[str, float] = {}
    mem: dict[str, int] = {"dense": keys_np.nbytes, "Flat": keys_np.nbytes}
    for spec in indexes:
        factory, _, settings = spec.partition(":")
        built = next((v for k, v in sides.items() if k.partition(":")[0] == factory), None)
        if isinstance(built, KeyIndex):  # the same index searched with other settings
            index = built.index
        else:
            t = time.perf_counter()
            sample = keys
            m = re.search(r"IVF(\d+)", factory)
            if m:
                n_train = min(len(keys), args.train_per_list * int(m.group(1)))
                sample = keys[torch.from_numpy(np.random.default_rng(1).choice(len(keys), n_train, replace=False))]
            index = build_index(sample.numpy(), factory)
            if sample is not keys:  # trained on the sample: now hold every key
                index.reset()
                for i in range(0, len(keys), 100_000):
                    index.add(keys[i : i + 100_000].numpy())
            build_s[factory] = time.perf_counter() - t
            print(f"{factory} built in {build_s[factory]:.0f} s; rss {rss_gb():.1f} GB", flush=True)
        if settings == "tune":
            if tune_exact is None:
                t = time.perf_counter()
                tune_exact = flat.search(tune_q, 16)[1]
                print(f"exact neighbours of the tuning queries in {time.perf_counter() - t:.0f} s", flush=True)
            settings, tried = tune_settings(KeyIndex(index, factory), tune_q, tune_exact, keys, args.k,
                                            args.target_recall)
            reached = bool(tried) and tried[-1][1] >= args.target_recall
            print(f"{factory} tuned on {len(tune_q)} held-out queries: "
                  + ", ".join(f"{s} recall@16 {r:.4f}" for s, r in tried)
                  + f" -> {settings}" + ("" if reached else f" (target {args.target_recall} not reached)"),
                  flush=True)
            spec = f"{factory}:{settings} (tuned)"
        if spec in sides or any(n.partition(" ")[0] == f"{factory}:{settings}" for n in sides):
            continue
        sides[spec] = KeyIndex(index, factory, params=settings)
        mem[spec] = index_bytes(index)

    n_exact = min(args.exact_queries or len(queries), len(queries))
    rounds = np.array_split(np.arange(len(queries)), args.rounds)
    qps: dict[str, list[float]] = {"dense": [], **{name: [] for name in sides}}
    agree: dict[str, list[float]] = {name: [] for name in sides}
    agree_flat: dict[str, list[float]] = {name: [] for name in sides}
    rec16: dict[str, list[float]] = {name: [] for name in sides}
    reck: dict[str, list[float]] = {name: [] for name in sides}
    acc: dict[str, list[float]] = {"dense": [], **{name: [] for name in sides}}
    exact_total = 0
    for r, idx in enumerate(rounds):
        ex = idx[: max(1, n_exact // args.rounds)]
        q, y = queries[idx], q_labels[idx]
        dense_logits, exact_rows, secs = dense_tip(queries[ex], keys, text, per_class, args.beta, args.alpha, args.k,
                                                   args.block)
        exact_total += len(ex)
        qps["dense"].append(len(ex) / secs)
        acc["dense"].append(float((dense_logits.argmax(1) == q_labels[ex]).float().sum()))
        flat_pred = None
        for name, index in sides.items():
            sub = q[: len(ex)] if name == "Flat" else q
            logits, rows, secs = topk_tip(sub, index, keys, labels, text, args.beta, args.alpha, args.k)
            pred = logits[: len(ex)].argmax(1)
            if name == "Flat":
                flat_pred = pred
            qps[name].append(len(sub) / secs)
            acc[name].append(float((pred == y[: len(ex)]).float().sum()))
            agree[name].append(float((pred == dense_logits.argmax(1)).float().sum()))
            agree_flat[name].append(float((pred == flat_pred).float().sum()))
            rec16[name].append(recall(rows[: len(ex)], exact_rows, 16) * len(ex))
            reck[name].append(recall(rows[: len(ex)], exact_rows, args.k) * len(ex))
        print(f"round {r + 1}/{len(rounds)}: " + ", ".join(f"{n} {v[-1]:.0f} q/s" for n, v in qps.items())
              + f"; load {os.getloadavg()[0]:.1f}", flush=True)

    print(f"\n{len(keys):,} keys x {args.dim}, {len(queries):,} queries ({exact_total:,} of them through the exact "
          f"sides, whose throughput is measured on those), k = {args.k}, beta = {args.beta}, alpha = {args.alpha}; "
          f"load average now {os.getloadavg()}; peak rss {rss_gb():.1f} GB")
    dense_median = statistics.median(qps["dense"])
    dense_acc = 100 * sum(acc["dense"]) / exact_total
    flat_acc = 100 * sum(acc["Flat"]) / exact_total
    print(f"| side | q/s min | q/s median | x dense (median) | recall@16 | recall@{args.k} | Tip top-1 % | "
          "vs dense Tip (points) | vs exact top-k Tip (points) | same top-1 as exact top-k | memory MB | build s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| dense (blocked matmul, every key) | {min(qps['dense']):.1f} | {dense_median:.1f} | 1.0 | 1 | 1 | "
          f"{dense_acc:.2f} | - | - | - | {mem['dense'] / 2**20:.0f} | - |")
    verdicts = []
    for name in sides:
        med = statistics.median(qps[name])
        factory = name.partition(":")[0]
        label = f"{factory} top-{args.k} ({sides[name].settings(args.k) or 'exact'}" \
                + (", tuned on held-out queries)" if name.endswith("(tuned)") else ")")
        a = 100 * sum(acc[name]) / exact_total
        r16 = sum(rec16[name]) / exact_total
        memory = f"{mem[name] / 2**20:.0f}" + ("" if name == "Flat" else f" (+{mem['Flat'] / 2**20:.0f} exact keys)")
        print(f"| {label} | {min(qps[name]):.1f} | {med:.1f} | {med / dense_median:.1f} | {r16:.4f} | "
              f"{sum(reck[name]) / exact_total:.4f} | {a:.2f} | {a - dense_acc:+.2f} | {a - flat_acc:+.2f} | "
              f"{100 * sum(agree_flat[name]) / exact_total:.2f}% | {memory} | {build_s.get(factory, 0):.0f} |")
        if name != "Flat":
            ok = med / dense_median >= 10 and r16 >= 0.99 and abs(a - flat_acc) <= 0.1
            verdicts.append(f"{label}: {'meets' if ok else 'misses'} the target (>= 10x dense: "
                            f"{med / dense_median:.1f}x; recall@16 >= 0.99: {r16:.4f}; Tip top-1 within 0.1 points "
                            f"of the exact top-{args.k}: {a - flat_acc:+.2f}, of dense Tip: {a - dense_acc:+.2f})")
    print("Flat is the exact top-k: the approximate indexes' Tip top-1 should match Flat's; Flat vs dense is the "
          "effect of keeping k keys per query (k is searched on val in the adapters)")
    print("\n".join(verdicts))


if __name__ == "__main__":
    main()
