"""Bad input, one row per case: the command, its exit code and a phrase of its one-line message, never a traceback.

Every case runs in-process through ``fewclip.cli.main`` (the function behind the ``fewclip`` command) with its
output captured; one case runs as a real ``python -m fewclip`` process to check the exit code end to end. Cases
marked ``cheap`` must be refused before any backbone is built: the backbone constructor raises if it is called.
"""

from __future__ import annotations

import errno
import json
import logging
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import make_class_folder

from fewclip.cli import main


@dataclass(frozen=True)
class Case:
    name: str
    args: tuple[str, ...]  # {tmp} is the test's temporary folder (prepared by _prepare)
    code: int
    phrase: str
    cheap: bool = True  # refused before the backbone loads
    lines: int = 1  # lines the message takes on stderr (plus Hydra's own)
    fault: str | None = None  # every write under the cache folder fails with this errno (tests/test_store_faults.py)


CASES = [
    # config: Hydra composition and the typed spine
    Case("shots-not-a-number", ("run", "shots=abc"), 2, "Value 'abc' of type 'str' could not be converted to Integer"),
    Case("unknown-adapter", ("run", "adapter=nope"), 2, "Could not find 'adapter/nope'; Available options in "
                                                        "'adapter': ape, ape_t"),
    Case("unknown-key", ("run", "foo=1"), 2, "Could not override 'foo'"),
    Case("sweep-value-without-m", ("run", "shots=1,2"), 2, "Ambiguous value for argument 'shots=1,2'"),
    # settings checked before anything is read or built
    Case("zero-views", ("run", "views=0"), 2, "views=0: must be >= 1"),
    Case("zero-shots", ("run", "shots=0"), 2, "shots=0: must be >= 1"),
    Case("negative-batch", ("run", "batch_size=-4"), 2, "batch_size=-4: must be >= 1"),
    Case("crop-scale-reversed", ("run", "augment.scale=[0.9,0.2]"), 2, "augment.scale=[0.9, 0.2]: needs [min, max]"),
    Case("unknown-target", ("run", "targets=[nope]"), 2, "unknown datasets ['nope']"),
    Case("bad-device", ("run", "device=tpu"), 2, "device=tpu: use auto, cpu, cuda or cuda:N"),
    # adapter settings: the constructor's check, before any backbone or encoding
    Case("adapter-bad-lookup", ("run", "adapter=tip", "adapter.lookup=foo"), 2, "TipAdapter: lookup must be"),
    Case("adapter-bad-grid", ("run", "adapter=tip", "adapter.grid=cubic"), 2, "TipAdapter: grid spacing must be"),
    Case("adapter-bad-views", ("run", "adapter=linear_probe", "adapter.use_views=sometimes"), 2,
         "LinearProbe: use_views must be true, false or auto"),
    Case("adapter-unknown-key", ("run", "adapter=gda", "+adapter.nope=1"), 2, "GDA: "),
    # datasets: missing, empty, one class, too few shots, bad CSV rows
    # (a folder's message is followed by the expected layout: 5 lines)
    Case("missing-root", ("run", "dataset=folder", "dataset.root={tmp}/missing"), 2, "does not exist", lines=6),
    Case("empty-class", ("run", "dataset=folder", "dataset.root={tmp}/empty_class"), 2, "holds no images", lines=6),
    Case("one-class", ("run", "dataset=folder", "dataset.root={tmp}/one_class"), 2, "a classifier needs at least 2"),
    Case("k-above-class-size", ("run", "dataset=folder", "dataset.root={tmp}/two_classes", "shots=50"), 2,
         "usable images, 50 requested. Lower shots=, or pass fewshot.allow_fewer=true"),
    Case("csv-conflicting-duplicate", ("run", "dataset=csv", "dataset.path={tmp}/conflict.csv"), 2,
         "lists 1 images more than once with different labels or splits: a/0.png on lines 2, 3 as 'a' (train) / "
         "'b' (test)"),
    Case("csv-empty-path", ("run", "dataset=csv", "dataset.path={tmp}/empty_path.csv"), 2, "empty path on line 3"),
    Case("csv-empty-label", ("run", "dataset=csv", "dataset.path={tmp}/empty_label.csv"), 2, "empty label on line 2"),
    Case("check-csv-conflict", ("data", "check", "dataset=csv", "dataset.path={tmp}/conflict.csv"), 1,
         "more than once with different labels", lines=0),
    Case("check-one-class", ("data", "check", "dataset=folder", "dataset.root={tmp}/one_class", "--no-open"), 1,
         "1 class: a classifier needs at least 2", lines=0),
    Case("check-bad-override", ("data", "check", "shots=abc"), 2, "could not be converted to Integer"),
    # backbones
    Case("open-clip-without-model", ("run", "backbone=open_clip"), 2, "backbone.model is not set: backbone=open_clip "
                                                                      "needs backbone.model=ARCH"),
    Case("unknown-model", ("run", "backbone=open_clip", "backbone.model=NoSuchNet-B-32"), 2,
         "unknown open_clip model backbone.model=NoSuchNet-B-32", cheap=False),
    Case("unknown-tag", ("run", "backbone=open_clip", "backbone.model=ViT-B-32", "backbone.pretrained=no-such-tag"),
         2, "Unknown pretrained tag 'no-such-tag' for open_clip model 'ViT-B-32'. Known tags: openai", cheap=False),
    Case("missing-weights-file", ("run", "backbone=tiny", "backbone.pretrained={tmp}/missing.bin"), 2,
         "no such weights file", cheap=False),
    Case("local-dir-without-weights", ("run", "backbone=open_clip", "backbone.model=local-dir:{tmp}/clip_no_weights"),
         2, "the folder has a config but no weights", cheap=False),
    Case("offline-tag", ("run", "backbone=vit_b32"), 2, "Cannot fetch pretrained weights", cheap=False, lines=3),
    # the cache folder cannot be written
    Case("disk-full-cache", ("run",), 2, "cannot write the feature cache at", fault="ENOSPC"),
    Case("read-only-cache", ("run",), 2, "Read-only file system (EROFS); set cache_dir= to a writable directory",
         fault="EROFS"),
    # other commands
    Case("completion-unknown-shell", ("run", "-sc", "install=fish"), 2, "shell completion supports bash, zsh"),
    Case("fit-bad-override", ("fit", "shots=abc"), 2, "could not be converted to Integer"),
    Case("demo-zero-views", ("demo", "views=0"), 2, "views=0: must be >= 1"),
    Case("report-nothing", ("report", "{tmp}/missing"), 2, "no readable result.json"),
    Case("report-plot-extension", ("report", "{tmp}", "--plot", "{tmp}/acc.jpg"), 2,
         "the extension picks the format; use one of .pdf, .svg, .eps, .png"),
    Case("predict-no-images", ("predict", "{tmp}/missing", "{tmp}/x.png"), 2, "x.png: no such file or folder"),
    Case("unknown-command", ("nosuch",), 2, "unknown command 'nosuch'", lines=0),
]


