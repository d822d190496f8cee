"""Threads per job: from threads=, the joblib launcher's jobs at once, or Slurm's cpus per task."""

from __future__ import annotations

import os

import pytest
import torch

from fewclip.config import compose
from fewclip.runner import run
from fewclip.threads import available_cores, job_threads

JOBLIB = {"_target_": "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"}
SLURM = {"_target_": "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"}
BASIC = {"_target_": "hydra._internal.core_plugins.basic_launcher.BasicLauncher"}


@pytest.fixture(autouse=True)
def _restore_threads(monkeypatch):
    before = torch.get_num_threads()
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS"):
        monkeypatch.setenv(var, os.environ.get(var, ""))  # undone after the test (set_threads writes them)
    yield
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(before)
    threadpool_limits(limits=before)


@pytest.mark.parametrize("requested,launcher,jobs,env,expected", [
    (None, {**JOBLIB, "n_jobs": 4}, None, {}, 16 // 4),
    (None, {**JOBLIB, "n_jobs": 3}, None, {}, 16 // 3),
    (None, {**JOBLIB, "n_jobs": -1}, None, {}, 1),  # joblib: -1 = one job per core
    (None, {**JOBLIB, "n_jobs": -4}, None, {}, 16 // 13),  # all but three cores
    (None, {**JOBLIB, "n_jobs": 10}, 2, {}, 16 // 2),  # a 2-job sweep runs 2 at once whatever n_jobs says
    (None, {**JOBLIB, "n_jobs": 32}, None, {}, 1),
    (None, {**SLURM, "cpus_per_task": 6}, None, {}, 6),
    (None, {**SLURM, "cpus_per_task": 6}, None, {"SLURM_CPUS_PER_TASK": "3"}, 3),  # the allocation wins
    (None, BASIC, None, {"SLURM_CPUS_PER_TASK": "5"}, 5),  # a job inside an allocation
    (None, BASIC, None, {}, 16),
    (None, None, None, {}, 16),
    (2, {**JOBLIB, "n_jobs": 4}, None, {"SLURM_CPUS_PER_TASK": "3"}, 2),  # threads= overrides everything
])
def test_threads_per_job(requested, launcher, jobs, env, expected):
    n, source = job_threads(requested, launcher, jobs, env=env, cores=16)
    assert n == expected and source


def test_bad_thread_counts_are_refused():
    with pytest.raises(ValueError, match="threads must be >= 1"):
        job_threads(0, None, cores=4)
    with pytest.raises(Exception, match="threads"):
        compose(["threads=abc"])


def test_a_job_sets_and_records_its_threads(tmp_path, monkeypatch):
    """A joblib sweep of 2 jobs at once on this machine: each job gets cores // 2 threads in torch and BLAS."""
    from threadpoolctl import threadpool_info

    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    monkeypatch.delenv("FEWCLIP_SWEEP_TOTAL", raising=False)
    base = [f"cache_dir={tmp_path / 'cache'}", "progress=false", "device=cpu", "adapter=zero_shot", "shots=1"]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert available_cores() == cores
    res = run(compose([*base, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]), out_dir=tmp_path / "a")
    expected = max(1, cores // 2)
    assert res["threads"]["n"] == expected and "joblib" in res["threads"]["source"]
    assert torch.get_num_threads() == expected
    assert all(pool["num_threads"] <= expected for pool in threadpool_info())
    res = run(compose([*base, "threads=1"]), out_dir=tmp_path / "b")
    assert res["threads"] == {"n": 1, "source": "threads="} and torch.get_num_threads() == 1
    assert all(pool["num_threads"] == 1 for pool in threadpool_info())
    # threads= changes how a job runs, not what it computes: a finished job is not run again for it
    again = run(compose([*base, "threads=2"]), out_dir=tmp_path / "b")
    assert again.get("resumed") is True
