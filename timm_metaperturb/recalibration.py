"""Batch-norm statistics re-estimated for MetaPerturb's deterministic evaluation.

A network trained with φ saw noisy features, and its batch-norm running variances include that noise. With the
noise replaced by its expectation (`set_eval_noise(model, "mean")`) the features vary less, so the stale
statistics mis-scale them: the variance shift that dropout causes with batch norm, and what makes a plain
deterministic pass lose accuracy. One pass over training images in the deterministic mode fixes it.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """Replace every batch-norm layer's running statistics by their average over `batches` (preprocessed
    inputs, e.g. the training images without augmentation), the rest of the model in eval mode, so φ runs as
    it will at test time. Returns the number of batch-norm layers re-estimated; the model is left in eval mode."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    momenta = [m.momentum for m in norms]
    model.eval()
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average over all batches
        norm.train()
    seen = 0
    for batch in batches:
        model(batch)
        seen += 1
    if norms and not seen:
        raise ValueError("recalibrate_batchnorm needs at least one batch")
    for norm, momentum in zip(norms, momenta, strict=True):
        norm.momentum = momentum
        norm.eval()
    return len(norms)
