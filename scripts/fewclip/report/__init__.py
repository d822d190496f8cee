"""``fewclip report``: aggregate ``result.json`` files into mean ± std tables, CSV, LaTeX and accuracy-vs-shots plots.

Every run writes one ``result.json``. The report is built in four steps, one module each:

* load.py: :func:`load_results` collects the files into one row per run, keyed by *protocol* (runs are
  comparable only when backbone, weights, prompt templates, split source, validation shots, augmented views,
  selection rule and class subset agree); :func:`load_published` reads the published numbers.
* stats.py: mean and population std over seeds, averages over datasets, the base-to-novel HM.
* tables.py: :func:`build_report` splits the runs into protocol groups, averages over seeds inside each group and
  lays out the tables. Runs from different protocol groups are never averaged together.
* render.py and plots.py: :func:`render_markdown`, :func:`write_csv`, :func:`write_latex` and :func:`plot` turn a
  report into text and files; cli.py is the command line.

The names below are the report's public API, re-exported here.
"""

from fewclip.report.cli import build_parser, main
from fewclip.report.load import (
    KEY,
    PROTOCOL_FIELDS,
    RESULT_FILE,
    RUN_COLUMNS,
    ReportError,
    default_templates,
    load_published,
    load_results,
    published_path,
)
from fewclip.report.plots import plot
from fewclip.report.render import (
    describe_protocol,
    latex_escape,
    render_markdown,
    write_csv,
    write_latex,
    write_markdown,
)
from fewclip.report.stats import STD_DDOF, average_over_datasets, harmonic_mean, seed_stats
from fewclip.report.tables import (
    ADAPTER_ORDER,
    STANDARD_DATASETS,
    SUMMARY_COLUMNS,
    DisplayTable,
    ProtocolGroup,
    Report,
    build_report,
)

__all__ = [
    "ADAPTER_ORDER", "KEY", "PROTOCOL_FIELDS", "RESULT_FILE", "RUN_COLUMNS", "STANDARD_DATASETS", "STD_DDOF",
    "SUMMARY_COLUMNS", "DisplayTable", "ProtocolGroup", "Report", "ReportError", "average_over_datasets",
    "build_parser", "build_report", "default_templates", "describe_protocol", "harmonic_mean", "latex_escape",
    "load_published", "load_results", "main", "plot", "published_path", "render_markdown", "seed_stats",
    "write_csv", "write_latex", "write_markdown",
]
