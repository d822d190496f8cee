"""``fewclip report``: aggregation against an independent computation, protocol separation, outputs, CLI."""

from __future__ import annotations

import json
import math
import os
import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fewclip import report as rp

# A template no dataset config uses, shared by every dataset: all synthetic runs get the same template hash, so
# grouping does not depend on what conf/dataset/*.yaml holds.
TEMPLATES = ["a synthetic photo of a {}."]
ADAPTERS = ["zero_shot", "coop", "tip"]
DATASETS = ["caltech101", "dtd", "eurosat"]
SHOTS = [1, 4, 16]
SEEDS = [1, 2, 3]
MISSING = ("coop", "eurosat", 4)  # one (adapter, dataset, shots) cell never run
B2N_ADAPTERS = ["coop", "cocoop"]
B2N_DATASETS = ["dtd", "eurosat"]


def write_result(root: Path, name: str, *, dataset: str, adapter: str, shots: int, seed: int, test_acc: float,
                 views: int = 10, subsample: str | None = None, novel: float | None = None,
                 mtime: float | None = None, protocol: str | None = None, templates: list[str] | None = None) -> Path:
    proto = {"templates": templates or TEMPLATES, "split_source": "standard", "val_shots": min(shots, 4),
             "views": views, "backbone_weights": "tag:openai", "selection": "val"}
    if protocol is not None:  # results written before the protocol switch carry no name: fewshot
        proto["name"] = protocol
    if subsample is not None:
        proto["subsample"] = subsample
    res = {"dataset": dataset, "adapter": adapter, "backbone": "rn50", "shots": shots, "seed": seed,
           "n_classes": 10, "val_acc": test_acc + 1.0, "test_acc": test_acc, "protocol": proto,
           "config": {"shots": shots}, "timings_s": {"total": 1.0}}
    if novel is not None:
        res["novel"] = {"test_acc": novel, "n_test": 50}
    path = root / name / "result.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res))
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


@pytest.fixture
def results(tmp_path: Path) -> dict:
    """Synthetic runs on disk plus the values written, kept here for the independent computation."""
    rng = np.random.default_rng(0)
    root = tmp_path / "runs"
    main_rows, other_rows, b2n_rows = [], [], []
    t0 = 1_700_000_000.0
    for a in ADAPTERS:
        for d in DATASETS:
            for k in SHOTS:
                if (a, d, k) == MISSING:
                    continue
                for s in SEEDS:
                    acc = float(np.round(rng.uniform(30, 90), 3))
                    write_result(root, f"main/{d}-{a}-k{k}-s{s}", dataset=d, adapter=a, shots=k, seed=s,
                                 test_acc=acc, mtime=t0)
                    main_rows.append((a, d, k, s, acc))
    # The same job with one augmented view instead of ten: another protocol, never averaged with the rest.
    for s in SEEDS:
        acc = float(np.round(rng.uniform(30, 90), 3))
        write_result(root, f"views1/dtd-tip-k16-s{s}", dataset="dtd", adapter="tip", shots=16, seed=s, test_acc=acc,
                     views=1, mtime=t0)
        other_rows.append(("tip", "dtd", 16, s, acc))
    for a in B2N_ADAPTERS:
        for d in B2N_DATASETS:
            for s in SEEDS:
                b, n = (float(np.round(x, 3)) for x in rng.uniform(40, 90, 2))
                write_result(root, f"b2n/{d}-{a}-s{s}", dataset=d, adapter=a, shots=16, seed=s, test_acc=b,
                             subsample="base", novel=n, mtime=t0)
                b2n_rows.append((a, d, 16, s, b, n))
    # A re-run of (tip, dtd, 16, seed 1) written later in another folder: the newer file wins.
    newer = 77.777
    write_result(root, "rerun/dtd-tip-k16-s1", dataset="dtd", adapter="tip", shots=16, seed=1, test_acc=newer,
                 mtime=t0 + 100)
    main_rows = [(a, d, k, s, newer if (a, d, k, s) == ("tip", "dtd", 16, 1) else acc)
                 for a, d, k, s, acc in main_rows]
    (root / "broken").mkdir()
    (root / "broken" / "result.json").write_text("{not json")
    cols = ["adapter", "dataset", "shots", "seed", "test_acc"]
    return {"root": root,
            "main": pd.DataFrame(main_rows, columns=cols),
            "other": pd.DataFrame(other_rows, columns=cols),
            "b2n": pd.DataFrame(b2n_rows, columns=[*cols, "novel_acc"])}


