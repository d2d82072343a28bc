"""Streamed images: decoded one at a time in DataLoader workers, for photos of any size and datasets larger than memory.

The in-memory path (`to_tensors`) decodes and resizes every image once and holds them as one uint8 tensor: the
fastest for the small benchmarks. `StreamedImages` holds only the labels and decodes each image when a batch asks
for it, with one of two training transforms:

- `reference`: the in-memory recipe (squash to the square image size, random crop with zero padding, flip), the
  draws made in the main process from the run's sampler, so that a streamed batch equals the in-memory one;
- `timm`: timm's own transforms (`resolve_data_config` / `create_transform`: random-resized crop, flip, optional
  RandAugment or TrivialAugment, the model's mean and std), each image's draws seeded from the run's seed, the step
  and its place in the batch, so that a run gives the same batches with any number of workers or processes.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import datasets
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from .data import (
    Augmentation,
    CropFlip,
    EpochSampler,
    _resize,
    crop_flip,
    draw_crop_flip,
    normalise,
    seed_for,
    seeded_generators,
    share_of_rank,
)

TRANSFORMS = ("reference", "timm")


class UnreadableImageError(ValueError):
    """An image file that cannot be decoded (truncated, corrupt, not an image), named by its path."""


def as_array(image: Image.Image | np.ndarray) -> np.ndarray:
    """(H, W, C) uint8 with 1 or 3 channels, as `to_tensors` makes it: grayscale kept, other modes as RGB."""
    if isinstance(image, Image.Image):
        image = np.asarray(image if image.mode in ("L", "RGB") else image.convert("RGB"))
    image = np.asarray(image, dtype=np.uint8)
    return image[..., None] if image.ndim == 2 else image[..., :3]


def open_image(cell: dict | np.ndarray | list, where: str) -> Image.Image | np.ndarray:
    """One undecoded cell of a dataset's image column (a path or bytes; an array for the built-ins), decoded in full:
    a truncated file fails here, with its path, not later inside a transform."""
    if not isinstance(cell, dict):
        return np.asarray(cell, dtype=np.uint8)
    source = cell.get("path") or where
    try:
        image = Image.open(io.BytesIO(cell["bytes"]) if cell.get("bytes") else cell["path"])
        image.load()
    except (OSError, SyntaxError, ValueError) as e:  # PIL's errors for corrupt, truncated and unknown files
        raise UnreadableImageError(f"cannot read image {source}: {type(e).__name__}: {e}") from e
    return image


def undecoded(ds: datasets.Dataset) -> datasets.Dataset:
    """The dataset with its image column left as paths or bytes (decoded per item by `open_image`), or as numpy
    arrays for the array-backed built-ins."""
    if isinstance(ds.features["image"], datasets.Image):
        return ds.cast_column("image", datasets.Image(decode=False))
    return ds.with_format("numpy")


class StreamedImages(Dataset):
    """Some images of a `datasets.Dataset`, by position, with their (remapped) labels; decoded per item in
    `workers` loader workers.

    An item key is (position, draws): `draws` is what the training transform needs for that image (a `CropFlip` row
    for the reference transform, a seed for timm's); None asks for the evaluation transform. An unreadable file
    raises `UnreadableImageError` naming it, or, with `skip_unreadable`, is left out of its batch with a warning."""

    def __init__(
        self,
        ds: datasets.Dataset,
        indices: torch.Tensor,
        labels: torch.Tensor,
        class_names: list[str],
        transforms: tuple[Callable, Callable],
        workers: int = 0,
        skip_unreadable: bool = False,
    ) -> None:
        self.ds, self.indices, self.labels, self.class_names = undecoded(ds), indices, labels, class_names
        (self.train_transform, self.eval_transform), self.workers = transforms, workers
        self.skip_unreadable = skip_unreadable

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key: tuple[int, object]):
        position, draws = key
        row = int(self.indices[position])
        try:
            image = open_image(self.ds[row]["image"], f"row {row} of the dataset")
        except UnreadableImageError as e:
            if not self.skip_unreadable:
                raise UnreadableImageError(f"{e}; remove the file, or pass --skip-unreadable to leave it out") from e
            warnings.warn(f"{e}: left out of its batch", stacklevel=2)
            return None
        transform = self.eval_transform if draws is None else self.train_transform
        return transform(image, draws), self.labels[position], position


def collate(items: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stack (image, label, position) items; the skipped (None) are left out."""
    kept = [item for item in items if item is not None]
    if not kept:
        raise UnreadableImageError("every image of a batch was unreadable: check the dataset's files")
    images, labels, positions = zip(*kept, strict=True)
    return torch.stack(images), torch.stack(labels), torch.tensor(positions)


@dataclass(frozen=True)
class ReferenceTransform:
    """The in-memory recipe for one image: squashed to `size` x `size` (bilinear, antialiased, on uint8 as
    `to_tensors` does), cropped and flipped by its draws, normalised."""

    size: int
    aug: Augmentation

    def __call__(self, image, draws: CropFlip | None) -> torch.Tensor:
        pixels = _resize(torch.from_numpy(np.array(as_array(image)))[None], self.size)  # a writable copy
        if draws is None:
            return normalise(pixels[0], self.aug)
        return normalise(crop_flip(pixels, draws, self.aug), self.aug, draws)[0]


@dataclass(frozen=True)
class SeededTransform:
    """A torchvision-style transform (timm's) applied to the RGB image with Python's, NumPy's and torch's generators
    seeded from the item's seed (timm's transforms draw from all three), their states restored afterwards (so that a
    loader without workers leaves the training's random state alone)."""

    transform: Callable

    def __call__(self, image, seed: int | None) -> torch.Tensor:
        if isinstance(image, np.ndarray):
            image = Image.fromarray(image)
        image = image.convert("RGB")
        if seed is None:
            return self.transform(image)
        with seeded_generators(seed):
            return self.transform(image)


def timm_data_config(model: torch.nn.Module, image_size: int) -> dict:
    """timm's resolved data config of `model` (its pretrained config's mean, std, interpolation and crop) at
    `image_size`."""
    from timm.data import resolve_data_config

    return resolve_data_config({"input_size": (3, image_size, image_size)}, model=model)


def timm_transforms(model: torch.nn.Module, image_size: int, hflip: bool, auto_augment: str | None) -> tuple:
    """timm's training and evaluation transforms for `model` at `image_size` (`timm_data_config`): random-resized
    crop and flip for training, RandAugment / TrivialAugment by timm's `auto_augment` string (e.g. rand-m9-mstd0.5,
    trivialaugment)."""
    from timm.data import create_transform

    config = timm_data_config(model, image_size)
    train = create_transform(**config, is_training=True, hflip=0.5 if hflip else 0.0, auto_augment=auto_augment)
    return SeededTransform(train), SeededTransform(create_transform(**config, is_training=False))


class TrainKeys:
    """The item keys of every training batch from `start` on, for one process's share of each global batch: a copy
    of the run's sampler replays the batch order (and the reference transform's crop and flip draws, from the same
    generator, as the in-memory path draws them), so the run's own sampler, advanced in step by `next_global`,
    stays the state a checkpoint saves."""

    def __init__(self, sampler: EpochSampler, kind: str, aug: Augmentation, seed: int, start: int, steps: int,
                 rank: int = 0, world_size: int = 1) -> None:  # fmt: skip
        import copy

        self.sampler, self.kind, self.aug, self.seed = copy.deepcopy(sampler), kind, aug, seed
        self.start, self.steps, self.rank, self.world_size = start, steps, rank, world_size

    def __len__(self) -> int:
        return self.steps - self.start

    def __iter__(self) -> Iterator[list]:
        for step in range(self.start, self.steps):
            idx, draws = next_global(self.sampler, self.kind, self.aug, self.seed, step)
            part = share_of_rank(len(idx), self.rank, self.world_size)
            own = range(part.start, part.stop)
            yield [(int(idx[j]), draws[j : j + 1] if isinstance(draws, CropFlip) else draws[j]) for j in own]


def next_global(sampler: EpochSampler, kind: str, aug: Augmentation, seed: int, step: int) -> tuple:
    """The next global batch's positions and per-image draws: crop and flip from the sampler's generator right after
    its order (`reference`, as `augment` draws them), or one seed per image (`timm`)."""
    idx = sampler.next()
    if kind == "reference":
        return idx, draw_crop_flip(len(idx), aug, sampler.generator)
    return idx, [seed_for(seed, "augment", step, j) % 2**63 for j in range(len(idx))]


def loader(images: StreamedImages, batches, workers: int) -> DataLoader:
    """A DataLoader over `images` whose batches are the key lists `batches` yields."""
    return DataLoader(images, batch_sampler=batches, num_workers=workers, collate_fn=collate,
                      persistent_workers=False, prefetch_factor=4 if workers else None)  # fmt: skip


class EvalKeys:
    """Keys of `n` images in order, `batch_size` at a time, with no draws (the evaluation transform)."""

    def __init__(self, n: int, batch_size: int, order: torch.Tensor | None = None) -> None:
        self.order = torch.arange(n) if order is None else order
        self.batch_size = batch_size

    def __len__(self) -> int:
        return -(-len(self.order) // self.batch_size)

    def __iter__(self) -> Iterator[list]:
        for part in self.order.split(self.batch_size):
            yield [(int(i), None) for i in part]


def batches_of(data, aug: Augmentation, device, batch_size: int = 512, order: torch.Tensor | None = None):
    """(normalised images on `device`, labels) of a training or test set, unaugmented, in order (or `order`):
    slices of the uint8 tensor in memory, or decoded by a loader for `StreamedImages`."""
    if isinstance(data, StreamedImages):
        for x, y, _ in loader(data, EvalKeys(len(data), batch_size, order), data.workers):
            yield x.to(device), y
        return
    images, labels = (data.images, data.labels) if order is None else (data.images[order], data.labels[order])
    for x, y in zip(images.split(batch_size), labels.split(batch_size), strict=True):
        yield normalise(x.to(device), aug), y
