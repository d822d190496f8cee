"""Read CoOp's saved few-shot draws, ``split_fewshot/shot_K-seed_S.pkl``, without executing their code.

CoOp's dataset classes (KaiyangZhou/CoOp ``datasets/*.py``) pickle ``{"train": [Datum, ...], "val": [Datum, ...]}``
(ImageNet: ``{"train": [...]}`` only) after Dassl's ``generate_fewshot_dataset``. A pickle can name any callable,
so ``pickle.load`` on a file from elsewhere runs whatever it names. This reader admits exactly one class, Dassl's
``Datum`` (``dassl.data.datasets.base_dataset.Datum``), mapped to :class:`Datum` below (a plain record whose
state is checked field by field), plus a few builtin container and scalar types; anything else is refused before
it is called.

The records' ``impath`` is an absolute path on the machine that made the file; each is matched to the dataset's
own sample whose id is the longest trailing part of that path, and its label must agree.
"""

from __future__ import annotations

import io
import logging
import os
import pickle
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from caches.data.fewshot import FewShotSplit
from caches.data.records import DatasetError, ImageDataset, Sample

log = logging.getLogger(__name__)

DATUM_MODULES = ("dassl.data.datasets.base_dataset", "dassl.data.datasets")
DATUM_FIELDS = {"_impath": str, "_label": int, "_domain": int, "_classname": str}
# Builtins a REDUCE may call harmlessly (constructors of plain data); never getattr, eval, exec, __import__, ...
SAFE_BUILTINS = frozenset({"list", "dict", "tuple", "set", "frozenset", "str", "int", "float", "bool", "bytes"})


class Datum:
    """Stand-in for Dassl's ``Datum``: ``impath``, ``label``, ``domain``, ``classname`` and nothing else."""

    __slots__ = ("_impath", "_label", "_domain", "_classname")

    def __init__(self, impath: str = "", label: int = 0, domain: int = 0, classname: str = "") -> None:
        self.__setstate__({"_impath": impath, "_label": label, "_domain": domain, "_classname": classname})

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2 and state[0] is None:  # (None, slots) form
            state = state[1]
        if not isinstance(state, dict) or not set(state) <= set(DATUM_FIELDS):
            raise pickle.UnpicklingError(f"Datum with unexpected state {type(state).__name__}: "
                                         f"{sorted(state) if isinstance(state, dict) else state!r}"[:200])
        for key, kind in DATUM_FIELDS.items():
            value = state.get(key, "" if kind is str else 0)
            if type(value) is not kind:
                raise pickle.UnpicklingError(f"Datum.{key} is a {type(value).__name__}, expected {kind.__name__}")
            object.__setattr__(self, key, value)

    @property
    def impath(self) -> str:
        return self._impath

    @property
    def label(self) -> int:
        return self._label

    @property
    def classname(self) -> str:
        return self._classname


class RestrictedUnpickler(pickle.Unpickler):
    """Resolves Dassl's ``Datum`` to :class:`Datum` and a few data builtins; refuses every other global."""

    def find_class(self, module: str, name: str) -> Any:
        if name == "Datum" and module in DATUM_MODULES:
            return Datum
        if module == "builtins" and name in SAFE_BUILTINS:
            import builtins

            return getattr(builtins, name)
        raise pickle.UnpicklingError(f"refused to load global '{module}.{name}': a CoOp few-shot file holds only "
                                     "Dassl's Datum records")

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("refused: persistent ids are not part of a CoOp few-shot file")


