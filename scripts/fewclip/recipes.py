"""Reference recipes: each method's published settings per dataset, as data (``conf/recipe/<adapter>.yaml``).

``protocol=reference`` runs a method the way its official code does, as far as that can be done without selecting
on test. A recipe file holds, per method:

- ``reference``: ``owner/repo@commit`` of the official code it was read from;
- ``unlisted``: ``refuse`` (the settings are per dataset; a dataset without an entry has no reference recipe) or
  ``defaults`` (the method-wide entries apply, and the run records that no per-dataset entry exists);
- ``run``: run-level settings: ``sampler`` (``dassl``), ``val`` (``fewshot`` = min(K, 4) per class, ``full`` = the
  whole val split, ``kshot`` = K per class), ``views`` (augmented views per support image), ``support_features``
  (``augmented`` or ``plain``: the eval transform, for methods fitted on un-augmented features);
- ``adapter``: hyperparameters of ``conf/adapter/<adapter>.yaml``;
- ``datasets``: per fewclip dataset name, ``adapter`` / ``run`` entries overriding the method-wide ones, its own
  ``departures``, or ``same_as: <other dataset>``;
- ``departures``: what reference mode cannot follow, and why (selection on test, extra data, other samplers).

Every value is ``{value: V, source: "path fragment"}`` or ``{by_shots: {K: V, ...}, source: ...}``; a source is a
path in the reference repository (``owner/repo:path`` for another repository) followed by the key or line it
comes from. :func:`compose_recipe` resolves a file for one (dataset, shots) into plain values.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

RUN_VALUES = {"sampler": ("dassl",), "val": ("fewshot", "full", "kshot"), "support_features": ("augmented", "plain")}
UNLISTED = ("refuse", "defaults")
PROTOCOLS = ("fewshot", "reference")


class RecipeError(ValueError):
    """A protocol setting that cannot be honoured: no reference recipe for this (method, dataset), a malformed
    recipe file, or a bad ``protocol`` / ``fewshot.*`` value. The CLI reports it in one line (exit 2)."""


@dataclass
class Recipe:
    """A recipe resolved for one (method, dataset, shots).

    ``adapter``: hyperparameter values for the adapter's config; ``run``: run-level settings (``sampler``, ``val``,
    ``views``, ``support_features``); ``sources``: ``"adapter.lr"`` -> where the value comes from;
    ``departures``: what differs from the official code.
    """

    method: str
    dataset: str
    shots: int
    reference: str
    adapter: dict[str, Any] = field(default_factory=dict)
    run: dict[str, Any] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)
    departures: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def recipe_dir() -> Path:
    from fewclip.config import conf_dir

    return conf_dir() / "recipe"


def recipe_methods() -> list[str]:
    """Adapters that have a reference recipe (the file stems of ``conf/recipe/``)."""
    return sorted(p.stem for p in recipe_dir().glob("*.yaml"))


def load_recipe_file(method: str) -> dict[str, Any]:
    """The raw recipe of ``method`` as plain containers. Raises ``RecipeError`` when there is none."""
    path = recipe_dir() / f"{method}.yaml"
    if not path.is_file():
        raise RecipeError(f"adapter '{method}' has no reference recipe (conf/recipe/); protocol=reference covers "
                          f"{', '.join(recipe_methods())}. Use protocol=fewshot.")
    data = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    if not isinstance(data, dict) or data.get("method") != method:
        raise RecipeError(f"{path}: 'method' must be '{method}'")
    if data.get("unlisted") not in UNLISTED:
        raise RecipeError(f"{path}: 'unlisted' must be one of {UNLISTED}")
    if "@" not in str(data.get("reference", "")):
        raise RecipeError(f"{path}: 'reference' must be owner/repo@commit")
    return data


def _resolve(entry: Any, shots: int, where: str) -> tuple[Any, str, str | None]:
    """``(value, source, note)`` of one entry; ``note`` when the shots had no entry of their own."""
    if not isinstance(entry, dict) or not entry.get("source") or ("value" in entry) == ("by_shots" in entry):
        raise RecipeError(f"{where}: expected {{value: ..., source: ...}} or {{by_shots: {{K: ...}}, source: ...}}")
    if "value" in entry:
        return entry["value"], str(entry["source"]), None
    table = {int(k): v for k, v in entry["by_shots"].items()}
    if shots in table:
        return table[shots], str(entry["source"]), None
    nearest = min(table, key=lambda k: (abs(math.log2(k) - math.log2(max(shots, 1))), k))
    return table[nearest], str(entry["source"]), f"{where}: the reference lists no {shots}-shot value; the " \
                                                 f"{nearest}-shot value applies"


def _apply(section: dict[str, Any] | None, target: dict[str, Any], sources: dict[str, str], prefix: str,
           shots: int, notes: list[str]) -> None:
    for key, entry in (section or {}).items():
        value, source, note = _resolve(entry, shots, f"{prefix}.{key}")
        if prefix == "run":
            allowed = RUN_VALUES.get(key)
            if key == "views":
                value = int(value)
            elif allowed is None or value not in allowed:
                raise RecipeError(f"run.{key}: unknown setting or value {value!r} (known: {RUN_VALUES}, views)")
        target[key] = value
        sources[f"{prefix}.{key}"] = source
        if note:
            notes.append(note)


def compose_recipe(method: str, dataset: str, shots: int) -> Recipe:
    """Resolve ``conf/recipe/<method>.yaml`` for one dataset (fewclip config name) and shot count."""
    data = load_recipe_file(method)
    entries = data.get("datasets") or {}
    entry = entries.get(dataset)
    seen = [dataset]
    while isinstance(entry, dict) and "same_as" in entry:
        if entry["same_as"] in seen:
            raise RecipeError(f"conf/recipe/{method}.yaml: same_as cycle {seen}")
        seen.append(entry["same_as"])
        entry = entries.get(entry["same_as"])
    departures = [str(d) for d in data.get("departures") or []]
    if entry is None and entries and data["unlisted"] == "refuse":
        listed = sorted(k for k in entries)
        raise RecipeError(f"{method} has no reference recipe for dataset '{dataset}': its official settings are per "
                          f"dataset ({', '.join(listed)}). Use protocol=fewshot.")
    if entry is None and entries:
        departures.append(f"the reference lists no settings for dataset '{dataset}': its method-wide settings apply")
    recipe = Recipe(method=method, dataset=dataset, shots=int(shots), reference=str(data["reference"]))
    notes: list[str] = []
    _apply(data.get("run"), recipe.run, recipe.sources, "run", shots, notes)
    _apply(data.get("adapter"), recipe.adapter, recipe.sources, "adapter", shots, notes)
    if entry:
        _apply(entry.get("run"), recipe.run, recipe.sources, "run", shots, notes)
        _apply(entry.get("adapter"), recipe.adapter, recipe.sources, "adapter", shots, notes)
        departures += [str(d) for d in entry.get("departures") or []]
    recipe.run.setdefault("sampler", "dassl")
    recipe.run.setdefault("val", "fewshot")
    recipe.run.setdefault("support_features", "augmented")
    recipe.departures = departures + notes
    return recipe


def source_repo(recipe_reference: str, source: str) -> tuple[str, str]:
    """``(owner/repo, path)`` a source string points at (``owner/repo:path ...`` names another repository)."""
    head = source.split()[0].rstrip(":")
    if ":" in head and "/" in head.split(":", 1)[0]:
        repo, path = head.split(":", 1)
        return repo, path
    return recipe_reference.split("@", 1)[0], head
