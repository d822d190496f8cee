"""Sweeps: progress across jobs, failures kept per job, and a summary at the end.

``fewclip run -m`` runs one job per combination of the sweep's values (``conf/sweep/*.yaml`` presets and the
command line, the command line winning per key). Every job writes into a directory named after its settings
(``outputs/sweeps/<sweep_name>/<dataset>/<adapter>/<backbone>-k<K>-s<seed>[/<other overrides>]``), so running
the same sweep again finds the finished jobs and skips them (``fewclip.runner.finished_result``). A job that
fails writes ``error.json`` (message, traceback, log path) instead of ``result.json``, and the sweep goes on;
``SweepSummary`` lists the failures when every job has returned.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger("fewclip")

ERROR_FILE = "error.json"
_TOTAL_ENV = "FEWCLIP_SWEEP_TOTAL"
last_summary: dict[str, Any] | None = None  # set when a sweep ends (the CLI's exit code reads it)


def count_jobs(params: dict[str, str], task_overrides: list[str]) -> int:
    """Jobs in a basic sweep: the product of the value counts per key (command line replaces preset keys)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    per_key: dict[str, int] = {}
    for o in parser.parse_overrides([f"{k}={v}" for k, v in params.items()] + list(task_overrides)):
        per_key[o.get_key_element()] = len(list(o.sweep_string_iterator())) if o.is_sweep_override() else 1
    return math.prod(per_key.values()) if per_key else 1


def job_progress(num: int, message: str) -> None:
    """One line per finished job: ``[3/24] ...`` (the total comes from ``SweepSummary``)."""
    total = os.environ.get(_TOTAL_ENV, "?")
    sys.stdout.write(f"[{num + 1}/{total}] {message}\n")
    sys.stdout.flush()


def record_failure(out_dir: Path, error: BaseException, log_file: Path | None) -> Path:
    """Write ``error.json`` for a failed job (and never a ``result.json``)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / ERROR_FILE
    path.write_text(json.dumps({
        "error": f"{type(error).__name__}: {error}",
        "traceback": "".join(traceback.format_exception(type(error), error, error.__traceback__)),
        "log": str(log_file) if log_file is not None else None,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }, indent=1))
    return path


def clear_failure(out_dir: Path) -> None:
    (out_dir / ERROR_FILE).unlink(missing_ok=True)


def summarize(sweep_dir: Path, since: float = 0.0) -> dict[str, Any]:
    """Finished and failed jobs under ``sweep_dir``; failures written after ``since`` (epoch seconds) only."""
    results = sorted(sweep_dir.rglob("result.json"))
    failed = []
    for p in sorted(sweep_dir.rglob(ERROR_FILE)):
        if (p.parent / "result.json").exists() or p.stat().st_mtime < since:
            continue
        info = json.loads(p.read_text())
        failed.append({"dir": str(p.parent), "error": info.get("error"), "log": info.get("log")})
    return {"finished": len(results), "failed": failed}


class SweepSummary(Callback):
    """Hydra callback (``hydra.callbacks`` in ``conf/config.yaml``): counts the jobs, then reports failures."""

    def __init__(self) -> None:
        self._start = 0.0

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._start = time.time()
        params = dict(config.hydra.sweeper.get("params") or {})
        total = count_jobs({k: str(v) for k, v in params.items()}, list(config.hydra.overrides.task))
        os.environ[_TOTAL_ENV] = str(total)  # read by each job's progress line (inherited by launcher workers)
        log.info("sweep: %d jobs into %s", total, config.hydra.sweep.dir)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        global last_summary
        sweep_dir = Path(config.hydra.sweep.dir)
        summary = last_summary = summarize(sweep_dir, since=self._start)
        lines = [f"sweep {sweep_dir}: {summary['finished']} jobs with a result.json, "
                 f"{len(summary['failed'])} failed in {time.time() - self._start:.0f} s"]
        for f in summary["failed"]:
            lines.append(f"  FAILED {f['dir']}\n    {f['error']}\n    log: {f['log']}")
        if summary["failed"]:
            lines.append("Fix the cause and run the same command again: finished jobs are skipped.")
        sys.stdout.write("\n".join(lines) + "\n")
        sys.stdout.flush()
