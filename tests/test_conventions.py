"""What users of a Hydra command-line tool expect: shell completion, output folders named after what they hold,
where the result went, progress bars only on a terminal, quiet logs, and a demo that says how long it will take."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_class_folder

from fewclip import completion
from fewclip.cli import main


@pytest.fixture(autouse=True)
def fresh_root_logger():
    """As in a new process: no handlers left on the root logger by an earlier in-process command."""
    root = logging.getLogger()
    saved, level = root.handlers[:], root.level
    root.handlers = []
    yield
    root.handlers, root.level = saved, level


# ------------------------------------------------------------------------------------------- completion
def _query(line: str, monkeypatch, capsys) -> list[str]:
    monkeypatch.setenv("COMP_LINE", line)
    monkeypatch.setattr(sys, "argv", ["fewclip"])
    assert main(["run", "-sc", "query=bash"]) == 0
    return capsys.readouterr().out.split()


def test_completion_query_completes_run_overrides(monkeypatch, capsys):
    """The query the installed script sends (``fewclip run -sc query=bash`` with the line in COMP_LINE)."""
    assert _query("fewclip run adapter=ti", monkeypatch, capsys) == ["adapter=tip", "adapter=tip_f"]
    assert "dataset=folder" in _query("fewclip run -m dataset=f", monkeypatch, capsys)
    assert "backbone.pretrained=" in _query("fewclip fit backbone.", monkeypatch, capsys)
    everything = _query("fewclip run ", monkeypatch, capsys)
    assert {"adapter=", "shots=", "views=", "dataset."} <= set(everything)
    assert completion.strip_command("fewclip run -m adapter=") == "fewclip -m adapter="
    assert completion.strip_command("/usr/bin/fewclip demo ") == "/usr/bin/fewclip "


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash not installed")
def test_installed_bash_script_completes_through_the_real_command(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["fewclip"])
    assert main(["run", "-sc", "install=bash"]) == 0
    script = tmp_path / "fewclip.bash"
    script.write_text(capsys.readouterr().out)
    assert "complete -o nospace -o default -F _fewclip_complete fewclip" in script.read_text()
    bin_dir = Path(sys.executable).parent  # the fewclip entry point installed beside this interpreter
    if not (bin_dir / "fewclip").exists():
        pytest.skip("the fewclip command is not installed beside this Python")
    probe = (f'source {script}; '
             'COMP_LINE="fewclip run dataset=fo"; COMP_POINT=${#COMP_LINE}; COMP_WORDS=(fewclip run dataset=fo); '
             'COMP_CWORD=2; _fewclip_complete; echo "${COMPREPLY[@]}"; '
             'COMP_LINE="fewclip re"; COMP_WORDS=(fewclip re); COMP_CWORD=1; _fewclip_complete; '
             'echo "${COMPREPLY[@]}"')
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, env=env, timeout=300)
    assert out.stdout.splitlines() == ["dataset=folder dataset=food101", "report"], out.stderr


# --------------------------------------------------------------------------- output folders and logs
def test_sweep_folders_are_named_after_the_data_and_short(tmp_path, monkeypatch, capsys):
    """A folder dataset is named after its folder; a path override becomes its last part and a hash, never
    folders mirroring the absolute path; job logs hold no progress bars and no third-party loader lines."""
    root = make_class_folder(tmp_path / "data" / "my pets", {"cat": 6, "dog": 6})
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["fewclip"])
    rc = main(["run", "-m", "adapter=zero_shot", "dataset=folder", f"dataset.root={root}", "shots=1", "views=1",
               f"cache_dir={tmp_path / 'cache'}", f"hydra.sweep.dir={tmp_path / 'sweep'}"])
    assert rc == 0, capsys.readouterr()
    found = list((tmp_path / "sweep").rglob("result.json"))
    assert len(found) == 1
    rel = found[0].relative_to(tmp_path / "sweep")
    import hashlib

    digest = hashlib.sha256(str(root).encode()).hexdigest()[:6]
    assert rel.parts == ("my-pets", "zero_shot", "tiny-k1-s1", f"dataset.root=my-pets-{digest},views=1",
                         "result.json")
    res = json.loads(found[0].read_text())
    assert res["dataset"] == "my-pets" and res["config"]["dataset"]["name"] == "my-pets"
    log = (found[0].parent / "fewclip.log").read_text()
    assert "faiss.loader" not in log and "\r" not in log and "Parsing model identifier" not in log
    assert "caches.builder" in log  # fewclip's own lines stay


def test_run_prints_where_the_result_went(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["fewclip"])
    rc = main(["run", "adapter=zero_shot", "shots=1", "views=1", f"cache_dir={tmp_path / 'cache'}",
               f"hydra.run.dir={tmp_path / 'run'}"])
    out = capsys.readouterr().out
    assert rc == 0
    assert f"result: {tmp_path / 'run' / 'result.json'}" in out.splitlines()
    assert (tmp_path / "run" / "result.json").is_file()


def test_open_clip_backbone_is_named_after_its_model():
    from fewclip.config import compose

    cfg = compose(["backbone=open_clip", "backbone.model=ViT-B-32"])
    assert cfg.backbone.name == "ViT-B-32"
    cfg = compose(["backbone=open_clip", "backbone.model=local-dir:/models/My CLIP/"])
    assert cfg.backbone.name == "My-CLIP"
    cfg = compose(["dataset=csv", "dataset.path=/data/birds/labels.csv"])
    assert cfg.dataset.name == "labels"
    cfg = compose(["dataset=folder", "dataset.root=/data/birds", "dataset.name=cub"])
    assert cfg.dataset.name == "cub"


# -------------------------------------------------------------------------------------------- progress
def test_progress_bars_only_on_a_terminal(capsys, caplog, monkeypatch):
    from caches.progress import Progress

    with caplog.at_level(logging.INFO, logger="caches.progress"):
        for _ in Progress(range(5), desc="encoding x", unit="img"):  # stderr is captured: not a terminal
            pass
    assert capsys.readouterr().err == ""
    assert [r.getMessage() for r in caplog.records][0] == "encoding x: 5 img"
    assert caplog.records[-1].getMessage().startswith("encoding x: done in ")
    monkeypatch.setattr("caches.progress.on_terminal", lambda: True)
    for _ in Progress(range(5), desc="encoding y", unit="img"):
        pass
    assert "encoding y: 100%" in capsys.readouterr().err
    for _ in Progress(range(5), desc="encoding z", enabled=False):
        pass
    assert capsys.readouterr().err == ""


# ------------------------------------------------------------------------------------------------ demo
def test_demo_estimates_its_work_and_keeps_to_the_quick_plan(tmp_path, monkeypatch, capsys):
    """The estimate is the image count times the measured cost per image; over the budget the demo keeps to the
    first dataset and the feature-mode adapters unless --full (the jobs themselves are not run here)."""
    import fewclip.demo as demo
    from caches.data.datasets import load_digits
    from fewclip import estimate

    monkeypatch.setattr(estimate, "seconds_per_image", lambda backbone: 0.5)
    ran = []

    def fake_run(cfg, out_dir):
        ran.append((str(cfg.dataset.name), out_dir.name))
        return {"val_acc": 1.0, "test_acc": 1.0, "hparams": {}, "timings_s": {"fit": 0, "search": 0, "total": 0},
                "protocol": {"backbone_weights": "tag:x"}, "dataset": "digits", "backbone": "tiny", "shots": 1,
                "seed": 1, "n_classes": 10, "n_support": 10, "n_val": 10, "n_test": 540, "config": {"views": 2}}

    monkeypatch.setattr("fewclip.runner.run", fake_run)
    monkeypatch.setattr(demo, "demo_datasets", lambda choice: choice.split(",") if choice else ["digits"])
    monkeypatch.setattr("fewclip.config.group_options", lambda group: ["zero_shot", "tip", "coop_pixels"])
    monkeypatch.setattr(demo, "DEMO_BUDGET_S", 60.0)
    args = ["--out", str(tmp_path / "demo"), "--curve", "", "backbone=tiny", "shots=1", "views=2",
            f"cache_dir={tmp_path / 'cache'}"]
    assert demo.main(args) == 0
    out = capsys.readouterr().out
    # Independent count: 10 classes x 1 shot x 2 views + 1 val per class + the test split; coop_pixels trains
    # the demo's 20 epochs x (3 passes x 10 support + 10 val), then encodes the test split.
    assert demo.DEMO_SHORT["coop_pixels"] == ["adapter.epochs=20"]
    n_test = len(load_digits(["{}"]).splits["test"])
    stores = 10 * 1 * 2 + 10 + n_test
    pixels = 20 * (3 * 10 + 10) + n_test
    assert f"estimated encoder time {estimate.fmt_duration(0.5 * (stores + pixels))}" in out
    assert f"quick plan (digits, the 2 feature-mode adapters: about {estimate.fmt_duration(0.5 * stores)})" in out
    assert ran == [("digits", "zero_shot"), ("digits", "tip")]
    ran.clear()
    assert demo.main(["--full", *args]) == 0
    assert ran == [("digits", "zero_shot"), ("digits", "tip"), ("digits", "coop_pixels")]

    # Within the budget with two datasets: the pixel-mode adapters run on the first one only, said before and
    # after the tables; --full runs them on both.
    from layouts import make_coop

    make_coop(tmp_path / "data", "dtd", n_classes=10)
    monkeypatch.setattr(demo, "DEMO_BUDGET_S", 1e9)
    monkeypatch.setattr(demo, "demo_datasets", lambda choice: ["digits", "dtd"])
    two = [*args, f"data_root={tmp_path / 'data'}"]
    ran.clear()
    assert demo.main(two) == 0
    out = capsys.readouterr().out
    assert ran == [("digits", "zero_shot"), ("digits", "tip"), ("digits", "coop_pixels"), ("dtd", "zero_shot"),
                   ("dtd", "tip")]
    assert "the pixel-mode adapters run on digits only" in out and "--full runs them there too" in out
    assert "Not run (see the plan above): coop_pixels on dtd." in out
    ran.clear()
    assert demo.main(["--full", *two]) == 0
    assert [r for r in ran if r[0] == "dtd"] == [("dtd", "zero_shot"), ("dtd", "tip"), ("dtd", "coop_pixels")]
