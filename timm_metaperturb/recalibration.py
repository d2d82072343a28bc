"""Batch-norm statistics re-estimated for MetaPerturb's deterministic evaluation.

A network trained with φ saw noisy features, and its batch-norm running variances include that noise. With the
noise replaced by its expectation (`set_eval_noise(model, "mean")`) the features vary less, so the stale
statistics mis-scale them: the variance shift that dropout causes with batch norm, and what makes a plain
deterministic pass lose accuracy. Passes over training images in the deterministic mode fix it.

The statistics are exact population statistics, independent of how the images are split into batches. Averaging
per-batch statistics (batch norm's `momentum=None`, and `torch.optim.swa_utils.update_bn`) weighs a batch of 8
images like one of 512, and normalises each batch by its own statistics on the way to the next layer, so a small
last batch can skew every layer. Here each layer, in the order the forward pass reaches them, is estimated over
all images with the layers before it already fixed, so every image passes through the same network whatever
batch it is in: one pass per layer, each stopped at that layer.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import nn

BatchNorm = nn.modules.batchnorm._BatchNorm


class _Reached(Exception):
    """Ends a pass once the layer being estimated has seen its input."""


class _Moments:
    """Per-channel count, mean and sum of squared deviations, merged batch by batch (Chan et al.) in float64."""

    def __init__(self) -> None:
        self.count, self.mean, self.m2 = 0, None, None

    def add(self, x: torch.Tensor) -> None:
        values = x.detach().transpose(0, 1).reshape(x.shape[1], -1).double()  # (C, everything else)
        n = values.shape[1]
        mean = values.mean(1)
        m2 = (values - mean[:, None]).square().sum(1)
        if self.mean is None:
            self.count, self.mean, self.m2 = n, mean, m2
            return
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta.square() * (self.count * n / total)
        self.count = total


def _replayable(batches: Iterable[torch.Tensor]) -> Iterable[torch.Tensor]:
    """`batches` as something that can be iterated once per layer: a one-shot iterator is kept in a list."""
    return list(batches) if isinstance(batches, Iterator) else batches


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """Replace every batch-norm layer's running statistics by the mean and (unbiased) variance of its input over all
    images of `batches` (preprocessed inputs on the model's device, e.g. the training images without
    augmentation), the whole model in eval mode, so φ runs as it will at test time. Any split of the same images
    into batches gives the same statistics, to float rounding. `batches` is read once per batch-norm layer: pass a
    list or a DataLoader (a one-shot iterator is held in memory). Returns the number of layers re-estimated (those
    a forward pass reaches); the model is left in eval mode."""
    norms = [m for m in model.modules() if isinstance(m, BatchNorm) and m.track_running_stats]
    model.eval()
    if not norms:
        return 0
    batches = _replayable(batches)
    order: list[BatchNorm] = []  # the norms in the order a forward pass reaches them
    handles = [norm.register_forward_pre_hook(lambda m, _: order.append(m) if m not in order else None)
               for norm in norms]  # fmt: skip
    try:
        first = next(iter(batches), None)
        if first is None:
            raise ValueError("recalibrate_batchnorm needs at least one batch")
        model(first[:1])
    finally:
        for handle in handles:
            handle.remove()
    for norm in order:
        _estimate(model, norm, batches)
    return len(order)


def _estimate(model: nn.Module, norm: BatchNorm, batches: Iterable[torch.Tensor]) -> None:
    """One layer's statistics over all batches, every layer before it already re-estimated."""
    moments = _Moments()

    def record(_module: nn.Module, args: tuple) -> None:
        moments.add(args[0])
        raise _Reached

    handle = norm.register_forward_pre_hook(record)
    try:
        for batch in batches:
            try:
                model(batch)
            except _Reached:
                pass
    finally:
        handle.remove()
    if moments.count < 2:
        raise ValueError(
            f"batch norm {type(norm).__name__}({norm.num_features}) saw {moments.count} value per channel: pass more "
            "images to re-estimate its variance"
        )
    norm.running_mean.copy_(moments.mean)
    norm.running_var.copy_(moments.m2 / (moments.count - 1))