def cell(summary: pd.DataFrame, **where) -> pd.Series:
    m = np.ones(len(summary), dtype=bool)
    for k, v in where.items():
        m &= (summary[k] == v).to_numpy()
    hit = summary[m]
    assert len(hit) == 1, f"{where}: {len(hit)} rows"
    return hit.iloc[0]


def load(root: Path) -> pd.DataFrame:
    return rp.load_results([root], templates={})


def test_load_skips_corrupt_and_keeps_newest_duplicate(results):
    df = load(results["root"])
    n_expected = len(results["main"]) + len(results["other"]) + len(results["b2n"])
    assert len(df) == n_expected
    assert len(df.attrs["skipped"]) == 1 and df.attrs["skipped"][0][0].endswith("broken/result.json")
    assert len(df.attrs["duplicates"]) == 1
    dropped, kept = df.attrs["duplicates"][0]
    assert "rerun" in kept and "main" in dropped
    row = df[(df.adapter == "tip") & (df.dataset == "dtd") & (df.shots == 16) & (df.seed == 1) & (df.views == 10)]
    assert row["test_acc"].tolist() == [77.777]
    assert df["novel_acc"].notna().sum() == len(results["b2n"])
    assert set(df["subsample"]) == {"all", "base"}  # missing subsample defaults to "all"
    assert df["protocol"].nunique() == 3


def test_protocol_key_templates_default_vs_custom(tmp_path):
    write_result(tmp_path, "a", dataset="dtd", adapter="tip", shots=1, seed=1, test_acc=50.0)
    write_result(tmp_path, "b", dataset="eurosat", adapter="tip", shots=1, seed=1, test_acc=50.0)
    df = rp.load_results([tmp_path], templates={"dtd": TEMPLATES, "eurosat": ["other {}."]})
    tpl = dict(zip(df["dataset"], df["templates"]))
    assert tpl["dtd"] == "default" and tpl["eurosat"] not in ("default", None)
    assert df["protocol"].nunique() == 2
    # The validation-size rule, not the number, is in the key: 1-shot and 16-shot runs share a protocol.
    write_result(tmp_path, "c", dataset="dtd", adapter="tip", shots=16, seed=1, test_acc=50.0)
    df = rp.load_results([tmp_path], templates={"dtd": TEMPLATES, "eurosat": ["other {}."]})
    assert df[df.dataset == "dtd"]["protocol"].nunique() == 1


def test_per_shot_cells_and_average_match_independent_computation(results):
    rep = rp.build_report(load(results["root"]))
    main = results["main"]
    key = rep.groups[0].key
    assert rep.groups[0].fields["views"] == 10 and not rep.groups[0].is_base_to_novel
    s = rep.summary[(rep.summary.protocol == key) & (rep.summary.table == "per_shot")]
    for (a, d, k), g in main.groupby(["adapter", "dataset", "shots"]):
        c = cell(s, adapter=a, dataset=d, shots=k)
        assert c["mean"] == pytest.approx(np.mean(g["test_acc"]))
        assert c["std"] == pytest.approx(np.std(g["test_acc"].to_numpy(), ddof=0))
        assert c["n_seeds"] == 3
    assert rp.STD_DDOF == 0
    # Average column: over datasets every adapter has at that shot count.
    for k in SHOTS:
        mk = main[main.shots == k]
        common = [d for d in DATASETS if all(((mk.adapter == a) & (mk.dataset == d)).any() for a in ADAPTERS)]
        assert (k == 4) == (common != DATASETS)
        for a in ADAPTERS:
            ma = mk[(mk.adapter == a) & mk.dataset.isin(common)]
            c = cell(s, adapter=a, dataset="Average", shots=k)
            assert c["mean"] == pytest.approx(ma.groupby("dataset")["test_acc"].mean().mean())
            per_seed = ma.pivot(index="seed", columns="dataset", values="test_acc").mean(axis=1)
            assert c["std"] == pytest.approx(np.std(per_seed.to_numpy(), ddof=0))
            assert c["n_datasets"] == len(common)
            assert bool(c["partial"]) == (k == 4)
    # The partial Average is flagged, with the dataset left out and who lacks it.
    t4 = next(t for t in rep.groups[0].tables if t.title.startswith("4 shots"))
    assert any("eurosat" in n and "coop" in n for n in t4.notes)
    assert all(r[-1].endswith("*") for r in t4.rows)


