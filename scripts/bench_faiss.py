"""Cache lookups at ImageNet-train size: exact dense Tip-Adapter vs faiss top-k (Flat, IVF, HNSW).

A synthetic cache with class structure (default: 1,000 classes x 1,280 keys = 1.28M keys, D = 1024, and 50
queries per class): class centres in a 64-d latent space, each with 10 sub-clusters (modes), samples around the
modes, mapped to D dimensions by a random orthonormal map, plus isotropic noise, L2-normalised (real CLIP features
also have a low intrinsic dimension and local structure; isotropic noise alone would make every neighbour
equidistant). The zero-shot text head is each class centre plus
noise, so the cache matters.

Sides, all on the same queries, with the same (beta, alpha):

* **dense**: Tip-Adapter's formula over every key, by blocks of queries: ``S = q K^T`` (a BLAS matmul), then
  ``exp(-beta (1 - S))`` summed per class. The exact top-k (for recall) is taken from the same S, outside the timing.
* **Flat**: faiss ``IndexFlatIP`` top-k (exact), rescored and summed over the k keys (``adapters.topk``).
* **each approximate index** (``--index``, factory:settings): the same, through the index. The defaults store the
  keys as 8-bit codes (``SQ8``, a quarter of the memory): the index only picks the k candidates, which are rescored
  from the exact keys, as the adapters do. Two float32 copies of 1.28M keys (the exact one and an IVF-Flat one)
  need 10.5 GB.

The exact sides (dense, Flat) cost ~2.6 GFLOP per query at full size; ``--exact-queries`` times them (and measures
recall and Tip agreement) on the first queries of each round only, while the approximate sides run every query.
Queries are split into ``--rounds`` blocks; every round runs every side on its block, interleaved, and the
queries-per-second figures are printed as min / median over rounds, with the machine load.

    python scripts/bench_faiss.py                                    # full size (hours on 2 shared cores)
    python scripts/bench_faiss.py --n-keys 100000 --classes 100 --queries 5000 --exact-queries 1000
"""

from __future__ import annotations

import argparse
import os
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


