"""fewclip's Python API for notebooks, installed as the ``fewclip`` package (``adapters.api`` in a checkout).

    import fewclip

    art = fewclip.fit(dataset="path/to/class_folders", adapter="tip", backbone="rn50", shots=16, out="pets-tip")
    probs = art.predict(["a.jpg", "b.jpg"])            # [2, C] probabilities, columns in art.classnames
    art = fewclip.load_artifact("pets-tip")            # later, elsewhere: only the artifact and the weights
    art.add_class("axolotl", ["ax1.jpg", "ax2.jpg"])   # training-free adapters: no refit, saved in place

Everything here lives in ``adapters.artifact``; this package only re-exports it, so ``fewclip.Artifact`` and
``adapters.artifact.Artifact`` are the same class.
"""

from adapters.artifact import (
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
