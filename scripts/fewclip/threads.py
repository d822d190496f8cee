"""Threads per job: torch, the BLAS / OpenMP pools (numpy, scikit-learn) and faiss, from the cores the launcher gives
each job, so that parallel jobs on one node do not oversubscribe it (two threads per job on a loaded node were
measured 8-18x slower than one).

``threads=N`` sets it; ``threads=null`` (the default) derives it:

* Slurm (``hydra/launcher=slurm``, or any job inside a Slurm allocation): ``SLURM_CPUS_PER_TASK``, else the
  launcher's ``cpus_per_task``;
* Hydra's joblib launcher: the cores this process may use / the jobs running at once (``n_jobs``, capped by the
  number of jobs in the sweep; negative ``n_jobs`` counts as joblib does: -1 = every core);
* otherwise (one job at a time): every core this process may use.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

log = logging.getLogger(__name__)


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity: cgroups, taskset, Slurm's cpuset)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def job_threads(requested: int | None, launcher: Mapping[str, Any] | None = None, sweep_jobs: int | None = None,
                env: Mapping[str, str] | None = None, cores: int | None = None) -> tuple[int, str]:
    """The thread count of one job and where it came from (for ``result.json``).

    Args:
        requested: ``threads=`` from the config (None: derive it).
        launcher: the Hydra launcher config (``hydra.launcher``), if any.
        sweep_jobs: jobs in the sweep, when known (joblib runs min(n_jobs, jobs) at once).
        env: environment (default ``os.environ``); cores: available cores (default ``available_cores()``).
    """
    if requested is not None:
        if int(requested) < 1:
            raise ValueError(f"threads must be >= 1, or null to follow the launcher; got {requested}")
        return int(requested), "threads="
    env = os.environ if env is None else env
    cores = available_cores() if cores is None else cores
    target = str((launcher or {}).get("_target_", "")).lower()
    if env.get("SLURM_CPUS_PER_TASK", "").isdigit():
        return max(1, int(env["SLURM_CPUS_PER_TASK"])), "Slurm: SLURM_CPUS_PER_TASK"
    if "slurm" in target and (launcher or {}).get("cpus_per_task"):
        return max(1, int(launcher["cpus_per_task"])), "Slurm launcher: cpus_per_task"
    if "joblib" in target:
        n_jobs = launcher.get("n_jobs")
        n_jobs = -1 if n_jobs is None else int(n_jobs)
        if n_jobs < 0:  # joblib's convention: -1 = every core, -2 = all but one, ...
            n_jobs = max(1, cores + 1 + n_jobs)
        n_jobs = max(1, n_jobs)
        if sweep_jobs:
            n_jobs = min(n_jobs, sweep_jobs)
        return max(1, cores // n_jobs), f"joblib: {cores} cores / {n_jobs} jobs at once"
    return cores, f"{cores} cores, one job at a time"


def set_threads(n: int) -> None:
    """Use ``n`` threads in torch, the BLAS / OpenMP pools threadpoolctl finds, and faiss."""
    import torch

    torch.set_num_threads(n)
    # Libraries loaded later (scikit-learn's scipy, ...) read these when they initialise; so do child processes.
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS"):
        os.environ[var] = str(n)
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(limits=n)
    except ImportError:  # scikit-learn brings it; without it, the BLAS pools keep their default
        log.debug("threadpoolctl not installed: BLAS thread pools left as they are")
    try:
        import faiss

        faiss.omp_set_num_threads(n)
    except (ImportError, AttributeError):
        pass


def configure_job_threads(requested: int | None) -> dict[str, Any]:
    """Resolve this job's thread count from ``threads=`` and the Hydra launcher, apply it, and return
    ``{"n", "source"}`` for ``result.json``."""
    from omegaconf import OmegaConf

    from fewclip.sweep import _TOTAL_ENV

    launcher = None
    try:
        from hydra.core.hydra_config import HydraConfig

        node = HydraConfig.get().get("launcher")
        if node is not None:
            launcher = OmegaConf.to_container(node, resolve=False)
    except ValueError:  # not inside a Hydra job (a plain run(cfg) call)
        pass
    total = os.environ.get(_TOTAL_ENV, "")
    n, source = job_threads(requested, launcher, int(total) if total.isdigit() else None)
    set_threads(n)
    log.info("%d threads per job (%s)", n, source)
    return {"n": n, "source": source}
