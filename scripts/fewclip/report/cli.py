"""``fewclip report DIR... [--out DIR] [--format md,csv,latex] [--plot FILE] [--compare published] [--shots ...]``:
the command line of the report (argument parsing, exit codes, which files are written)."""

from __future__ import annotations

import argparse
import sys

from fewclip.report.load import RESULT_FILE, ReportError, load_published, load_results
from fewclip.report.plots import plot
from fewclip.report.render import render_markdown, write_csv, write_latex, write_markdown
from fewclip.report.tables import build_report

FORMATS = ("md", "csv", "latex")



def _int_list(text: str) -> list[int]:
    try:
        vals = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not vals:
        raise argparse.ArgumentTypeError("expected at least one shot count")
    return vals


def _formats(text: str) -> list[str]:
    vals = [t.strip() for t in text.split(",") if t.strip()]
    bad = [v for v in vals if v not in FORMATS]
    if bad or not vals:
        raise argparse.ArgumentTypeError(f"formats are {', '.join(FORMATS)}; got {text!r}")
    return vals


def build_parser() -> argparse.ArgumentParser:
    """The ``fewclip report`` argument parser."""
    p = argparse.ArgumentParser(
        prog="fewclip report",
        description="Aggregate result.json files into mean ± std tables (printed as Markdown), CSV, LaTeX and "
                    "accuracy-vs-shots plots. Runs under different protocols are reported separately.")
    p.add_argument("dirs", nargs="+", metavar="DIR", help="folders searched recursively for result.json")
    p.add_argument("--out", metavar="DIR", help="write report files here (report.md, runs.csv, summary.csv, "
                                                "report.tex, per --format)")
    p.add_argument("--format", type=_formats, default=None, metavar="md,csv,latex",
                   help="files to write into --out (default: all three when --out is given)")
    p.add_argument("--plot", metavar="FILE", help="write accuracy-vs-shots curves to this PNG")
    p.add_argument("--compare", metavar="published",
                   help="'published' (the packaged published numbers) or a CSV with the same columns: add the "
                        "published value and the delta next to each cell that has one")
    p.add_argument("--shots", type=_int_list, metavar="1,2,...", help="only these shot counts")
    return p


def main(argv: list[str] | None = None) -> int:
    """``fewclip report DIR... [--out DIR] [--format md,csv,latex] [--plot FILE] [--compare published]
    [--shots 1,2,...]``: print the Markdown report; 0 on success, 2 on bad input or when nothing is found."""
    args = build_parser().parse_args(argv)
    formats = args.format if args.format is not None else (list(FORMATS) if args.out else ["md"])
    if args.out is None and any(f != "md" for f in formats):
        sys.stderr.write("fewclip report: --format csv/latex writes files and needs --out DIR\n")
        return 2
    df = load_results(args.dirs)
    if df.empty:
        n_bad = len(df.attrs.get("skipped", []))
        why = f"{n_bad} found, none readable" if n_bad else "none found"
        sys.stderr.write(f"fewclip report: no readable {RESULT_FILE} under {', '.join(args.dirs)} ({why})\n")
        return 2
    try:
        published = load_published(args.compare) if args.compare else None
    except ReportError as e:
        sys.stderr.write(f"fewclip report: {e}\n")
        return 2
    report = build_report(df, shots=args.shots, published=published)
    if report.runs.empty:
        sys.stderr.write(f"fewclip report: no run with shots in {args.shots}\n")
        return 2
    sys.stdout.write(render_markdown(report))
    if args.out:
        if "md" in formats:
            write_markdown(report, args.out)
        if "csv" in formats:
            write_csv(report, args.out)
        if "latex" in formats:
            write_latex(report, args.out)
    if args.plot:
        try:
            plot(df, args.plot, shots=args.shots)
        except ImportError as e:
            sys.stderr.write(f"fewclip report: {e}\n")
            return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
