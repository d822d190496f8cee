"""Sweep cost: the smoke sweep's wall time from a cold cache, and the per-job overhead once every cache is warm.

Runs ``fewclip run -m sweep=<preset>`` as a subprocess three times into a temporary directory:

1. cold: empty cache (encodes every image once) -> the smoke sweep's wall time;
2. warm, N jobs, ``resume=false`` (every job runs again, every store is a cache hit);
3. warm, 1 job (process start, imports, Hydra set-up, one job).

Per-job cost, two ways: the median interval between consecutive jobs' ``result.json`` writes in the warm sweep
(robust to the first job's one-off imports and to noise), and (wall_N - wall_1) / (N - 1). The adapter's own work
is read from each ``result.json`` (``timings_s``: fit + search + eval); the overhead is the difference, printed
with the in-job breakdown (backbone, dataset, cache loads).

    python scripts/bench_sweep_overhead.py              # sweep=smoke (8 jobs, tiny backbone)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def sweep(workdir: Path, extra: list[str]) -> float:
    cmd = [sys.executable, "-m", "fewclip", "run", "-m", f"cache_dir={workdir / 'cache'}", "progress=false",
           *extra]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    t = time.perf_counter()
    out = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if out.returncode != 0:
        raise SystemExit(f"sweep failed:\n{out.stdout}\n{out.stderr}")
    return wall


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="smoke")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        cold = sweep(work, [f"sweep={args.preset}", f"hydra.sweep.dir={work / 'cold'}"])
        warm_n = sweep(work, [f"sweep={args.preset}", f"hydra.sweep.dir={work / 'warm'}", "resume=false"])
        files = sorted((work / "warm").rglob("result.json"), key=lambda f: f.stat().st_mtime)
        written = [f.stat().st_mtime for f in files]
        results = [json.loads(f.read_text()) for f in files]
        n = len(results)
        first = results[0]
        one = [f"sweep={args.preset}", f"hydra.sweep.dir={work / 'one'}", f"adapter={first['adapter']}",
               f"shots={first['shots']}", f"seed={first['seed']}"]
        warm_1 = sweep(work, one)
    t = [r["timings_s"] for r in results]
    work_s = [x["fit"] + x["search"] + x["eval"] for x in t]
    per_job = (warm_n - warm_1) / (n - 1)
    interval = statistics.median(b - a for a, b in zip(written, written[1:]))
    work_med = statistics.median(work_s[1:])  # the jobs whose intervals are measured
    print(f"sweep={args.preset}: {n} jobs")
    print(f"cold cache (encodes every image once): {cold:.1f} s wall")
    print(f"warm cache: {warm_n:.1f} s wall for {n} jobs; 1 job alone {warm_1:.1f} s (process start included)")
    print(f"per job: median interval between jobs {interval:.3f} s; (wall_N - wall_1) / (N - 1) = {per_job:.3f} s")
    print(f"adapter's own work (fit + search + eval): median {work_med:.3f} s")
    print(f"overhead per job beyond the adapter's work: {interval - work_med:.3f} s (median interval), "
          f"{per_job - statistics.mean(work_s):.3f} s (wall difference)")
    for k in ("backbone", "dataset", "encode"):
        print(f"  in-job {k}: mean {statistics.mean(x.get(k, 0.0) for x in t):.3f} s")
    rest = [x["total"] - x["fit"] - x["search"] - x["eval"] - x.get("backbone", 0) - x.get("dataset", 0) for x in t]
    print(f"  in-job rest (sampling, cache loads, result.json): mean {statistics.mean(rest):.3f} s")


if __name__ == "__main__":
    main()