def load_coop_pickle(path: str | os.PathLike) -> dict[str, list[Datum]]:
    """``{"train": [Datum], "val": [Datum]}`` from a CoOp ``shot_K-seed_S.pkl`` (``val`` may be absent).

    Raises ``DatasetError`` for a missing file, a pickle that names anything besides ``Datum``, or a payload
    that is not a dict of lists of records.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise DatasetError(f"fewshot.import: {p} does not exist")
    try:
        data = RestrictedUnpickler(io.BytesIO(p.read_bytes())).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as e:
        raise DatasetError(f"fewshot.import: {p} is not a CoOp few-shot pickle: {e}") from e
    if not isinstance(data, dict) or "train" not in data or not set(data) <= {"train", "val"}:
        raise DatasetError(f"fewshot.import: {p} should hold {{'train': [...], 'val': [...]}}, found "
                           f"{sorted(data) if isinstance(data, dict) else type(data).__name__}")
    for key, items in data.items():
        if not isinstance(items, list) or not all(isinstance(d, Datum) for d in items):
            raise DatasetError(f"fewshot.import: {p}['{key}'] is not a list of Datum records")
    return data


def _path_parts(impath: str) -> tuple[str, ...]:
    # The file may come from Windows or POSIX; either separator splits.
    parts = PureWindowsPath(impath).parts if "\\" in impath else PurePosixPath(impath).parts
    return tuple(p for p in parts if p not in ("/", "\\"))


def match_samples(records: list[Datum], pool: dict[str, Sample], what: str) -> list[Sample]:
    """The pool's sample for each record: the one whose id is the longest trailing part of ``impath``.

    Raises ``DatasetError`` naming the first records that match nothing or whose label differs.
    """
    out, missing, wrong = [], [], []
    for d in records:
        parts = _path_parts(d.impath)
        hit = next((pool[k] for i in range(len(parts)) if (k := "/".join(parts[i:])) in pool), None)
        if hit is None:
            missing.append(d.impath)
        elif hit.label != d.label:
            wrong.append(f"{hit.id} (file: label {d.label} '{d.classname}', dataset: label {hit.label})")
        else:
            out.append(hit)
    if missing:
        raise DatasetError(f"fewshot.import: {len(missing)} {what} images of the file are not in this dataset's "
                           f"train/val splits (first: {missing[:3]}); is it the same dataset and split file?")
    if wrong:
        raise DatasetError(f"fewshot.import: {len(wrong)} {what} images carry another label in the file than in "
                           f"the dataset: {wrong[:3]}")
    return out


def import_fewshot(path: str | os.PathLike, dataset: ImageDataset, shots: int, seed: int,
                   draw_from: ImageDataset | None = None) -> FewShotSplit:
    """CoOp's saved draw as a ``FewShotSplit`` over ``dataset``'s sample ids.

    Records are matched against the train and val splits of ``draw_from`` (the full dataset when ``dataset`` is
    a base/new class subset: CoOp subsamples after loading the file), then restricted to ``dataset``'s classes.
    A file without ``val`` (CoOp's ImageNet) gives an empty ``val``: the caller applies its own val rule. A train
    image that ``dataset`` keeps in its val split (ImageNet, whose val is carved from train) is returned in
    ``train``; the caller must not also use it for validation.
    """
    data = load_coop_pickle(path)
    full = draw_from or dataset
    pool = {s.id: s for split in ("train", "val") for s in full.splits[split]}
    test_ids = {s.id for s in full.splits["test"]}
    own = {s.id: s for split in ("train", "val") for s in dataset.splits[split]}
    chosen: dict[str, list[str]] = {}
    for key in ("train", "val"):
        samples = match_samples(data.get(key, []), pool, key)
        leaked = [s.id for s in samples if s.id in test_ids]
        if leaked:
            raise DatasetError(f"fewshot.import: {len(leaked)} {key} images are test images here: {leaked[:3]}")
        chosen[key] = [s.id for s in samples if s.id in own]
    counts: dict[int, int] = {}
    for i in chosen["train"]:
        counts[own[i].label] = counts.get(own[i].label, 0) + 1
    notes = [f"imported from {Path(path).name}: {len(chosen['train'])} train, {len(chosen['val'])} val images"]
    if counts and max(counts.values()) != shots:
        notes.append(f"the file holds up to {max(counts.values())} train images per class, shots={shots}")
        log.warning("fewshot.import: %s", notes[-1])
    digest = dataset.sample_digest(dataset.splits["train"] + dataset.splits["val"])
    return FewShotSplit(dataset.name, shots, seed, chosen["train"], chosen["val"], [], digest,
                        source=f"import:{Path(path).expanduser().resolve()}", notes=notes)
