"""faiss indexes over store keys: built from a factory string, trained on the keys, searched on CPU or GPU.

A store's keys are searched through a faiss index chosen by a *factory string* (``cache.index=``): ``Flat``
(exact, the default), ``HNSW32`` (graph), ``IVF4096,Flat`` (inverted lists, exact vectors), ``IVF4096,PQ64``
(inverted lists, compressed vectors), or anything else ``faiss.index_factory`` accepts. Every index uses the
inner-product metric over L2-normalised keys, so scores are cosine similarities.

Types that need training (IVF, PQ, SQ, OPQ) are trained on the store's own keys; too few keys for the type is an
``IndexSpecError`` that says how many it needs and what to use instead.

Search-time settings (``nprobe`` of IVF, ``efSearch`` of HNSW) are not part of the index: they are set per search
from a faiss ``ParameterSpace`` string (``cache.search_params=nprobe=64``), with defaults from ``default_params``.

``KeyIndex`` moves an index to the GPU (all visible GPUs, sharded) when faiss was built with GPU support and
CUDA is present; index types faiss cannot run on a GPU (HNSW) stay on the CPU, and say so.

Packaging: faiss comes from exactly one pip distribution (``faiss-cpu`` by default; ``faiss-gpu-cu12`` or conda's
``faiss-gpu`` in its place for GPU search); ``faiss_distributions`` lists the installed ones, so that two of them
sharing the ``faiss`` module is reported instead of silently mixing files.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

DEFAULT_INDEX = "Flat"
# faiss's k-means asks for 39 training points per centroid (fewer is allowed but clusters poorly).
POINTS_PER_CENTROID = 39
SEARCH_BATCH = 16384  # queries per faiss call (bounds the [B, k] results and faiss's scratch memory)


class IndexSpecError(ValueError):
    """A faiss index factory string that faiss cannot parse, or that cannot be built on these keys."""


def faiss_distributions() -> list[str]:
    """The installed pip distributions that provide the ``faiss`` module (normally exactly one)."""
    from importlib.metadata import packages_distributions

    return sorted(set(packages_distributions().get("faiss", [])))


def check_single_faiss() -> None:
    """Warn when two distributions provide ``faiss`` (e.g. faiss-cpu and faiss-gpu-cu12): they write the same
    files, so the module is whichever was installed last, possibly a mix of both."""
    dists = faiss_distributions()
    if len(dists) > 1:
        log.warning("several packages provide the faiss module (%s); they overwrite each other's files. Keep one: "
                    "pip uninstall -y %s, then pip install the one you want (faiss-cpu, or faiss-gpu-cu12 for GPU "
                    "search)", ", ".join(dists), " ".join(dists))


def faiss_has_gpu() -> bool:
    """faiss was built with GPU support and at least one CUDA device is visible."""
    import faiss

    return hasattr(faiss, "StandardGpuResources") and torch.cuda.is_available() and faiss.get_num_gpus() > 0


def is_flat(factory: str) -> bool:
    """True for the exact, untrained flat index (``Flat``; ``IDMap,Flat`` and friends are not special-cased)."""
    return factory.strip() == DEFAULT_INDEX


def _new_index(dim: int, factory: str) -> Any:
    import faiss

    if not isinstance(factory, str) or not factory.strip():
        raise IndexSpecError(f"cache.index must be a faiss index factory string such as Flat, HNSW32 or "
                             f"IVF1024,Flat; got {factory!r}")
    try:
        return faiss.index_factory(int(dim), factory.strip(), faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        detail = str(e).strip().splitlines()[-1]
        detail = detail.split("Error: ", 1)[-1].split(": ", 1)[-1] if "Error" in detail else detail
        raise IndexSpecError(f"cache.index={factory!r} is not a faiss index factory string faiss can build for "
                             f"{dim}-d keys ({detail}); examples: Flat, HNSW32, IVF1024,Flat, IVF1024,PQ32 (the PQ "
                             "size must divide the dimension)") from None


def check_factory(factory: str, dim: int) -> str:
    """Validate a factory string for ``dim``-d keys (parsed by faiss, nothing trained); returns it stripped.

    Raises:
        IndexSpecError: a one-line message naming the string and what faiss said.
    """
    _new_index(dim, factory)
    return factory.strip()


def min_train_keys(factory: str) -> int:
    """The fewest keys faiss can train ``factory`` on: the most centroids any of its quantisers has
    (``IVF<n>``: n; ``PQ<m>[x<b>]``: 2^b, 256 by default); 1 for types that need no training."""
    need = 1
    for m in re.finditer(r"IVF(\d+)", factory):
        need = max(need, int(m.group(1)))
    for m in re.finditer(r"PQ\d+(?:x(\d+))?", factory):
        need = max(need, 2 ** int(m.group(1) or 8))
    return need


def build_index(keys: np.ndarray, factory: str = DEFAULT_INDEX) -> Any:
    """A faiss inner-product index over ``keys [N, D]`` (float32, rows L2-normalised), trained on them when the
    type needs training.

    Raises:
        IndexSpecError: the string does not parse, or there are too few keys to train it.
    """
    import faiss

    n, dim = keys.shape
    # Flat as IndexFlatIP, the class faiss reads a flat inner-product index back as (and format 1's type).
    index = faiss.IndexFlatIP(int(dim)) if is_flat(factory) else _new_index(dim, factory)
    if not index.is_trained:
        need = min_train_keys(factory)
        if n < need:
            m = re.search(r"IVF(\d+)", factory)
            hint = (f"use fewer lists (IVF{max(1, n // POINTS_PER_CENTROID)},... trains on {n} keys with "
                    f"{POINTS_PER_CENTROID} per list)" if m else "use HNSW32 or Flat, which need no training")
            raise IndexSpecError(f"cache.index={factory} must be trained on at least {need} keys and this store has "
                                 f"{n}: {hint}, or Flat")
        if n < POINTS_PER_CENTROID * need:
            log.warning("cache.index=%s is trained on %d keys, fewer than faiss's %d per centroid (%d): its clusters "
                        "will be rough and recall lower", factory, n, POINTS_PER_CENTROID, POINTS_PER_CENTROID * need)
        try:
            index.train(np.ascontiguousarray(keys, dtype=np.float32))
        except RuntimeError as e:
            raise IndexSpecError(f"cache.index={factory}: faiss could not train it on {n} keys "
                                 f"({str(e).strip().splitlines()[-1]})") from None
    if n:
        index.add(np.ascontiguousarray(keys, dtype=np.float32))
    return index


def index_kind(index: Any) -> str:
    """The class name of an index as faiss reads it back (``IndexFlatIP``, ``IndexHNSWFlat``, ``IndexIVFFlat``)."""
    import faiss

    return type(faiss.downcast_index(index)).__name__


def reconstruct_exact(index: Any, keys: np.ndarray) -> bool:
    """True when the index gives back ``keys`` bit for bit (flat storage: Flat, HNSW, IVF-Flat, RFlat); False for
    compressed codes (PQ, SQ) or types that cannot reconstruct. The store then keeps the keys in a file beside it."""
    if index.ntotal != keys.shape[0]:
        return False
    if index.ntotal == 0:
        return True
    try:
        return bool(np.array_equal(index.reconstruct_n(0, index.ntotal), keys))
    except RuntimeError:
        return False


def default_params(index: Any, k: int) -> str:
    """Search settings that favour recall at ``k`` over speed: IVF probes 1/8 of its lists (at least 8), HNSW
    explores max(128, 2k) candidates. Conservative, not tuned: they scan an eighth of an IVF index, so they cap its
    speed-up near 8x; ``scripts/bench_faiss.py`` measures the recall of cheaper settings (``:tune``), and
    ``cache.search_params`` sets them."""
    import faiss

    parts = []
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        parts.append(f"nprobe={min(ivf.nlist, max(8, ivf.nlist // 8))}")
    if "HNSW" in index_kind(index):
        parts.append(f"efSearch={max(128, 2 * k)}")
    return ",".join(parts)


@dataclass
class KeyIndex:
    """A searchable index over a store's keys, on the GPU when faiss can put it there.

    Attributes:
        index: the CPU faiss index.
        factory: its factory string.
        params: search settings (a faiss ParameterSpace string, ``""`` for the defaults of ``default_params``).
        use_gpu: move it to every visible GPU (sharded) when faiss has GPU support and CUDA is present.
    """

    index: Any
    factory: str = DEFAULT_INDEX
    params: str = ""
    use_gpu: bool = True

    def __post_init__(self) -> None:
        self._gpu: Any = None
        self._gpu_tried = False
        self.device = "cpu"

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    @property
    def exact(self) -> bool:
        """Exact search (a flat index): top-k equals a dense scan up to floating-point rounding."""
        return index_kind(self.index) in ("IndexFlatIP", "IndexFlat")

    def _target(self) -> Any:
        if not (self.use_gpu and faiss_has_gpu()):
            return self.index
        if not self._gpu_tried:
            import faiss

            self._gpu_tried = True
            try:
                options = faiss.GpuMultipleClonerOptions()
                options.shard = True  # each GPU holds a slice of the keys; results are merged
                self._gpu = faiss.index_cpu_to_all_gpus(self.index, co=options)
                self.device = f"cuda x{faiss.get_num_gpus()}"
            except (RuntimeError, AttributeError) as e:  # e.g. HNSW has no GPU implementation
                log.info("%s stays on the CPU: faiss cannot move it to the GPU (%s)", self.factory,
                         str(e).strip().splitlines()[-1][:200])
        return self._gpu if self._gpu is not None else self.index

    def settings(self, k: int) -> str:
        """The search settings used at ``k`` (explicit ``params``, else ``default_params``)."""
        return self.params or default_params(self.index, k)

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``k`` best keys by inner product: ``[B, D] -> ([B, k] float32 scores, [B, k] int64 rows)``,
        best first, on the queries' device. ``k`` is capped at the number of keys."""
        import faiss

        k = min(int(k), self.ntotal)
        index = self._target()
        settings = self.settings(k)
        if settings:
            space = faiss.GpuParameterSpace() if index is not self.index else faiss.ParameterSpace()
            try:
                space.set_index_parameters(index, settings)
            except RuntimeError as e:
                raise IndexSpecError(f"cache.search_params={settings!r} does not apply to {self.factory} "
                                     f"({str(e).strip().splitlines()[-1].rsplit(':', 1)[-1].strip()})") from None
        q = queries.detach().float().cpu().numpy()
        scores = np.empty((q.shape[0], k), dtype=np.float32)
        rows = np.empty((q.shape[0], k), dtype=np.int64)
        for i in range(0, q.shape[0], SEARCH_BATCH):
            scores[i : i + SEARCH_BATCH], rows[i : i + SEARCH_BATCH] = index.search(
                np.ascontiguousarray(q[i : i + SEARCH_BATCH]), k)
        if (rows < 0).any():  # an approximate index found fewer than k: never silently wrong
            missing = int((rows < 0).any(axis=1).sum())
            raise RuntimeError(f"{self.factory} returned fewer than k={k} neighbours for {missing} of {len(q)} "
                               f"queries ({settings or 'default settings'}): search more (e.g. a larger nprobe "
                               "with cache.search_params) or lower k")
        return (torch.from_numpy(scores).to(queries.device), torch.from_numpy(rows).to(queries.device))

    def describe(self, k: int | None = None) -> dict[str, Any]:
        """What ``result.json`` records about the search: factory, class, settings, device, key count."""
        self._target()
        return {"index": self.factory, "class": index_kind(self.index), "exact": self.exact,
                "search_params": self.settings(k or 1), "device": self.device, "n_keys": self.ntotal}
