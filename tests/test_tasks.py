"""The meta-training task split."""

import pytest
import torch

from timm_metaperturb.training.data import share_of_rank
from timm_metaperturb.training.tasks import make_tasks, parse_classes

LABELS = torch.arange(10).repeat_interleave(30)


def test_class_wise_split():
    tasks = make_tasks(LABELS, num_groups=2, seed=3, classes=parse_classes("0-4"))
    assert len(tasks) == 4
    groups = [set(tasks[0].classes), set(tasks[2].classes)]
    assert groups[0].isdisjoint(groups[1]) and groups[0] | groups[1] == {0, 1, 2, 3, 4}
    for a, b in ((tasks[0], tasks[1]), (tasks[2], tasks[3])):
        assert torch.equal(a.train, b.val) and torch.equal(a.val, b.train), "the swapped pair"
        assert set(a.train.tolist()).isdisjoint(a.val.tolist()), "disjoint halves"
        assert set(LABELS[a.train].tolist()) == set(a.classes) == set(LABELS[a.val].tolist())
    used = torch.cat([t.train for t in tasks] + [t.val for t in tasks])
    assert set(LABELS[used].tolist()) == {0, 1, 2, 3, 4}, "held-out classes 5-9 absent"
    assert tasks[0].remap(LABELS[tasks[0].train]).max() == len(tasks[0].classes) - 1


def test_split_is_deterministic_from_the_seed():
    a, b = make_tasks(LABELS, 3, seed=1), make_tasks(LABELS, 3, seed=1)
    c = make_tasks(LABELS, 3, seed=2)
    assert all(torch.equal(x.train, y.train) and x.classes == y.classes for x, y in zip(a, b, strict=True))
    assert any(not torch.equal(x.train, y.train) for x, y in zip(a, c, strict=True))


def test_instance_wise_split():
    tasks = make_tasks(LABELS, num_groups=5, seed=0, classes=[0, 1, 2], split="instance_wise")
    assert len(tasks) == 10 and all(t.classes == (0, 1, 2) for t in tasks)
    parts = [set(t.train.tolist()) | set(t.val.tolist()) for t in tasks[::2]]
    assert all(p.isdisjoint(q) for i, p in enumerate(parts) for q in parts[i + 1 :])
    assert sum(map(len, parts)) == 90


def test_train_per_class_keeps_n_training_images_of_each_class():
    full = make_tasks(LABELS, num_groups=2, seed=3, classes=parse_classes("0-4"))
    scarce = make_tasks(LABELS, num_groups=2, seed=3, classes=parse_classes("0-4"), train_per_class=4)
    again = make_tasks(LABELS, num_groups=2, seed=3, classes=parse_classes("0-4"), train_per_class=4)
    for f, s, a in zip(full, scarce, again, strict=True):
        assert s.classes == f.classes and torch.equal(s.val, f.val), "validation sets stay whole"
        assert set(s.train.tolist()) <= set(f.train.tolist()), "a subset of the task's own half"
        assert torch.bincount(LABELS[s.train], minlength=10)[list(s.classes)].tolist() == [4] * len(s.classes)
        assert torch.equal(s.train, a.train), "deterministic from the seed"
    capped = make_tasks(LABELS, num_groups=2, seed=3, classes=parse_classes("0-4"), train_per_class=16)
    for f, c in zip(full, capped, strict=True):  # halves hold 10-20 images of a class: the larger ones are cut
        counts = torch.bincount(LABELS[f.train], minlength=10)[list(f.classes)]
        assert torch.bincount(LABELS[c.train], minlength=10)[list(c.classes)].tolist() == counts.clamp(max=16).tolist()
    with pytest.raises(ValueError, match="train_per_class must be at least 1"):
        make_tasks(LABELS, num_groups=2, train_per_class=0)


def test_bad_splits_fail_before_training():
    with pytest.raises(ValueError, match="cannot make 3 class-wise groups"):
        make_tasks(LABELS, num_groups=3, classes=[0, 1, 2, 3, 4])
    with pytest.raises(ValueError, match="fewer than 64 training or validation images"):
        make_tasks(LABELS, num_groups=5, min_images=64)
    with pytest.raises(ValueError, match=r"classes \[12\] have no images"):
        make_tasks(LABELS, num_groups=1, classes=[0, 12])


def test_tasks_and_batches_spread_over_processes():
    for tasks, world in ((10, 1), (10, 2), (10, 3), (6, 4), (2, 2)):
        ranks = [list(range(tasks)[share_of_rank(tasks, r, world)]) for r in range(world)]
        assert [t for r in ranks for t in r] == list(range(tasks))
        assert max(map(len, ranks)) - min(map(len, ranks)) <= 1
