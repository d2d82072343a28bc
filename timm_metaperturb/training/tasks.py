"""Meta-training tasks: the reference's class-wise split of a source dataset, and the homogeneous ablation.

Class-wise (heterogeneous): the classes are shuffled into G groups; each group's images are split in half,
and each half serves once as the training set and once as the validation set, giving T = 2G tasks whose
label spaces differ. Instance-wise (homogeneous, the paper's ablation): the images of all classes are split
into G parts, each part again in half, so every task sees every class. Both are deterministic given a seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SPLITS = ("class_wise", "instance_wise")


@dataclass(frozen=True)
class Task:
    """One meta-training task: its classes (in the task's label order) and its train/validation image indices."""

    index: int
    classes: tuple[int, ...]
    train: torch.Tensor
    val: torch.Tensor

    def remap(self, labels: torch.Tensor) -> torch.Tensor:
        """Dataset labels -> the task's labels 0..len(classes)-1."""
        lookup = torch.full((int(labels.max()) + 1,), -1, dtype=torch.int64)
        lookup[list(self.classes)] = torch.arange(len(self.classes))
        return lookup[labels]


def _halves(indices: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    shuffled = indices[torch.randperm(len(indices), generator=generator)]
    half = len(shuffled) // 2
    return shuffled[:half].sort().values, shuffled[half:].sort().values


def make_tasks(
    labels: torch.Tensor,
    num_groups: int,
    seed: int = 0,
    classes: list[int] | None = None,
    split: str = "class_wise",
    min_images: int = 1,
    train_per_class: int | None = None,
) -> list[Task]:
    """2 * num_groups tasks over the images whose label is in `classes` (default: all).

    `train_per_class` keeps at most that many training images of each class in every task (validation sets stay
    whole), so that the task networks overfit as a data-scarce target's would and φ's validation gradient learns
    to regularise that regime. A class with fewer keeps all it has, so that sources of different sizes can share
    one setting. The tasks' splits are the same with or without it.

    Fails before any training when there are fewer than 2 classes per group, or when a task would have fewer
    than `min_images` training or validation images (a batch needs that many).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    present = sorted(set(labels.tolist()))
    classes = present if classes is None else sorted(set(classes))
    absent = sorted(set(classes) - set(present))
    if absent:
        raise ValueError(f"classes {absent} have no images (the dataset's classes are {present})")
    if num_groups < 1:
        raise ValueError(f"num_groups must be at least 1, got {num_groups}")
    if train_per_class is not None and train_per_class < 1:
        raise ValueError(f"train_per_class must be at least 1, got {train_per_class}")
    if split == "class_wise" and len(classes) < 2 * num_groups:
        raise ValueError(
            f"{len(classes)} classes cannot make {num_groups} class-wise groups of at least 2 classes each: "
            f"use at most {len(classes) // 2} groups, or split='instance_wise'"
        )
    generator = torch.Generator().manual_seed(seed)
    if split == "class_wise":
        order = torch.tensor(classes)[torch.randperm(len(classes), generator=generator)]
        groups = [tuple(sorted(g.tolist())) for g in order.tensor_split(num_groups)]
        parts = [torch.nonzero(torch.isin(labels, torch.tensor(g))).flatten() for g in groups]
    else:
        pool = torch.nonzero(torch.isin(labels, torch.tensor(classes))).flatten()
        pool = pool[torch.randperm(len(pool), generator=generator)]
        groups = [tuple(classes)] * num_groups
        parts = list(pool.tensor_split(num_groups))
    tasks = []
    for group, part in zip(groups, parts, strict=True):
        a, b = _halves(part, generator)
        for train, val in ((a, b), (b, a)):
            tasks.append(Task(len(tasks), group, train, val))
    if train_per_class is not None:
        tasks = [_subsample(t, labels, train_per_class, generator) for t in tasks]
    small = [t.index for t in tasks if min(len(t.train), len(t.val)) < min_images]
    if small:
        raise ValueError(
            f"tasks {small} have fewer than {min_images} training or validation images (the batch size): use "
            "fewer groups, more classes or a smaller batch"
        )
    return tasks


def _subsample(task: Task, labels: torch.Tensor, per_class: int, generator: torch.Generator) -> Task:
    kept = []
    for c in task.classes:
        own = task.train[labels[task.train] == c]
        kept.append(own[torch.randperm(len(own), generator=generator)[:per_class]])
    return Task(task.index, task.classes, torch.cat(kept).sort().values, task.val)


def parse_classes(text: str | None) -> list[int] | None:
    """'0-4' or '0,2,5-7' -> [0, 1, 2, 3, 4] / [0, 2, 5, 6, 7]; None -> None (all classes)."""
    if not text:
        return None
    out: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.strip().partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out