def _prepare(tmp: Path) -> None:
    """The folders, CSV files and backbone folder the cases name."""
    make_class_folder(tmp / "one_class", {"only": 4})
    make_class_folder(tmp / "two_classes", {"a": 3, "b": 3})
    make_class_folder(tmp / "empty_class", {"a": 3})
    (tmp / "empty_class" / "b").mkdir()
    make_class_folder(tmp / "csv", {"a": 3, "b": 3})
    rows = [f"{c}/{i}.png,{c},{s}" for c in "ab" for i, s in zip(range(3), ("train", "val", "test"))]
    for c in "ab":
        for j in range(3):
            (tmp / "csv" / c / f"img{j:03d}.png").rename(tmp / "csv" / c / f"{j}.png")
    header = "path,label,split"
    (tmp / "csv" / "conflict.csv").write_text("\n".join([header, rows[0], "a/0.png,b,test", *rows[1:]]) + "\n")
    (tmp / "csv" / "empty_path.csv").write_text("\n".join([header, rows[0], ",a,train", *rows[1:]]) + "\n")
    (tmp / "csv" / "empty_label.csv").write_text("\n".join([header, "a/0.png,,train", *rows[1:]]) + "\n")
    for name in ("conflict", "empty_path", "empty_label"):
        (tmp / f"{name}.csv").symlink_to(tmp / "csv" / f"{name}.csv")
    folder = tmp / "clip_no_weights"
    folder.mkdir()
    cfg = json.loads((Path(__file__).parents[1] / "caches" / "model_configs" / "fewclip-tiny.json").read_text())
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))


@pytest.fixture(autouse=True)
def fresh_root_logger():
    """Each case starts, as a new process does, without handlers on the root logger (an earlier in-process command
    or Hydra left handlers bound to an earlier test's captured streams)."""
    root = logging.getLogger()
    saved, level = root.handlers[:], root.level
    root.handlers = []
    yield
    root.handlers, root.level = saved, level


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("bad_input")
    _prepare(tmp)
    return tmp


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(case: Case, prepared: Path, tmp_path: Path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # outputs/ and artifacts/ land here
    monkeypatch.setattr(sys, "argv", ["fewclip"])
    if case.cheap:
        def never(*args, **kwargs):
            raise AssertionError("the backbone was built before the bad input was reported")

        monkeypatch.setattr("caches.backbone.FrozenClip.__init__", never)
    args = [a.replace("{tmp}", str(prepared)) for a in case.args]
    if args[0] in ("run", "fit", "demo"):
        args.append(f"cache_dir={tmp_path / 'cache'}")
    if case.fault:
        from test_store_faults import read_only

        (tmp_path / "cache").mkdir()
        with read_only(tmp_path / "cache", getattr(errno, case.fault)):
            code = main(args)
    else:
        code = main(args)
    out = capsys.readouterr()
    assert "Traceback" not in out.out + out.err
    assert code == case.code, out.out + out.err
    where = out.err if case.lines else out.out + out.err
    assert any(case.phrase in line for line in where.splitlines()), where  # the phrase on one line
    if case.lines:
        assert len(out.err.strip().splitlines()) <= case.lines, out.err
    if case.name == "zero-views":  # refused before any store was built
        assert not list((tmp_path / "cache").rglob("manifest.json"))


def test_a_real_process_exits_2_with_one_line(tmp_path):
    """The command as a user runs it: ``python -m fewclip run shots=abc`` (Hydra's own handler exits 1)."""
    p = subprocess.run([sys.executable, "-m", "fewclip", "run", "shots=abc"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=300, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == ["fewclip run: Error merging override shots=abc; Value 'abc' of type "
                                             "'str' could not be converted to Integer; full_key: shots"]
    assert p.stdout == ""