def test_over_datasets_table(results):
    rep = rp.build_report(load(results["root"]))
    main = results["main"]
    s = rep.summary[(rep.summary.protocol == rep.groups[0].key) & (rep.summary.table == "over_datasets")]
    # eurosat lacks one (adapter, shots) cell, so the whole table averages caltech101 and dtd only.
    common = ["caltech101", "dtd"]
    for (a, k), g in main[main.dataset.isin(common)].groupby(["adapter", "shots"]):
        c = cell(s, adapter=a, shots=k)
        assert c["mean"] == pytest.approx(g.groupby("dataset")["test_acc"].mean().mean())
        assert c["dataset"] == "Average" and c["n_datasets"] == 2
    assert len(s) == len(main.groupby(["adapter", "shots"]))


def test_different_protocols_are_not_averaged(results):
    rep = rp.build_report(load(results["root"]))
    assert len(rep.groups) == 3
    other = results["other"]
    g_views1 = next(g for g in rep.groups if g.fields["views"] == 1)
    s1 = rep.summary[rep.summary.protocol == g_views1.key]
    assert set(s1["adapter"]) == {"tip"}
    c = cell(s1, table="per_shot", dataset="dtd")
    assert c["mean"] == pytest.approx(other["test_acc"].mean())
    main = results["main"]
    c_main = cell(rep.summary[rep.summary.protocol == rep.groups[0].key], table="per_shot", adapter="tip",
                  dataset="dtd", shots=16)
    assert c_main["mean"] == pytest.approx(main[(main.adapter == "tip") & (main.dataset == "dtd")
                                                & (main.shots == 16)]["test_acc"].mean())
    # The report says why the groups are separate.
    sep = next(n for n in rep.notes if "protocol groups" in n)
    assert "views (10, 1)" in sep and "subsample" in sep
    md = rp.render_markdown(rep)
    assert md.count("## Protocol ") == 3


def test_base_to_novel_hm(results):
    rep = rp.build_report(load(results["root"]))
    g = next(g for g in rep.groups if g.is_base_to_novel)
    s = rep.summary[(rep.summary.protocol == g.key) & (rep.summary.table == "base_to_novel")]
    b2n = results["b2n"]
    for (a, d), grp in b2n.groupby(["adapter", "dataset"]):
        b, n = grp["test_acc"].mean(), grp["novel_acc"].mean()
        assert cell(s, adapter=a, dataset=d, metric="base")["mean"] == pytest.approx(b)
        assert cell(s, adapter=a, dataset=d, metric="novel")["mean"] == pytest.approx(n)
        assert cell(s, adapter=a, dataset=d, metric="hm")["mean"] == pytest.approx(2 * b * n / (b + n))
    for a, grp in b2n.groupby("adapter"):
        b = grp.groupby("dataset")["test_acc"].mean().mean()
        n = grp.groupby("dataset")["novel_acc"].mean().mean()
        assert cell(s, adapter=a, dataset="Average", metric="base")["mean"] == pytest.approx(b)
        assert cell(s, adapter=a, dataset="Average", metric="hm")["mean"] == pytest.approx(2 * b * n / (b + n))
    assert rp.harmonic_mean(80.0, 0.0) == 0.0 and math.isnan(rp.harmonic_mean(80.0, math.nan))


