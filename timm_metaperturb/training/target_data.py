"""The training and test sets of a target run: which images (the class subset, the split, the data-scarce subset),
then held in memory as one uint8 tensor (`to_tensors`) or streamed from their files (`StreamedImages`).

The choice of images depends only on the labels and the seed, so both ways hold the same images in the same order.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import datasets
import numpy as np
import torch

from .data import ImageTensors, load_image_dataset, seed_for, to_tensors
from .streaming import StreamedImages
from .tasks import parse_classes

LOADERS = ("auto", "memory", "stream")
MEMORY_BUDGET = 2 * 1024**3  # bytes of decoded uint8 images above which `auto` streams


@dataclass
class Split:
    """Rows of a loaded dataset and their labels, remapped to the run's classes."""

    ds: datasets.Dataset
    rows: torch.Tensor
    labels: torch.Tensor


@dataclass
class TargetData:
    """The images of a run before any is decoded: its classes and the rows of its training and test sets."""

    class_names: list[str]
    train: Split
    test: Split

    def materialise(self, image_size: int, streamed: bool, transforms: tuple[Callable, Callable] | None = None,
                    workers: int = 0, skip_unreadable: bool = False) -> tuple:  # fmt: skip
        """(train, test) as `ImageTensors` (decoded once, resized to `image_size`) or as `StreamedImages` with
        `transforms` (training, evaluation)."""
        if streamed:
            return tuple(StreamedImages(s.ds, s.rows, s.labels, self.class_names, transforms, workers, skip_unreadable)
                         for s in (self.train, self.test))  # fmt: skip
        held = {}
        for split in (self.train, self.test):
            if id(split.ds) not in held:
                held[id(split.ds)] = to_tensors(split.ds, image_size)
        return tuple(ImageTensors(held[id(s.ds)].images[s.rows], s.labels, self.class_names)
                     for s in (self.train, self.test))  # fmt: skip

    def decoded_bytes(self, image_size: int) -> int:
        return (len(self.train.rows) + len(self.test.rows)) * 3 * image_size**2


def _labels(ds: datasets.Dataset) -> torch.Tensor:
    return torch.as_tensor(np.asarray(ds.select_columns(["label"]).with_format("numpy")[:]["label"]), dtype=torch.int64)


def _kept(ds: datasets.Dataset, classes: list[int] | None) -> Split:
    """The rows of `classes` (all by default), labels renumbered 0.. in the order of `classes`."""
    labels = _labels(ds)
    if classes is None:
        return Split(ds, torch.arange(len(labels)), labels)
    lookup = torch.full((len(ds.features["label"].names),), -1, dtype=torch.int64)
    lookup[classes] = torch.arange(len(classes))
    rows = torch.nonzero(torch.isin(labels, torch.tensor(classes))).flatten()
    return Split(ds, rows, lookup[labels[rows]])


def _per_class(labels: torch.Tensor, generator: torch.Generator) -> list[torch.Tensor]:
    """Each class's indices, shuffled."""
    return [idx[torch.randperm(len(idx), generator=generator)] for idx in (torch.nonzero(labels == c).flatten()
            for c in range(int(labels.max()) + 1))]  # fmt: skip


def _subset(split: Split, positions: list[torch.Tensor]) -> Split:
    order = torch.cat(positions).sort().values
    return Split(split.ds, split.rows[order], split.labels[order])


def select_target_data(cfg) -> TargetData:
    """The training and test images of a run (`TargetConfig`): the dataset's test split, or held out from its
    training split with `val_fraction` (a fraction of each class) and/or `test_rest` (every image not picked for
    training); `max_per_class` keeps that many training images of each class (the data-scarce settings)."""
    classes = parse_classes(cfg.classes)
    ds = load_image_dataset(cfg.dataset, cfg.train_split)
    names = list(ds.features["label"].names)
    if classes and max(classes) >= len(names):
        raise ValueError(f"--classes {cfg.classes}: '{cfg.dataset}' has {len(names)} classes, 0-{len(names) - 1}")
    names = [names[c] for c in classes] if classes else names
    whole = _kept(ds, classes)
    counts = torch.bincount(whole.labels, minlength=len(names))
    empty = [names[c] for c in torch.nonzero(counts == 0).flatten().tolist()]
    if empty:
        raise ValueError(f"classes {empty} have no images in '{cfg.dataset}' ({cfg.train_split}): add images to "
                         "them, or leave them out with --classes")  # fmt: skip
    generator = torch.Generator().manual_seed(seed_for(cfg.seed, "data split"))
    train_idx, test_idx = [], []
    for idx in _per_class(whole.labels, generator):
        held = round(len(idx) * cfg.val_fraction) if cfg.val_fraction else 0
        test_idx.append(idx[:held])
        pool = idx[held:]
        keep = pool[: cfg.max_per_class] if cfg.max_per_class else pool
        train_idx.append(keep)
        if cfg.test_rest:
            test_idx.append(pool[len(keep) :])
    train = _subset(whole, train_idx)
    if cfg.val_fraction or cfg.test_rest:
        test = _subset(whole, test_idx)
    else:
        try:
            test_ds = load_image_dataset(cfg.dataset, cfg.test_split)
        except (ValueError, KeyError) as e:
            raise ValueError(
                f"dataset '{cfg.dataset}' has no '{cfg.test_split}' split ({e}): pass --val-fraction F to hold out a "
                "fraction of each class as the test set, or --test-rest with --max-per-class"
            ) from e
        test = _kept(test_ds, classes)
    if len(test.rows) == 0:
        raise ValueError("the test set is empty: check --val-fraction, --test-rest and --max-per-class")
    return TargetData(names, train, test)
