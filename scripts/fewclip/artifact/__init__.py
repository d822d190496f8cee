"""Fitted classifiers as self-contained artifact directories: ``fewclip fit``, ``predict`` and ``add-class``.

Fitted classifiers as self-contained artifact directories: ``fewclip fit``, ``predict`` and ``add-class``.

``fewclip fit`` runs one job exactly as ``fewclip run`` does (selection on val only, test evaluated once,
``result.json``) and then copies everything needed to classify new images into one directory: the adapter's
state and chosen hyperparameters, the text head, the support cache (so training-free adapters need neither the
dataset nor the cache), the class names, templates, backbone identity and preprocessing. ``load_artifact`` (or
``fewclip predict``) rebuilds the classifier from it with nothing but the backbone weights.

One module per job: format.py (the directory on disk: layout, writing, verification), predict.py
(``load_artifact`` and ``Artifact``), add_class.py (a new class without refitting), images.py (finding and decoding
the user's images), fitting.py (``fit``) and cli.py (the three commands). The names below are re-exported here.
"""

from fewclip.artifact.add_class import AddClassRule, add_class_rule
from fewclip.artifact.cli import add_class_main, fit_main, predict_main, write_predictions
from fewclip.artifact.fitting import default_out, fit, fit_run
from fewclip.artifact.format import (
    FORMAT,
    FORMAT_VERSION,
    AddClassError,
    ArtifactError,
    BackboneMismatchError,
    check_backbone,
    export_artifact,
)
from fewclip.artifact.images import collect_images
from fewclip.artifact.predict import Artifact, FilePredictions, load_artifact

__all__ = [
    "FORMAT", "FORMAT_VERSION", "AddClassError", "AddClassRule", "Artifact", "ArtifactError", "BackboneMismatchError",
    "FilePredictions", "add_class_main", "add_class_rule", "check_backbone", "collect_images", "default_out",
    "export_artifact", "fit", "fit_main", "fit_run", "load_artifact", "predict_main", "write_predictions",
]