def test_compare_published_delta(results, tmp_path):
    rep = rp.build_report(load(results["root"]), published=rp.load_published("published"))
    pub = pd.read_csv(rp.published_path())
    pub = pub[pub.backbone == "RN50"]
    compared = rep.summary[rep.summary.published.notna()]
    assert len(compared) > 0
    for _, c in compared.iterrows():
        rows = pub[(pub.adapter == c["adapter"]) & (pub.dataset == c["dataset"]) & (pub.metric == c["metric"])
                   & ((pub.shots == c["shots"]) | pub.shots.isna())]
        assert len(rows) == 1 and rows["protocol"].iloc[0] == "any"  # fewshot runs meet zero-shot rows only
        assert c["published"] == pytest.approx(rows["value"].iloc[0])
        assert c["delta"] == pytest.approx(c["mean"] - rows["value"].iloc[0])
    assert len(compared[(compared.adapter == "zero_shot") & (compared.dataset == "dtd")]) == len(SHOTS)
    assert set(compared.adapter) == {"zero_shot"}
    md = rp.render_markdown(rep)
    assert "Published tip rows skipped" in md and "this group ran protocol=fewshot" in md
    # A 3-dataset Average is never compared with a published 11-dataset average.
    assert compared[compared.dataset == "Average"].empty
    # protocol=reference runs of Tip-Adapter meet Tip-Adapter's rows, except those selected on test
    for s in SEEDS:
        write_result(tmp_path, f"ref/s{s}", dataset="dtd", adapter="tip", shots=16, seed=s, test_acc=60.0 + s,
                     protocol="reference")
        write_result(tmp_path, f"ref/tipf-s{s}", dataset="dtd", adapter="tip_f", shots=16, seed=s, test_acc=65.0,
                     protocol="reference")
    rep = rp.build_report(load(tmp_path / "ref"), published=rp.load_published())
    tip = cell(rep.summary, adapter="tip", dataset="dtd", shots=16, table="per_shot")
    assert tip["published"] == pytest.approx(60.93) and tip["delta"] == pytest.approx(62.0 - 60.93)
    assert "(pub 60.93, Δ " in rp.render_markdown(rep)
    tip_f = cell(rep.summary, adapter="tip_f", dataset="dtd", shots=16, table="per_shot")
    assert math.isnan(tip_f["published"])
    assert "Published tip_f rows skipped" in rp.render_markdown(rep) and "selection on test" in \
        rp.render_markdown(rep)


def test_fewshot_and_reference_runs_are_never_averaged_together(tmp_path):
    for s in SEEDS:
        write_result(tmp_path, f"fs/s{s}", dataset="dtd", adapter="tip", shots=4, seed=s, test_acc=50.0)
        write_result(tmp_path, f"ref/s{s}", dataset="dtd", adapter="tip", shots=4, seed=s, test_acc=70.0,
                     protocol="reference")
    df = load(tmp_path)
    assert set(df["protocol_name"]) == {"fewshot", "reference"} and df["protocol"].nunique() == 2
    rep = rp.build_report(df)
    assert len(rep.groups) == 2
    cells = rep.summary[(rep.summary.adapter == "tip") & (rep.summary.table == "per_shot")]
    assert sorted(cells["mean"]) == [50.0, 70.0] and set(cells["n_seeds"]) == {3}  # never 60 over 6 runs
    md = rp.render_markdown(rep)
    assert "protocol: reference" in md and "protocol: fewshot" in md


def test_published_table_is_consistent():
    pub = rp.load_published()
    assert set(pub.backbone) == {"RN50", "ViT-B/16"}
    assert pub["source"].str.contains("@").all()  # every row names owner/repo@commit and a file
    # Every 11-dataset average is the mean of the table's own per-dataset rows (imagenet_ens stands for ImageNet).
    pub["canon"] = pub["dataset"].replace({"imagenet_ens": "imagenet"})
    checked = 0
    for (bb, a, k, m), g in pub.groupby(["backbone", "adapter", "shots", "metric"], dropna=False):
        per, avg = g[g.canon.isin(rp.STANDARD_DATASETS)], g[g.dataset == "Average"]
        if len(per) == 11 and len(avg) == 1 and m != "hm":
            assert per["value"].mean() == pytest.approx(avg["value"].iloc[0], abs=0.006), (bb, a, k, m)
            checked += 1
    assert checked >= 5 * 6  # tip, tip_f, clip_adapter, coop, gda, ape, ape_t at 1..16 shots
    b2n = pub[pub.metric.isin(["base", "novel", "hm"]) & (pub.dataset == "Average")]
    b2n = b2n.pivot(index="adapter", columns="metric", values="value")
    hm = 2 * b2n["base"] * b2n["novel"] / (b2n["base"] + b2n["novel"])
    assert np.allclose(hm, b2n["hm"], atol=0.011)


