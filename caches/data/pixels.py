"""Pixel batches for adapters that must see images (``input_kind = "pixels"``).

Feature-mode adapters never need this: they read cached features. Pixel mode re-decodes images every epoch,
with a fresh augmentation seeded by (seed, epoch, sample id), as the reference implementations do.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from caches.backbone import ImageSpec
from caches.data.augment import AugmentSpec, augmented_view, eval_transform, view_generator
from caches.data.records import ImageDataset, Sample
from caches.workers import loader_options

# Views drawn for pixel-mode training use view indices from here on, so they never coincide with the cached
# support views (0 .. A-1) of the same seed.
_EPOCH_VIEW_OFFSET = 1_000_000


class _Images(Dataset):
    def __init__(self, dataset: ImageDataset, samples: Sequence[Sample],
                 transform: Callable[[Any, Sample], torch.Tensor], size: int) -> None:
        self.dataset, self.samples, self.transform, self.size = dataset, list(samples), transform, size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, bool]:
        s = self.samples[i]
        try:
            return self.transform(self.dataset.load_image(s), s), s.label, True
        except Exception:  # unreadable: dropped from the batch by the caller
            return torch.zeros(3, self.size, self.size), s.label, False


class PixelSplit:
    """The images of one split as pixel batches: eval transform, or seeded fresh augmentation for training."""

    def __init__(self, dataset: ImageDataset, samples: Sequence[Sample], spec: ImageSpec, batch_size: int = 64,
                 num_workers: int = 0, pin_memory: bool = False) -> None:
        self.dataset, self.samples, self.spec = dataset, list(samples), spec
        self.batch_size, self.num_workers, self.pin_memory = batch_size, num_workers, pin_memory

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def labels(self) -> torch.Tensor:
        return torch.tensor([s.label for s in self.samples], dtype=torch.int64)

    def _loader(self, samples: Sequence[Sample], transform: Callable[[Any, Sample], torch.Tensor],
                batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        loader = DataLoader(_Images(self.dataset, samples, transform, self.spec.size), batch_size=batch_size,
                            shuffle=False, num_workers=self.num_workers, pin_memory=self.pin_memory,
                            **loader_options(self.num_workers))
        for pixels, labels, ok in loader:
            if not bool(ok.all()):
                pixels, labels = pixels[ok], labels[ok]
            if len(labels):
                yield pixels, labels

    def batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``([B, 3, S, S], [B])`` in split order with the eval transform (unreadable images skipped)."""
        tf = eval_transform(self.spec)
        return self._loader(self.samples, lambda img, s: tf(img), self.batch_size)

    def augmented_batches(self, aug: AugmentSpec, seed: int, batch_size: int
                          ) -> Callable[[int, torch.Generator], Iterator[tuple[torch.Tensor, torch.Tensor]]]:
        """Training batches for ``adapters.training.train``: seeded order, a fresh seeded view per epoch."""

        def batches(epoch: int, gen: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            order = torch.randperm(len(self.samples), generator=gen).tolist()
            samples = [self.samples[i] for i in order]
            view = _EPOCH_VIEW_OFFSET + epoch

            def tf(img: Any, s: Sample) -> torch.Tensor:
                return augmented_view(img, self.spec, aug, view_generator(seed, view, s.id))

            return self._loader(samples, tf, batch_size)

        return batches


class PixelData:
    """What a pixel-mode adapter receives in ``AdapterContext.pixels``: train (support) and val images."""

    def __init__(self, train: PixelSplit, val: PixelSplit, aug: AugmentSpec) -> None:
        self.train, self.val, self.aug = train, val, aug
