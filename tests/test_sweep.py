"""Sweeps end to end: the smoke preset as a subprocess, killed and resumed, then reported."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from caches.store import KVStore

ROOT = Path(__file__).parents[1]


def _sweep(tmp_path: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "fewclip", "run", "-m", "sweep=smoke", f"cache_dir={tmp_path / 'cache'}",
            f"hydra.sweep.dir={tmp_path / 'sweep'}", "progress=false", *extra]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}


def _results(tmp_path: Path) -> dict[Path, dict]:
    return {p: json.loads(p.read_text()) for p in sorted((tmp_path / "sweep").rglob("result.json"))}


def test_smoke_sweep_is_killed_resumed_and_encodes_each_image_once(tmp_path):
    # Start the sweep and kill it (SIGKILL, no chance to clean up) once two jobs have finished.
    proc = subprocess.Popen(_sweep(tmp_path), cwd=tmp_path, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.time() + 300
    while len(list((tmp_path / "sweep").rglob("result.json"))) < 2 and proc.poll() is None:
        assert time.time() < deadline, "sweep made no progress"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    first = _results(tmp_path)  # every result.json there parses: none is half-written
    assert 2 <= len(first) < 8, "the sweep must be killed partway"
    stamps = {p: p.stat().st_mtime_ns for p in first}

    out = subprocess.run(_sweep(tmp_path), cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    results = _results(tmp_path)
    assert len(results) == 8  # 2 adapters x 2 shot counts x 2 seeds
    assert all(p.stat().st_mtime_ns == stamps[p] for p in first)  # finished jobs were not run again
    assert out.stdout.count("already done, skipped") == len(first)
    assert "[8/8]" in out.stdout and "0 failed" in out.stdout
    assert {(r["adapter"], r["shots"], r["seed"]) for r in results.values()} == {
        (a, k, s) for a in ("tip", "linear_probe") for k in (1, 2) for s in (1, 2)}

    # Each image was encoded once: the encoder's work over all jobs equals the distinct images the jobs drew,
    # counted here from the few-shot id files and the test store.
    fewshot = [json.loads(p.read_text()) for p in (tmp_path / "cache" / "fewshot" / "digits").glob("*.json")]
    train_ids = {i for f in fewshot for i in f["train"]}
    val_ids = {i for f in fewshot for i in f["val"]}
    any_result = next(iter(results.values()))
    n_test = len(KVStore.load(any_result["cache"]["test"]["path"]))
    views = any_result["protocol"]["views"]
    expected = views * len(train_ids) + len(val_ids) + n_test
    encoded = sum(r["cache_activity"]["encoded_images"] for r in results.values())
    killed_work = expected - encoded  # images a killed job had encoded into a bank chunk are not encoded again
    assert 0 <= killed_work and encoded <= expected
    bank = {}
    for chunk in (tmp_path / "cache").glob("tiny/digits/bank-*/chunk-*"):
        store = KVStore.load(chunk)
        for row in store.meta:
            key = (chunk.parent.name.split("-")[1], row["key"])
            assert key not in bank, f"{key} encoded twice"
            bank[key] = True
    assert len(bank) == len(train_ids) + len(val_ids) + n_test
    # a job whose images were all encoded before spends no time encoding
    assert any(r["timings_s"]["encode"] == 0 and r["cache_activity"]["encoded_images"] == 0
               for r in results.values())

    # The report's numbers equal a computation over the result files written here.
    rep = subprocess.run([sys.executable, "-m", "fewclip", "report", str(tmp_path / "sweep"), "--out",
                          str(tmp_path / "report"), "--plot", str(tmp_path / "report" / "acc.png")],
                         cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert rep.returncode == 0, rep.stderr
    runs = pd.DataFrame([{"adapter": r["adapter"], "shots": r["shots"], "seed": r["seed"], "acc": r["test_acc"]}
                         for r in results.values()])
    expected_means = runs.groupby(["adapter", "shots"])["acc"].agg(["mean", lambda s: s.std(ddof=0)])
    summary = pd.read_csv(tmp_path / "report" / "summary.csv")
    cells = summary[(summary["table"] == "per_shot") & (summary["dataset"] == "digits")]
    assert len(cells) == 4
    for _, c in cells.iterrows():
        mean, std = expected_means.loc[(c["adapter"], c["shots"])]
        assert c["mean"] == pytest.approx(mean) and c["std"] == pytest.approx(std)
        assert f"{mean:.2f} ± {std:.2f}" in rep.stdout
    assert (tmp_path / "report" / "acc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_failing_job_does_not_stop_the_sweep(tmp_path):
    out = subprocess.run(_sweep(tmp_path, "adapter=tip", "shots=1,500", "seed=1"), cwd=tmp_path, env=_env(),
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 1  # the sweep finished, with a failure to report
    ok = tmp_path / "sweep" / "digits" / "tip" / "tiny-k1-s1"
    bad = tmp_path / "sweep" / "digits" / "tip" / "tiny-k500-s1"
    assert (ok / "result.json").is_file()
    assert not (bad / "result.json").exists()
    error = json.loads((bad / "error.json").read_text())
    assert "500 requested" in error["error"] and "Traceback" in error["traceback"]
    assert "500 requested" in Path(error["log"]).read_text()
    assert "FAILED" in out.stdout and str(error["log"]) in out.stdout


def test_parallel_jobs_share_the_caches(tmp_path):
    """Two local parallel workers (Hydra's joblib launcher) on one cache: no store is built twice."""
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    out = subprocess.run(_sweep(tmp_path, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "adapter=tip",
                                "shots=1", "seed=1,2,3,4"), cwd=tmp_path, env=_env(), capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    results = _results(tmp_path)
    assert len(results) == 4
    built = [name for r in results.values() for name in r["cache_activity"]["built"]]
    assert len(built) == len(set(built))  # text, val and test stores: built by one job, loaded by the others
    assert sum(name.startswith("features-test") for name in built) == 1


def test_presets_and_the_slurm_launcher_compose():
    """Every sweep preset composes with its values; the Slurm launcher config resolves to submitit's."""
    from hydra import compose, initialize_config_dir

    from fewclip.config import conf_dir, group_options, register_schema
    from fewclip.sweep import count_jobs

    register_schema()
    expected = {"smoke": 8, "main_table": 11 * 7 * 5 * 3, "base2novel": 11 * 5 * 3}
    assert set(group_options("sweep")) == set(expected)
    for preset, jobs in expected.items():
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            cfg = compose("config", overrides=[f"sweep={preset}"], return_hydra_config=True)
        params = {k: str(v) for k, v in cfg.hydra.sweeper.params.items()}
        assert count_jobs(params, []) == jobs and cfg.sweep_name == preset
        assert count_jobs(params, ["adapter=tip,coop", "dataset=dtd"]) == jobs // (len(
            params["adapter"].split(",")) * len(params.get("dataset", "x").split(","))) * 2
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose("config", overrides=["sweep=main_table", "hydra/launcher=slurm"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher") and cfg.hydra.launcher.gpus_per_node == 1
    assert cfg.backbone.name == "rn50" and cfg.dataset.subsample == "all"