def synthetic(n_classes: int, per_class: int, queries_per_class: int, dim: int, latent: int, seed: int
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Keys ``[C*K, D]`` in class order, labels, queries ``[C*Q, D]``, their labels, text head ``[C, D]``."""
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
    return (keys, np.repeat(np.arange(n_classes), per_class), queries,
            np.repeat(np.arange(n_classes), queries_per_class), text.astype(np.float32))


def dense_tip(q: torch.Tensor, keys: torch.Tensor, text: torch.Tensor, per_class: int, beta: float, alpha: float,
              k: int, block: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Dense Tip logits ``[B, C]`` (timed) and the exact top-k rows ``[B, k]`` (from the same S, untimed)."""
    n_cls = text.shape[0]
    logits, rows, seconds = [], [], 0.0
    for i in range(0, len(q), block):
        t = time.perf_counter()
        s = q[i : i + block] @ keys.t()
        cache = torch.exp(beta * (s - 1.0)).view(len(s), n_cls, per_class).sum(-1)
        logits.append(100.0 * q[i : i + block] @ text.t() + alpha * cache)
        seconds += time.perf_counter() - t
        rows.append(torch.topk(s, k, dim=1).indices)
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
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--latent", type=int, default=64)
    p.add_argument("--k", type=int, default=64, help="neighbours per query for top-k Tip (recall is also at 16)")
    p.add_argument("--index", action="append", default=None,
                   help="approximate index as FACTORY[:SETTINGS], repeatable (default: IVF1024,SQ8 at nprobe 8, 16 "
                        "and 32, and HNSW32,SQ8:efSearch=128)")
    p.add_argument("--train-per-list", type=int, default=50, help="IVF training keys per list (seeded sample)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--block", type=int, default=32, help="queries per dense block")
    p.add_argument("--beta", type=float, default=1.0)
    p.add_argument("--alpha", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    indexes = args.index or ["IVF1024,SQ8:nprobe=8", "IVF1024,SQ8:nprobe=16", "IVF1024,SQ8:nprobe=32",
                             "HNSW32,SQ8:efSearch=128"]
    per_class = args.n_keys // args.classes
    qpc = max(1, args.queries // args.classes)
    print(f"load average {os.getloadavg()} on {os.cpu_count()} cores; torch threads {torch.get_num_threads()}; "
          f"no GPU used (CUDA {'present' if torch.cuda.is_available() else 'absent'})", flush=True)

    t = time.perf_counter()
    keys_np, labels_np, q_np, ql_np, text_np = synthetic(args.classes, per_class, qpc, args.dim, args.latent,
                                                         args.seed)
    print(f"data: {len(keys_np):,} keys x {args.dim}, {len(q_np):,} queries, {args.classes} classes "
          f"({time.perf_counter() - t:.0f} s)", flush=True)
    # One copy of the keys in memory (5.2 GB at full size): the dense side and faiss's exact search (faiss.knn, the
    # brute-force search an IndexFlatIP runs, without copying the keys into an index) both read it.
    keys = torch.from_numpy(keys_np)
    labels, queries, q_labels = torch.from_numpy(labels_np), torch.from_numpy(q_np), torch.from_numpy(ql_np)
    text = torch.from_numpy(text_np)

    sides: dict[str, KeyIndex | FlatKnn] = {"Flat": FlatKnn(keys_np)}
    build_s: dict[str, float] = {}
    for spec in indexes:
        factory, _, settings = spec.partition(":")
        built = next((v for k, v in sides.items() if k.partition(":")[0] == factory), None)
        if isinstance(built, KeyIndex):  # the same index searched with other settings
            sides[spec] = KeyIndex(built.index, factory, params=settings)
            continue
        t = time.perf_counter()
        sample = keys
        m = __import__("re").search(r"IVF(\d+)", factory)
        if m:
            n_train = min(len(keys), args.train_per_list * int(m.group(1)))
            sample = keys[torch.from_numpy(np.random.default_rng(1).choice(len(keys), n_train, replace=False))]
        index = build_index(sample.numpy(), factory)
        if sample is not keys:  # trained on the sample: now hold every key
            index.reset()
            for i in range(0, len(keys), 100_000):
                index.add(keys[i : i + 100_000].numpy())
        build_s[spec] = time.perf_counter() - t
        sides[spec] = KeyIndex(index, factory, params=settings)
        print(f"{factory} built in {build_s[spec]:.0f} s ({settings or 'default settings'}); rss {rss_gb():.1f} GB",
              flush=True)

    n_exact = args.exact_queries or len(queries)
    rounds = np.array_split(np.arange(len(queries)), args.rounds)
    qps: dict[str, list[float]] = {"dense": [], **{name: [] for name in sides}}
    agree: dict[str, list[float]] = {name: [] for name in sides}
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
        for name, index in sides.items():
            sub = q[: len(ex)] if name == "Flat" else q
            logits, rows, secs = topk_tip(sub, index, keys, labels, text, args.beta, args.alpha, args.k)
            qps[name].append(len(sub) / secs)
            acc[name].append(float((logits[: len(ex)].argmax(1) == y[: len(ex)]).float().sum()))
            agree[name].append(float((logits[: len(ex)].argmax(1) == dense_logits.argmax(1)).float().sum()))
            rec16[name].append(recall(rows[: len(ex)], exact_rows, 16) * len(ex))
            reck[name].append(recall(rows[: len(ex)], exact_rows, args.k) * len(ex))
        print(f"round {r + 1}/{len(rounds)}: " + ", ".join(f"{n} {v[-1]:.0f} q/s" for n, v in qps.items())
              + f"; load {os.getloadavg()[0]:.1f}", flush=True)

    print(f"\n{len(keys):,} keys x {args.dim}, {len(queries):,} queries ({exact_total:,} through the exact sides), "
          f"k = {args.k}, beta = {args.beta}, alpha = {args.alpha}; load average now {os.getloadavg()}; "
          f"peak rss {rss_gb():.1f} GB")
    dense_median = statistics.median(qps["dense"])
    print(f"| side | q/s min | q/s median | x dense (median) | recall@16 | recall@{args.k} | Tip top-1 (exact "
          "queries) | agrees with dense Tip | build s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| dense (blocked matmul, every key) | {min(qps['dense']):.0f} | {dense_median:.0f} | 1.0 | 1 | 1 | "
          f"{100 * sum(acc['dense']) / exact_total:.2f} | - | - |")
    for name in sides:
        med = statistics.median(qps[name])
        label = f"{name.partition(':')[0]} top-{args.k} ({sides[name].settings(args.k) or 'exact'})"
        print(f"| {label} | {min(qps[name]):.0f} | "
              f"{med:.0f} | {med / dense_median:.1f} | {sum(rec16[name]) / exact_total:.4f} | "
              f"{sum(reck[name]) / exact_total:.4f} | {100 * sum(acc[name]) / exact_total:.2f} | "
              f"{100 * sum(agree[name]) / exact_total:.2f}% | {build_s.get(name, 0):.0f} |")
    print("Flat is the exact top-k: the approximate indexes' Tip top-1 should match Flat's; Flat vs dense is the "
          "effect of keeping k keys per query (k is searched on val in the adapters)")


if __name__ == "__main__":
    main()
