"""fewclip: the application on top of the methods (runner, sweeps, ``auto``, config, CLI, report, artifacts).

The package is also the Python API for notebooks:

    import fewclip

    art = fewclip.fit(dataset="path/to/class_folders", adapter="tip", backbone="rn50", shots=16, out="pets-tip")
    probs = art.predict(["a.jpg", "b.jpg"])            # [2, C] probabilities, columns in art.classnames
    art = fewclip.load_artifact("pets-tip")            # later, elsewhere: only the artifact and the weights
    art.add_class("axolotl", ["ax1.jpg", "ax2.jpg"])   # training-free adapters: no refit, saved in place

The API names live in ``fewclip.artifact`` and are imported on first use, so that ``import fewclip.report`` or
``fewclip --help`` do not load torch and the backbone code. ``fewclip.Artifact`` and ``fewclip.artifact.Artifact``
are the same class.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = [
    "AddClassError",
    "Artifact",
    "ArtifactError",
    "BackboneMismatchError",
    "FilePredictions",
    "add_class_rule",
    "export_artifact",
    "fit",
    "load_artifact",
]

if TYPE_CHECKING:
    from fewclip.artifact import (
        AddClassError,
        Artifact,
        ArtifactError,
        BackboneMismatchError,
        FilePredictions,
        add_class_rule,
        export_artifact,
        fit,
        load_artifact,
    )


def __getattr__(name: str) -> Any:
    # PEP 562: resolve the API names lazily; submodules (fewclip.report, ...) import as usual.
    if name in __all__:
        return getattr(importlib.import_module("fewclip.artifact"), name)
    raise AttributeError(f"module 'fewclip' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
