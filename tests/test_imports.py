"""PyPI has unrelated packages named `adapters` and `caches`: the ones imported must be this repository's."""

from pathlib import Path

import adapters
import caches
import fewclip

REPO = Path(__file__).resolve().parents[1]


def test_packages_come_from_this_repository():
    assert Path(adapters.__file__).resolve().parent == REPO / "adapters"
    assert Path(caches.__file__).resolve().parent == REPO / "caches"
    assert Path(fewclip.__file__).resolve().parent == REPO / "scripts" / "fewclip"


def test_caches_never_import_adapters():
    # Dependencies run one way: caches <- adapters <- CLI.
    for py in (REPO / "caches").rglob("*.py"):
        text = py.read_text()
        assert "import adapters" not in text and "from adapters" not in text, py