def test_markdown_formatting(results):
    rep = rp.build_report(load(results["root"]))
    md = rp.render_markdown(rep)
    main = results["main"]
    g = main[(main.adapter == "coop") & (main.dataset == "dtd") & (main.shots == 1)]["test_acc"].to_numpy()
    assert f"{g.mean():.2f} ± {np.std(g):.2f}" in md
    assert "ddof=0" in md
    assert "| adapter | caltech101 | dtd | eurosat | Average |" in md


def test_csv_latex_png_and_cli(results, tmp_path, capsys):
    out = tmp_path / "out"
    png = tmp_path / "curves.png"
    code = rp.main([str(results["root"]), "--out", str(out), "--format", "md,csv,latex", "--plot", str(png),
                    "--compare", "published"])
    assert code == 0
    printed = capsys.readouterr().out
    assert printed.startswith("# fewclip report") and (out / "report.md").read_text() == printed
    rep = rp.build_report(load(results["root"]), published=rp.load_published())
    back = pd.read_csv(out / "summary.csv")
    pd.testing.assert_frame_equal(back, rep.summary.astype({"published_source": object}), check_dtype=False)
    runs = pd.read_csv(out / "runs.csv")
    assert len(runs) == len(rep.runs) and list(runs.columns) == rp.RUN_COLUMNS
    # LaTeX: balanced environments, and every row has as many cells as the column spec.
    tex = (out / "report.tex").read_text()
    blocks = re.findall(r"\\begin\{tabular\}\{([lr]+)\}(.*?)\\end\{tabular\}", tex, flags=re.S)
    assert len(blocks) == tex.count(r"\begin{table}") == tex.count(r"\end{table}") > 0
    for spec, body in blocks:
        rows = [ln for ln in body.splitlines() if ln.endswith(r"\\")]
        assert rows and all(len(re.split(r"(?<!\\)&", r)) == len(spec) for r in rows)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # One PNG per few-shot protocol group: the views=1 group goes to a second file.
    assert (tmp_path / "curves_p2.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_shots_filter(results, capsys):
    rep = rp.build_report(load(results["root"]), shots=[16])
    assert set(rep.summary["shots"]) == {16}
    assert rp.main([str(results["root"]), "--shots", "16"]) == 0
    assert "### 1 shots" not in capsys.readouterr().out
    assert rp.main([str(results["root"]), "--shots", "3"]) == 2


def test_main_empty_dir_returns_2(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert rp.main([str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "no readable result.json" in err


def test_main_needs_out_for_files(results, capsys):
    assert rp.main([str(results["root"]), "--format", "csv"]) == 2
    assert "--out" in capsys.readouterr().err


def test_plot_without_matplotlib(results, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r"fewclip\[report\]"):
        rp.plot(load(results["root"]), tmp_path / "x.png")


def test_average_over_the_11_datasets_is_compared(tmp_path):
    # One seed per dataset: no spread ("± -"). CoOp (reference protocol) on the 11 datasets, ImageNet with one
    # template as in CoOp's rows, each dataset with its configured templates.
    accs = {d: 50.0 + i for i, d in enumerate(rp.STANDARD_DATASETS)}
    defaults = rp.default_templates()
    for d, acc in accs.items():
        write_result(tmp_path, d, dataset=d, adapter="coop", shots=16, seed=1, test_acc=acc, protocol="reference",
                     templates=defaults[d])
    rep = rp.build_report(rp.load_results([tmp_path]), published=rp.load_published())
    avg = cell(rep.summary, table="per_shot", dataset="Average")
    assert avg["mean"] == pytest.approx(np.mean(list(accs.values())))
    assert math.isnan(avg["std"]) and avg["n_seeds"] == 1
    assert avg["published"] == pytest.approx(73.45) and avg["delta"] == pytest.approx(avg["mean"] - 73.45)
    assert cell(rep.summary, table="per_shot", dataset="imagenet")["published"] == pytest.approx(62.97)
    assert f"{avg['mean']:.2f} ± - (pub 73.45" in rp.render_markdown(rep)


