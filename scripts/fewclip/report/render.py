"""Renderers: a :class:`~fewclip.report.tables.Report` as Markdown (printed by ``fewclip report``), CSV (runs and
tidy summary), LaTeX (booktabs tables) and the files ``--out`` writes.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fewclip.report.tables import DisplayTable, Report

log = logging.getLogger(__name__)


def describe_protocol(fields: Mapping[str, Any], template_list: str | None = None) -> list[str]:
    """Human-readable lines for a protocol group's header."""
    def s(v: Any) -> str:
        return "unknown" if v is None else str(v)

    tpl = fields.get("templates")
    if tpl == "default":
        tpl_text = "each dataset's configured templates"
    elif tpl is None:
        tpl_text = "unknown"
    else:
        shown = ""
        if template_list:
            items = json.loads(template_list)
            shown = ": " + "; ".join(f'"{t}"' for t in items[:3]) + (f" (+{len(items) - 3} more)"
                                                                     if len(items) > 3 else "")
        tpl_text = f"custom (hash {tpl}){shown}"
    sub = fields.get("subsample")
    sub_text = {"all": "all classes", "base": "base classes (base-to-novel)", "new": "novel classes only"}.get(
        str(sub), s(sub))
    proto = {"fewshot": "fewshot (fewclip's: every choice on min(K, 4) val images per class)",
             "reference": "reference (each method's published recipe, conf/recipe/; val and views per recipe)"}
    per_recipe = fields.get("protocol_name") == "reference"
    val_text = "per recipe" if per_recipe else s(fields.get("val_shots"))
    views_text = "per recipe" if per_recipe else s(fields.get("views"))
    return [f"protocol: {proto.get(str(fields.get('protocol_name')), s(fields.get('protocol_name')))}; "
            f"few-shot draw: {s(fields.get('sampler'))}",
            f"backbone: {s(fields.get('backbone'))} (weights {s(fields.get('backbone_weights'))})",
            f"prompt templates: {tpl_text}",
            f"split: {s(fields.get('split_source'))}; validation images per class: {val_text}; "
            f"augmented views: {views_text}; model selection: {s(fields.get('selection'))}; "
            f"classes: {sub_text}"]


def _stats_footnote(ddof: int) -> str:
    kind = "population std (ddof=0, as CoOp/Dassl's parse_test_res)" if ddof == 0 else f"sample std (ddof={ddof})"
    return (f"Cells: mean ± {kind} over seeds; '± -' = a single seed; (n=...) = fewer seeds than the most in this "
            "group. Average = mean of the per-dataset seed means; its ± is the std of the per-seed average, shown "
            "only when every seed exists for every dataset.")


def _md_table(t: DisplayTable) -> str:
    def esc(c: str) -> str:
        return c.replace("|", "\\|")

    lines = ["| " + " | ".join(esc(h) for h in t.header) + " |",
             "|" + "|".join([":---"] + ["---:"] * (len(t.header) - 1)) + "|"]
    lines += ["| " + " | ".join(esc(c) for c in r) + " |" for r in t.rows]
    return "\n".join(lines)


def render_markdown(report: Report) -> str:
    """The whole report as Markdown: a header, then per protocol group its description and tables."""
    out = ["# fewclip report", ""]
    out += [*report.notes, ""]
    for i, g in enumerate(report.groups, 1):
        out += [f"## Protocol {i}: `{g.key}`", ""]
        tl = g.runs["template_list"].dropna()
        out += [f"- {line}" for line in describe_protocol(g.fields, tl.iloc[0] if len(tl) else None)]
        out += [f"- runs: {len(g.runs)} ({g.runs['adapter'].nunique()} adapter(s), {g.runs['dataset'].nunique()} "
                f"dataset(s), shots {', '.join(str(k) for k in sorted(g.runs['shots'].unique()))})", ""]
        out += [f"> {n}" for n in g.notes] + ([""] if g.notes else [])
        for t in g.tables:
            out += [f"### {t.title}", "", _md_table(t), ""]
            out += [f"{n}  " for n in t.notes] + ([""] if t.notes else [])
    out += [_stats_footnote(report.ddof), ""]
    return "\n".join(out)


def write_csv(report: Report, out_dir: str | Path) -> list[Path]:
    """Write ``runs.csv`` (one row per run) and ``summary.csv`` (one row per table cell, tidy) into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs_path, summary_path = out / "runs.csv", out / "summary.csv"
    report.runs.to_csv(runs_path, index=False)
    report.summary.to_csv(summary_path, index=False)
    log.info("wrote %s and %s", runs_path, summary_path)
    return [runs_path, summary_path]


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                  "|": r"\textbar{}", "<": r"\textless{}", ">": r"\textgreater{}",
                  "±": r"$\pm$", "Δ": r"$\Delta$", "·": r"$\cdot$"}


def latex_escape(text: str) -> str:
    """Escape LaTeX's special characters (and the few non-ASCII symbols the tables use)."""
    return "".join(_LATEX_SPECIAL.get(c, c) for c in text)


def _latex_table(t: DisplayTable, caption: str) -> str:
    # Hand-written rather than DataFrame.to_latex: that needs jinja2, which fewclip does not declare.
    n_text = 2 if t.header[:2] == ["dataset", "adapter"] else 1
    spec = "l" * n_text + "r" * (len(t.header) - n_text)
    lines = [r"\begin{table}[t]", r"\centering", r"\small", f"\\caption{{{latex_escape(caption)}}}",
             f"\\begin{{tabular}}{{{spec}}}", r"\toprule",
             " & ".join(latex_escape(h) for h in t.header) + r" \\", r"\midrule"]
    lines += [" & ".join(latex_escape(c) for c in r) + r" \\" for r in t.rows]
    lines += [r"\bottomrule", r"\end{tabular}"]
    if t.notes:
        lines += [r"\par\footnotesize " + latex_escape(" ".join(n.replace("\\*", "*") for n in t.notes))]
    lines.append(r"\end{table}")
    return "\n".join(lines)


def write_latex(report: Report, out_dir: str | Path) -> Path:
    """Write every table into ``out_dir/report.tex`` (needs ``\\usepackage{booktabs}``)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    parts = ["% fewclip report; needs \\usepackage{booktabs}", "% " + _stats_footnote(report.ddof), ""]
    for i, g in enumerate(report.groups, 1):
        parts.append(f"% Protocol {i}: {g.key}")
        for t in g.tables:
            parts += [_latex_table(t, f"{t.title}. Protocol {i}: {g.key}"), ""]
    path = out / "report.tex"
    path.write_text("\n".join(parts))
    log.info("wrote %s", path)
    return path


def write_markdown(report: Report, out_dir: str | Path) -> Path:
    """Write :func:`render_markdown` into ``out_dir/report.md``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "report.md"
    path.write_text(render_markdown(report))
    return path
